"""Parameters, MACs and FLOPs per layer, the convention of seed 000.

FLOPs count a multiply and an add as two; a dot product of n terms costs 2n - 1, and a
bias add makes it 2n:

- conv:   (2 * C_in/g * kh * kw - 1) * H_out * W_out * C_out, without the -1 with bias
- linear: (2 * N_in - 1) * N_out, without the -1 with bias (the seed writes the bias-free
          form; the bias rule is its conv rule)
- LSTM:   (E + H) * H * 4 * 2 per time step, GRU: (E + H) * H * 3 * 2 (E: input size,
          H: hidden size; per layer and direction)
- SeparableConv2d: its depthwise conv plus its pointwise conv, by the conv rule.

MACs (multiply-accumulates) follow fvcore and ptflops on convs and linears: C_in/g * kh *
kw * H_out * W_out * C_out and N_in * N_out, bias not counted; for LSTM / GRU half the
FLOPs. Norms, activations and pooling are listed with their parameters and no FLOPs, as
the seed gives them none. Every count is for the whole input batch. Parameters are what
PyTorch holds (``p.numel()``, both LSTM bias vectors included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from .modules import SeparableConv2d

__all__ = ["complexity", "ComplexityReport"]


def _conv_counts(c_in_per_group: int, kernel: int, out_pixels: int, c_out: int,
                 bias: bool) -> tuple[int, int]:
    """(MACs, FLOPs) of a conv producing out_pixels x c_out values."""
    terms = c_in_per_group * kernel
    return terms * out_pixels * c_out, (2 * terms - (not bias)) * out_pixels * c_out


def _counts(m: nn.Module, inputs: tuple, output) -> tuple[int, int] | None:
    """(MACs, FLOPs) of one call of m, or None for layers without a formula."""
    if isinstance(m, SeparableConv2d):
        n, c_out, *spatial = output.shape
        pixels = n * math.prod(spatial)
        mid = m.depthwise_weight.shape[0]
        dw = _conv_counts(1, math.prod(m.kernel_size), pixels, mid, m.depthwise_bias is not None)
        pw = _conv_counts(mid, 1, pixels, c_out, m.bias is not None)
        return dw[0] + pw[0], dw[1] + pw[1]
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        n, c_out, *spatial = output.shape
        return _conv_counts(m.in_channels // m.groups, math.prod(m.kernel_size),
                            n * math.prod(spatial), c_out, m.bias is not None)
    if isinstance(m, nn.Linear):
        rows = output.numel() // m.out_features
        macs = m.in_features * m.out_features * rows
        return macs, (2 * m.in_features - (m.bias is None)) * m.out_features * rows
    if isinstance(m, (nn.LSTM, nn.GRU)):
        x = inputs[0]
        steps = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]  # time x batch
        gates = 4 if isinstance(m, nn.LSTM) else 3
        dirs = 2 if m.bidirectional else 1
        macs = 0
        for layer in range(m.num_layers):
            e = m.input_size if layer == 0 else m.hidden_size * dirs
            macs += (e + m.hidden_size) * m.hidden_size * gates * dirs * steps
        return macs, 2 * macs
    return None


@dataclass
class ComplexityReport:
    """rows: one per layer call (name, type, output shape, params, MACs, FLOPs; for
    SeparableConv2d also the FLOPs of the nn.Conv2d it replaces and R = 1/C_out + 1/K^2);
    totals over the model (params: every parameter of the model)."""

    input_size: tuple[int, ...]
    rows: list[dict] = field(default_factory=list)
    params: int = 0

    @property
    def macs(self) -> int:
        return sum(r["macs"] for r in self.rows)

    @property
    def flops(self) -> int:
        return sum(r["flops"] for r in self.rows)

    def by_name(self) -> dict[str, dict]:
        """The first call's row of each layer, by qualified name."""
        out: dict[str, dict] = {}
        for r in self.rows:
            out.setdefault(r["name"], r)
        return out

    def __str__(self) -> str:
        lines = [f"{'layer':<32}{'type':<18}{'output':<22}{'params':>11}{'MACs':>15}"
                 f"{'FLOPs':>15}"]
        for r in self.rows:
            lines.append(f"{r['name'] or '(model)':<32}{r['type']:<18}{str(r['output']):<22}"
                         f"{r['params']:>11,}{r['macs']:>15,}{r['flops']:>15,}")
            if "conv2d_flops" in r:
                lines.append(f"{'':<32}{r['flops'] / r['conv2d_flops']:.4f} of the FLOPs of the "
                             f"nn.Conv2d it replaces ({r['conv2d_flops']:,}); "
                             f"R = 1/C_out + 1/K^2 = {r['R']:.4f}")
        lines.append(f"{'total':<72}{self.params:>11,}{self.macs:>15,}{self.flops:>15,}")
        return "\n".join(lines)


def complexity(model: nn.Module, input_size: tuple[int, ...], *,
               dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> ComplexityReport:
    """Runs ``model`` once on a random input of ``input_size`` (batch included; dtype and
    device of the model's first parameter unless given) and counts every layer call."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"complexity() takes an nn.Module, got {type(model).__name__}")
    if not (isinstance(input_size, (tuple, list, torch.Size)) and input_size
            and all(isinstance(s, int) and s >= 0 for s in input_size)):
        raise ValueError(f"input_size must be a tuple of sizes, batch first, got {input_size!r}")
    first = next(model.parameters(), None)
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    device = device or (first.device if first is not None else "cpu")
    report = ComplexityReport(tuple(input_size), params=sum(p.numel() for p in model.parameters()))
    counted: set[int] = set()

    def hook(name: str):
        def record(m: nn.Module, inputs: tuple, output) -> None:
            counts = _counts(m, inputs, output)
            out = output[0] if isinstance(output, tuple) else output
            row = dict(name=name, type=type(m).__name__,
                       output=tuple(out.shape) if isinstance(out, Tensor) else None,
                       params=0 if id(m) in counted else sum(p.numel() for p in m.parameters()),
                       macs=counts[0] if counts else 0, flops=counts[1] if counts else 0)
            counted.add(id(m))
            if isinstance(m, SeparableConv2d):
                k = math.prod(m.kernel_size)
                n, c_out, *spatial = out.shape
                row["conv2d_flops"] = _conv_counts(m.in_channels, k, n * math.prod(spatial),
                                                   c_out, m.bias is not None)[1]
                row["R"] = 1 / c_out + 1 / k
            report.rows.append(row)
        return record

    leaves = [(name, m) for name, m in model.named_modules()
              if isinstance(m, SeparableConv2d) or next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook(name)) for name, m in leaves]
    try:
        with torch.no_grad():
            model(torch.randn(*input_size, dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
    return report


# torch.utils.flop_counter.FlopCounterMode counts 2 FLOPs per multiply-accumulate and
# leaves out biases, as for aten's convolutions.
def _sep_macs(x_shape, dw_shape, pw_shape, out_shape) -> tuple[int, int]:
    """(depthwise, pointwise) multiply-accumulates of one forward."""
    pixels = out_shape[0] * out_shape[2] * out_shape[3]
    return pixels * dw_shape[0] * dw_shape[2] * dw_shape[3], pixels * pw_shape[0] * pw_shape[1]


@register_flop_formula(torch.ops.sepconv.separable_conv2d)
def _forward_flops(x_shape, dw_shape, pw_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * sum(_sep_macs(x_shape, dw_shape, pw_shape, out_shape))


@register_flop_formula(torch.ops.sepconv.separable_conv2d_backward)
def _backward_flops(grad_y_shape, x_shape, dw_shape, pw_shape, dw_bias, pw_bias, stride,
                    padding, dilation, mid_activation, activation, backend, output_mask,
                    out_shape=None, **kwargs) -> int:
    """Each wanted gradient costs what its part of the forward does, as aten counts conv
    backward: grad of the intermediate (for x and dw weight) and of the pw weight, grad of
    x and of the dw weight."""
    dw, pw = _sep_macs(x_shape, dw_shape, pw_shape, grad_y_shape)
    want_x, want_dw, want_pw = output_mask[:3]
    macs = pw * ((want_x or want_dw) + want_pw) + dw * (want_x + want_dw)
    return 2 * macs
