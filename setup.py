"""Builds the CPU extension sepconv._C from csrc/.

The kernels are compiled once per instruction set (kernels_<isa>.cpp) with that
ISA's flags and picked at run time, so the default build runs on any x86-64 CPU.
Environment switches:
  SEPCONV_NATIVE=1   add -march=native to every file (a build for this machine only)
  SEPCONV_DEBUG=1    -O0 -g instead of -O3
  SEPCONV_SANITIZE=1 AddressSanitizer + UndefinedBehaviorSanitizer (run Python with
                     LD_PRELOAD="$(gcc -print-file-name=libasan.so)")
  SEPCONV_BUILD_JOBS=N compile N files at a time (default: one per core)
"""

import glob
import os
import platform

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

X86 = platform.machine().lower() in ("x86_64", "amd64", "x64")
# -mprfchw: the kernels' prefetches for writing (__builtin_prefetch(p, 1, ...)) emit
# PREFETCHW, not a plain read prefetch (every AVX2 CPU runs it; the oldest as a no-op).
# -falign-loops=64: a hot loop's place in the code moved the GEMM-bound layers by up to
# 6% from one build to the next (the 6x16 micro-kernel's k loop across two or three
# 64-byte lines). Both flags and depthwise.h's seven-column unroll, against none, builds
# alternated, Granite Rapids guest, batch 8, pair-normalised: AVX2 forward 1-4% faster
# in channels-last, 3-10% in NCHW, training 96x56->384 (7x7) 4%. The AVX-512 file keeps
# its flags: its A/B was within noise and its full benchmark run, on a quieter host, was
# 3-8% lower against the pair on the GEMM-bound suites (not yet separated from the host).
LOOPS = ["-mprfchw", "-falign-loops=64"]
ISA_FLAGS = {
    "kernels_avx2.cpp": ["-mavx2", "-mfma", *LOOPS],
    "kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"],
}


def _on(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


class BuildExt(build_ext):
    """Adds each ISA file's target flags to that file only."""

    def build_extensions(self):
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            flags = ISA_FLAGS.get(os.path.basename(src), []) if X86 else []
            return compile_one(obj, src, ext, cc_args, list(extra_postargs) + flags, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()


# The extension's files compile in parallel, one per core unless SEPCONV_BUILD_JOBS says:
# serially, the sanitizer build alone took 7.5 of CI's 25 minutes.
ParallelCompile("SEPCONV_BUILD_JOBS").install()

opt = ["-O0", "-g"] if _on("SEPCONV_DEBUG") else ["-O3"]
native = ["-march=native"] if _on("SEPCONV_NATIVE") else []
sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"] \
    if _on("SEPCONV_SANITIZE") else []
sources = ["csrc/bindings.cpp", "csrc/kernels_generic.cpp"]
if X86:
    sources += ["csrc/kernels_avx2.cpp", "csrc/kernels_avx512.cpp"]

setup(
    ext_modules=[
        Pybind11Extension(
            "sepconv._C",
            sources,
            include_dirs=["csrc"],
            depends=["csrc/sepconv.h", "csrc/kernels.h", *sorted(glob.glob("csrc/kernels/*.h"))],
            cxx_std=17,
            extra_compile_args=opt + native + sanitize + ["-fopenmp", "-ffp-contract=fast"],
            extra_link_args=["-fopenmp"] + sanitize,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
