"""Functional form: checks every argument, then calls the ``sepconv::`` op."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _norm, _ops
from .reference import ACTIVATIONS

__all__ = ["separable_conv2d", "depthwise_mean"]


# Sizes, strides, paddings and dilations past int32 are certainly mistakes, and the larger
# ones would otherwise surface as an opaque overflow inside torch or pybind11.
LIMIT = 2**31


def _pair(value, name: str, minimum: int) -> list[int]:
    items = list(value) if isinstance(value, (tuple, list)) else [value, value]
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(items) >= LIMIT:
        raise ValueError(f"{name} must be < 2**31, got {value!r}")
    return items


def _activation(name, what: str) -> str:
    if name is None:
        return "none"
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"unknown {what} {name!r}; expected None or one of {ACTIVATIONS[1:]}")
    return name.lower()


def resolve_padding(padding, kernel_size, stride, dilation, size=None) -> list[int] | None:
    """[top, bottom, left, right] for an int, a pair, "valid" or "same".

    "same" makes the output ceil(input / stride) as TensorFlow's SAME (and timm's
    Conv2dSame) do: in total max((ceil(i / s) - 1) * s + d * (k - 1) + 1 - i, 0) pixels, the
    odd one at the bottom / right. At stride 1 that is ``nn.Conv2d``'s "same"; at stride > 1
    (which ``nn.Conv2d`` refuses) it depends on the input ``size`` (H, W): None without it.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        if list(stride) != [1, 1] and size is None:
            return None
        pads = []
        for axis, (s, d, k) in enumerate(zip(stride, dilation, kernel_size)):
            i = size[axis] if s != 1 else 1  # at stride 1 the total is d * (k - 1) for any i
            total = max((-(-i // s) - 1) * s + d * (k - 1) + 1 - i, 0)
            pads += [total // 2, total - total // 2]
        return pads
    ph, pw = _pair(padding, "padding", 0)
    return [ph, ph, pw, pw]


def _key(v):
    """A hashable stand-in for a hyper-parameter that keeps its types: True == 1, 1.0 == 1
    and (1, 1) == [1, 1], but only some of them are valid. An int, a str, None or a pair
    of ints stands for itself; anything else becomes a tuple that starts with its type."""
    t = type(v)
    if t is int or t is str or v is None:
        return v
    if t is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v
    if t is tuple or t is list:
        return t, tuple(v), tuple(map(type, v))
    return t, v


def _check_config(stride, padding, dilation, kh: int, kw: int, H: int, W: int, mid_activation,
                  activation) -> tuple:
    """The checked, normalised hyper-parameters of a call: (stride, [top, bottom, left,
    right], dilation, act1, act2)."""
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    pads = resolve_padding(padding, (kh, kw), stride, dilation, (H, W))
    act1 = _activation(mid_activation, "mid_activation")
    act2 = _activation(activation, "activation")
    for size, before, after, d, k, axis in ((H, *pads[:2], dilation[0], kh, "height"),
                                            (W, *pads[2:], dilation[1], kw, "width")):
        if size + before + after < d * (k - 1) + 1:
            raise ValueError(f"kernel {axis} {d * (k - 1) + 1} (dilated) is larger than the "
                             f"padded input {axis} {size + before + after}")
    return tuple(stride), tuple(pads), tuple(dilation), act1, act2


_CALLS: dict = {}  # the signatures of checked calls -> their normalised hyper-parameters


def _signature(x, depthwise_weight, pointwise_weight, bias, depthwise_bias, stride, padding,
               dilation, mid_activation, activation) -> tuple:
    """Everything the checks read: each tensor's type, shape, dtype and device, and each
    hyper-parameter with its type. A call whose signature has passed the checks needs
    no checking again: the full checks were about half of a small layer's time (25 of
    55 us at 16 channels, 4x4). Raises AttributeError or TypeError for what cannot be
    a signature (a non-tensor, an unhashable argument): those calls are checked anew."""
    return (type(x), x.shape, x.dtype, x.device,
            type(depthwise_weight), depthwise_weight.shape, depthwise_weight.dtype,
            depthwise_weight.device,
            None if pointwise_weight is None else (type(pointwise_weight), pointwise_weight.shape,
                                                   pointwise_weight.dtype, pointwise_weight.device),
            None if bias is None else (type(bias), bias.shape, bias.dtype, bias.device),
            None if depthwise_bias is None else (type(depthwise_bias), depthwise_bias.shape,
                                                 depthwise_bias.dtype, depthwise_bias.device),
            _key(stride), _key(padding), _key(dilation), _key(mid_activation), _key(activation))


def _check_tensor(t, name: str, x: Tensor | None, shape: tuple | None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x is not None and t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
    if x is not None and t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"expected {name} of shape {shape}, got {tuple(t.shape)}")


def _autocast(x, *tensors) -> tuple:
    """As autocast treats F.conv2d: float32 tensors are cast to the autocast dtype (the
    kernels still accumulate in fp32); gradients flow back through the cast."""
    _check_tensor(x, "x", None, None)
    if not (torch.amp.is_autocast_available(x.device.type)
            and torch.is_autocast_enabled(x.device.type)):
        return (x, *tensors)
    low = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(low) if isinstance(t, Tensor) and t.dtype == torch.float32 else t
                 for t in (x, *tensors))


def separable_conv2d(
    x: Tensor,
    depthwise_weight: Tensor,
    pointwise_weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    depthwise_bias: Tensor | None = None,
    mid_activation: str | None = None,
    activation: str | None = None,
    scale: Tensor | None = None,
    pointwise_groups: int = 1,
    channel_shuffle: int = 1,
    norm: str | None = None,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    norm_eps: float = 1e-5,
) -> Tensor:
    """Fused ``act(pw(norm(act_mid(dw(x) + depthwise_bias) * scale)) + bias)``.

    Shapes:
        x: (N, C_in, H, W) or unbatched (C_in, H, W)
        depthwise_weight: (C_in * m, 1, kh, kw)  (m: depth multiplier)
        pointwise_weight: (C_out, C_in * m / pointwise_groups, 1, 1)
        bias: (C_out,); depthwise_bias: (C_in * m,)
        returns: (N, C_out, H_out, W_out), in x's memory format

    ``stride``, ``padding`` and ``dilation`` follow ``F.conv2d`` (padding may be
    "same" or "valid"; zeros only: pad other modes with ``F.pad`` first). "same" with
    stride > 1 pads as TensorFlow's SAME: the output is ceil(input / stride).
    ``mid_activation`` / ``activation``: None, "relu", "relu6", "silu", "hardswish", "gelu"
    (exact, erf) or "gelu_tanh" (``F.gelu(approximate="tanh")``).
    ``scale``: (N, C_in * m) (unbatched: (C_in * m,)) or None, a factor per image and mid
    channel applied before the pointwise conv: squeeze-and-excitation's excitation, with
    the mid channels' means from ``depthwise_mean``. Its backward also gives the scale's
    gradient (native: in one kernel call; Triton and the reference: a call per image).
    ``pointwise_groups``: the pointwise conv's groups, as ``nn.Conv2d``'s ``groups`` (both
    C_in * m and C_out divisible by it): output channel block i reads mid channel block i
    only (ShuffleNetV1's group convolutions). The native forward's GEMM skips the zero
    blocks; the backward (every path) and Triton's forward compute them.
    ``channel_shuffle``: x's channels go through ``F.channel_shuffle(x, channel_shuffle)``
    first (read as a g x C_in / g matrix, transposed: ShuffleNetV1's shuffle before its
    depthwise conv; C_in divisible by it; not with ``scale``). The native kernels read x
    through it, so the shuffled tensor is never made; elsewhere it is.
    ``norm="layernorm"``: ``nn.LayerNorm(C_in * m, eps=norm_eps)`` over each pixel's mid
    channels before the pointwise conv (ConvNeXt's block: dw -> LN -> Linear -> GELU),
    its affine ``norm_weight`` / ``norm_bias`` ((C_in * m,) or None): in the tile, with
    statistics in float32 at least; the native kernels apply the affine and sum its
    gradients there too, elsewhere it is folded into the pointwise weight and bias
    (``W * norm_weight``, ``bias + W @ norm_bias``: autograd gives their gradients). Not
    with ``scale``, ``pointwise_groups`` or ``channel_shuffle``.
    """
    if norm is None and norm_weight is None and norm_bias is None:
        return _separable_conv2d(x, depthwise_weight, pointwise_weight, bias, stride, padding,
                                 dilation, depthwise_bias, mid_activation, activation, scale,
                                 None, pointwise_groups, channel_shuffle)
    _check_norm(norm, norm_eps, scale, pointwise_groups, channel_shuffle)
    if isinstance(pointwise_weight, Tensor) and pointwise_weight.dim() == 4:
        mid = pointwise_weight.shape[1]
        for t, name in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
            if t is not None:
                _check_tensor(t, name, pointwise_weight, (mid,))
    return _separable_conv2d(x, depthwise_weight, pointwise_weight, bias, stride, padding,
                             dilation, depthwise_bias, mid_activation, activation, None, None,
                             1, 1, float(norm_eps), norm_weight, norm_bias)


def _check_norm(norm, eps, scale, pointwise_groups, channel_shuffle) -> None:
    if norm != "layernorm":
        raise ValueError(f"norm must be None or 'layernorm', got {norm!r}"
                         + (" (norm_weight / norm_bias given)" if norm is None else ""))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 \
            or eps == float("inf"):
        raise ValueError(f"norm_eps must be a finite float >= 0, got {eps!r}")
    if scale is not None or pointwise_groups != 1 or channel_shuffle != 1:
        raise ValueError("norm='layernorm' does not take scale, pointwise_groups or "
                         "channel_shuffle")


def _separable_conv2d(x, depthwise_weight, pointwise_weight, bias, stride, padding, dilation,
                      depthwise_bias, mid_activation, activation, scale, mid,
                      pointwise_groups=1, channel_shuffle=1, norm_eps=None, norm_weight=None,
                      norm_bias=None) -> Tensor:
    """separable_conv2d; mid: None, or the intermediate from _depthwise_mean(keep=True);
    norm_eps: None, or LayerNorm with that eps and affine (norm_weight, norm_bias)."""
    if torch._C._is_any_autocast_enabled():
        if norm_weight is not None or norm_bias is not None:  # (folded in float32, then cast)
            pointwise_weight, bias = _norm.fold(pointwise_weight, bias, norm_weight, norm_bias)
            norm_weight = norm_bias = None
        x, depthwise_weight, pointwise_weight, bias, depthwise_bias, scale = _autocast(
            x, depthwise_weight, pointwise_weight, bias, depthwise_bias, scale)
    hyper = (stride, padding, dilation, mid_activation, activation)
    try:
        key = _signature(x, depthwise_weight, pointwise_weight, bias, depthwise_bias, *hyper)
        if scale is not None:
            key += (type(scale), scale.shape, scale.dtype, scale.device)
        if pointwise_groups != 1 or channel_shuffle != 1:
            key += ("groups", _key(pointwise_groups), _key(channel_shuffle))
        if norm_eps is not None:
            key += ("norm",)
        config = _CALLS.get(key)
    except (AttributeError, TypeError):  # not a tensor, or unhashable: checked, not kept
        key = config = None
    if config is None:
        _check_tensor(x, "x", None, None)
        if x.dim() == 3:
            if isinstance(scale, Tensor):
                scale = scale.unsqueeze(0)
            return _separable_conv2d(x.unsqueeze(0), depthwise_weight, pointwise_weight, bias,
                                     stride, padding, dilation, depthwise_bias, mid_activation,
                                     activation, scale, mid, pointwise_groups, channel_shuffle,
                                     norm_eps, norm_weight, norm_bias)[0]
        config = _check_call(x, depthwise_weight, pointwise_weight, bias, depthwise_bias, *hyper,
                             pointwise_groups)
        _check_shuffle(channel_shuffle, x.shape[1], scale is not None or mid is not None)
        if scale is not None:
            _check_tensor(scale, "scale", x, (x.shape[0], depthwise_weight.shape[0]))
        if key is not None and len(_CALLS) < 4096:
            _CALLS[key] = config
    return _ops.call(x, depthwise_weight, pointwise_weight, depthwise_bias, bias, *config,
                     _backend.current_backend(), scale, mid, pointwise_groups, channel_shuffle,
                     norm_eps, norm_weight, norm_bias)


def depthwise_mean(
    x: Tensor,
    depthwise_weight: Tensor,
    stride=1,
    padding=0,
    dilation=1,
    *,
    depthwise_bias: Tensor | None = None,
    mid_activation: str | None = None,
) -> Tensor:
    """``act_mid(dw(x) + depthwise_bias).mean((2, 3))`` without the full-size intermediate:
    squeeze-and-excitation's squeeze of a separable conv's mid channels.

    Shapes: x (N, C_in, H, W) or (C_in, H, W); depthwise_weight (C_in * m, 1, kh, kw);
    depthwise_bias (C_in * m,); returns (N, C_in * m) or (C_in * m,). The arguments
    mean what they mean for ``separable_conv2d``. The gradients recompute the
    intermediate, which the forward does not keep.
    """
    return _depthwise_mean(x, depthwise_weight, stride, padding, dilation, depthwise_bias,
                           mid_activation, False)


def _depthwise_mean(x, depthwise_weight, stride, padding, dilation, depthwise_bias,
                    mid_activation, keep):
    """depthwise_mean; with keep, (mean, mid) where mid is the intermediate for
    _separable_conv2d to start from, or None where the kernels do not make it."""
    if torch._C._is_any_autocast_enabled():
        x, depthwise_weight, depthwise_bias = _autocast(x, depthwise_weight, depthwise_bias)
    _check_tensor(x, "x", None, None)
    if x.dim() == 3:
        mean = depthwise_mean(x.unsqueeze(0), depthwise_weight, stride, padding, dilation,
                              depthwise_bias=depthwise_bias, mid_activation=mid_activation)[0]
        return (mean, None) if keep else mean
    try:  # checked calls are remembered, as separable_conv2d's (no pointwise weight: None)
        key = ("mean", *_signature(x, depthwise_weight, None, None, depthwise_bias, stride,
                                   padding, dilation, mid_activation, None))
        config = _CALLS.get(key)
    except (AttributeError, TypeError):
        key = config = None
    if config is None:
        _, kh, kw = _check_depthwise(x, depthwise_weight, depthwise_bias)
        config = _check_config(stride, padding, dilation, kh, kw, *x.shape[2:],
                               mid_activation, None)[:4]
        if key is not None and len(_CALLS) < 4096:
            _CALLS[key] = config
    return _ops.call_mean(x, depthwise_weight, depthwise_bias, *config,
                          _backend.current_backend(), keep)


def excited_conv2d(x, depthwise_weight, pointwise_weight, bias, stride, padding, dilation,
                   depthwise_bias, mid_activation, activation, excitation) -> Tensor:
    """``separable_conv2d(..., scale=excitation(depthwise_mean(...)))``, as SeparableConv2d
    with squeeze-and-excitation runs it: where the native kernels run both passes, the
    mean's pass also stores the intermediate and the conv's starts from it, not from a
    second depthwise (the intermediate is a temporary, as a PyTorch pair's; the backward
    recomputes it from x, and nothing more is saved for it); in training, as one autograd
    node whose backward runs one depthwise backward for both (_ops._NativeExcited).
    Elsewhere two passes over x."""
    if (torch.is_grad_enabled() and isinstance(x, Tensor) and x.dim() == 4
            and not torch._C._is_any_autocast_enabled()):
        # training on the native path: one autograd node, one depthwise backward
        config = _check_call(x, depthwise_weight, pointwise_weight, bias, depthwise_bias, stride,
                             padding, dilation, mid_activation, activation)
        y = _ops.call_excited(x, depthwise_weight, pointwise_weight, depthwise_bias, bias,
                              *config, _backend.current_backend(), excitation)
        if y is not None:
            return y
    mean, mid = _depthwise_mean(x, depthwise_weight, stride, padding, dilation,
                                depthwise_bias, mid_activation, True)
    return _separable_conv2d(x, depthwise_weight, pointwise_weight, bias, stride, padding,
                             dilation, depthwise_bias, mid_activation, activation,
                             excitation(mean), mid)


def _check_depthwise(x, depthwise_weight, depthwise_bias) -> tuple[int, int, int]:
    """Checks x (4 dims) and the depthwise weight and bias; returns (C * m, kh, kw)."""
    if x.dim() != 4:
        raise ValueError(f"expected x with 4 dims (N, C, H, W) or 3 dims (C, H, W), "
                         f"got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    if H == 0 or W == 0:
        raise ValueError(f"x has an empty spatial size {H}x{W}")
    _check_tensor(depthwise_weight, "depthwise_weight", x, None)
    if depthwise_weight.dim() != 4 or depthwise_weight.shape[1] != 1:
        raise ValueError(f"expected depthwise_weight of shape (C_in * m, 1, kh, kw), "
                         f"got {tuple(depthwise_weight.shape)}")
    Cm, _, kh, kw = depthwise_weight.shape
    if C == 0 or Cm == 0 or Cm % C:
        raise ValueError(f"depthwise_weight has {Cm} channels, which is not a positive "
                         f"multiple of the {C} input channels of x")
    if kh == 0 or kw == 0:
        raise ValueError(f"depthwise kernel must be at least 1x1, got {kh}x{kw}")
    if depthwise_bias is not None:
        _check_tensor(depthwise_bias, "depthwise_bias", x, (Cm,))
    return Cm, kh, kw


def _check_positive_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_shuffle(groups, channels: int, scaled: bool) -> None:
    _check_positive_int(groups, "channel_shuffle")
    if channels % groups:
        raise ValueError(f"channel_shuffle={groups} does not divide the {channels} input "
                         "channels")
    if groups > 1 and scaled:
        raise ValueError("channel_shuffle does not go with a scale (squeeze-and-excitation)")


def _check_call(x, depthwise_weight, pointwise_weight, bias, depthwise_bias, stride, padding,
                dilation, mid_activation, activation, groups=1) -> tuple:
    """Checks a call with a tensor x; returns its (stride, [top, bottom, left, right],
    dilation, act1, act2). groups: the pointwise conv's."""
    Cm, kh, kw = _check_depthwise(x, depthwise_weight, depthwise_bias)
    H, W = x.shape[2:]
    _check_tensor(pointwise_weight, "pointwise_weight", x, None)
    _check_positive_int(groups, "pointwise_groups")
    if Cm % groups:
        raise ValueError(f"pointwise_groups={groups} does not divide the {Cm} mid channels")
    if (pointwise_weight.dim() != 4 or pointwise_weight.shape[1:] != (Cm // groups, 1, 1)
            or pointwise_weight.shape[0] == 0 or pointwise_weight.shape[0] % groups):
        out = "C_out" if groups == 1 else f"C_out (a multiple of {groups})"
        raise ValueError(f"expected pointwise_weight of shape ({out}, {Cm // groups}, 1, 1), "
                         f"got {tuple(pointwise_weight.shape)}")
    if bias is not None:
        _check_tensor(bias, "bias", x, (pointwise_weight.shape[0],))
    return _check_config(stride, padding, dilation, kh, kw, H, W, mid_activation, activation)


torch.fx.wrap("separable_conv2d")  # keep them one node in fx-traced models
torch.fx.wrap("depthwise_mean")
