// Vector types, integer helpers and the aligned workspace buffer.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

constexpr int VB = SEPCONV_VEC_BYTES;
// Rows of the GEMM micro-tile: MR x 2 accumulators + 2 B vectors + 1 broadcast
// must fit the register file (32 zmm on AVX-512, 16 ymm/xmm otherwise).
constexpr int MR = VB >= 64 ? 12 : 6;
constexpr int NV = 2;  // vectors per micro-tile row

template <class T> struct VecOf;
template <> struct VecOf<float> { typedef float type __attribute__((vector_size(VB))); };
template <> struct VecOf<double> { typedef double type __attribute__((vector_size(VB))); };

template <class T> using V = typename VecOf<T>::type;
template <class T> constexpr int lanes() { return VB / (int)sizeof(T); }
template <class T> constexpr int NR() { return NV * lanes<T>(); }

template <class T> inline V<T> loadu(const T* p) { V<T> v; __builtin_memcpy(&v, p, sizeof v); return v; }
template <class T> inline void storeu(T* p, V<T> v) { __builtin_memcpy(p, &v, sizeof v); }
// Lanes [0, n) of a vector, 0 <= n <= lanes: loaded (the others read as 0) and stored
// (the others left alone in memory), for the channels past the last whole vector of
// an accumulator, where an overlapping whole vector would add some channels twice.
// (The #if tests the macro: VB is a C++ constant, which the preprocessor reads as 0.)
#if SEPCONV_VEC_BYTES == 64
inline __mmask16 lane_mask(int n) { return (__mmask16)((1u << n) - 1); }
inline V<float> load_n(const float* p, int n) {
  return (V<float>)_mm512_maskz_loadu_ps(lane_mask(n), p);
}
inline V<double> load_n(const double* p, int n) {
  return (V<double>)_mm512_maskz_loadu_pd((__mmask8)lane_mask(n), p);
}
inline void store_n(float* p, V<float> v, int n) {
  _mm512_mask_storeu_ps(p, lane_mask(n), (__m512)v);
}
inline void store_n(double* p, V<double> v, int n) {
  _mm512_mask_storeu_pd(p, (__mmask8)lane_mask(n), (__m512d)v);
}
// A whole vector stored around the caches (non-temporal; p aligned to the vector).
inline void stream_store(float* p, V<float> v) { _mm512_stream_ps(p, (__m512)v); }
inline void stream_store(double* p, V<double> v) { _mm512_stream_pd(p, (__m512d)v); }
inline void stream_fence() { _mm_sfence(); }
// Whole-number rounding (to nearest, ties to even) and p * 2^n for whole-number n,
// which VSCALEF saturates to inf and 0 (exp_vec).
inline V<float> round_even(V<float> v) {
  return (V<float>)_mm512_roundscale_ps((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline V<double> round_even(V<double> v) {
  return (V<double>)_mm512_roundscale_pd((__m512d)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline V<float> scale_pow2(V<float> p, V<float> n) {
  return (V<float>)_mm512_scalef_ps((__m512)p, (__m512)n);
}
inline V<double> scale_pow2(V<double> p, V<double> n) {
  return (V<double>)_mm512_scalef_pd((__m512d)p, (__m512d)n);
}
#elif SEPCONV_VEC_BYTES == 32
// AVX2: lane i takes part where the mask lane's sign bit is set, i.e. where i < n.
inline __m256i lane_mask32(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i lane_mask64(int n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
inline V<float> load_n(const float* p, int n) { return (V<float>)_mm256_maskload_ps(p, lane_mask32(n)); }
inline V<double> load_n(const double* p, int n) { return (V<double>)_mm256_maskload_pd(p, lane_mask64(n)); }
inline void store_n(float* p, V<float> v, int n) { _mm256_maskstore_ps(p, lane_mask32(n), (__m256)v); }
inline void store_n(double* p, V<double> v, int n) { _mm256_maskstore_pd(p, lane_mask64(n), (__m256d)v); }
inline void stream_store(float* p, V<float> v) { _mm256_stream_ps(p, (__m256)v); }
inline void stream_store(double* p, V<double> v) { _mm256_stream_pd(p, (__m256d)v); }
inline void stream_fence() { _mm_sfence(); }
#else  // SSE2 / NEON: lane by lane
template <class T> inline V<T> load_n(const T* p, int n) {
  V<T> v{};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
template <class T> inline void store_n(T* p, V<T> v, int n) {
  for (int i = 0; i < n; ++i) p[i] = v[i];
}
template <class T> inline void stream_store(T* p, V<T> v) { storeu(p, v); }
inline void stream_fence() {}
#endif
// Copies N elements, N a compile-time constant (so: vector moves, no call).
template <class T, int64_t N> inline void storeu_n(T* d, const T* s) { __builtin_memcpy(d, s, N * sizeof(T)); }
// s - 0 is an IEEE identity, so this compiles to a bare broadcast; `V<T>{} + s`
// is not (-0 + 0 = +0) and leaves a scalar add in front of every broadcast.
template <class T> inline V<T> bcast(T s) { return s - V<T>{}; }

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
// Row stride (in elements) of a pixel-major buffer of n channels: a multiple of m,
// plus one cache line where rows of 1 KiB or more would be a multiple of `alias`
// bytes apart. Rows a multiple of 1 KiB apart share a few L1 sets (at 4 KiB, Cm =
// 1024 floats, the forward's 12-row micro-tile ran 15% slower): the forward pads
// those. The backward's weight-gradient GEMM reads its stacks a row per k step (228
// rows of 728 channels, 2944 B = 46 lines), and any even line count leaves half the
// sets unused: the stack and its B panel overflowed the ways and ran from L2. So the
// backward pads every even line count (alias 128). Zen 5, batch 32 training step,
// in-process A/B: 728x19 CL 1.04x (AVX2) / 1.12x (AVX-512), 512x14 1.05-1.07x, 256x28
// 1.02-1.07x. Odd lines in the forward too: 0.99-1.11x on five layers, and at
// 384x14->1536 CL 0.86-0.93x against the pair where this rule gave 0.86-0.99x (noise
// either way); the forward keeps its rule.
template <class T> inline int64_t padded_ld(int64_t n, int64_t m, int64_t alias) {
  const int64_t ld = round_up(n, m), bytes = ld * (int64_t)sizeof(T);
  return bytes >= 1024 && bytes % alias == 0 ? ld + 64 / (int64_t)sizeof(T) : ld;
}
// floor(a / b) for b > 0 and any sign of a
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

inline float ex(float v) { return expf(v); }
inline double ex(double v) { return exp(v); }

// e^x in vector arithmetic. silu took libm's exp lane by lane: at 96x112 (stride 2,
// batch 1, Zen 4) the depthwise stage with silu took 0.54 ms, 0.10 ms with relu.
// x = n ln2 + r (Cody-Waite, |r| <= ln2 / 2), e^r by its Taylor polynomial (degree 7
// for float, 13 for double: truncation below 0.1 ulp), 2^n put in the exponent bits
// (AVX-512: by VSCALEF). Beyond [lo, hi] the result is 0 or inf (e^88 is 1.7e38 of
// FLT_MAX's 3.4e38; the kernels flush subnormals anyway); a NaN stays NaN.
template <class T> struct ExpConsts;
template <> struct ExpConsts<float> {
  typedef int32_t I __attribute__((vector_size(VB)));
  static constexpr float lo = -87.0f, hi = 88.0f, magic = 12582912.0f;  // 1.5 * 2^23
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
  static constexpr int degree = 7, mantissa = 23, bias = 127;
};
template <> struct ExpConsts<double> {
  typedef int64_t I __attribute__((vector_size(VB)));
  static constexpr double lo = -708.0, hi = 709.0, magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double ln2_hi = 6.93147180369123816490e-01,
                          ln2_lo = 1.90821492927058770002e-10;
  static constexpr int degree = 13, mantissa = 52, bias = 1023;
};
template <class T> inline V<T> exp_vec(V<T> x) {
  typedef ExpConsts<T> K;
  typedef typename K::I I;
  // AVX-512: n by rounding and 2^n by VSCALEF, which gives inf and 0 beyond the range
  // itself: no integer exponent arithmetic and none of the three selects at the end
  // (silu alone, in L2, one thread: 15 cycles a vector, 19.3 with them; the same bits
  // in range). Its wider clamp only keeps n finite (x = +-inf). A NaN x passes the
  // clamp (its comparisons are false) and stays NaN.
  constexpr bool scalef = VB >= 64;
  const V<T> lo = bcast(scalef ? T(K::lo * 1.2) : K::lo), hi = bcast(scalef ? T(K::hi + 1) : K::hi);
  V<T> xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V<T> magic = bcast(K::magic);
  V<T> n, t;  // n = round(x / ln2); t = magic + n (but on AVX-512)
  if constexpr (scalef) {
    n = round_even(xc * T(1.4426950408889634));
  } else {
    t = xc * T(1.4426950408889634) + magic;  // the magic number's rounding
    n = t - magic;
  }
  const V<T> r = (xc - n * K::ln2_hi) - n * K::ln2_lo;
  // Horner on the coefficients 1/k! (one FMA a degree: 1 + r (1 + r/2 (..)) took a
  // multiply more each, and twice the dependent chain)
  T c[K::degree + 1];
  c[0] = T(1);
  for (int k = 1; k <= K::degree; ++k) c[k] = c[k - 1] / T(k);
  V<T> p = bcast(c[K::degree]);
  for (int k = K::degree - 1; k >= 0; --k) p = p * r + c[k];
  if constexpr (scalef) {
    return scale_pow2(p, n);
  } else {
    const I scale = ((I)t - (I)magic + K::bias) << K::mantissa;    // 2^n
    V<T> e = p * (V<T>)scale;
    e = x < lo ? V<T>{} : e;
    e = x > hi ? bcast(T(__builtin_inf())) : e;
    return x != x ? x : e;
  }
}


// ---------------------------------------------------------------- aligned buffer
// Workspaces are not cleared (they are written before being read); pass zero =
// true for accumulators and for buffers whose padding lanes reach the arithmetic.
// Each buffer of a call takes its own scratch slot, so the memory is reused by the
// next call on this thread (see scratch() in sepconv.h).
template <class T> struct Buf {
  T* p = nullptr;
  bool owned = false;
  Buf(int slot, int64_t n, bool zero = false) {
    size_t bytes = ((size_t)(n > 0 ? n : 1) * sizeof(T) + 63) / 64 * 64;
    p = (T*)scratch(slot, bytes, &owned);
    if (p && zero) memset(p, 0, bytes);
  }
  ~Buf() {
    if (owned) free(p);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// Denormal (subnormal) floats run 10-100x slower through the FMA units (a microcode
// assist per operation). They arise in real training: gradients of 1e-19 times
// activations of 1e-22 sum to 1e-41, and a weight-gradient GEMM whose accumulators
// stay subnormal ran 8-12x slower than on normal data. Where the caller asks for it
// (Geometry::flush_denormals, the default), each thread of a kernel sets FTZ and DAZ
// in MXCSR for its share of the call and restores its previous mode on the way out:
// values under FLT_MIN (DBL_MIN) become zero, as in XNNPACK and TensorFlow, and the
// caller's threads (also PyTorch's) keep their own mode.
struct DenormalMode {
#if defined(__x86_64__) || defined(__i386__)
  unsigned saved;
  explicit DenormalMode(bool flush) : saved(__builtin_ia32_stmxcsr()) {
    if (flush) __builtin_ia32_ldmxcsr(saved | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
  }
  ~DenormalMode() { __builtin_ia32_ldmxcsr(saved); }
#else
  explicit DenormalMode(bool) {}  // other CPUs: IEEE gradual underflow, as given
#endif
  DenormalMode(const DenormalMode&) = delete;
  DenormalMode& operator=(const DenormalMode&) = delete;
};
