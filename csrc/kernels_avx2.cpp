// AVX2 + FMA build of the kernels (setup.py compiles this file with -mavx2 -mfma).
#if defined(__x86_64__) || defined(_M_X64)
#define SEPCONV_NS avx2
#define SEPCONV_VEC_BYTES 32
#include "kernels.h"
#endif
