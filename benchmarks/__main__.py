"""``python -m benchmarks``: fused sepconv vs the PyTorch dw+pw pair, per layer, CPU or GPU.

For each layer of a suite (shapes in benchmarks/shapes.py) it checks sepconv's output
against the pair's, then times both in both memory formats, forward or forward +
backward, and reports the speedup over the best pair and the fraction of the two
floors (FLOPs / measured compute peak, minimum bytes / measured copy bandwidth). The
four variants of a layer are timed in turns, so that a shared machine's drifting speed
hits them alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark as tbench

import sepconv
from benchmarks.shapes import SUITES, Layer

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
CACHE_BYTES = 64 << 20  # rotate inputs until this much is touched (> L2 + L3 here)


def _act(name):
    return {None: lambda t: t, "relu": lambda t: F.relu(t, inplace=True),
            "relu6": lambda t: F.relu6(t, inplace=True)}[name]


def pytorch_pair(layer: Layer, dw, pw, b_dw, b_pw):
    """The unfused reference users would write: two convs (BN folded) and activations."""
    act1, act2 = _act(layer.mid_activation), _act(layer.activation)

    def run(x):
        u = F.conv2d(x, dw, b_dw, layer.stride, layer.padding, groups=layer.c_in)
        return act2(F.conv2d(act1(u), pw, b_pw))
    return run


def fused(layer: Layer, dw, pw, b_dw, b_pw):
    def run(x):
        return sepconv.separable_conv2d(x, dw, pw, b_pw, layer.stride, layer.padding,
                                        depthwise_bias=b_dw, mid_activation=layer.mid_activation,
                                        activation=layer.activation)
    return run


def _stepper(fn, inputs):
    """One call of fn per step, on the next of the rotating inputs (so a layer cannot
    run from a warm cache)."""
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(inputs)
        fn(inputs[state["i"]])
    return step


def interleaved_seconds(variants: dict, min_run_time: float, rounds: int = 15) -> dict:
    """Median seconds per call of each variant (name -> (fn, inputs)).

    The variants take turns in short blocks, round after round, and each gets the
    median of its blocks: on a shared machine whose speed drifts, the drift then
    hits every variant alike instead of whichever ran during a slow spell.
    """
    timers = {}
    for name, (fn, inputs) in variants.items():
        step = _stepper(fn, inputs)
        for _ in range(3):
            step()  # warm-up: first-touch allocations, thread pools
        timer = tbench.Timer("step()", globals={"step": step},
                             num_threads=torch.get_num_threads())
        once = timer.timeit(1).mean
        calls = max(1, int(min_run_time / rounds / max(once, 1e-7)))
        timers[name] = (timer, calls)
    blocks = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (timer, calls) in timers.items():
            blocks[name].append(timer.timeit(calls).mean)
    return {name: statistics.median(b) for name, b in blocks.items()}


def _median_seconds(stmt: str, **env) -> float:
    return tbench.Timer(stmt, globals=env, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=1.0).median


def measure_peaks(device: str, dtype: torch.dtype) -> dict:
    """Compute and bandwidth ceilings, measured now on this machine: on CPU an FMA
    loop compiled into sepconv._C (torch's sgemm is far below the FMA peak here), on
    GPU a large matmul in the benchmark's dtype; a copy far beyond the caches."""
    if device == "cpu":
        threads = torch.get_num_threads()
        gflops = max(sepconv._backend._C.fma_peak(threads, 5_000_000) for _ in range(3)) \
            if sepconv.backend_info()["cpu_native"] else float("nan")
        probe = f"FMA loop, {threads} threads"
    else:
        n = 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        gflops = 2 * n**3 / _median_seconds("a @ a", a=a) / 1e9
        probe = f"torch.mm {n}^3 {str(dtype)[6:]}"
    a = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # 256 MiB
    b = torch.empty_like(a)
    secs = _median_seconds("b.copy_(a)", a=a, b=b)
    return {"compute_gflops": gflops, "compute_probe": probe,
            "copy_gbs": 2 * a.numel() / secs / 1e9}


TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 8e-2}


def _train_step(fn, params):
    """Forward + backward: the gradient of every input and weight, as training needs."""
    def run(x):
        y = fn(x)
        return torch.autograd.grad(y, [x, *params], torch.ones_like(y))
    return run


def run_layer(layer: Layer, batch: int, device: str, dtype, mode: str, min_run_time: float,
              peaks: dict) -> dict:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    dw = rand(layer.c_in, 1, layer.kernel, layer.kernel, scale=1 / 3)
    pw = rand(layer.c_out, layer.c_in, 1, 1, scale=layer.c_in**-0.5)
    b_dw, b_pw = rand(layer.c_in, scale=0.1), rand(layer.c_out, scale=0.1)
    params = [dw, pw, b_dw, b_pw]
    x_bytes = batch * layer.c_in * layer.hw**2 * dtype.itemsize
    copies = max(1, min(16, CACHE_BYTES // max(x_bytes, 1)))
    backward = mode == "fwdbwd"
    row = {"layer": layer.name(), "flops": layer.flops(batch, backward),
           "min_bytes": layer.min_bytes(batch, dtype.itemsize, backward)}
    variants = {}
    for fmt_name, fmt in FORMATS.items():
        xs = [rand(batch, layer.c_in, layer.hw, layer.hw).contiguous(memory_format=fmt)
              for _ in range(copies)]
        ref, ours = pytorch_pair(layer, *params), fused(layer, *params)
        with torch.no_grad():
            tol = TOLERANCE[dtype]
            torch.testing.assert_close(ours(xs[0]), ref(xs[0]), rtol=tol, atol=tol,
                                       msg=f"sepconv disagrees with the pair on {layer.name()}")
        if backward:
            for t in xs + params:
                t.requires_grad_()
            ref, ours = _train_step(ref, params), _train_step(ours, params)
        variants[f"pytorch_{fmt_name}_s"] = (ref, xs)
        variants[f"sepconv_{fmt_name}_s"] = (ours, xs)
    with torch.set_grad_enabled(backward):
        row.update(interleaved_seconds(variants, min_run_time))
    best_pair = min(row["pytorch_nchw_s"], row["pytorch_channels_last_s"])
    best_ours = min(row["sepconv_nchw_s"], row["sepconv_channels_last_s"])
    row["speedup"] = best_pair / best_ours
    row["gflops"] = row["flops"] / best_ours / 1e9
    row["fraction_compute_peak"] = row["gflops"] / peaks["compute_gflops"]
    row["fraction_bandwidth"] = row["min_bytes"] / best_ours / 1e9 / peaks["copy_gbs"]
    return row


def print_table(suite: str, rows: list[dict]) -> None:
    head = (f"{'layer':28} {'pair NCHW':>10} {'pair CL':>10} {'ours NCHW':>10} {'ours CL':>10}"
            f" {'speedup':>8} {'GFLOP/s':>8} {'%peak':>6} {'%BW':>6}")
    print(f"\n{suite}  (times in ms; speedup = best pair / best sepconv)\n{head}")
    for r in rows:
        ms = [r[k] * 1e3 for k in ("pytorch_nchw_s", "pytorch_channels_last_s",
                                   "sepconv_nchw_s", "sepconv_channels_last_s")]
        print(f"{r['layer']:28} " + " ".join(f"{v:10.3f}" for v in ms)
              + f" {r['speedup']:8.2f} {r['gflops']:8.1f} {100 * r['fraction_compute_peak']:6.1f}"
              f" {100 * r['fraction_bandwidth']:6.1f}")
    tot = {k: sum(r[k] for r in rows) * 1e3 for k in ("pytorch_nchw_s", "pytorch_channels_last_s",
                                                      "sepconv_nchw_s", "sepconv_channels_last_s")}
    best_pair = min(tot["pytorch_nchw_s"], tot["pytorch_channels_last_s"])
    best_ours = min(tot["sepconv_nchw_s"], tot["sepconv_channels_last_s"])
    print(f"{'total':28} " + " ".join(f"{v:10.3f}" for v in tot.values())
          + f" {best_pair / best_ours:8.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--suite", nargs="+", choices=sorted(SUITES), default=["mobilenet_v1"])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"],
                   default="float32")
    p.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwd",
                   help="forward only, or forward + backward (every gradient)")
    p.add_argument("--quick", action="store_true", help="shorter timing runs (noisier)")
    p.add_argument("--json", type=Path, help="also write the rows and the machine here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")

    torch.set_num_threads(args.threads)
    info = sepconv.backend_info()
    dtype = getattr(torch, args.dtype)
    peaks = measure_peaks(args.device, dtype)
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"isa {info['cpu_isa']}  threads {args.threads}  {cpu}"
    print(f"sepconv {info['version']}  torch {torch.__version__}  {where}")
    print(f"measured: {peaks['compute_probe']} {peaks['compute_gflops']:.0f} GFLOP/s, "
          f"copy bandwidth {peaks['copy_gbs']:.1f} GB/s;  {args.mode} {args.dtype} "
          f"batch {args.batch}")
    results = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "platform": platform.platform(), "device_name": where, **info,
                           **peaks},
               "batch": args.batch, "dtype": args.dtype, "mode": args.mode,
               "device": args.device, "suites": {}}
    for suite in args.suite:
        rows = [run_layer(layer, args.batch, args.device, dtype, args.mode,
                          0.1 if args.quick else 0.6, peaks) for layer in SUITES[suite]]
        results["suites"][suite] = rows
        print_table(suite, rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
