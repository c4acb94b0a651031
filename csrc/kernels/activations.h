// Activations and their derivatives, scalar and vector.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

// GELU's constants: 1/sqrt(2), 1/sqrt(2 pi), sqrt(2/pi) and the tanh form's cubic term.
constexpr double kSqrtHalf = 0.70710678118654752440, kInvSqrt2Pi = 0.39894228040143267794,
                 kSqrt2OverPi = 0.79788456080286535588, kGeluCubic = 0.044715;

// Same formulas and the same NaN behaviour as torch's relu / relu6 (hardtanh) /
// silu / hardswish / gelu (both forms) and their backward kernels.
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
    case ACT_GELU: return T(0.5) * v * (T(1) + std::erf(v * T(kSqrtHalf)));
    case ACT_GELU_TANH:
      return T(0.5) * v * (T(1) + std::tanh(T(kSqrt2OverPi) * (v + T(kGeluCubic) * v * v * v)));
    default: return v;
  }
}

// d act(z) / dz for silu and hardswish, written so that NaN passes the gradient
// through as torch does (relu and relu6 select in grad_act instead).
template <class T> inline T dact(int a, T z) {
  switch (a) {
    case ACT_SILU: {
      T s = T(1) / (T(1) + ex(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    case ACT_HARDSWISH: return z < T(-3) ? T(0) : (z <= T(3) ? z / T(3) + T(0.5) : T(1));
    case ACT_GELU:  // Phi(z) + z phi(z)
      return T(0.5) * (T(1) + std::erf(z * T(kSqrtHalf))) +
             z * T(kInvSqrt2Pi) * ex(T(-0.5) * z * z);
    case ACT_GELU_TANH: {  // torch's gelu_backward(approximate="tanh")
      const T t = std::tanh(T(kSqrt2OverPi) * (z + T(kGeluCubic) * z * z * z));
      return T(0.5) * (T(1) + t) +
             T(0.5) * z * (T(1) - t * t) * T(kSqrt2OverPi) * (T(1) + T(3 * kGeluCubic) * z * z);
    }
    default: return T(1);
  }
}

// GELU in float vectors (double takes libm's erf / tanh lane by lane: it is the tests'
// dtype, where the last bits matter, not the speed). Phi(v) = (1 + erf(x)) / 2, x = v /
// sqrt 2, with erf(x) = x P(x^2) / Q(x^2) on |x| <= 4 (P, Q of degree 5, fitted to
// erf's absolute error by Lawson's reweighted least squares: 2e-8 in exact arithmetic,
// 3.5e-7 evaluated in float; GELU's error relative to max(1, |GELU|) 9e-7) and Phi = 0
// below, where torch's float GELU gives -0 as well (|GELU| < 4e-8 there). NaN stays NaN.
// This replaced Abramowitz and Stegun 7.1.26 (erfc = poly(1 / (1 + p s)) e^-s^2), whose
// exp_vec took most of GELU's 22 cycles a vector (a 6x16 micro-tile's epilogue at Zen
// 5's AVX2 path, 46% of its GEMM at 96 channels: 96x56->384 forward 1.24 -> 1.64 ms).
// The rational form, 13 FMAs and a division, took 13 cycles a vector (the same tile, in
// a C++ harness). The derivative still needs e^(-v^2/2) (exp_vec). tanh(a) = 1 - 2 /
// (e^2a + 1), which is +-1 beyond exp_vec's range and NaN for NaN. Returns Phi(v) (exact
// form) or the tanh form's (1 + tanh(a)) / 2, and its derivative's second factor in *d
// (dPhi/dv, or the tanh form's (1 - t^2) a' / 2).
template <class T> [[gnu::always_inline]] inline V<T> gelu_cdf_vec(int a, V<T> v, V<T>* d) {
  if (a == ACT_GELU) {
    const V<T> x = v * T(kSqrtHalf), lo = bcast(T(-4)), hi = bcast(T(4));
    V<T> xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const V<T> t = xc * xc;
    const V<T> p = T(1.1283789773550468) + t * (T(0.1962449538486883) + t * (T(0.05346662845666405) +
                   t * (T(0.004003359023836181) + t * (T(0.0002880158129992434) +
                   t * T(1.9746313731916487e-06)))));
    const V<T> q = T(1) + t * (T(0.5072487294918249) + t * (T(0.11647446321287892) +
                   t * (T(0.015443900317962687) + t * (T(0.0012162522009810687) +
                   t * T(3.747741011282668e-05)))));
    const V<T> cdf = T(0.5) + T(0.5) * (xc * p / q);
    if (d) *d = exp_vec<T>(T(-0.5) * v * v) * T(kInvSqrt2Pi);  // e^(-v^2/2) / sqrt(2 pi)
    return x < lo ? V<T>{} : cdf;
  }
  const V<T> inner = T(kSqrt2OverPi) * (v + T(kGeluCubic) * v * v * v);
  const V<T> t = T(1) - T(2) / (exp_vec<T>(inner + inner) + T(1));
  if (d) *d = T(0.5) * (T(1) - t * t) * T(kSqrt2OverPi) * (T(1) + T(3 * kGeluCubic) * v * v);
  return T(0.5) * (T(1) + t);
}

// f(ActTag<a>{}) with the activation code a as a compile-time constant
// (decltype(tag)::value), for the code that takes it as a template argument so that its
// unrolled stores carry no per-vector switch: the GEMM's epilogues (store_tile, also
// transposed) and the depthwise's runs (dw_run). The one list of the activations there:
// each of those once had its own switch, and an activation missing from one fell to the
// identity (GELU's forward at 16+ output channels, until both switches took it).
template <int A> struct ActTag { static constexpr int value = A; };
template <class F> inline void with_act(int a, F f) {
  switch (a) {
    case ACT_RELU: return f(ActTag<ACT_RELU>{});
    case ACT_RELU6: return f(ActTag<ACT_RELU6>{});
    case ACT_SILU: return f(ActTag<ACT_SILU>{});
    case ACT_HARDSWISH: return f(ActTag<ACT_HARDSWISH>{});
    case ACT_GELU: return f(ActTag<ACT_GELU>{});
    case ACT_GELU_TANH: return f(ActTag<ACT_GELU_TANH>{});
    default: return f(ActTag<ACT_NONE>{});
  }
}

// Always inlined: where `a` is a compile-time constant (the templated epilogues and
// depthwise runs) the switch then folds away. GCC stopped inlining it once GELU's
// rational form made it long, and the depthwise paid a call and a switch per vector
// (Zen 5, AVX2 path, 32x112->16 forward at batch 8, relu6 after the depthwise: 11% of
// the time in act_vec's body).
template <class T> [[gnu::always_inline]] inline V<T> act_vec(int a, V<T> v) {
  const V<T> zero = {}, six = zero + T(6);
  switch (a) {
    case ACT_NONE: return v;
    case ACT_SILU: return v / (T(1) + exp_vec<T>(-v));
    case ACT_RELU: return v < zero ? zero : v;
    case ACT_RELU6: v = v < zero ? zero : v; return v > six ? six : v;
    case ACT_HARDSWISH: {
      V<T> t = v + T(3);
      t = t < zero ? zero : t;
      t = t > six ? six : t;
      return v * t / six;
    }
    case ACT_GELU:
    case ACT_GELU_TANH:
      if constexpr (sizeof(T) == 4) return v * gelu_cdf_vec<T>(a, v, nullptr);
      [[fallthrough]];
    default:
      for (int l = 0; l < lanes<T>(); ++l) v[l] = act(a, v[l]);
      return v;
  }
}

// silu's derivative, in vectors (exp_vec).
template <class T> inline V<T> dsilu_vec(V<T> z) {
  const V<T> s = T(1) / (T(1) + exp_vec<T>(-z));
  return s * (T(1) + z * (T(1) - s));
}

// One loop per activation, so that each compiles to vector code (silu's in explicit
// vectors: its exp would otherwise be libm's, lane by lane).
template <class T> void act_inplace(int a, T* p, int64_t n) {
  auto each = [p, n](auto f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = f(p[i]);
  };
  if (a == ACT_SILU || a == ACT_GELU || a == ACT_GELU_TANH) {
    constexpr int L = lanes<T>();
    int64_t i = 0;
    for (; i + L <= n; i += L) storeu(p + i, act_vec<T>(a, loadu(p + i)));
    if (i < n) store_n(p + i, act_vec<T>(a, load_n(p + i, (int)(n - i))), (int)(n - i));
    return;
  }
  switch (a) {
    case ACT_RELU: return each([](T v) { return act(ACT_RELU, v); });
    case ACT_RELU6: return each([](T v) { return act(ACT_RELU6, v); });
    case ACT_SILU: return each([](T v) { return act(ACT_SILU, v); });
    case ACT_HARDSWISH: return each([](T v) { return act(ACT_HARDSWISH, v); });
    default: return;
  }
}

// out[i] = g[i] * act'(z[i]), one loop per activation as above; out may be g or z.
// relu and relu6 select instead of multiplying, as torch's threshold / hardtanh
// backward do (an infinite g where act' = 0 gives 0, not NaN), in explicit vectors:
// GCC left the AVX2 build's loop scalar and branchy (58% of a 32x112->64 backward,
// 5x the AVX-512 build's time).
template <class T> void grad_act(int a, const T* g, const T* z, T* out, int64_t n) {
  auto each = [=](auto f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = g[i] * f(z[i]);
  };
  if (a == ACT_RELU || a == ACT_RELU6) {
    constexpr int L = lanes<T>();
    const bool six = a == ACT_RELU6;
    const V<T> zero = {}, top = zero + T(6);
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const V<T> zv = loadu(z + i), gv = loadu(g + i);
      auto off = zv <= zero;  // act'(z) = 0 (a NaN z passes g through)
      if (six) off = off | (zv >= top);
      storeu(out + i, off ? zero : gv);
    }
    for (; i < n; ++i) out[i] = z[i] <= T(0) || (six && z[i] >= T(6)) ? T(0) : g[i];
    return;
  }
  if (a == ACT_SILU) {
    constexpr int L = lanes<T>();
    int64_t i = 0;
    for (; i + L <= n; i += L) storeu(out + i, loadu(g + i) * dsilu_vec<T>(loadu(z + i)));
    if (i < n) {
      const int r = (int)(n - i);
      store_n(out + i, load_n(g + i, r) * dsilu_vec<T>(load_n(z + i, r)), r);
    }
    return;
  }
  if ((a == ACT_GELU || a == ACT_GELU_TANH) && sizeof(T) == 4) {  // g * (cdf + v cdf')
    constexpr int L = lanes<T>();
    auto one = [a](V<T> gv, V<T> zv) {
      V<T> d;
      const V<T> c = gelu_cdf_vec<T>(a, zv, &d);
      return gv * (c + zv * d);
    };
    int64_t i = 0;
    for (; i + L <= n; i += L) storeu(out + i, one(loadu(g + i), loadu(z + i)));
    if (i < n) {
      const int r = (int)(n - i);
      store_n(out + i, one(load_n(g + i, r), load_n(z + i, r)), r);
    }
    return;
  }
  switch (a) {
    case ACT_HARDSWISH: return each([](T v) { return dact(ACT_HARDSWISH, v); });
    case ACT_GELU: return each([](T v) { return dact(ACT_GELU, v); });
    case ACT_GELU_TANH: return each([](T v) { return dact(ACT_GELU_TANH, v); });
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = g[i];
  }
}
