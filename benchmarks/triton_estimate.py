"""What the Triton forward should take per benchmark layer on an H200, predicted
without a GPU, so that the next GPU run tests a prediction.

    python -m benchmarks.triton_estimate [--batch 32 128] [--out FILE]

(The GPU machines run triton 3.6: PYTHONPATH=<a folder holding triton 3.6> predicts
with the kernels as they compile there.)

Each layer's forward is launched as the GPU run launches it (bfloat16, the fixed block
sizes of SEPCONV_TRITON_AUTOTUNE=0, both layouts) and compiled for sm_90a, as
benchmarks.triton_fit does. From each kernel come its occupancy (blocks per SM, from
registers, shared memory and warps) and its programs for the layer; from the layer,
the bytes each program moves.

The model. The one GPU measurement (H200, benchmarks/results/nvidia-h200/, kernels of
commit e9ec436: fused, 64 pixels x 128 output channels x 32 mid channels, 4 warps,
2 blocks per SM for 3x3 and 1 for 7x7) put every fused forward far from the HBM floor
(12-14% of it) and at a nearly constant rate of depthwise tap loads per SM: the
kernel is bound by its gathers, each program's BLOCK_P x Cm x KH x KW tap loads, not by
HBM. So a kernel that gathers takes, per wave of programs (132 SMs x its blocks per
SM), blocks_per_sm x tap_bytes_per_program / r, with r the per-SM tap rate measured
then for that layout and kernel size: at least the rate of 2 blocks per SM, assumed no
faster with more (the loads in flight were the limit) and no slower with fewer. A
kernel that does not gather (the pointwise GEMM over a split forward's buffer) takes
its bytes at the measured copy bandwidth, or its dot at the measured bfloat16 matmul
rate, whichever is longer, stretched where its programs do not fill the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
from sepconv.triton_kernels import forward  # noqa: E402
from sepconv.triton_kernels._common import cdiv  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from benchmarks import triton_fit  # noqa: E402
from benchmarks.shapes import SUITES, Layer  # noqa: E402
from sepconv import _triton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEASURED = REPO / "benchmarks" / "results" / "nvidia-h200" / "fwd_b128_bfloat16.json"
SMS, CC = 132, 90
OLD = dict(bp=64, bco=128)  # the measured kernels' blocks (e9ec436), fused everywhere
OLD_BLOCKS_PER_SM = {3: 2, 7: 1}  # their occupancy (NOTES, "GPU, issue 16")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SUITE_NAMES = ("mobilenet_v1", "mobilenet_v2", "convnext")
ELT = 2  # bytes per bfloat16 element


def pixels(layer: Layer, batch: int) -> int:
    return batch * layer.out_hw**2


def tap_bytes(bp: int, channels: int, k: int) -> int:
    """A gathering program's depthwise tap loads: BLOCK_P x channels x k x k elements."""
    return bp * channels * k * k * ELT


def calibrate(run: dict) -> tuple[dict, list[str]]:
    """The per-SM tap rate r (bytes/s) of the measured kernels (run: the H200's
    results), per (layout, kernel size): the median over the suites' layers; and, for
    the notes, the rates' spread and the model's suite sums for those kernels."""
    work = []  # (suite, layout, k, a wave's tap bytes per SM x waves, measured seconds)
    for suite in SUITE_NAMES:
        for row in run["suites"][suite]:
            layer = Layer(row["c_in"], row["hw"], row["c_out"], row["stride"], row["kernel"])
            k, b = layer.kernel, OLD_BLOCKS_PER_SM[layer.kernel]
            programs = cdiv(pixels(layer, run["batch"]), OLD["bp"]) * cdiv(layer.c_out, OLD["bco"])
            per_sm = cdiv(programs, SMS * b) * b * tap_bytes(OLD["bp"], layer.c_in, k)
            work += [(suite, fmt, k, per_sm, row[f"sepconv_{fmt}_kernel_s"]) for fmt in FORMATS]
    rates = {}
    for _, fmt, k, per_sm, t in work:
        rates.setdefault((fmt, k), []).append(per_sm / t)
    r = {key: statistics.median(v) for key, v in rates.items()}
    lines = [f"{fmt} {k}x{k}: {r[fmt, k] / 1e9:.1f} GB/s per SM (median of {len(v)} layers; "
             f"they spread {min(v) / r[fmt, k]:.2f}-{max(v) / r[fmt, k]:.2f}x)"
             for (fmt, k), v in sorted(rates.items())]
    # the model's own error: the measured kernels' suite sums, predicted with those rates
    for suite in SUITE_NAMES:
        for fmt in FORMATS:
            mine = [(per_sm / r[fmt, k], t) for s, f, k, per_sm, t in work
                    if s == suite and f == fmt]
            pred, then = sum(p for p, _ in mine), sum(t for _, t in mine)
            lines.append(f"{suite} {fmt}, the measured kernels: predicted {pred * 1e3:.3f} ms, "
                         f"measured {then * 1e3:.3f} ms ({pred / then:.2f}x)")
    return r, lines


_launches: list[tuple[str, dict, object]] = []


def _capture(jit_run):
    """JITFunction.run, compiling only, recording every launch (cache hits too)."""
    def run(self, *args, grid, warmup, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):  # ptxas -v's log
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        _launches.append((self.fn.__name__, kwargs, kernel))
        return kernel
    return run


def launches(layer: Layer, fmt) -> list[tuple[str, dict, dict]]:
    """The forward's kernels for this layer: name, block sizes, resources."""
    g = torch.Generator().manual_seed(0)
    k = layer.kernel
    x = torch.randn(2, layer.c_in, layer.hw, layer.hw, generator=g).to(torch.bfloat16) \
        .contiguous(memory_format=fmt)
    dw = torch.randn(layer.c_in, 1, k, k, generator=g).to(torch.bfloat16)
    pw = torch.randn(layer.c_out, layer.c_in, 1, 1, generator=g).to(torch.bfloat16)
    del _launches[:]
    forward.autotuned = lambda t: False  # the GPU run's fixed block sizes
    _triton.forward(x, dw, pw, None, None, (layer.stride,) * 2, (layer.padding,) * 4, (1, 1),
                    layer.mid_activation or "none", layer.activation or "none",
                    norm_eps=1e-6 if layer.norm else None)
    return [(name, kw, triton_fit.resources(kernel)) for name, kw, kernel in _launches]


def estimate(layer: Layer, fmt: str, batch: int, kernels, r: dict, bw: float,
             mm: float) -> dict:
    """Predicted seconds of one layer's forward, and what the prediction rests on."""
    P, Cm, Co, k = pixels(layer, batch), layer.c_in, layer.c_out, layer.kernel
    total, parts = 0.0, []
    for name, kw, res in kernels:
        bps = triton_fit.blocks_per_sm(res, CC)
        bp = kw["BLOCK_P"]
        if name == "_normalize":  # LayerNorm's rows: read three times, written once
            programs = cdiv(P, bp)
            t = 4 * P * Cm * ELT / bw / min(1.0, programs / (SMS * bps))
            total += t
            parts.append(f"norm {bp}x{kw['BLOCK_K']} {res['registers']}r {bps}/SM {programs}p")
            continue
        gathers = name == "_depthwise" or kw.get("DEPTHWISE", True)
        if name == "_depthwise":
            programs = cdiv(P, bp) * cdiv(Cm, kw["BLOCK_K"])
            moved = tap_bytes(bp, kw["BLOCK_K"], k) + bp * kw["BLOCK_K"] * ELT
        else:
            programs = cdiv(P, bp) * cdiv(Co, kw["BLOCK_CO"])
            moved = (tap_bytes(bp, Cm, k) if gathers else bp * Cm * ELT) \
                + Cm * kw["BLOCK_CO"] * ELT + bp * kw["BLOCK_CO"] * ELT
        waves = cdiv(programs, SMS * bps)
        if gathers:
            t = waves * bps * moved / r[fmt, k]
        else:  # the GEMM over the buffer: its bytes once from HBM (its column blocks
            # are neighbours in launch order and share the rows in L2), or its dot
            fill = min(1.0, programs / (SMS * bps))
            t = max((P * Cm + Cm * Co + P * Co) * ELT / bw, 2 * P * Cm * Co / mm) / fill
        total += t
        blocks = "x".join(str(kw[key]) for key in ("BLOCK_P", "BLOCK_CO", "BLOCK_K") if key in kw)
        parts.append(f"{'dw' if name == '_depthwise' else 'fused' if gathers else 'gemm'} "
                     f"{blocks} {res['registers']}r {bps}/SM {programs}p {moved // 1024}K")
    return dict(seconds=total, kernels="; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.triton_estimate",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "triton-fit"
                    / f"estimate_sm90_triton{triton_fit.triton.__version__}.md")
    args = ap.parse_args(argv)
    measured = json.loads(MEASURED.read_text())
    r, fit = calibrate(measured)
    bw, mm = measured["peaks"]["copy_gbs"] * 1e9, measured["peaks"]["compute_gflops"] * 1e9
    JITFunction.run = _capture(JITFunction.run)
    driver.set_active(triton_fit._Target(CC))
    forward.arch = lambda x: CC
    lines = [f"# The Triton forward on an H200, predicted (triton {triton_fit.triton.__version__},"
             " sm_90a, bfloat16, fixed blocks)", "",
             f"`python -m benchmarks.triton_estimate {' '.join(argv or sys.argv[1:])}` at "
             f"sepconv {triton_fit._commit()}; model and calibration: the module's docstring.",
             "", "Per-SM tap rates of the measured kernels (H200, batch 128), and the model "
             "applied to those kernels against what they measured:", ""]
    lines += [f"- {line}" for line in fit]
    lines += ["", f"Copy {bw / 1e12:.2f} TB/s, bfloat16 matmul {mm / 1e12:.0f} TFLOP/s "
              "(measured in that run). Floor: the layer's minimum bytes at that copy rate. "
              "Kernels: blocks, registers, blocks per SM, programs, bytes a program moves "
              "(its tap loads, weights and output).", "",
              "| suite | layer | batch | layout | kernels | predicted us | floor us | "
              "measured then us (pair) |", "|---|---|---|---|---|---|---|---|"]
    sums = {}
    for suite in SUITE_NAMES:
        seen, printed = {}, set()
        for layer in SUITES[suite]:
            for fmt_name, fmt in FORMATS.items():
                key = (layer.name(), fmt_name)
                if key not in seen:
                    seen[key] = launches(layer, fmt)
                for batch in args.batch:
                    e = estimate(layer, fmt_name, batch, seen[key], r, bw, mm)
                    floor = layer.min_bytes(batch, ELT) / bw
                    then = ""
                    # (a layer the GPU run did not measure, as convnext's block since it
                    # has its LayerNorm, is predicted but not compared)
                    row = next((x for x in measured["suites"][suite]
                                if x["layer"] == layer.name()), None)
                    if batch == measured["batch"] and row is not None:
                        then = (f"{row[f'sepconv_{fmt_name}_kernel_s'] * 1e6:.0f} "
                                f"({row[f'pytorch_{fmt_name}_kernel_s'] * 1e6:.0f})")
                        s = sums.setdefault((suite, fmt_name), [0.0, 0.0, 0.0])
                        s[0] += e["seconds"]
                        s[1] += row[f"sepconv_{fmt_name}_kernel_s"]
                        s[2] += row[f"pytorch_{fmt_name}_kernel_s"]
                    if (key, batch) in printed:  # a repeated layer: summed, not listed again
                        continue
                    printed.add((key, batch))
                    lines.append(f"| {suite} | {layer.name()} | {batch} | {fmt_name} | "
                                 f"{e['kernels']} | {e['seconds'] * 1e6:.0f} | "
                                 f"{floor * 1e6:.1f} | {then} |")
    lines += ["", f"Suite sums at batch {measured['batch']}, kernel time: predicted now / "
              "measured then (e9ec436) / the pair then, and the predicted ratio pair / sepconv:",
              "", "| suite | layout | predicted ms | then ms | pair ms | predicted pair/sepconv |",
              "|---|---|---|---|---|---|"]
    for (suite, fmt_name), (pred, then, pair) in sums.items():
        lines.append(f"| {suite} | {fmt_name} | {pred * 1e3:.3f} | {then * 1e3:.3f} | "
                     f"{pair * 1e3:.3f} | {pair / pred:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(sums) - 4:]))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
