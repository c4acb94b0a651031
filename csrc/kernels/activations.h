// Activations and their derivatives, scalar and vector.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

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

// d act(z) / dz for silu and hardswish, written so that NaN passes the gradient
// through as torch does (relu and relu6 select in grad_act instead).
template <class T> inline T dact(int a, T z) {
  switch (a) {
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
    case ACT_SILU: return v / (T(1) + exp_vec<T>(-v));
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
  if (a == ACT_SILU) {
    constexpr int L = lanes<T>();
    int64_t i = 0;
    for (; i + L <= n; i += L) storeu(p + i, act_vec<T>(ACT_SILU, loadu(p + i)));
    if (i < n) store_n(p + i, act_vec<T>(ACT_SILU, load_n(p + i, (int)(n - i))), (int)(n - i));
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
  switch (a) {
    case ACT_HARDSWISH: return each([](T v) { return dact(ACT_HARDSWISH, v); });
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = g[i];
  }
}
