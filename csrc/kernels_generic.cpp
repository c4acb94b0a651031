// Baseline build of the kernels: SSE2 on x86-64, NEON on aarch64 (the compiler's
// default target, no extra flags).
#define SEPCONV_NS generic
#define SEPCONV_VEC_BYTES 16
#include "kernels.h"
