"""Calls into the Triton kernels (``sepconv.triton_kernels``), imported on first use.

They run on CUDA tensors, and on CPU tensors when the process set
``TRITON_INTERPRET=1`` before the first use (the interpreter; for tests).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os

import torch
from torch import Tensor

from ._native import memory_format, output_size

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_kernels = None


@functools.cache  # asked on every CUDA call; the answer does not change in a process
def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _load():
    global _kernels
    if _kernels is None:
        _kernels = importlib.import_module("sepconv.triton_kernels")
    return _kernels


def unsupported(x: Tensor) -> str | None:
    """Why the Triton kernels cannot take x, or None if they can."""
    if not installed():
        return "Triton is not installed (pip install 'sepconv[gpu]')"
    if x.dtype not in DTYPES:
        return f"the Triton kernels take float16, bfloat16 and float32, not {x.dtype}"
    if x.device.type == "cuda":
        return None
    if x.device.type != "cpu":
        return f"the Triton kernels do not run on {x.device.type} tensors"
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "CPU tensors run the Triton kernels only under TRITON_INTERPRET=1"
    if not _load().INTERPRET:
        return "TRITON_INTERPRET=1 was set after the Triton kernels were loaded"
    return None


def _on_device(x: Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check_pixels(x: Tensor, Ho: int, Wo: int) -> None:
    # pixel indices are int32 in the kernels (memory offsets are int64)
    if max(x.shape[0] * Ho * Wo, x.shape[0] * x.shape[2] * x.shape[3]) >= 2**31:
        raise ValueError(f"the Triton kernels take fewer than 2^31 pixels per call; got x of "
                         f"shape {tuple(x.shape)}: split the batch")


def forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
            mid_activation, activation, scale=None, norm_eps=None) -> Tensor:
    Ho, Wo = output_size(x, dw_weight, stride, padding, dilation)
    _check_pixels(x, Ho, Wo)
    y = torch.empty((x.shape[0], pw_weight.shape[0], Ho, Wo), dtype=x.dtype, device=x.device,
                    memory_format=memory_format(x))
    with _on_device(x):
        return _load().forward.launch(x, dw_weight, pw_weight, dw_bias, pw_bias, stride,
                                      padding, dilation, mid_activation, activation, y,
                                      scale=scale, norm_eps=norm_eps)


def mean(x, dw_weight, dw_bias, stride, padding, dilation, mid_activation) -> Tensor:
    Ho, Wo = output_size(x, dw_weight, stride, padding, dilation)
    _check_pixels(x, Ho, Wo)
    with _on_device(x):
        return _load().mean.launch(x, dw_weight, dw_bias, stride, padding, dilation,
                                   mid_activation, Ho, Wo)


def backward(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
             mid_activation, activation, output_mask, norm_eps=None) -> tuple[Tensor | None, ...]:
    _check_pixels(x, *grad_y.shape[2:])
    with _on_device(x):
        return _load().backward.launch(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias,
                                       stride, padding, dilation, mid_activation, activation,
                                       output_mask, memory_format(x), norm_eps)
