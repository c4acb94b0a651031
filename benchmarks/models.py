"""Whole networks: MobileNetV1 and V2 with batch norm folded into the conv biases (the
inference form), built from nn.Conv2d pairs, and the same networks, same weights,
with every separable pair replaced by one SeparableConv2d."""

from __future__ import annotations

import copy

import torch
from torch import nn

import sepconv
from benchmarks.layers import interleaved_seconds
from benchmarks.shapes import SUITES, Layer

_ACTS = {None: nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6}


class PairBlock(nn.Module):
    """Depthwise conv -> act -> pointwise conv -> act, as users write it."""

    def __init__(self, layer: Layer):
        super().__init__()
        self.layer = layer
        self.dw = nn.Conv2d(layer.c_in, layer.c_in, layer.kernel, layer.stride, layer.padding,
                            groups=layer.c_in)
        self.pw = nn.Conv2d(layer.c_in, layer.c_out, 1)
        self.act1, self.act2 = _ACTS[layer.mid_activation](), _ACTS[layer.activation]()

    def forward(self, x):
        return self.act2(self.pw(self.act1(self.dw(x))))

    def fused(self) -> sepconv.SeparableConv2d:
        L = self.layer
        m = sepconv.SeparableConv2d(L.c_in, L.c_out, L.kernel, L.stride, L.padding,
                                    depthwise_bias=True, mid_activation=L.mid_activation,
                                    activation=L.activation)
        with torch.no_grad():
            for name, t in (("depthwise_weight", self.dw.weight), ("depthwise_bias", self.dw.bias),
                            ("pointwise_weight", self.pw.weight), ("bias", self.pw.bias)):
                getattr(m, name).copy_(t)
        return m


class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


def _conv(c_in, c_out, k, stride, act):
    return [nn.Conv2d(c_in, c_out, k, stride, k // 2), act()]


def _head(c_in, c_out=None):
    convs = _conv(c_in, c_out, 1, 1, nn.ReLU6) if c_out else []
    return convs + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_out or c_in, 1000)]


def mobilenet_v1() -> nn.Sequential:
    blocks = [PairBlock(L) for L in SUITES["mobilenet_v1"]]
    return nn.Sequential(*_conv(3, 32, 3, 2, nn.ReLU), *blocks, *_head(1024))


def mobilenet_v2() -> nn.Sequential:
    """Inverted residuals: 1x1 expansion (ReLU6) -> separable pair (ReLU6, linear)."""
    parts, c = _conv(3, 32, 3, 2, nn.ReLU6), 32
    for L in SUITES["mobilenet_v2"]:
        body = (_conv(c, L.c_in, 1, 1, nn.ReLU6) if L.c_in != c else []) + [PairBlock(L)]
        parts.append(Residual(*body) if L.stride == 1 and c == L.c_out else nn.Sequential(*body))
        c = L.c_out
    return nn.Sequential(*parts, *_head(c, 1280))


MODELS = {"mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2}


def separable_copy(model: nn.Module) -> nn.Module:
    """The same network with each PairBlock replaced by its SeparableConv2d."""
    model = copy.deepcopy(model)
    for name, child in model.named_children():
        setattr(model, name, child.fused() if isinstance(child, PairBlock)
                else separable_copy(child))
    return model


def saved_bytes(fn) -> int:
    """Bytes autograd keeps from fn() for the backward (activation memory)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _train_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step(x):
        opt.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        opt.step()
    return step


def run_model(name: str, device: str, dtype, fmt: torch.memory_format, batch: int,
              resolution: int, min_run_time: float) -> dict:
    """Latency (batch 1), throughput and one training step (batch ``batch``), and the
    activation memory, of the nn.Conv2d network and its sepconv copy."""
    torch.manual_seed(0)
    pair = MODELS[name]().to(device=device, dtype=dtype, memory_format=fmt)
    ours = separable_copy(pair)
    x1, xb = (torch.randn(n, 3, resolution, resolution, device=device, dtype=dtype)
              .contiguous(memory_format=fmt) for n in (1, batch))
    models = {"pytorch": pair, "sepconv": ours}
    row = {"model": name, "batch": batch, "resolution": resolution}
    with torch.no_grad():
        want = pair(x1)
        torch.testing.assert_close(ours(x1), want, rtol=2e-2, atol=2e-2 * want.abs().max().item(),
                                   msg=f"sepconv {name} disagrees with the nn.Conv2d network")
        lat = interleaved_seconds({k: (m, [x1]) for k, m in models.items()}, min_run_time, 5)
        thr = interleaved_seconds({k: (m, [xb]) for k, m in models.items()}, min_run_time, 5,
                                  warmup=1)
    train = interleaved_seconds({k: (_train_step(m), [xb]) for k, m in models.items()},
                                min_run_time, 5, warmup=1)
    for k, m in models.items():
        row[f"{k}_latency_s"] = lat[k]
        row[f"{k}_images_per_s"] = batch / thr[k]
        row[f"{k}_train_step_s"] = train[k]
        row[f"{k}_saved_mb"] = saved_bytes(lambda: m(xb)) / 2**20
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _train_step(m)(xb)
            torch.cuda.synchronize()
            row[f"{k}_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row
