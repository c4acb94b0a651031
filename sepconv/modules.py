"""``SeparableConv2d``: a drop-in for ``nn.Conv2d`` computed as one fused kernel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from .functional import (
    _activation,
    _check_norm,
    _check_positive_int,
    _pair,
    excited_conv2d,
    resolve_padding,
    separable_conv2d,
)

__all__ = ["SeparableConv2d", "Excitation"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
PLAIN_FORWARDS = (nn.Conv2d.forward, nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward)


def fold_norm(weight: Tensor, bias: Tensor | None, norm: nn.Module | None,
              what: str) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a conv followed by an eval-mode batch norm, as one conv:
    w * g / sqrt(var + eps) and (b - mean) * g / sqrt(var + eps) + beta, in float64."""
    if norm is None:
        return weight, bias
    if not isinstance(norm, NORMS):
        raise TypeError(f"{what} must be an nn.BatchNorm2d, got {type(norm).__name__}")
    if norm.training:
        raise ValueError(f"{what} is in training mode: a batch norm that normalises with "
                         "batch statistics cannot be folded into weights; call .eval() first")
    if norm.running_mean is None:
        raise ValueError(f"{what} has track_running_stats=False: it always normalises with "
                         "batch statistics, which cannot be folded into weights")
    if norm.num_features != weight.shape[0]:
        raise ValueError(f"{what} has {norm.num_features} features but the conv before it has "
                         f"{weight.shape[0]} output channels")
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    if bias is not None:
        shift = shift + bias.double() * scale
    w = weight.double() * scale.view(-1, *[1] * (weight.dim() - 1))
    return w.to(weight.dtype), shift.to(weight.dtype)


SE_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish}
SE_GATES = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


class Excitation(nn.Module):
    """Squeeze-and-excitation's excitation, on the mid channels' means: (N, C) -> (N, C)
    (or (C,) -> (C,))
    scales ``gate(fc2(activation(fc1(means))))``, fc1 / fc2 1x1 convs with biases (C -> r
    -> C, torchvision's and timm's SE blocks hold them so). ``SeparableConv2d`` runs it
    between its two kernel calls; the activation and gate may be any modules."""

    def __init__(self, fc1: nn.Conv2d, activation: nn.Module, fc2: nn.Conv2d,
                 gate: nn.Module) -> None:
        super().__init__()
        self.fc1, self.activation, self.fc2, self.gate = fc1, activation, fc2, gate

    def forward(self, means: Tensor) -> Tensor:
        # F.linear on (N, C): the 1x1 convs on (N, C, 1, 1) cost ~20 us more per block
        # at batch 1 (their weights are the same tensors, viewed).
        s = F.linear(means, self.fc1.weight.flatten(1), self.fc1.bias)
        s = F.linear(self.activation(s), self.fc2.weight.flatten(1), self.fc2.bias)
        return self.gate(s)


def pointwise_problem(conv: nn.Conv2d, channels: int) -> str | None:
    """Why ``conv`` is not a 1x1 conv from ``channels`` channels that a fused module can
    take, or None."""
    if conv.kernel_size != (1, 1):
        return f"has kernel {conv.kernel_size}, not 1x1"
    if conv.stride != (1, 1) or conv.padding not in ((0, 0), "valid", "same"):
        return f"has stride {conv.stride} and padding {conv.padding}; it must be 1 and 0"
    if conv.in_channels != channels:
        return f"takes {conv.in_channels} channels, not the {channels} before it"
    return None


class SeparableConv2d(nn.Module):
    """Depthwise ``kernel_size`` conv (``depth_multiplier`` filters per input channel),
    optional ``mid_activation``, then a 1x1 conv to ``out_channels``, optional ``activation``.

    Takes ``nn.Conv2d``'s arguments and gives the same output shape for all of them.
    ``groups`` keeps ``nn.Conv2d``'s position for signature compatibility and must be 1:
    the depthwise stage is grouped per input channel already, and which stage a second
    grouping would apply to is ambiguous. ``pointwise_groups`` groups the 1x1 conv
    (ShuffleNetV1's group convolutions; in_channels * depth_multiplier and out_channels
    divisible by it): output channel block i reads mid channel block i. ``channel_shuffle``
    puts ShuffleNet's channel shuffle (g groups, ``F.channel_shuffle``) before the
    depthwise conv, folded: the native kernels read x through it. ``padding="same"``
    also works with stride > 1 (which ``nn.Conv2d`` refuses): TensorFlow's SAME, as timm's
    Conv2dSame, with the output ceil(input / stride). ``norm="layernorm"`` puts
    ``nn.LayerNorm(in_channels * m, eps=norm_eps)`` over each pixel's mid channels before
    the 1x1 conv, inside the fused kernel (ConvNeXt's dw -> LN -> Linear -> GELU).

    Parameters:
        depthwise_weight: (in_channels * m, 1, kh, kw)
        pointwise_weight: (out_channels, in_channels * m / pointwise_groups, 1, 1)
        bias: (out_channels,) or None
        depthwise_bias: (in_channels * m,) or None (``depthwise_bias=True`` creates it)
        norm_weight, norm_bias: (in_channels * m,), with ``norm="layernorm"`` (else None)

    Shapes: (N, in_channels, H, W) or (in_channels, H, W) -> (N, out_channels, H_out, W_out)
    or (out_channels, H_out, W_out), H_out / W_out as ``nn.Conv2d``.
    """

    # (class defaults: a module pickled before these existed still runs)
    pointwise_groups: int = 1
    channel_shuffle: int = 1
    norm: str | None = None
    norm_eps: float = 1e-5

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        depth_multiplier: int = 1,
        mid_activation: str | None = None,
        activation: str | None = None,
        depthwise_bias: bool = False,
        se_channels: int | None = None,
        se_activation: str = "relu",
        se_gate: str = "sigmoid",
        pointwise_groups: int = 1,
        channel_shuffle: int = 1,
        norm: str | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("depth_multiplier", depth_multiplier),
                            ("pointwise_groups", pointwise_groups),
                            ("channel_shuffle", channel_shuffle)):
            _check_positive_int(value, name)
        if groups != 1:
            raise ValueError(f"SeparableConv2d has no groups (got groups={groups}): its depthwise "
                             "stage is already grouped per input channel; pointwise_groups "
                             "groups the 1x1 conv")
        if (in_channels * depth_multiplier) % pointwise_groups or out_channels % pointwise_groups:
            raise ValueError(f"pointwise_groups={pointwise_groups} must divide the "
                             f"{in_channels * depth_multiplier} mid channels and the "
                             f"{out_channels} out_channels")
        if in_channels % channel_shuffle:
            raise ValueError(f"channel_shuffle={channel_shuffle} must divide the {in_channels} "
                             "in_channels")
        if (pointwise_groups > 1 or channel_shuffle > 1) and se_channels is not None:
            raise ValueError("SeparableConv2d does not take pointwise_groups or channel_shuffle "
                             "with squeeze-and-excitation (se_channels)")
        if norm is not None:
            _check_norm(norm, norm_eps, None, pointwise_groups, channel_shuffle)
            if se_channels is not None:
                raise ValueError("SeparableConv2d does not take norm with squeeze-and-excitation "
                                 "(se_channels)")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(_pair(kernel_size, "kernel_size", 1))
        self.stride = tuple(_pair(stride, "stride", 1))
        self.dilation = tuple(_pair(dilation, "dilation", 1))
        # Validates and gives [top, bottom, left, right], "same" split like nn.Conv2d
        # (None for "same" at stride > 1: it depends on the input size).
        self._pads = resolve_padding(padding, self.kernel_size, list(self.stride),
                                     list(self.dilation))
        self.padding = padding if isinstance(padding, str) else tuple(_pair(padding, "padding", 0))
        self.groups, self.padding_mode, self.depth_multiplier = 1, padding_mode, depth_multiplier
        self.pointwise_groups, self.channel_shuffle = pointwise_groups, channel_shuffle
        self.mid_activation = None if _activation(mid_activation, "mid_activation") == "none" \
            else mid_activation.lower()
        self.activation = None if _activation(activation, "activation") == "none" \
            else activation.lower()

        factory = {"device": device, "dtype": dtype}
        mid = in_channels * depth_multiplier
        self.depthwise_weight = nn.Parameter(torch.empty((mid, 1, *self.kernel_size), **factory))
        self.pointwise_weight = nn.Parameter(
            torch.empty((out_channels, mid // pointwise_groups, 1, 1), **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.depthwise_bias = nn.Parameter(torch.empty(mid, **factory)) if depthwise_bias else None
        self.norm, self.norm_eps = norm, float(norm_eps)
        self.norm_weight = nn.Parameter(torch.ones(mid, **factory)) if norm else None
        self.norm_bias = nn.Parameter(torch.zeros(mid, **factory)) if norm else None
        self.excitation = None
        if se_channels is not None:
            _check_positive_int(se_channels, "se_channels")
            if se_activation not in SE_ACTIVATIONS or se_gate not in SE_GATES:
                raise ValueError(f"se_activation must be one of {tuple(SE_ACTIVATIONS)} and "
                                 f"se_gate one of {tuple(SE_GATES)}, got {se_activation!r}, "
                                 f"{se_gate!r}")
            self.excitation = Excitation(nn.Conv2d(mid, se_channels, 1, **factory),
                                         SE_ACTIVATIONS[se_activation](),
                                         nn.Conv2d(se_channels, mid, 1, **factory),
                                         SE_GATES[se_gate]())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As ``nn.Conv2d.reset_parameters`` for each convolution (the excitation's too)."""
        if getattr(self, "excitation", None) is not None:
            self.excitation.fc1.reset_parameters()
            self.excitation.fc2.reset_parameters()
        for weight, b in ((self.depthwise_weight, self.depthwise_bias),
                          (self.pointwise_weight, self.bias)):
            init.kaiming_uniform_(weight, a=math.sqrt(5))
            if b is not None:
                fan_in, _ = init._calculate_fan_in_and_fan_out(weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(b, -bound, bound)
        if getattr(self, "norm_weight", None) is not None:
            init.ones_(self.norm_weight)
            init.zeros_(self.norm_bias)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() not in (3, 4):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected input of shape (N, C, H, W) or (C, H, W), got {shape}")
        padding = self.padding
        if self.padding_mode != "zeros":
            top, bottom, left, right = self._pads or resolve_padding(
                "same", self.kernel_size, self.stride, self.dilation, x.shape[-2:])
            x = F.pad(x, (left, right, top, bottom), mode=self.padding_mode)
            padding = 0
        # The parameters by one dict read each: nn.Module's __getattr__ for the four was a
        # tenth of a small layer's call (1.2 of 10.7 us at 16 channels, 4x4). A name not
        # there (None, a parametrization's property, a plain tensor) is read as usual.
        p = self._parameters
        dw = p["depthwise_weight"] if "depthwise_weight" in p else self.depthwise_weight
        pw = p["pointwise_weight"] if "pointwise_weight" in p else self.pointwise_weight
        b = p["bias"] if "bias" in p else self.bias
        db = p["depthwise_bias"] if "depthwise_bias" in p else self.depthwise_bias
        if self.excitation is not None:  # the mid channels' means, the excitation, then y
            # (unbatched, the means are (C,): F.linear takes them as they are)
            return excited_conv2d(x, dw, pw, b, self.stride, padding, self.dilation, db,
                                  self.mid_activation, self.activation, self.excitation)
        if self.norm is not None:
            return separable_conv2d(x, dw, pw, b, self.stride, padding, self.dilation,
                                    depthwise_bias=db, mid_activation=self.mid_activation,
                                    activation=self.activation, norm=self.norm,
                                    norm_weight=self.norm_weight, norm_bias=self.norm_bias,
                                    norm_eps=self.norm_eps)
        return separable_conv2d(x, dw, pw, b, self.stride, padding, self.dilation,
                                depthwise_bias=db, mid_activation=self.mid_activation,
                                activation=self.activation,
                                pointwise_groups=self.pointwise_groups,
                                channel_shuffle=self.channel_shuffle)

    @classmethod
    def from_conv2d_pair(cls, depthwise: nn.Conv2d, pointwise: nn.Conv2d, *,
                         depthwise_norm: nn.Module | None = None,
                         mid_activation: str | None = None,
                         pointwise_norm: nn.Module | None = None,
                         activation: str | None = None,
                         padding=None,
                         excitation: Excitation | None = None,
                         channel_shuffle: int = 1,
                         layer_norm: nn.LayerNorm | None = None) -> SeparableConv2d:
        """The module computing ``act(norm(pointwise(act_mid(norm(depthwise(x))))))``
        exactly: weights copied, eval-mode batch norms folded into weights and biases.

        depthwise: ``nn.Conv2d(C, C * m, k, ..., groups=C)`` (any stride, padding,
        dilation, padding_mode); pointwise: ``nn.Conv2d(C * m, C_out, 1)`` (stride 1, no
        padding, any groups: ``pointwise_groups``). On depthwise's device and dtype,
        without gradients attached.
        ``padding`` replaces depthwise's (``"same"`` for a conv that pads as TensorFlow's
        SAME, as timm's Conv2dSame). ``excitation``: a squeeze-and-excitation between the
        mid activation and the pointwise conv, taken as it is (not copied).
        ``channel_shuffle``: a channel shuffle of that many groups before the depthwise
        conv. ``layer_norm``: an ``nn.LayerNorm`` over the mid channels between the mid
        activation and the pointwise conv (ConvNeXt's block), taken as ``norm="layernorm"``
        with its eps, weight and bias copied (not with an excitation, pointwise groups or a
        shuffle). Subclasses that override ``forward`` are refused: their attributes do not
        say what they compute.
        """
        for conv, name in ((depthwise, "depthwise"), (pointwise, "pointwise")):
            if not isinstance(conv, nn.Conv2d):
                raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
        for m, name in ((depthwise, "depthwise"), (pointwise, "pointwise"),
                        (depthwise_norm, "depthwise_norm"), (pointwise_norm, "pointwise_norm")):
            if isinstance(m, (nn.Conv2d, *NORMS)) and type(m).forward not in PLAIN_FORWARDS:
                raise TypeError(f"{name} is a {type(m).__name__}, whose forward is its own: "
                                f"its attributes do not say what it computes")
        c = depthwise.in_channels
        if depthwise.groups != c or depthwise.out_channels % c:
            raise ValueError(f"depthwise must have groups == in_channels ({c}) and a multiple of "
                             f"them out, got groups={depthwise.groups}, "
                             f"out_channels={depthwise.out_channels}")
        why = pointwise_problem(pointwise, depthwise.out_channels)
        if why:
            raise ValueError(f"pointwise {why}")
        dw_w, dw_b = fold_norm(depthwise.weight, depthwise.bias, depthwise_norm, "depthwise_norm")
        pw_w, pw_b = fold_norm(pointwise.weight, pointwise.bias, pointwise_norm, "pointwise_norm")
        padding = depthwise.padding if padding is None else padding
        if layer_norm is not None:
            if not isinstance(layer_norm, nn.LayerNorm) or \
                    tuple(layer_norm.normalized_shape) != (depthwise.out_channels,):
                raise ValueError(f"layer_norm must be an nn.LayerNorm over the "
                                 f"{depthwise.out_channels} mid channels, got {layer_norm!r}")
            if excitation is not None:
                raise ValueError("layer_norm with an excitation is not supported")
        module = cls(c, pointwise.out_channels, depthwise.kernel_size, depthwise.stride,
                     padding, depthwise.dilation, bias=pw_b is not None,
                     padding_mode=depthwise.padding_mode, device=dw_w.device, dtype=dw_w.dtype,
                     depth_multiplier=depthwise.out_channels // c,
                     mid_activation=mid_activation, activation=activation,
                     depthwise_bias=dw_b is not None, pointwise_groups=pointwise.groups,
                     channel_shuffle=channel_shuffle,
                     norm=None if layer_norm is None else "layernorm",
                     norm_eps=1e-5 if layer_norm is None else layer_norm.eps)
        with torch.no_grad():
            if layer_norm is not None:  # (no weight / bias: the identity's ones / zeros)
                for param, value in ((module.norm_weight, layer_norm.weight),
                                     (module.norm_bias, layer_norm.bias)):
                    if value is not None:
                        param.copy_(value)
            for param, value in ((module.depthwise_weight, dw_w), (module.depthwise_bias, dw_b),
                                 (module.pointwise_weight, pw_w), (module.bias, pw_b)):
                if param is not None:
                    param.copy_(value)
        if excitation is not None:
            if pointwise.groups != 1:
                raise ValueError("an excitation with a grouped pointwise conv is not supported")
            if not isinstance(excitation, Excitation):
                raise TypeError(f"excitation must be a sepconv Excitation, got "
                                f"{type(excitation).__name__}")
            mid = depthwise.out_channels
            if excitation.fc1.in_channels != mid or excitation.fc2.out_channels != mid:
                raise ValueError(f"excitation maps {excitation.fc1.in_channels} -> "
                                 f"{excitation.fc2.out_channels} channels, the depthwise conv "
                                 f"has {mid}")
            module.excitation = excitation
        return module

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) \
                else f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.depth_multiplier != 1:
            s += f", depth_multiplier={self.depth_multiplier}"
        if self.pointwise_groups != 1:
            s += f", pointwise_groups={self.pointwise_groups}"
        if self.channel_shuffle != 1:
            s += f", channel_shuffle={self.channel_shuffle}"
        if self.depthwise_bias is not None:
            s += ", depthwise_bias=True"
        if self.norm is not None:
            s += f", norm={self.norm!r}, norm_eps={self.norm_eps}"
        if self.mid_activation:
            s += f", mid_activation={self.mid_activation!r}"
        if self.activation:
            s += f", activation={self.activation!r}"
        return s
