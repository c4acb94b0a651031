"""Whole networks: the zoo's MobileNetV1, MobileNetV2, ShuffleNetV2, ShuffleNetV1 (groups=3),
MobileNetV3-Large and EfficientNet-B0 as users have them (eval mode, batch norms as
modules), the same with every conv + batch norm folded (the PyTorch baseline: what an
inference deployment runs), and ``sepconv.fuse`` of the model with the remaining conv +
batch norm pairs folded the same way, so that the last two differ only in the depthwise
separable chains."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import sepconv
from benchmarks.layers import interleaved_seconds

MODELS = {"mobilenet_v1": sepconv.models.mobilenet_v1,
          "mobilenet_v2": sepconv.models.mobilenet_v2,
          "shufflenet_v2": sepconv.models.shufflenet_v2,
          "shufflenet_v1": sepconv.models.shufflenet_v1,  # groups=3: grouped pointwise
          # squeeze-and-excitation between dw and pw
          "mobilenet_v3_large": sepconv.models.mobilenet_v3_large,
          "efficientnet_b0": sepconv.models.efficientnet_b0}
# Timed only when asked for (--model), not by default: Xception (seed 002; 4.6 G
# multiply-adds an image at 224, a minute or two more for the default run), and
# torchvision's own model code where torchvision is installed (fuse() on a network it
# did not write).
EXTRA_MODELS = {"xception": sepconv.models.xception,
                # ConvNeXt-T (torchvision's blocks; 4.5 G multiply-adds an image): its 18
                # dw -> LayerNorm -> Linear -> GELU as SeparableConv2d(norm="layernorm")
                "convnext_tiny": sepconv.models.convnext_tiny}
try:
    import torchvision
    EXTRA_MODELS["torchvision_mobilenet_v2"] = torchvision.models.mobilenet_v2
except ImportError:
    pass
ALL_MODELS = MODELS | EXTRA_MODELS


def fold_conv_bn(model: nn.Module) -> nn.Module:
    """Every Conv2d directly followed by a BatchNorm2d in a Sequential, folded into one
    Conv2d (torch.nn.utils.fusion), the norm replaced by Identity. Works in place."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = [n for n, _ in seq.named_children()]
        for a, b in zip(names, names[1:]):
            conv, bn = getattr(seq, a), getattr(seq, b)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(seq, a, fuse_conv_bn_eval(conv, bn))
                setattr(seq, b, nn.Identity())
    return model


def saved_bytes(fn) -> int:
    """Bytes autograd keeps from fn() for the backward (activation memory). A storage
    saved twice (a layer's output is also the next layer's saved input) counts once."""
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
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
    """Latency (batch 1) of the model as given, and latency, throughput and one training
    step (batch ``batch``) and activation memory of the BN-folded nn.Conv2d network and
    of ``sepconv.fuse`` of it."""
    torch.manual_seed(0)
    given = ALL_MODELS[name]().eval().to(device=device, dtype=dtype, memory_format=fmt)
    pair = fold_conv_bn(copy.deepcopy(given))
    ours, fused = sepconv.fuse(given)
    ours = fold_conv_bn(ours)
    x1, xb = (torch.randn(n, 3, resolution, resolution, device=device, dtype=dtype)
              .contiguous(memory_format=fmt) for n in (1, batch))
    models = {"pytorch": pair, "sepconv": ours}
    row = {"model": name, "batch": batch, "resolution": resolution,
           "fused_chains": len(fused.fused)}
    with torch.no_grad():
        want = given(x1)
        for label, m in models.items():
            torch.testing.assert_close(m(x1), want, rtol=2e-2, atol=2e-2 * want.abs().max().item(),
                                       msg=f"{label} {name} disagrees with the model as given")
        lat = interleaved_seconds({"given": (given, [x1])}
                                  | {k: (m, [x1]) for k, m in models.items()}, min_run_time, 5)
        thr = interleaved_seconds({k: (m, [xb]) for k, m in models.items()}, min_run_time, 5,
                                  warmup=1)
    for m in models.values():
        m.train()
    train = interleaved_seconds({k: (_train_step(m), [xb]) for k, m in models.items()},
                                min_run_time, 5, warmup=1)
    row["given_latency_s"] = lat["given"]
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
