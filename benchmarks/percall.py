"""``python -m benchmarks.percall``: the fixed cost of one call, in microseconds.

A layer so small that its arithmetic is negligible (16 channels, 4x4, batch 1 by
default) shows what every call pays around the kernel: argument checks, the Python
between the module and the kernel, the output's allocation, the thread team, and
autograd's node where a gradient is wanted. Issue 15 asks for at most 10 us at batch 1.
Each path is timed by ``torch.utils.benchmark.Timer`` (blocked_autorange), in both
memory formats; the PyTorch pair and its 1x1 conv alone are the yardsticks.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import sepconv
from sepconv import _native


def paths(channels: int, size: int, fmt: torch.memory_format) -> dict:
    """name -> (a no-argument callable, grad mode), for one layer in one memory format."""
    torch.manual_seed(0)
    module = sepconv.SeparableConv2d(channels, channels, 3, padding=1).to(memory_format=fmt)
    x = torch.randn(1, channels, size, size).contiguous(memory_format=fmt)
    dw, pw, b = (t.detach() for t in (module.depthwise_weight, module.pointwise_weight,
                                      module.bias))
    config = ([1, 1], [1, 1, 1, 1], [1, 1], "none", "none")

    return {  # name -> (callable, whether a gradient is wanted)
        "kernel (sepconv._native.forward)": (
            lambda: _native.forward(x, dw, pw, None, b, *config), False),
        "sepconv.separable_conv2d": (lambda: sepconv.separable_conv2d(x, dw, pw, b, 1, 1), False),
        "SeparableConv2d, no_grad": (lambda: module(x), False),
        "SeparableConv2d, grad (forward)": (lambda: module(x), True),
        "pair: two F.conv2d, no_grad": (
            lambda: F.conv2d(F.conv2d(x, dw, None, 1, 1, 1, channels), pw, b), False),
        "one 1x1 F.conv2d, no_grad": (lambda: F.conv2d(x, pw, b), False),
    }


def measure(channels: int = 16, size: int = 4, min_run_time: float = 0.5) -> list[dict]:
    """Median microseconds per call of each path, per memory format."""
    rows = []
    for name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        for path, (fn, grad) in paths(channels, size, fmt).items():
            timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            # the grad mode set around the timing, not per call: a network runs all its
            # layers inside one no_grad block
            with torch.set_grad_enabled(grad):
                us = timer.blocked_autorange(min_run_time=min_run_time).median * 1e6
            rows.append({"format": name, "path": path, "us": us})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.percall",
                                description=__doc__.split("\n")[0])
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=4, help="input height = width")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per path")
    args = p.parse_args(argv)
    rows = measure(args.channels, args.size, args.min_run_time)
    print(f"per call, {args.channels} channels, {args.size}x{args.size}, batch 1, "
          f"{torch.get_num_threads()} threads (us, median)")
    paths_ = list(dict.fromkeys(r["path"] for r in rows))
    print(f"{'path':36s} {'NCHW':>8s} {'CL':>8s}")
    for path in paths_:
        us = {r["format"]: r["us"] for r in rows if r["path"] == path}
        print(f"{path:36s} {us['nchw']:8.2f} {us['channels_last']:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
