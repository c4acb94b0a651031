// Fused depthwise-separable convolution, forward and backward, for one
// instruction set. Included by kernels_<isa>.cpp, which defines SEPCONV_NS (the
// namespace of its entry points) and SEPCONV_VEC_BYTES (its SIMD width) and is
// compiled with that ISA's target flags.
//
// Everything below the entry points lives in an anonymous namespace and uses no
// inline function from a shared header (no std:: templates): a weak symbol
// compiled with AVX-512 flags could otherwise be picked by the linker for the
// generic path and crash an older CPU.
//
// Forward, per tile of output pixels of one image:
//   U  = act1(dw(x) + b_dw)          (tile buffer only, never a full-size tensor)
//   y  = act2(W_pw . U + b_pw)       (register-blocked GEMM, bias + act in the epilogue)
// Backward recomputes U (and the pre-activation of y when act2 is silu or hardswish)
// per tile.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sepconv.h"

namespace sepconv {
namespace SEPCONV_NS {
namespace {

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
// s - 0 is an IEEE identity, so this compiles to a bare broadcast; `V<T>{} + s`
// is not (-0 + 0 = +0) and leaves a scalar add in front of every broadcast.
template <class T> inline V<T> bcast(T s) { return s - V<T>{}; }

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
// Row stride (in elements) for a buffer whose rows are read a few at a time by the
// GEMM: a multiple of 1 KiB puts those rows in the same few L1 sets (at a 4 KiB
// stride, Cm = 1024 floats, the 12-row micro-tile ran 15% slower), so add a line.
template <class T> inline int64_t padded_ld(int64_t n) {
  const int64_t ld = (n + 15) / 16 * 16;
  return (ld * (int64_t)sizeof(T)) % 1024 == 0 ? ld + 64 / (int64_t)sizeof(T) : ld;
}
// floor(a / b) for b > 0 and any sign of a
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

inline float ex(float v) { return expf(v); }
inline double ex(double v) { return exp(v); }

// ---------------------------------------------------------------- activations
// Same formulas and the same NaN behaviour as torch's relu / relu6 (hardtanh) /
// silu / hardswish and their backward kernels.
template <class T> inline T act(int a, T v) {
  switch (a) {
    case ACT_RELU: return v < T(0) ? T(0) : v;
    case ACT_RELU6: return v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
    case ACT_SILU: return v / (T(1) + ex(-v));
    case ACT_HARDSWISH: {
      T t = v + T(3);
      t = t < T(0) ? T(0) : (t > T(6) ? T(6) : t);
      return v * t / T(6);
    }
    default: return v;
  }
}

// d act(z) / dz, written so that NaN passes the gradient through as torch does.
template <class T> inline T dact(int a, T z) {
  switch (a) {
    case ACT_RELU: return z <= T(0) ? T(0) : T(1);
    case ACT_RELU6: return (z <= T(0) || z >= T(6)) ? T(0) : T(1);
    case ACT_SILU: {
      T s = T(1) / (T(1) + ex(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    case ACT_HARDSWISH: return z < T(-3) ? T(0) : (z <= T(3) ? z / T(3) + T(0.5) : T(1));
    default: return T(1);
  }
}

template <class T> inline V<T> act_vec(int a, V<T> v) {
  const V<T> zero = {}, six = zero + T(6);
  switch (a) {
    case ACT_NONE: return v;
    case ACT_RELU: return v < zero ? zero : v;
    case ACT_RELU6: v = v < zero ? zero : v; return v > six ? six : v;
    case ACT_HARDSWISH: {
      V<T> t = v + T(3);
      t = t < zero ? zero : t;
      t = t > six ? six : t;
      return v * t / six;
    }
    default:
      for (int l = 0; l < lanes<T>(); ++l) v[l] = act(a, v[l]);
      return v;
  }
}

// One loop per activation, so that each compiles to vector code.
template <class T> void act_inplace(int a, T* p, int64_t n) {
  auto each = [p, n](auto f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = f(p[i]);
  };
  switch (a) {
    case ACT_RELU: return each([](T v) { return act(ACT_RELU, v); });
    case ACT_RELU6: return each([](T v) { return act(ACT_RELU6, v); });
    case ACT_SILU: return each([](T v) { return act(ACT_SILU, v); });
    case ACT_HARDSWISH: return each([](T v) { return act(ACT_HARDSWISH, v); });
    default: return;
  }
}

// out[i] = g[i] * act'(z[i]), one loop per activation as above; out may be g or z.
template <class T> void grad_act(int a, const T* g, const T* z, T* out, int64_t n) {
  auto each = [=](auto f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = g[i] * f(z[i]);
  };
  switch (a) {
    case ACT_RELU: return each([](T v) { return dact(ACT_RELU, v); });
    case ACT_RELU6: return each([](T v) { return dact(ACT_RELU6, v); });
    case ACT_SILU: return each([](T v) { return dact(ACT_SILU, v); });
    case ACT_HARDSWISH: return each([](T v) { return dact(ACT_HARDSWISH, v); });
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = g[i];
  }
}

// ---------------------------------------------------------------- aligned buffer
// Workspaces are not cleared (they are written before being read); pass zero =
// true for accumulators and for buffers whose padding lanes reach the arithmetic.
template <class T> struct Buf {
  T* p = nullptr;
  explicit Buf(int64_t n, bool zero = false) {
    size_t bytes = ((size_t)(n > 0 ? n : 1) * sizeof(T) + 63) / 64 * 64;
    p = (T*)aligned_alloc(64, bytes);
    if (p && zero) memset(p, 0, bytes);
  }
  ~Buf() { free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// ---------------------------------------------------------------- GEMM
// C[i][j] (i < M, j < N) = epilogue(sum_k A[i][k] B[k][j]).
// A[i][k] = A[i*ars + k*acs]: any layout, read by broadcast.
// B: panels of NR columns; panel q starts at B + q*b_panel, row k at + k*ldb.
//    Every panel is readable for all NR columns (callers pad), so no masking.
// C: C[i][j] at c + i*rs + j.
template <class T> struct Out {
  T* c;
  int64_t rs;
  bool accumulate;      // C += result instead of C = result
  const T* bias;        // the sum starts from it (before the activation)
  int bias_mode;        // 0 none, 1 bias[i] (per row), 2 bias[j] (per column, NR-padded)
  int act;
};

// Stores a micro-tile of NVT full vectors per row. The activation and accumulation
// are template arguments so that the unrolled stores carry no per-vector branches:
// with a short K (32 channels) the epilogue is a good part of the micro-tile's time.
template <class T, int M, int NVT, int A, bool ACC>
inline void store_tile(const V<T> (&acc)[M][NVT], T* c, int64_t rs) {
  constexpr int L = lanes<T>();
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NVT; ++v) {
      V<T> r = acc[i][v];
      if (ACC) r += loadu(c + i * rs + v * L);
      storeu(c + i * rs + v * L, act_vec<T>(A, r));
    }
}

// One micro-tile: rows [i0, i0 + M) by columns [j0, j0 + nr), nr <= NVT * L.
// NVT = 1 serves panels of at most L columns (16 output channels), which would
// otherwise spend half their FMAs on padding.
template <class T, int M, int NVT>
void micro(int64_t K, const T* A, int64_t ars, int64_t acs, const T* B, int64_t ldb,
           const Out<T>& o, int64_t i0, int64_t j0, int64_t nr) {
  constexpr int L = lanes<T>();
  // The accumulators start from the bias, which leaves the epilogue bias-free.
  V<T> acc[M][NVT];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NVT; ++v)
      acc[i][v] = o.bias_mode == 1   ? bcast(o.bias[i0 + i])
                  : o.bias_mode == 2 ? loadu(o.bias + j0 + v * L)
                                     : V<T>{};
  const T* a = A + i0 * ars;
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    V<T> bv[NVT];
    for (int v = 0; v < NVT; ++v) bv[v] = loadu(b + v * L);
    const T* ak = a + k * acs;
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      V<T> ai = bcast(ak[i * ars]);
      for (int v = 0; v < NVT; ++v) acc[i][v] += ai * bv[v];
    }
  }
  T* c = o.c + i0 * o.rs + j0;
  if (nr == NVT * L && (!o.accumulate || o.act == ACT_NONE)) {
    switch (o.accumulate ? -1 : o.act) {
      case -1: return store_tile<T, M, NVT, ACT_NONE, true>(acc, c, o.rs);
      case ACT_RELU: return store_tile<T, M, NVT, ACT_RELU, false>(acc, c, o.rs);
      case ACT_RELU6: return store_tile<T, M, NVT, ACT_RELU6, false>(acc, c, o.rs);
      case ACT_SILU: return store_tile<T, M, NVT, ACT_SILU, false>(acc, c, o.rs);
      case ACT_HARDSWISH: return store_tile<T, M, NVT, ACT_HARDSWISH, false>(acc, c, o.rs);
      default: return store_tile<T, M, NVT, ACT_NONE, false>(acc, c, o.rs);
    }
  }
  // The last, partial panel: whole vectors, then the first nr % L lanes of one
  // through a copy (C has no room past column nr).
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NVT && v * L < nr; ++v) {
      T* cv = c + i * o.rs + v * L;
      const int64_t n = imin(L, nr - v * L);
      V<T> r = acc[i][v];
      if (o.accumulate) {
        V<T> old{};
        __builtin_memcpy(&old, cv, n * sizeof(T));
        r += old;
      }
      r = act_vec<T>(o.act, r);
      __builtin_memcpy(cv, &r, n * sizeof(T));
    }
}

template <class T, int NVT, int M = MR>
void micro_rows(int mr, int64_t K, const T* A, int64_t ars, int64_t acs, const T* B,
                int64_t ldb, const Out<T>& o, int64_t i0, int64_t j0, int64_t nr) {
  if constexpr (M > 1) {
    if (mr < M) return micro_rows<T, NVT, M - 1>(mr, K, A, ars, acs, B, ldb, o, i0, j0, nr);
  }
  micro<T, M, NVT>(K, A, ars, acs, B, ldb, o, i0, j0, nr);
}

// rows_outer: keep an MR-row block of A hot and stream the B panels, or the
// reverse. The caller puts the weight operand in the outer loop so that the
// weights are read once per tile while the tile-sized operand stays in L1/L2.
template <class T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t acs, const T* B,
          int64_t b_panel, int64_t ldb, const Out<T>& o, bool rows_outer) {
  constexpr int64_t nr = NR<T>(), L = lanes<T>();
  const int64_t np = ceil_div(N, nr), nm = ceil_div(M, MR);
  if (M <= 0 || N <= 0) return;
  for (int64_t outer = 0; outer < (rows_outer ? nm : np); ++outer) {
    for (int64_t inner = 0; inner < (rows_outer ? np : nm); ++inner) {
      int64_t q = rows_outer ? inner : outer, ib = rows_outer ? outer : inner;
      int64_t i0 = ib * MR, j0 = q * nr, cols = imin(nr, N - j0);
      int mr = (int)imin(MR, M - i0);
      const T* bq = B + q * b_panel;
      if (cols <= L)
        micro_rows<T, 1>(mr, K, A, ars, acs, bq, ldb, o, i0, j0, cols);
      else
        micro_rows<T, NV>(mr, K, A, ars, acs, bq, ldb, o, i0, j0, cols);
    }
  }
}

// ---------------------------------------------------------------- geometry walkers
// Output range [lo, hi) of ow whose input column ow*s + off lies in [0, W).
inline void valid_range(int64_t W, int64_t s, int64_t off, int64_t* lo, int64_t* hi) {
  *lo = off >= 0 ? 0 : ceil_div(-off, s);
  *hi = W - 1 - off >= 0 ? floor_div(W - 1 - off, s) + 1 : 0;
}

// cols[2j], cols[2j+1]: the valid ow range of tap column j (computed once per call:
// the divisions are too slow for the inner loops).
inline void column_ranges(const Geometry& g, int64_t* cols) {
  for (int64_t j = 0; j < g.kw; ++j) valid_range(g.W, g.sw, j * g.dw - g.pl, cols + 2 * j, cols + 2 * j + 1);
}

// For a tile of flattened output pixels [p0, p1) walk every (output row segment,
// tap) pair that reads inside the input: f(d, i, j, ih, lo, hi, off) where the
// tile-local index of output column ow is d + ow and the input column is ow*sw + off.
template <class F>
void walk_rows(const Geometry& g, const int64_t* cols, int64_t p0, int64_t p1, F&& f) {
  for (int64_t oh = p0 / g.Wo; oh * g.Wo < p1; ++oh) {
    int64_t owa = imax(p0 - oh * g.Wo, 0), owb = imin(p1 - oh * g.Wo, g.Wo);
    int64_t d = oh * g.Wo - p0;
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t lo = imax(cols[2 * j], owa), hi = imin(cols[2 * j + 1], owb);
        if (lo < hi) f(d, i, j, ih, lo, hi, j * g.dw - g.pl);
      }
    }
  }
}

// For each output pixel of [p0, p1) and each tap inside the input:
// f(r, tap, input_pixel) with r the tile-local pixel and input_pixel = ih*W + iw.
template <class F> void walk_pixels(const Geometry& g, int64_t p0, int64_t p1, F&& f) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t oh = p / g.Wo, ow = p % g.Wo;
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t iw = ow * g.sw - g.pl + j * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        f(p - p0, i * g.kw + j, ih * g.W + iw);
      }
    }
  }
}

// ---------------------------------------------------------------- depthwise stage
// NHWC, depth multiplier 1. The taps of output pixel (oh, ow) that read inside the
// input form a rectangle [i0, i1) x [j0, j1). PX pixels of one row (ps apart in x,
// ldu apart in U) times B vectors of channels accumulate in registers over it (at
// least 4 independent FMA chains where the channels allow), and act1 is applied
// before the one store.
template <class T, int PX, int B>
inline int64_t dw_block(const T* x, int64_t ps, int64_t xs_i, int64_t xs_j, const T* w,
                        int64_t ws_i, int64_t Cm, int64_t di, int64_t dj, const T* dwb, int act1,
                        T* u, int64_t ldu, int64_t c) {
  constexpr int L = lanes<T>();
  for (; c + B * L <= Cm; c += B * L) {
    V<T> acc[PX][B];
    for (int b = 0; b < B; ++b) acc[0][b] = dwb ? loadu(dwb + c + b * L) : V<T>{};
    for (int q = 1; q < PX; ++q)
      for (int b = 0; b < B; ++b) acc[q][b] = acc[0][b];
    for (int64_t i = 0; i < di; ++i)
      for (int64_t j = 0; j < dj; ++j) {
        const T* xp = x + i * xs_i + j * xs_j + c;
        const T* wp = w + i * ws_i + j * Cm + c;
        for (int b = 0; b < B; ++b) {
          const V<T> wv = loadu(wp + b * L);
          for (int q = 0; q < PX; ++q) acc[q][b] += loadu(xp + q * ps + b * L) * wv;
        }
      }
    for (int q = 0; q < PX; ++q)
      for (int b = 0; b < B; ++b) storeu(u + q * ldu + c + b * L, act_vec<T>(act1, acc[q][b]));
  }
  return c;
}

template <class T>
void dw_forward_nhwc(const Geometry& g, const int64_t* cols, const T* xn, const T* wt,
                     const T* dwb, int act1, int64_t p0, int64_t p1, T* U, int64_t ldu) {
  constexpr int PX = 4;
  const int64_t Cm = g.Cm, C = g.C, ps = g.sw * C, xs_i = g.dh * g.W * C, xs_j = g.dw * C,
                ws_i = g.kw * Cm;
  // Output columns [ca, cb) see every tap column.
  int64_t ca = 0, cb = g.Wo;
  for (int64_t j = 0; j < g.kw; ++j) ca = imax(ca, cols[2 * j]), cb = imin(cb, cols[2 * j + 1]);
  for (int64_t p = p0; p < p1;) {
    const int64_t oh = p / g.Wo, ow = p % g.Wo;
    int64_t i0 = 0, i1 = g.kh, j0 = 0, j1 = g.kw;
    auto row_ok = [&](int64_t i) { int64_t ih = oh * g.sh - g.pt + i * g.dh; return ih >= 0 && ih < g.H; };
    auto col_ok = [&](int64_t j) { return ow >= cols[2 * j] && ow < cols[2 * j + 1]; };
    while (i0 < i1 && !row_ok(i0)) ++i0;
    while (i1 > i0 && !row_ok(i1 - 1)) --i1;
    while (j0 < j1 && !col_ok(j0)) ++j0;
    while (j1 > j0 && !col_ok(j1 - 1)) --j1;
    if (j0 >= j1) i1 = i0;  // no tap reads inside the input: bias only
    const int64_t di = i1 - i0, dj = j1 - j0;
    const T* x = xn + ((oh * g.sh - g.pt + i0 * g.dh) * g.W + ow * g.sw - g.pl + j0 * g.dw) * C;
    const T* w = wt + (i0 * g.kw + j0) * Cm;
    T* u = U + (p - p0) * ldu;
    // The channels left over after the vector blocks, one at a time.
    auto scalar_tail = [&](int64_t npx, int64_t c0) {
      for (int64_t q = 0; q < npx; ++q)
        for (int64_t c = c0; c < Cm; ++c) {
          T acc = dwb ? dwb[c] : T(0);
          for (int64_t i = 0; i < di; ++i)
            for (int64_t j = 0; j < dj; ++j)
              acc += x[q * ps + i * xs_i + j * xs_j + c] * w[i * ws_i + j * Cm + c];
          u[q * ldu + c] = act(act1, acc);
        }
    };
    const bool block = ow >= ca && ow + PX <= cb && p + PX <= p1;  // PX pixels, same rectangle
    const int64_t npx = block ? PX : 1;
    // Prefetch the input rows that output row oh + 1 adds, under these pixels' columns
    // (to the row's end at its last pixel). The depthwise stage otherwise waits on
    // DRAM: in a network x arrives from cold cache, and the hardware prefetcher
    // ramps up too slowly over tiles of a few rows.
    const int64_t c_lo = ow * g.sw, c_hi = ow + npx == g.Wo ? g.W : imin((ow + npx) * g.sw, g.W);
    for (int64_t ih = imax(oh * g.sh - g.pt + (g.kh - 1) * g.dh + 1, 0),
                 ie = imin((oh + 1) * g.sh - g.pt + (g.kh - 1) * g.dh + 1, g.H);
         ih < ie && c_lo < c_hi; ++ih) {
      const char* r = (const char*)(xn + (ih * g.W + c_lo) * C);
      const int64_t bytes = (c_hi - c_lo) * C * (int64_t)sizeof(T);
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(r + b, 0, 2);  // T1: into L2
    }
    if (block) {
      int64_t c = dw_block<T, PX, 2>(x, ps, xs_i, xs_j, w, ws_i, Cm, di, dj, dwb, act1, u, ldu, 0);
      c = dw_block<T, PX, 1>(x, ps, xs_i, xs_j, w, ws_i, Cm, di, dj, dwb, act1, u, ldu, c);
      scalar_tail(PX, c);
      p += PX;
    } else {
      int64_t c = dw_block<T, 1, 4>(x, ps, xs_i, xs_j, w, ws_i, Cm, di, dj, dwb, act1, u, ldu, 0);
      c = dw_block<T, 1, 1>(x, ps, xs_i, xs_j, w, ws_i, Cm, di, dj, dwb, act1, u, ldu, c);
      scalar_tail(1, c);
      ++p;
    }
  }
}

// act1(depthwise output) of pixels [p0, p1) of image xn into U, applied while the
// tile is still in L1. NHWC: U[r][c] at U + r*ldu (channels contiguous; wt is the
// weight as [tap][Cm]). NCHW: U[c][r] at U + c*ldu (pixels contiguous; dww as [Cm][tap]).
template <class T>
void dw_forward(const Geometry& g, const int64_t* cols, const T* xn, const T* dww, const T* wt,
                const T* dwb, int act1, int64_t p0, int64_t p1, T* U, int64_t ldu) {
  const int64_t P = p1 - p0, Cm = g.Cm, C = g.C, m = g.m, kk = g.kh * g.kw;
  if (g.channels_last && m == 1) return dw_forward_nhwc(g, cols, xn, wt, dwb, act1, p0, p1, U, ldu);
  if (g.channels_last) {
    for (int64_t p = p0; p < p1; ++p) {
      T* u = U + (p - p0) * ldu;
      for (int64_t c = 0; c < Cm; ++c) u[c] = dwb ? dwb[c] : T(0);
      const int64_t oh = p / g.Wo, ow = p % g.Wo;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.sh - g.pt + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t iw = ow * g.sw - g.pl + j * g.dw;
          if (iw < 0 || iw >= g.W) continue;
          const T* xp = xn + (ih * g.W + iw) * C;
          const T* w = wt + (i * g.kw + j) * Cm;
          for (int64_t c = 0; c < Cm; ++c) u[c] += xp[c / m] * w[c];
        }
      }
      act_inplace(act1, u, Cm);
    }
  } else {
    for (int64_t c = 0; c < Cm; ++c) {
      T* u = U + c * ldu;
      const T* xc = xn + (c / m) * g.H * g.W;
      const T* w = dww + c * kk;
      for (int64_t r = 0; r < P; ++r) u[r] = dwb ? dwb[c] : T(0);
      walk_rows(g, cols, p0, p1, [&](int64_t d, int64_t i, int64_t j, int64_t ih, int64_t lo,
                                     int64_t hi, int64_t off) {
        const T wv = w[i * g.kw + j];
        const T* xr = xc + ih * g.W;
        if (g.sw == 1) {
#pragma omp simd
          for (int64_t ow = lo; ow < hi; ++ow) u[d + ow] += wv * xr[ow + off];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) u[d + ow] += wv * xr[ow * g.sw + off];
        }
      });
      act_inplace(act1, u, P);
    }
  }
}

// Depthwise backward for pixels [p0, p1): G holds d loss / d U in U's layout.
// Accumulates into gdw (NHWC: [tap][Cm]; NCHW: [Cm][tap]), gdwb and gxn (any may be null).
template <class T>
void dw_backward(const Geometry& g, const int64_t* cols, const T* xn, const T* dww, const T* wt,
                 const T* G, int64_t ldg, int64_t p0, int64_t p1, T* gdw, T* gdwb, T* gxn) {
  const int64_t P = p1 - p0, Cm = g.Cm, C = g.C, m = g.m, kk = g.kh * g.kw;
  if (g.channels_last) {
    if (gdwb)
      for (int64_t r = 0; r < P; ++r)
        for (int64_t c = 0; c < Cm; ++c) gdwb[c] += G[r * ldg + c];
    if (!gdw && !gxn) return;
    walk_pixels(g, p0, p1, [&](int64_t r, int64_t tap, int64_t ip) {
      const T* gr = G + r * ldg;
      const T* xp = xn + ip * C;
      const T* w = wt + tap * Cm;
      T* gw = gdw ? gdw + tap * Cm : nullptr;
      T* gxp = gxn ? gxn + ip * C : nullptr;
      if (m == 1) {
        if (gw) {
#pragma omp simd
          for (int64_t c = 0; c < Cm; ++c) gw[c] += gr[c] * xp[c];
        }
        if (gxp) {
#pragma omp simd
          for (int64_t c = 0; c < Cm; ++c) gxp[c] += gr[c] * w[c];
        }
      } else {
        if (gw)
          for (int64_t c = 0; c < Cm; ++c) gw[c] += gr[c] * xp[c / m];
        if (gxp)
          for (int64_t c = 0; c < Cm; ++c) gxp[c / m] += gr[c] * w[c];
      }
    });
  } else {
    for (int64_t c = 0; c < Cm; ++c) {
      const T* gc = G + c * ldg;
      if (gdwb) {
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t r = 0; r < P; ++r) s += gc[r];
        gdwb[c] += s;
      }
      if (!gdw && !gxn) continue;
      const int64_t plane = (c / m) * g.H * g.W;
      walk_rows(g, cols, p0, p1, [&](int64_t d, int64_t i, int64_t j, int64_t ih, int64_t lo,
                                     int64_t hi, int64_t off) {
        const int64_t tap = i * g.kw + j, s = g.sw, row = plane + ih * g.W;
        if (gdw) {
          const T* xr = xn + row;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t ow = lo; ow < hi; ++ow) acc += gc[d + ow] * xr[ow * s + off];
          gdw[c * kk + tap] += acc;
        }
        if (gxn) {
          T* gxr = gxn + row;
          const T wv = dww[c * kk + tap];
          for (int64_t ow = lo; ow < hi; ++ow) gxr[ow * s + off] += wv * gc[d + ow];
        }
      });
    }
  }
}

// ---------------------------------------------------------------- packing
// In-register transpose of an L x L block (r[t] = row t): log2(L) stages, each
// swapping the off-diagonal H x H blocks of every 2H x 2H block. The shuffle
// masks are constants after unrolling, so each step is one permute instruction.
template <class T> struct IVecOf;
template <> struct IVecOf<float> { typedef int32_t type __attribute__((vector_size(VB))); };
template <> struct IVecOf<double> { typedef int64_t type __attribute__((vector_size(VB))); };

template <class T, int H = lanes<T>() / 2> inline void transpose(V<T>* r) {
  constexpr int L = lanes<T>();
  typename IVecOf<T>::type lo, hi;
  for (int l = 0; l < L; ++l) {
    lo[l] = (l & H) ? L + l - H : l;
    hi[l] = (l & H) ? L + l : l + H;
  }
  for (int g = 0; g < L; g += 2 * H)
    for (int q = g; q < g + H; ++q) {
      const V<T> a = r[q], b = r[q + H];
      r[q] = __builtin_shuffle(a, b, lo);
      r[q + H] = __builtin_shuffle(a, b, hi);
    }
  if constexpr (H > 1) transpose<T, H / 2>(r);
}

// Panel q of W_pw (Co x Cm, row-major) as B operand of y = U . W^T (NHWC):
// Bp[q][k][jj] = W[q*NR + jj][k], zero padded. Called for each q by the threads.
// Full panels go by L x L register transposes (2.5x faster than element copies
// at 512 x 512); the rest by blocks of 16 k, so that each source line is read
// whole and the destination rows stay in L1.
template <class T> void pack_wt_panel(const T* w, int64_t Co, int64_t Cm, int64_t q, T* Bp) {
  constexpr int64_t nr = NR<T>(), L = lanes<T>();
  T* panel = Bp + q * Cm * nr;
  const int64_t cols = imin(nr, Co - q * nr);
  const T* wq = w + q * nr * Cm;
  int64_t k0 = 0;
  if (cols == nr)
    for (; k0 + L <= Cm; k0 += L)
      for (int64_t h = 0; h < NV; ++h) {
        V<T> r[L];
        for (int64_t t = 0; t < L; ++t) r[t] = loadu(wq + (h * L + t) * Cm + k0);
        transpose<T>(r);
        for (int64_t t = 0; t < L; ++t) storeu(panel + (k0 + t) * nr + h * L, r[t]);
      }
  for (; k0 < Cm; k0 += 16) {
    const int64_t k1 = imin(k0 + 16, Cm);
    for (int64_t jj = 0; jj < nr; ++jj)
      for (int64_t k = k0; k < k1; ++k) panel[k * nr + jj] = jj < cols ? wq[jj * Cm + k] : T(0);
  }
}

// Pixels per tile: the depthwise tile U (P x Cm) should stay within ~256 KiB of L2,
// and an image's tiles should be equal in size so that the threads finish together.
// unit: the granularity of the GEMM dimension that pixels map to (1 for NHWC, where
// a partial micro-tile row block costs in proportion to its rows). With few tiles
// in all, their number is raised to a multiple of the threads while tiles keep at
// least min_p pixels: 7 tiles on 2 threads leave one idle for a whole tile.
template <class T> int64_t tile_pixels(const Geometry& g, int64_t unit, int64_t min_p) {
  const int64_t HWo = g.Ho * g.Wo;
  const int64_t p = imax(unit, imin((int64_t)(256 * 1024 / sizeof(T)) / imax(g.Cm, 1), 2048));
  int64_t n = ceil_div(HWo, p);
  for (int64_t k = n; g.N * k < 8 * g.threads && ceil_div(HWo, k) >= min_p; ++k)
    if ((g.N * k) % g.threads == 0) {
      n = k;
      break;
    }
  return round_up(ceil_div(HWo, n), unit);
}

// ---------------------------------------------------------------- forward
template <class T>
int forward_impl(const Geometry& g, const T* x, const T* dww, const T* pww, const T* dwb,
                 const T* pwb, T* y) {
  constexpr int64_t nr = NR<T>();
  const int64_t HWo = g.Ho * g.Wo, Cm = g.Cm, Co = g.Co, kk = g.kh * g.kw;
  const bool cl = g.channels_last;
  // NHWC: rows = pixels, columns = output channels; NCHW: the transpose.
  const int64_t P = cl ? tile_pixels<T>(g, 1, 4 * MR) : tile_pixels<T>(g, nr, 2 * nr);
  const int64_t ldu = cl ? padded_ld<T>(Cm) : P;
  const int64_t co_unit = cl ? nr : MR;
  const int64_t pixel_tiles = g.N * ceil_div(HWo, P);
  // Split the output channels too when there are few pixel tiles (batch 1, 7x7):
  // up to two tiles per thread, each holding a share of the weights in L2. Each
  // split recomputes its depthwise tile (k^2/Co extra work).
  int64_t co_splits = imin(ceil_div(2 * g.threads, imax(pixel_tiles, 1)), ceil_div(Co, 4 * co_unit));
  // With few tiles, a count that is not a multiple of the threads leaves one idle.
  while (co_splits < ceil_div(Co, co_unit) && (pixel_tiles * co_splits) % g.threads != 0 &&
         pixel_tiles * co_splits < 8 * g.threads)
    ++co_splits;
  const int64_t co_block = round_up(ceil_div(Co, co_splits), co_unit);
  co_splits = ceil_div(Co, co_block);

  const int64_t npanels = cl ? ceil_div(Co, nr) : 0;
  Buf<T> wt(cl ? kk * Cm : 0), bp(npanels * nr * Cm), bias(round_up(Co, nr), true);
  Buf<int64_t> cols(2 * g.kw);
  const int64_t per_thread = cl ? P * ldu : Cm * ldu;
  Buf<T> ws(g.threads * per_thread);
  if (!wt.p || !bp.p || !bias.p || !ws.p || !cols.p) return OUT_OF_MEMORY;
  column_ranges(g, cols.p);
  if (cl)
    for (int64_t c = 0; c < Cm; ++c)
      for (int64_t t = 0; t < kk; ++t) wt.p[t * Cm + c] = dww[c * kk + t];
  if (pwb)
    for (int64_t co = 0; co < Co; ++co) bias.p[co] = pwb[co];

  const int64_t ntiles = pixel_tiles * co_splits;
#pragma omp parallel num_threads(g.threads)
  {
#pragma omp for schedule(static)
  for (int64_t q = 0; q < npanels; ++q) pack_wt_panel(pww, Co, Cm, q, bp.p);
#pragma omp for schedule(static)
  for (int64_t t = 0; t < ntiles; ++t) {
    T* U = ws.p + omp_get_thread_num() * per_thread;
    // Output-channel block major: with few pixel tiles each thread keeps to one
    // weight block, and unequal pixel tiles are shared out evenly.
    const int64_t cb = t / pixel_tiles, pt = t % pixel_tiles;
    const int64_t n = pt / ceil_div(HWo, P), p0 = (pt % ceil_div(HWo, P)) * P;
    const int64_t p1 = imin(p0 + P, HWo), co0 = cb * co_block, co1 = imin(co0 + co_block, Co);
    const T* xn = x + n * g.C * g.H * g.W;
    dw_forward(g, cols.p, xn, dww, wt.p, dwb, g.act1, p0, p1, U, ldu);
    if (cl) {
      Out<T> o{y + (n * HWo + p0) * Co + co0, Co, false, bias.p + co0, pwb ? 2 : 0, g.act2};
      gemm(p1 - p0, co1 - co0, Cm, U, ldu, (int64_t)1, bp.p + (co0 / nr) * Cm * nr, Cm * nr,
           nr, o, false);
    } else {
      Out<T> o{y + (n * Co + co0) * HWo + p0, HWo, false, bias.p + co0, pwb ? 1 : 0, g.act2};
      gemm(co1 - co0, p1 - p0, Cm, pww + co0 * Cm, Cm, (int64_t)1, U, nr, ldu, o, true);
    }
  }
  }
  return OK;
}

// ---------------------------------------------------------------- backward
template <class T>
int backward_impl(const Geometry& g, const T* gy, const T* y, const T* x, const T* dww,
                  const T* pww, const T* dwb, const T* pwb, const Grads<T>& out) {
  constexpr int64_t nr = NR<T>();
  const int64_t HWo = g.Ho * g.Wo, Cm = g.Cm, Co = g.Co, kk = g.kh * g.kw, T_ = g.threads;
  const bool cl = g.channels_last;
  const bool need_g = out.x || out.dw_weight || out.dw_bias;  // d loss / d U needed
  const bool from_y = y && (g.act2 == ACT_RELU || g.act2 == ACT_RELU6);
  // Tiles are bands of R whole output rows. Bands b and b+2 read disjoint input
  // rows when (R + 1) * sh > (kh - 1) * dh, so the even bands, then the odd ones,
  // can scatter into grad_x in parallel without races and in a fixed order.
  const int64_t r_min = imax(1, (g.kh - 1) * g.dh / g.sh);
  const int64_t R = imin(imax(r_min, ceil_div(64, g.Wo)), imax(g.Ho, 1));
  const int64_t P = R * g.Wo, nb = ceil_div(g.Ho, R);
  const int64_t ldm = round_up(Cm, nr), ldo = round_up(Co, nr), ldp = round_up(P, nr);

  // The weight gradient sums GZ^T . M over all pixels. Per tile its K is one band
  // (49 pixels at 7x7), so each call streamed the Co x Cm accumulator from L3 for
  // little work; NHWC keeps the M and GZ of KS consecutive tiles of a thread side by
  // side and runs that GEMM once per KS tiles, with K of about 256 pixels.
  const int64_t KS = cl ? imax(1, 256 / P) : 1;
  // Per-thread tile buffers: U, dL/dU (G), KS x act1(U) (M), KS x dL/dz (GZ), and
  // U^T (NCHW only).
  const int64_t sU = cl ? P * ldm : Cm * ldp, sGZ = cl ? P * ldo : Co * ldp;
  const int64_t sMT = cl ? 0 : P * ldm;
  const int64_t per_thread = (2 + KS) * sU + KS * sGZ + sMT;
  // Per-thread gradient accumulators, reduced in thread order at the end.
  const int64_t sacc = Co * Cm + kk * Cm + Cm + Co;
  Buf<T> ws(T_ * per_thread), acc(T_ * sacc, true), wt(cl ? kk * Cm : 0), bp(cl ? ldo * Cm : 0),
      wpad(cl ? Co * ldm : 0), bias(ldo, true);
  Buf<int64_t> cols(2 * g.kw);
  if (!ws.p || !acc.p || !wt.p || !bp.p || !wpad.p || !bias.p || !cols.p) return OUT_OF_MEMORY;
  column_ranges(g, cols.p);
  if (cl) {
    for (int64_t c = 0; c < Cm; ++c)
      for (int64_t t = 0; t < kk; ++t) wt.p[t * Cm + c] = dww[c * kk + t];
    for (int64_t q = 0; q < ldo / nr; ++q) pack_wt_panel(pww, Co, Cm, q, bp.p);
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t c = 0; c < Cm; ++c) wpad.p[co * ldm + c] = pww[co * Cm + c];
  }
  if (pwb)
    for (int64_t co = 0; co < Co; ++co) bias.p[co] = pwb[co];

#pragma omp parallel num_threads(g.threads)
  {
    const int tid = omp_get_thread_num();
    T* U = ws.p + tid * per_thread;
    T* G = U + sU;
    T* Ms = G + sU;
    T* GZs = Ms + KS * sU;
    T* MT = GZs + KS * sGZ;
    T* a_pw = acc.p + tid * sacc;
    int64_t stacked = 0;  // pixels (NHWC) in Ms / GZs whose weight gradient is pending
    auto flush_pw = [&] {  // gW[co][c] += sum_p GZ[p][co] * M[p][c] over the stack
      if (out.pw_weight && stacked) {
        Out<T> o{a_pw, Cm, true, nullptr, 0, ACT_NONE};
        gemm(Co, Cm, stacked, GZs, (int64_t)1, ldo, Ms, nr, ldm, o, false);
      }
      stacked = 0;
    };
    T* a_dw = a_pw + Co * Cm;
    T* a_dwb = a_dw + kk * Cm;
    T* a_pwb = a_dwb + Cm;
    for (int phase = 0; phase < 2; ++phase) {
      const int64_t per_n = (nb + 1 - phase) / 2;
#pragma omp for schedule(static)
      for (int64_t t = 0; t < g.N * per_n; ++t) {
        const int64_t n = t / per_n, band = 2 * (t % per_n) + phase;
        const int64_t p0 = band * P, p1 = imin(p0 + P, HWo), np = p1 - p0;
        if (stacked + P > KS * P) flush_pw();  // NCHW: KS = 1 and stacked stays 0
        T* M = Ms + stacked * ldm;  // act1(U)
        T* GZ = GZs + stacked * ldo;
        const T* xn = x + n * g.C * g.H * g.W;
        T* gxn = out.x ? out.x + n * g.C * g.H * g.W : nullptr;
        dw_forward(g, cols.p, xn, dww, wt.p, dwb, ACT_NONE, p0, p1, U, cl ? ldm : ldp);
        // M = act1(U); rows of M are pixels (NHWC) or channels (NCHW)
        const int64_t rows_u = cl ? np : Cm, ldu = cl ? ldm : ldp, cols_u = cl ? Cm : np;
        for (int64_t r = 0; r < rows_u; ++r) {
          for (int64_t c = 0; c < cols_u; ++c) M[r * ldu + c] = U[r * ldu + c];
          act_inplace(g.act1, M + r * ldu, cols_u);
        }
        // GZ = dL/dz where z = W.M + b. relu'(z) and relu6'(z) equal relu'(y) and
        // relu6'(y) exactly (NaN included), so with y at hand z is not recomputed;
        // silu and hardswish need z itself.
        const int64_t rows_z = cl ? np : Co, cols_z = cl ? Co : np, ldz = cl ? ldo : ldp;
        const int64_t off = cl ? (n * HWo + p0) * Co : n * Co * HWo + p0;
        const T* gyt = gy + off;
        const T* yt = from_y ? y + off : nullptr;
        const int64_t gy_rs = cl ? Co : HWo;
        if (g.act2 != ACT_NONE && !from_y) {
          if (cl) {
            Out<T> o{GZ, ldo, false, bias.p, pwb ? 2 : 0, ACT_NONE};
            gemm(np, Co, Cm, M, ldm, (int64_t)1, bp.p, Cm * nr, nr, o, false);
          } else {
            Out<T> o{GZ, ldp, false, bias.p, pwb ? 1 : 0, ACT_NONE};
            gemm(Co, np, Cm, pww, Cm, (int64_t)1, M, nr, ldp, o, true);
          }
        }
        for (int64_t r = 0; r < rows_z; ++r)
          grad_act(g.act2, gyt + r * gy_rs, from_y ? yt + r * gy_rs : GZ + r * ldz,
                   GZ + r * ldz, cols_z);
        if (out.pw_bias)
          for (int64_t r = 0; r < rows_z; ++r) {
            const T* z = GZ + r * ldz;
            if (cl) {
#pragma omp simd
              for (int64_t c = 0; c < cols_z; ++c) a_pwb[c] += z[c];
            } else {
              for (int64_t c = 0; c < cols_z; ++c) a_pwb[r] += z[c];
            }
          }
        if (cl) {
          stacked += np;  // its weight gradient waits for flush_pw
        } else if (out.pw_weight) {  // gW[co][c] += sum_p GZ[co][p] * M^T[p][c]
          for (int64_t c = 0; c < Cm; ++c)
            for (int64_t r = 0; r < np; ++r) MT[r * ldm + c] = M[c * ldp + r];
          Out<T> o{a_pw, Cm, true, nullptr, 0, ACT_NONE};
          gemm(Co, Cm, np, GZ, ldp, (int64_t)1, MT, nr, ldm, o, true);
        }
        if (!need_g) continue;
        // G = dL/dU = (W^T . GZ) * act1'(U)
        if (cl) {
          Out<T> o{G, ldm, false, nullptr, 0, ACT_NONE};
          gemm(np, Cm, Co, GZ, ldo, (int64_t)1, wpad.p, nr, ldm, o, false);
        } else {
          Out<T> o{G, ldp, false, nullptr, 0, ACT_NONE};
          gemm(Cm, np, Co, pww, (int64_t)1, Cm, GZ, nr, ldp, o, false);
        }
        if (g.act1 != ACT_NONE)
          for (int64_t r = 0; r < rows_u; ++r)
            grad_act(g.act1, G + r * ldu, U + r * ldu, G + r * ldu, cols_u);
        dw_backward(g, cols.p, xn, dww, wt.p, G, ldu, p0, p1, out.dw_weight ? a_dw : nullptr,
                    out.dw_bias ? a_dwb : nullptr, gxn);
      }
    }
    flush_pw();
  }
  // Deterministic reduction of the per-thread accumulators, in thread order.
  for (int64_t t = 0; t < T_; ++t) {
    const T* a_pw = acc.p + t * sacc;
    const T* a_dw = a_pw + Co * Cm;
    const T* a_dwb = a_dw + kk * Cm;
    const T* a_pwb = a_dwb + Cm;
    if (out.pw_weight)
      for (int64_t i = 0; i < Co * Cm; ++i) out.pw_weight[i] = (t ? out.pw_weight[i] : T(0)) + a_pw[i];
    if (out.dw_weight)  // NHWC accumulates [tap][Cm]; the result is [Cm][tap]
      for (int64_t c = 0; c < Cm; ++c)
        for (int64_t k = 0; k < kk; ++k)
          out.dw_weight[c * kk + k] =
              (t ? out.dw_weight[c * kk + k] : T(0)) + (cl ? a_dw[k * Cm + c] : a_dw[c * kk + k]);
    if (out.dw_bias)
      for (int64_t c = 0; c < Cm; ++c) out.dw_bias[c] = (t ? out.dw_bias[c] : T(0)) + a_dwb[c];
    if (out.pw_bias)
      for (int64_t co = 0; co < Co; ++co) out.pw_bias[co] = (t ? out.pw_bias[co] : T(0)) + a_pwb[co];
  }
  return OK;
}

}  // namespace

template <class T>
int forward(const Geometry& g, const T* x, const T* dww, const T* pww, const T* dwb,
            const T* pwb, T* y) {
  return forward_impl(g, x, dww, pww, dwb, pwb, y);
}

template <class T>
int backward(const Geometry& g, const T* gy, const T* y, const T* x, const T* dww, const T* pww,
             const T* dwb, const T* pwb, const Grads<T>& out) {
  return backward_impl(g, gy, y, x, dww, pww, dwb, pwb, out);
}

template int forward<float>(const Geometry&, const float*, const float*, const float*,
                            const float*, const float*, float*);
template int forward<double>(const Geometry&, const double*, const double*, const double*,
                             const double*, const double*, double*);
template int backward<float>(const Geometry&, const float*, const float*, const float*,
                             const float*, const float*, const float*, const float*,
                             const Grads<float>&);
template int backward<double>(const Geometry&, const double*, const double*, const double*,
                              const double*, const double*, const double*, const double*,
                              const Grads<double>&);

// FMA throughput probe: independent chains of vector FMAs, enough of them to hide
// the FMA latency. Returns GFLOP/s over all threads (2 flops per lane per FMA).
double fma_probe(int threads, int64_t iters) {
  // 8 chains cover the FMA latency x pipes of current cores; 16 only where the
  // 32-register file holds them without spilling (AVX-512).
  constexpr int CH = VB >= 64 ? 16 : 8, L = lanes<float>();
  double start = omp_get_wtime();
  float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    V<float> acc[CH];
    for (int c = 0; c < CH; ++c) acc[c] = V<float>{} + (float)(omp_get_thread_num() + c);
    V<float> a = V<float>{} + 0.999999f, b = V<float>{} + 1e-7f;
    for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
      for (int c = 0; c < CH; ++c) acc[c] = acc[c] * a + b;
    }
    for (int c = 0; c < CH; ++c)
      for (int l = 0; l < L; ++l) sink += acc[c][l];
  }
  double secs = omp_get_wtime() - start;
  if (sink == 12345.f) secs += 1e-9;  // consume the result
  return 2.0 * L * CH * (double)iters * threads / secs / 1e9;
}

}  // namespace SEPCONV_NS
}  // namespace sepconv
