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
//   U *= scale[n]                    (optional: squeeze-and-excitation's per-image scale)
//   y  = act2(W_pw . U + b_pw)       (register-blocked GEMM, bias + act in the epilogue)
// Backward recomputes U (and the pre-activation of y when act2 is silu or hardswish)
// per tile, and with a scale also gives its gradient. Mean: the channel means of U per
// image (squeeze-and-excitation's squeeze).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if SEPCONV_VEC_BYTES >= 32
#include <immintrin.h>  // masked loads and stores (vec.h); static inline only
#endif

#include "sepconv.h"

namespace sepconv {
namespace SEPCONV_NS {
namespace {

#include "kernels/vec.h"
#include "kernels/activations.h"
#include "kernels/norm.h"
#include "kernels/pack.h"
#include "kernels/gemm.h"
#include "kernels/depthwise.h"
#include "kernels/forward.h"
#include "kernels/mean.h"
#include "kernels/backward.h"

}  // namespace

template <class T>
int forward(const Geometry& g, const T* x, const T* dww, const T* pww, const T* dwb,
            const T* pwb, const T* scale, const T* lnw, const T* lnb, T* y) {
  return forward_impl(g, x, dww, pww, dwb, pwb, scale, lnw, lnb, y);
}

template <class T>
int mean(const Geometry& g, const T* x, const T* dww, const T* dwb, T* out, T* u) {
  return mean_impl(g, x, dww, dwb, out, u);
}

template <class T>
int backward(const Geometry& g, const T* gy, const T* y, const T* x, const T* dww, const T* pww,
             const T* dwb, const T* pwb, const T* scale, const T* mid_in, const T* lnw,
             const T* lnb, const Grads<T>& out) {
  return backward_impl(g, gy, y, x, dww, pww, dwb, pwb, scale, mid_in, lnw, lnb, out);
}

template int forward<float>(const Geometry&, const float*, const float*, const float*,
                            const float*, const float*, const float*, const float*,
                            const float*, float*);
template int forward<double>(const Geometry&, const double*, const double*, const double*,
                             const double*, const double*, const double*, const double*,
                             const double*, double*);
template int mean<float>(const Geometry&, const float*, const float*, const float*, float*,
                         float*);
template int mean<double>(const Geometry&, const double*, const double*, const double*,
                          double*, double*);
template int backward<float>(const Geometry&, const float*, const float*, const float*,
                             const float*, const float*, const float*, const float*,
                             const float*, const float*, const float*, const float*,
                             const Grads<float>&);
template int backward<double>(const Geometry&, const double*, const double*, const double*,
                              const double*, const double*, const double*, const double*,
                              const double*, const double*, const double*, const double*,
                              const Grads<double>&);

bool backward_splits(const Geometry& g, bool f64) {
  return f64 ? splits_channels<double>(g, band_rows(g))
             : splits_channels<float>(g, band_rows(g));
}

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