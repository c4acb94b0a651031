"""Which implementation runs: the native kernels, Triton, or the PyTorch reference."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

try:
    from . import _C
except ImportError as exc:  # a source checkout without a build, or a broken wheel
    _C = None
    warnings.warn(
        f"sepconv: native CPU kernels unavailable ({exc}); using the PyTorch reference path",
        RuntimeWarning,
        stacklevel=2,
    )

if _C is not None and os.environ.get("SEPCONV_ISA"):
    try:
        _C.set_isa(os.environ["SEPCONV_ISA"])
    except ValueError as exc:
        warnings.warn(f"sepconv: SEPCONV_ISA ignored: {exc}", RuntimeWarning, stacklevel=2)

if _C is not None and os.environ.get("SEPCONV_FLUSH_DENORMAL", "1") == "0":
    _C.set_flush_denormal(False)

if _C is not None and os.environ.get("SEPCONV_HUGE_PAGES", "1") == "0":
    _C.set_huge_pages(False)


def set_huge_pages(mode: bool) -> bool:
    """Whether the native CPU kernels advise their large outputs (``y``, ``grad_x``)
    onto transparent huge pages; returns the previous setting.

    On by default. A fresh output of tens of MiB is a fresh mapping whose 4 KiB pages
    the kernel's threads fault in and clear one by one: 10-13 ms of a 60 ms forward at
    38 MiB. With ``madvise(MADV_HUGEPAGE)`` on the whole 2 MiB pages inside the output
    (Linux, THP mode ``madvise`` or ``always``) the call took 8-10 ms less. PyTorch does the
    same for all its large allocations under ``THP_MEM_ALLOC_ENABLE=1``. The data are
    unaffected; only where the memory comes from changes. ``False`` (or
    ``SEPCONV_HUGE_PAGES=0`` at import) leaves the memory as allocated, e.g. where the
    kernel's huge-page compaction stalls (THP ``defrag`` setting) matter more.
    """
    if _C is None:
        return False
    previous = bool(_C.huge_pages())
    _C.set_huge_pages(bool(mode))
    return previous


def set_flush_denormal(mode: bool) -> bool:
    """Whether the native CPU kernels treat subnormal numbers as zero (FTZ + DAZ on
    their threads, for the duration of a call); returns the previous setting.

    On by default, as in XNNPACK and TensorFlow: subnormal operands cost a microcode
    assist per instruction, and tiny gradients times tiny activations produce them in
    real training (a weight gradient ran 8-12x slower). Values under
    ``torch.finfo(dtype).tiny`` then become zero; all others are unaffected.
    ``False`` (or ``SEPCONV_FLUSH_DENORMAL=0`` at import) keeps IEEE gradual
    underflow, as PyTorch's own CPU ops do unless ``torch.set_flush_denormal(True)``.
    The calling thread's and PyTorch's floating-point modes are never changed.
    """
    if _C is None:
        return False
    previous = bool(_C.flush_denormal())
    _C.set_flush_denormal(bool(mode))
    return previous


BACKENDS = ("auto", "native", "triton", "reference")
_backend = "auto"  # process-wide, like torch.backends flags


def current_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force an implementation inside a ``with`` block.

    - ``"auto"`` (default): the C++ kernels on CPU for float32 / float64, the Triton
      kernels on CUDA for float16 / bfloat16 / float32, the PyTorch reference elsewhere.
    - ``"native"``: the C++ kernels on CPU; raises if they are not built or the dtype
      has none.
    - ``"triton"``: the Triton kernels; raises if triton is missing or the dtype has
      none. On CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter).
    - ``"reference"``: the pure PyTorch ``F.conv2d`` pair.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def backend_info() -> dict:
    """What this installation can run: version, native CPU path and its ISA, threads, GPU."""
    from . import __version__

    return {
        "version": __version__,
        "backend": _backend,
        "cpu_native": _C is not None,
        "cpu_isa": _C.isa() if _C is not None else None,
        "cpu_isas": list(_C.supported_isas()) if _C is not None else [],
        # cache sizes (bytes) the kernels read at load, and the blocking derived from them
        "cpu_caches": dict(_C.blocking()) if _C is not None else None,
        "cpu_flush_denormal": bool(_C.flush_denormal()) if _C is not None else False,
        "cpu_huge_pages": bool(_C.huge_pages()) if _C is not None else False,
        "num_threads": torch.get_num_threads(),
        "triton": importlib.util.find_spec("triton") is not None,
        "cuda": torch.cuda.is_available(),
    }
