// AVX-512 build of the kernels (setup.py compiles this file with -mavx512f ...).
#if defined(__x86_64__) || defined(_M_X64)
#define SEPCONV_NS avx512
#define SEPCONV_VEC_BYTES 64
#include "kernels.h"
#endif
