"""Calls into the C++ kernels (sepconv._C) with raw pointers.

This is the only place that turns tensors into addresses, so it owns the
guarantees the kernels rely on: CPU, float32/float64, every tensor dense in the
layout passed to the kernel, and outputs allocated with the right sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import _C
from .reference import ACTIVATIONS

DTYPES = {torch.float32: "float32", torch.float64: "float64"}
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def memory_format(x: Tensor) -> torch.memory_format:
    """The layout the output (and grad_x) of ``x`` gets: channels_last in, channels_last out.

    Where contiguity does not single out one layout (a strided view, a batch of 0,
    C == 1, H == W == 1), the stride order decides.
    """
    nchw, nhwc = x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)
    if nchw != nhwc:
        return torch.contiguous_format if nchw else torch.channels_last
    return torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format


def output_size(x: Tensor, dw_weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    (H, W), (kh, kw) = x.shape[2:], dw_weight.shape[2:]
    top, bottom, left, right = padding
    Ho = (H + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return Ho, Wo


def shuffle_channels(x: Tensor, groups: int, inverse: bool = False) -> Tensor:
    """ShuffleNet's channel shuffle (channels read as a groups x C / groups matrix,
    transposed: F.channel_shuffle), or its inverse (the shuffle of C / groups), in x's
    memory format. Channels-last by F.channel_shuffle, 2.5x faster there than the
    reshape and transpose (8x60x56x56: 0.23 against 0.73 ms; a copy 0.06), which is 2.6x
    faster in NCHW (0.07 against 0.19 ms) and exports to ONNX as standard operators."""
    N, C, H, W = x.shape
    if memory_format(x) == torch.channels_last and not torch.onnx.is_in_onnx_export():
        return F.channel_shuffle(x, C // groups if inverse else groups).contiguous(
            memory_format=torch.channels_last)
    rows = (C // groups, groups) if inverse else (groups, C // groups)
    return x.reshape(N, *rows, H, W).transpose(1, 2).reshape(N, C, H, W)


def supports(x: Tensor) -> bool:
    return _C is not None and x.is_cpu and x.dtype in DTYPES  # (is_cpu: 5x faster than .device)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


_GEOMETRIES: dict = {}  # a layer calls with the same shapes and hyper-parameters every time


def _geometry(x, dw_weight, Co, stride, padding, dilation, fmt, act1, act2):
    """The kernels' geometry tuple, memoised: building it anew was a third of the
    Python around a small layer's kernel call."""
    key = (x.shape, dw_weight.shape, Co, *stride, *padding, *dilation,
           fmt, act1, act2, torch.get_num_threads())
    geom = _GEOMETRIES.get(key)
    if geom is None:
        geom = _build_geometry(x, dw_weight, Co, stride, padding, dilation, fmt, act1, act2)
        if len(_GEOMETRIES) < 4096:
            _GEOMETRIES[key] = geom
    return geom


def _build_geometry(x, dw_weight, Co, stride, padding, dilation, fmt, act1, act2):
    N, C, H, W = x.shape
    top, bottom, left, right = padding
    Ho, Wo = output_size(x, dw_weight, stride, padding, dilation)
    return (N, C, H, W, dw_weight.shape[0] // C, Co, *dw_weight.shape[2:],
            *stride, top, bottom, left, right, *dilation, Ho, Wo,
            fmt == torch.channels_last, ACT_CODES[act1], ACT_CODES[act2], torch.get_num_threads())


def _dense(*ts: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.contiguous() for t in ts]


def forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
            mid_activation, activation, scale=None, y_format=None, pw_groups=1,
            shuffle=1, norm_eps=None, norm_weight=None, norm_bias=None) -> Tensor:
    """scale: (N, C * m) or None, each image's factor for each mid channel. y_format: y's
    memory format (default: x's). pw_groups: the pointwise conv's groups, pw_weight (C_out,
    C * m / pw_groups, 1, 1): the kernel's GEMM is block-diagonal, without zero blocks.
    shuffle: x's channels are read through a channel shuffle of that many groups (NCHW:
    the kernel takes the planes in its order as it copies each input band, and the
    shuffle is never made; channels-last: made here, which measured faster). norm_eps:
    None, or LayerNorm over each pixel's mid channels after act_mid, with that eps and the
    affine norm_weight / norm_bias ((C * m,) or None each)."""
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    if shuffle > 1 and fmt == torch.channels_last:
        x, shuffle = shuffle_channels(x, shuffle), 1
    dw_weight, pw_weight, dw_bias, pw_bias, scale, norm_weight, norm_bias = _dense(
        dw_weight, pw_weight, dw_bias, pw_bias, scale, norm_weight, norm_bias)
    geom = _geometry(x, dw_weight, pw_weight.shape[0], stride, padding, dilation, fmt,
                     mid_activation, activation)
    Ho, Wo = geom[16:18]
    y_format = fmt if y_format is None else y_format
    y = torch.empty((x.shape[0], pw_weight.shape[0], Ho, Wo), dtype=x.dtype,
                    memory_format=y_format)
    _C.forward(geom, DTYPES[x.dtype], _ptr(x), _ptr(dw_weight), _ptr(pw_weight),
               _ptr(dw_bias), _ptr(pw_bias), _ptr(scale), _ptr(y),
               int(y_format == torch.channels_last), pw_groups, shuffle,
               -1.0 if norm_eps is None else norm_eps, _ptr(norm_weight), _ptr(norm_bias))
    return y


_IDENTITY: dict = {}  # (channels, dtype) -> a 1x1 depthwise weight of ones


def forward_from_mid(mid, pw_weight, pw_bias, activation, scale, fmt, pw_groups=1) -> Tensor:
    """The pointwise stage alone, on mid = act_mid(dw(x) + dw_bias) already made (``mean``
    with keep; channels-last): the fused forward with a 1x1 identity depthwise (a copy
    into its tiles), so the same scale and GEMM, and the same bits, as from x. y is made
    in ``fmt``, x's layout, by the kernel (a transposing copy after it took as long as
    the GEMM at 32x112->16 in NCHW)."""
    key = (mid.shape[1], mid.dtype)
    ones = _IDENTITY.get(key)
    if ones is None:
        ones = _IDENTITY[key] = torch.ones((mid.shape[1], 1, 1, 1), dtype=mid.dtype)
    return forward(mid, ones, pw_weight, None, pw_bias, (1, 1), (0, 0, 0, 0), (1, 1), "none",
                   activation, scale=scale, y_format=fmt, pw_groups=pw_groups)


def mean(x, dw_weight, dw_bias, stride, padding, dilation, mid_activation,
         keep=False) -> Tensor | tuple[Tensor, Tensor]:
    """(N, C * m): the mean over the output pixels of act_mid(dw(x) + dw_bias) per image;
    with keep, also that intermediate u (N, C * m, Ho, Wo), channels-last: (mean, u)."""
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    dw_weight, dw_bias = _dense(dw_weight, dw_bias)
    geom = _geometry(x, dw_weight, 1, stride, padding, dilation, fmt, mid_activation, "none")
    out = torch.empty((x.shape[0], dw_weight.shape[0]), dtype=x.dtype)
    u = torch.empty((x.shape[0], dw_weight.shape[0], *geom[16:18]), dtype=x.dtype,
                    memory_format=torch.channels_last) if keep else None
    _C.mean(geom, DTYPES[x.dtype], _ptr(x), _ptr(dw_weight), _ptr(dw_bias), _ptr(out), _ptr(u))
    return (out, u) if keep else out


def backward(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
             mid_activation, activation, output_mask, y=None, scale=None,
             want_scale=False, mid_in=None, want_mid=False,
             pw_groups=1, shuffle=1, norm_eps=None, y_is_z=False, norm_weight=None,
             norm_bias=None, want_norm=(False, False)) -> tuple[Tensor | None, ...]:
    """y: the forward's output, or None; the kernel reads relu' / relu6' from it. scale:
    the forward's (N, C * m) or None. Returns the gradients of (x, dw_weight, pw_weight,
    dw_bias, pw_bias), then of the scale (None unless want_scale) where it is given, then
    with want_mid d loss / d act_mid(dw(x) + dw_bias) (N, C * m, Ho, Wo; channels-last),
    which a later call adds as its mid_in (a squeeze-and-excitation block's mean).
    pw_groups, shuffle, norm_eps, norm_weight, norm_bias: as ``forward``'s (grad_x is x's,
    unshuffled); where norm_weight or norm_bias is given, the gradients of both follow
    the others (None where not given or not in ``want_norm``). y_is_z: y is the
    pre-activation z of the pointwise stage (act2' is read from it: no GEMM to recompute
    it)."""
    fmt = memory_format(x)
    x, grad_y = x.contiguous(memory_format=fmt), grad_y.contiguous(memory_format=fmt)
    groups, unshuffle = shuffle, shuffle > 1 and fmt == torch.channels_last  # (as forward)
    if unshuffle:
        x, shuffle = shuffle_channels(x, groups), 1
    if y is not None:  # read with grad_y's offsets
        if y.shape != grad_y.shape or y.dtype != x.dtype or y.device != x.device:
            raise ValueError(f"y must be like grad_y ({tuple(grad_y.shape)}, {x.dtype}, "
                             f"{x.device}), got {tuple(y.shape)}, {y.dtype}, {y.device}")
        y = y.contiguous(memory_format=fmt)
    dw_weight, pw_weight, dw_bias, pw_bias, scale, norm_weight, norm_bias = _dense(
        dw_weight, pw_weight, dw_bias, pw_bias, scale, norm_weight, norm_bias)
    if mid_in is not None:
        mid_in = mid_in.contiguous(memory_format=torch.channels_last)
    geom = _geometry(x, dw_weight, pw_weight.shape[0], stride, padding, dilation, fmt,
                     mid_activation, activation)
    want_x, want_dw, want_pw, want_dwb, want_pwb = output_mask
    gx = torch.empty_like(x, memory_format=fmt) if want_x else None  # cleared by the kernel
    gdw = torch.empty_like(dw_weight) if want_dw else None
    gpw = torch.empty_like(pw_weight) if want_pw else None
    gdwb = torch.empty_like(dw_bias) if want_dwb and dw_bias is not None else None
    gpwb = torch.empty_like(pw_bias) if want_pwb and pw_bias is not None else None
    gs = torch.empty_like(scale) if want_scale and scale is not None else None
    gmid = torch.empty((x.shape[0], dw_weight.shape[0], *geom[16:18]), dtype=x.dtype,
                       memory_format=torch.channels_last) if want_mid else None
    gnw, gnb = (torch.empty_like(t) if t is not None and want else None
                for t, want in zip((norm_weight, norm_bias), want_norm))
    _C.backward(geom, DTYPES[x.dtype], _ptr(grad_y), _ptr(y), _ptr(x), _ptr(dw_weight),
                _ptr(pw_weight), _ptr(dw_bias), _ptr(pw_bias), _ptr(scale), _ptr(mid_in),
                _ptr(gx), _ptr(gdw), _ptr(gpw), _ptr(gdwb), _ptr(gpwb), _ptr(gs), _ptr(gmid),
                pw_groups, shuffle, -1.0 if norm_eps is None else norm_eps, y_is_z,
                _ptr(norm_weight), _ptr(norm_bias), _ptr(gnw), _ptr(gnb))
    if unshuffle and gx is not None:
        gx = shuffle_channels(gx, groups, inverse=True)
    grads = (gx, gdw, gpw, gdwb, gpwb) + ((gs,) if scale is not None else ())
    if norm_weight is not None or norm_bias is not None:
        grads += (gnw, gnb)
    return grads + (gmid,) if want_mid else grads


def mean_backward(grad, x, dw_weight, dw_bias, stride, padding, dilation, mid_activation,
                  output_mask, mid_in=None) -> tuple[Tensor | None, ...]:
    """Gradients (x, dw_weight, dw_bias) of ``mean`` given grad (N, C * m), by the fused
    backward kernel: the sum of the mean's grad-weighted pixels is the op with one output
    channel, pointwise weight 1 / (Ho * Wo), scale ``grad`` and grad_y 1. Its GEMMs have
    one output channel; the depthwise backward is the work. mid_in: another d loss /
    d act_mid(...) to add (``backward``'s want_mid), so that the one depthwise backward
    gives the gradients of both."""
    Ho, Wo = output_size(x, dw_weight, stride, padding, dilation)
    ones = x.new_ones((x.shape[0], 1, Ho, Wo))  # one channel: NCHW and NHWC alike
    w = x.new_full((1, dw_weight.shape[0], 1, 1), 1.0 / (Ho * Wo))
    need_x, need_dw, need_dwb = output_mask
    gx, gdw, _, gdwb, _, _ = backward(ones, x, dw_weight, w, dw_bias, None, stride, padding,
                                      dilation, mid_activation, "none",
                                      [need_x, need_dw, False, need_dwb, False], scale=grad,
                                      mid_in=mid_in)
    return gx, gdw, gdwb
