"""``python -m benchmarks``: fused sepconv vs the PyTorch dw+pw pair, on CPU or GPU.

For each layer of the chosen suites (shapes in benchmarks/shapes.py) it checks
sepconv's output against the pair's, then times both in each memory format, forward
or forward + backward, and reports the speedup over the best pair and the fraction
of the two floors (FLOPs / measured compute peak, minimum bytes / measured copy
bandwidth). The variants of a layer are timed in turns, so that a shared machine's
drifting speed hits them alike. The ``models`` suite times MobileNetV1/V2/V3-Large,
ShuffleNetV2 and EfficientNet-B0 end to end.
Results go to benchmarks/results/<machine>/ as JSON, CSV, Markdown and PNG.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import report
from benchmarks.layers import FORMATS, run_layer
from benchmarks.machine import REPO, describe, machine_name, measure_peaks, set_allocator
from benchmarks.models import ALL_MODELS, MODELS, run_model
from benchmarks.shapes import SUITES

DEFAULT_SUITES = ["mobilenet_v1", "mobilenet_v2", "xception", "convnext", "models"]
DEFAULT_THREADS = torch.get_num_threads()  # read before main() changes it


def _parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--suite", nargs="+", choices=sorted(SUITES) + ["models"],
                   default=DEFAULT_SUITES)
    p.add_argument("--batch", type=int, help="layer batch (default 1 on CPU, 32 on GPU)")
    p.add_argument("--model", nargs="+", choices=sorted(ALL_MODELS),
                   default=list(MODELS), help="the networks of the models suite (default: "
                   "the zoo's; torchvision's where torchvision is installed)")
    p.add_argument("--model-batch", type=int,
                   help="throughput / training batch of the models (default 32 on GPU; 8 on "
                   "CPU, where 32 takes 7 minutes on 2 cores)")
    p.add_argument("--resolution", type=int, default=224, help="input size of the models")
    p.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"],
                   help="default float32 on CPU, bfloat16 on GPU")
    p.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwd",
                   help="forward only, or forward + backward (every gradient)")
    p.add_argument("--format", choices=["nchw", "channels_last", "both"], default="both")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="threads of both sepconv and PyTorch (files get a _<n>threads suffix "
                   "when not the default)")
    p.add_argument("--malloc", choices=["reuse", "system"], default="reuse",
                   help="CPU memory policy for both sides: freed memory reused (default; "
                   "kernel against kernel) or the C library's defaults (large blocks "
                   "faulted in anew on every call)")
    p.add_argument("--quick", action="store_true", help="shorter timing runs (noisier)")
    p.add_argument("--out", type=Path, help="results folder (default "
                   "benchmarks/results/<machine>); 'none' writes nothing")
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: no CUDA device is available")
    gpu = args.device == "cuda"
    args.batch = args.batch or (32 if gpu else 1)
    args.model_batch = args.model_batch or (32 if gpu else 8)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.formats = list(FORMATS) if args.format == "both" else [args.format]
    return args


def steady_host(before: dict, after: dict, tolerance: float = 0.15) -> bool:
    """Whether the compute probe read the same (within tolerance) before and after."""
    a, b = before["compute_gflops"], after["compute_gflops"]
    if a != a or b != b:  # NaN: no probe on this path
        return True
    return abs(a - b) <= tolerance * max(a, b)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    allocator = set_allocator(args.malloc) if args.device == "cpu" else "torch CUDA caching"
    dtype = getattr(torch, args.dtype)
    machine = {**describe(args.device), "allocator": allocator}
    name = machine_name(machine)
    peaks = measure_peaks(args.device, dtype)
    command = shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    print(f"{name}: {machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, "
          f"{args.threads} threads;  measured {peaks['compute_probe']} "
          f"{peaks['compute_gflops']:.0f} GFLOP/s, copy {peaks['copy_gbs']:.1f} GB/s")
    result = {"command": command, "machine_name": name, "machine": machine, "peaks": peaks,
              "batch": args.batch, "dtype": args.dtype, "mode": args.mode,
              "formats": args.formats, "suites": {}, "models": [], "refused": []}

    layer_suites = [s for s in args.suite if s != "models"]
    jobs = [(s, layer) for s in layer_suites for layer in SUITES[s]]
    if "models" in args.suite:
        jobs += [("models", (m, f)) for m in args.model for f in args.formats]
    min_run_time = 0.1 if args.quick else 0.6
    for suite, job in tqdm(jobs, desc="benchmarks", unit="config", file=sys.stderr):
        try:
            if suite == "models":
                model, fmt = job
                row = run_model(model, args.device, dtype, FORMATS[fmt], args.model_batch,
                                args.resolution, min_run_time)
                result["models"].append({"format": fmt, **row})
            else:
                row = run_layer(job, args.batch, args.device, dtype, args.mode, args.formats,
                                min_run_time, peaks)
                result["suites"].setdefault(suite, []).append(row)
        except AssertionError as exc:  # a wrong result: no time is reported for it
            result["refused"].append({"suite": suite, "config": str(job), "why": str(exc)})
            tqdm.write(f"REFUSED {suite} {job}: {exc}", file=sys.stderr)

    # The compute probe again: on a shared host another tenant can take the cores for
    # minutes (a Zen 5 VM read 480-510 GFLOP/s quiet, 217-250 shared), and ratios
    # measured then moved by up to 15%. A run whose probe moved is marked, not hidden.
    result["peaks_after"] = after = measure_peaks(args.device, dtype)
    result["host_steady"] = steady_host(peaks, after)
    for suite, rows in result["suites"].items():
        print("\n" + report.layer_table(suite, rows, args.formats))
    if result["models"]:
        print("\n" + report.model_table(result["models"]))
    if args.out is None or str(args.out).lower() != "none":
        out = args.out or REPO / "benchmarks" / "results" / name
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{args.mode}_b{args.batch}_{args.dtype}" if layer_suites else \
            f"models_b{args.model_batch}_{args.dtype}"  # a models-only run keeps the layers
        if args.threads != DEFAULT_THREADS:
            stem += f"_{args.threads}threads"  # a scaling run keeps the default run's files
        plots = [p.name for p, draw in ((out / f"{stem}_speedup.png", report.plot_speedup),
                                        (out / f"{stem}_roofline.png", report.plot_roofline))
                 if draw(p, result)]
        report.write_json(out / f"{stem}.json", result)
        report.write_csv(out / f"{stem}.csv", result)
        report.write_markdown(out / f"{stem}.md", result, plots)
        print(f"\nwrote {out}/{stem}.{{json,csv,md}} and {len(plots)} plots")
    if not result["host_steady"]:
        print(f"\nWARNING: the compute probe read {peaks['compute_gflops']:.0f} GFLOP/s before "
              f"the run and {after['compute_gflops']:.0f} after: the host was shared or "
              "throttled, and this run's ratios are unreliable", file=sys.stderr)
    if result["refused"]:
        print(f"\n{len(result['refused'])} configs gave a wrong result and were not timed",
              file=sys.stderr)
    return 1 if result["refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
