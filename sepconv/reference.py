"""Pure-PyTorch separable convolution: the fallback path on every device.

Forward is the ``F.conv2d`` pair; backward uses aten's own convolution and
activation backward kernels, so both directions have exactly torch's semantics.
``padding`` is (top, bottom, left, right) of zeros; ``mid_activation`` /
``activation`` are names from ``ACTIVATIONS``. ``mean`` is squeeze-and-excitation's
squeeze of the intermediate, and ``mean_backward`` its gradients on every path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish", "gelu", "gelu_tanh")

_FORWARD = {
    "none": lambda t: t,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}

aten = torch.ops.aten
_BACKWARD = {  # (grad_out, pre-activation input) -> grad_in
    "none": lambda g, z: g,
    "relu": lambda g, z: aten.threshold_backward(g, F.relu(z), 0),
    "relu6": lambda g, z: aten.hardtanh_backward(g, z, 0.0, 6.0),
    "silu": aten.silu_backward,
    "hardswish": aten.hardswish_backward,
    "gelu": aten.gelu_backward,
    "gelu_tanh": lambda g, z: aten.gelu_backward(g, z, approximate="tanh"),
}


def _pad(x: Tensor, padding: list[int]) -> Tensor:
    top, bottom, left, right = padding
    return F.pad(x, (left, right, top, bottom)) if any(padding) else x


def layer_norm(mid: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine over the channels of each pixel of (N, C, H, W) mid."""
    return F.layer_norm(mid.permute(0, 2, 3, 1), mid.shape[1:2], eps=eps).permute(0, 3, 1, 2)


def forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
            mid_activation, activation, scale=None, pw_groups=1, norm_eps=None) -> Tensor:
    """scale: (N, C * m) or None, each image's factor for each mid channel; pw_groups: the
    pointwise conv's groups; norm_eps: None, or LayerNorm (no affine) over each pixel's
    mid channels after act_mid, with that eps."""
    top, bottom, left, right = padding
    if top == bottom and left == right:  # conv2d's own padding: one ONNX Conv node
        u = F.conv2d(x, dw_weight, dw_bias, stride, (top, left), dilation, groups=x.shape[1])
    else:
        u = F.conv2d(_pad(x, padding), dw_weight, dw_bias, stride, 0, dilation,
                     groups=x.shape[1])
    mid = _FORWARD[mid_activation](u)
    if scale is not None:
        mid = mid * scale[:, :, None, None]
    if norm_eps is not None:
        mid = layer_norm(mid, norm_eps)
    return _FORWARD[activation](F.conv2d(mid, pw_weight, pw_bias, groups=pw_groups))


def backward(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
             mid_activation, activation, output_mask, norm_eps=None) -> tuple[Tensor | None, ...]:
    """Gradients (x, dw_weight, pw_weight, dw_bias, pw_bias); None where not asked for.
    norm_eps: as ``forward``'s (LayerNorm's backward by aten's own kernel)."""
    need_x, need_dw, need_pw, need_dwb, need_pwb = output_mask
    C, (top, _, left, _) = x.shape[1], padding
    xp = _pad(x, padding)
    u = F.conv2d(xp, dw_weight, dw_bias, stride, 0, dilation, groups=C)
    mid = _FORWARD[mid_activation](u)
    normed = mid
    if norm_eps is not None:  # channels last: LayerNorm's rows
        mid_nhwc = mid.permute(0, 2, 3, 1)
        n_nhwc, mean_, rstd = aten.native_layer_norm(mid_nhwc, mid.shape[1:2], None, None,
                                                     norm_eps)
        normed = n_nhwc.permute(0, 3, 1, 2)
    z = F.conv2d(normed, pw_weight, pw_bias) if activation != "none" else None
    gz = _BACKWARD[activation](grad_y, z)
    gmid, gpw, gpwb = aten.convolution_backward(
        gz, normed, pw_weight, [pw_weight.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [need_x or need_dw or need_dwb, need_pw, need_pwb])
    gx = gdw = gdwb = None
    if norm_eps is not None and gmid is not None:
        gmid = aten.native_layer_norm_backward(
            gmid.permute(0, 2, 3, 1), mid_nhwc, mid.shape[1:2], mean_, rstd, None, None,
            [True, False, False])[0].permute(0, 3, 1, 2)
    if need_x or need_dw or need_dwb:
        gu = _BACKWARD[mid_activation](gmid, u)
        gxp, gdw, gdwb = aten.convolution_backward(
            gu, xp, dw_weight, [dw_weight.shape[0]], list(stride), [0, 0], list(dilation),
            False, [0, 0], C, [need_x, need_dw, need_dwb])
        if need_x:
            gx = gxp[:, :, top:top + x.shape[2], left:left + x.shape[3]]
    return gx, gdw, gpw, gdwb, gpwb


def mean(x, dw_weight, dw_bias, stride, padding, dilation, mid_activation) -> Tensor:
    """(N, C * m): the mean over the output pixels of act_mid(dw(x) + dw_bias)."""
    u = F.conv2d(_pad(x, padding), dw_weight, dw_bias, stride, 0, dilation, groups=x.shape[1])
    return _FORWARD[mid_activation](u).mean((2, 3))


def mean_backward(grad, x, dw_weight, dw_bias, stride, padding, dilation, mid_activation,
                  output_mask) -> tuple[Tensor | None, ...]:
    """Gradients (x, dw_weight, dw_bias) of ``mean`` given grad (N, C * m): each output
    pixel gets grad / (Ho * Wo). The intermediate is recomputed here and dropped: the
    forward keeps nothing of it."""
    need_x, need_dw, need_dwb = output_mask
    C, (top, _, left, _) = x.shape[1], padding
    xp = _pad(x, padding)
    u = F.conv2d(xp, dw_weight, dw_bias, stride, 0, dilation, groups=C)
    gu = (grad / (u.shape[2] * u.shape[3]))[:, :, None, None].expand_as(u)
    gu = _BACKWARD[mid_activation](gu, u).contiguous()
    gxp, gdw, gdwb = aten.convolution_backward(
        gu, xp, dw_weight, [dw_weight.shape[0]], list(stride), [0, 0], list(dilation), False,
        [0, 0], C, [need_x, need_dw, need_dwb])
    gx = gxp[:, :, top:top + x.shape[2], left:left + x.shape[3]] if need_x else None
    return gx, gdw, gdwb if dw_bias is not None else None
