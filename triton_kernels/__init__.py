"""Triton kernels of sepconv, installed as ``sepconv.triton_kernels``.

``forward.launch``, ``backward.launch`` and ``mean.launch`` take tensors of any strides (x, grad_y)
and dense weights; they run natively on CUDA tensors, and on CPU tensors when the
process started with ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests).
Shapes and arguments are checked by ``sepconv.functional`` before they get here.
"""

from . import backward, forward, mean, norm
from ._common import INTERPRET

__all__ = ["forward", "backward", "mean", "norm", "INTERPRET"]
