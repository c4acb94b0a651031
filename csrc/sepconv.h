// Shared declarations of the fused separable-convolution CPU kernels.
//
// The kernels see raw pointers and a Geometry only (no torch headers), so the
// extension builds with a plain compiler + pybind11 and survives torch upgrades.
// Every tensor is dense in the layout named by Geometry::channels_last:
//   x, grad_x            (N, C,  H,  W)   NCHW or NHWC
//   y, grad_y            (N, Co, Ho, Wo)  same layout as x
//   dw_weight            (Cm, kh, kw)     contiguous, Cm = C * m
//   pw_weight            (Co, Cm)         contiguous
//   mean's out, scale    (N, Cm)          contiguous (mean: Co is not read); scale or null
//   mean's u             (N, Cm, Ho, Wo)  NHWC whatever x's layout, or null
//   dw_bias / pw_bias    (Cm) / (Co)      contiguous, or null
//   lnw / lnb            (Cm)             LayerNorm's weight / bias, contiguous, or null
#pragma once
#include <cstdint>

namespace sepconv {

enum Act : int {
  ACT_NONE = 0, ACT_RELU = 1, ACT_RELU6 = 2, ACT_SILU = 3, ACT_HARDSWISH = 4,
  ACT_GELU = 5,       // x * Phi(x), the exact (erf) form
  ACT_GELU_TANH = 6,  // torch's approximate="tanh"
  ACT_COUNT = 7
};

struct Geometry {
  int64_t N, C, H, W;     // input
  int64_t m, Cm, Co;      // depth multiplier, mid channels (C * m), output channels
  int64_t groups;         // pointwise groups: output channel block i reads mid channel
                          // block i only
  int64_t shuffle;        // channel shuffle of an NCHW x before the depthwise stage (1:
                          // none): channel i * shuffle + j reads x's j * (C / shuffle) + i
  int64_t kh, kw;         // depthwise kernel
  int64_t sh, sw;         // stride
  int64_t pt, pl;         // top / left zero padding (bottom / right follow from Ho, Wo)
  int64_t dh, dw;         // dilation
  int64_t Ho, Wo;         // output size
  bool channels_last;     // x's layout (and y's, but for the forward's y_channels_last)
  bool y_channels_last;   // the forward's y layout
  int act1, act2;         // activation after the depthwise / pointwise stage
  bool y_is_z;            // the backward's y is z, the pointwise stage's pre-activation
  double norm_eps;        // >= 0: LayerNorm over the mid channels of each pixel after act1,
                          // with this eps and the affine lnw / lnb (kernels/norm.h); < 0: none
  int threads;
  int64_t tile_bytes;     // the forward's depthwise tile budget, from the L2 size (bindings)
  int64_t l2_bytes;       // L2 per core (bindings): bounds what the drivers prefetch
  int64_t l3_bytes;       // last-level cache (bindings): bounds per-thread weight copies
  int64_t stream_bytes;   // a channels-last y of at least this size is stored non-temporally
  bool flush_denormals;   // treat subnormal inputs and results as zero (FTZ + DAZ) in the call
  int backward_mode;      // BACKWARD_AUTO, or one forced for tests and tuning (bindings)
};

// How the backward shares out its work: bands of pixels, or the mid channels
// (kernels/backward.h, splits_channels); AUTO picks by the shape and the threads.
enum BackwardMode : int { BACKWARD_AUTO = 0, BACKWARD_BANDS = 1, BACKWARD_SPLIT = 2 };

// Gradients to compute; a null pointer in Grads means "not wanted".
template <class T>
struct Grads {
  T* x;       // any contents: the kernel clears it band by band before adding into it
  T* dw_weight;
  T* pw_weight;
  T* dw_bias;
  T* pw_bias;
  T* scale;   // (N, Cm): d loss / d scale, for a call with a scale (null: not wanted)
  T* mid;     // (N, Ho, Wo, Cm): d loss / d act1(U) (scaled), for a caller that takes the
              // depthwise gradients later from it (backward's mid_in; null: not wanted)
  T* norm_weight;  // (Cm): LayerNorm's weight and bias (given lnw / lnb; null: not wanted)
  T* norm_bias;
};

// Scratch memory for one kernel call, kept by the calling thread between calls
// (bindings.cpp): memory fresh from the OS costs a page fault per 4 KiB, and the
// workspaces of a 960 -> 320 backward at batch 8 (6 MiB) faulted 1600 times per call,
// a fifth of its time. Returns 64-byte aligned memory for `slot` (< kScratchSlots),
// valid until this thread asks for the same slot again, or null when out of memory.
// Blocks over kScratchKeep bytes are not kept: the caller frees them (owned = true).
constexpr int kScratchSlots = 8;
constexpr size_t kScratchKeep = size_t(64) << 20;
void* scratch(int slot, size_t bytes, bool* owned);

// Status codes returned by the kernels.
constexpr int OK = 0;
constexpr int OUT_OF_MEMORY = 1;

// One set of entry points per instruction set, each compiled in its own
// translation unit with its own target flags (see setup.py).
#define SEPCONV_DECLARE_ISA(ns)                                                            \
  namespace ns {                                                                           \
  template <class T>                                                                       \
  int forward(const Geometry& g, const T* x, const T* dww, const T* pww, const T* dwb,     \
              const T* pwb, const T* scale, const T* lnw, const T* lnb, T* y);             \
  template <class T>                                                                       \
  int mean(const Geometry& g, const T* x, const T* dww, const T* dwb, T* out, T* u);     \
  template <class T>                                                                       \
  int backward(const Geometry& g, const T* gy, const T* y, const T* x, const T* dww,       \
               const T* pww, const T* dwb, const T* pwb, const T* scale, const T* mid_in,  \
               const T* lnw, const T* lnb, const Grads<T>& out);                           \
  bool backward_splits(const Geometry& g, bool f64);                                       \
  double fma_probe(int threads, int64_t iters);                                            \
  }

SEPCONV_DECLARE_ISA(generic)
#if defined(__x86_64__) || defined(_M_X64)
SEPCONV_DECLARE_ISA(avx2)
SEPCONV_DECLARE_ISA(avx512)
#else
namespace avx2 = generic;  // never selected off x86; keeps the dispatch code uniform
namespace avx512 = generic;
#endif

}  // namespace sepconv
