"""What a run prints and writes: a table on stdout, JSON, CSV, Markdown and two plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

VARIANTS = [("pytorch", "pair"), ("sepconv", "ours")]
FORMAT_LABEL = {"nchw": "NCHW", "channels_last": "CL"}


def _columns(formats):
    return [(f"{v}_{f}_s", f"{label} {FORMAT_LABEL[f]}") for v, label in VARIANTS
            for f in formats]


def same_format(row: dict, fmt: str) -> float:
    """The pair in one memory format over sepconv in the same format."""
    return row[f"pytorch_{fmt}_s"] / row[f"sepconv_{fmt}_s"]


def suite_same_format(rows: list[dict], fmt: str) -> float:
    return sum(r[f"pytorch_{fmt}_s"] for r in rows) / sum(r[f"sepconv_{fmt}_s"] for r in rows)


def layer_table(suite: str, rows: list[dict], formats: list[str]) -> str:
    cols = _columns(formats)
    lines = [f"{suite}  (ms; speedup = best pair / best sepconv; '<fmt> x' = the pair over "
             "sepconv, both in that format)",
             f"{'layer':24}" + "".join(f"{h:>11}" for _, h in cols)
             + "".join(f"{FORMAT_LABEL[f] + ' x':>8}" for f in formats)
             + f"{'speedup':>9}{'GFLOP/s':>9}{'GB/s':>8}{'%peak':>7}{'%BW':>6}"]
    for r in rows:
        lines.append(f"{r['layer']:24}" + "".join(f"{r[k] * 1e3:11.3f}" for k, _ in cols)
                     + "".join(f"{same_format(r, f):8.2f}" for f in formats)
                     + f"{r['speedup']:9.2f}{r['gflops']:9.1f}{r['gbs']:8.1f}"
                     f"{100 * r['fraction_compute_peak']:7.1f}{100 * r['fraction_bandwidth']:6.1f}")
    tot = {k: sum(r[k] for r in rows) for k, _ in cols}
    lines.append(f"{'total':24}" + "".join(f"{tot[k] * 1e3:11.3f}" for k, _ in cols)
                 + "".join(f"{suite_same_format(rows, f):8.2f}" for f in formats)
                 + f"{suite_speedup(rows, formats):9.2f}")
    libraries = pair_libraries(rows, formats)
    if libraries:
        lines.append(libraries)
    times = kernel_times(rows, formats)
    if times:
        lines.append(times)
    return "\n".join(lines)


def kernel_times(rows: list[dict], formats: list[str]) -> str | None:
    """On CUDA: the summed GPU kernel time of a call (profiler), the host's launch
    overhead left out, per format: pair / sepconv ms and the ratio."""
    if f"sepconv_{formats[0]}_kernel_s" not in rows[0]:
        return None
    cells = []
    for f in formats:
        pair, ours = (sum(r[f"{v}_{f}_kernel_s"] for r in rows) for v in ("pytorch", "sepconv"))
        cells.append(f"{FORMAT_LABEL[f]} {pair * 1e3:.3f} / {ours * 1e3:.3f} ms "
                     f"({pair / ours:.2f}x)")
    return "GPU kernel time only, pair / sepconv: " + ", ".join(cells)


def pair_libraries(rows: list[dict], formats: list[str]) -> str | None:
    """On CUDA: which library ran the pair's convolutions, per format."""
    if f"pytorch_{formats[0]}_library" not in rows[0]:
        return None
    return "PyTorch pair ran on: " + ", ".join(
        f"{FORMAT_LABEL[f]} " + "/".join(sorted({r[f"pytorch_{f}_library"] for r in rows}))
        for f in formats)


def suite_speedup(rows: list[dict], formats: list[str]) -> float:
    """Best pair format over best sepconv format, on the summed layer times."""
    best = {v: min(sum(r[f"{v}_{f}_s"] for r in rows) for f in formats) for v, _ in VARIANTS}
    return best["pytorch"] / best["sepconv"]


MODEL_COLUMNS = [("latency_s", "latency b1 ms", 1e3), ("images_per_s", "images/s", 1.0),
                 ("train_step_s", "train step ms", 1e3), ("saved_mb", "saved MiB", 1.0)]


def _model_cell(row: dict, key: str, scale: float) -> str:
    """pair / sepconv, and how much faster (or smaller) sepconv is."""
    pair, ours = (row[f"{v}_{key}"] for v, _ in VARIANTS)
    gain = ours / pair if key == "images_per_s" else pair / ours
    return f"{pair * scale:.1f} / {ours * scale:.1f} ({gain:.2f}x)"


def model_table(rows: list[dict]) -> str:
    lines = ["whole networks: as given (batch norms unfolded), then BN-folded nn.Conv2d / "
             "sepconv.fuse",
             f"{'model':15}{'format':>15}{'batch':>6}{'fused':>6}{'as given b1 ms':>16}"
             + "".join(f"{h:>28}" for _, h, _ in MODEL_COLUMNS)]
    lines += [f"{r['model']:15}{r['format']:>15}{r['batch']:>6}{r['fused_chains']:>6}"
              f"{r['given_latency_s'] * 1e3:>16.1f}"
              + "".join(f"{_model_cell(r, k, s):>28}" for k, _, s in MODEL_COLUMNS)
              for r in rows]
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1))


def write_csv(path: Path, result: dict) -> None:
    """One row per (suite, layer); the run's settings and the machine on every row."""
    machine = {f"machine_{k}": v for k, v in result["machine"].items()}
    rows = [{"suite": s, "batch": result["batch"], "dtype": result["dtype"],
             "mode": result["mode"], **r, "machine": result["machine_name"], **machine}
            for s, rs in result["suites"].items() for r in rs]
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(path: Path, result: dict, plots: list[str]) -> None:
    m, p = result["machine"], result["peaks"]
    caches = m.get("cpu_caches") or {}
    where = m.get("gpu") or (
        f"{m['cpu']} ({m.get('cpu_uarch') or 'microarchitecture unknown'}"
        + (f", L2 {caches['l2'] >> 10} KiB per core" if caches.get("l2") else "")
        + f"), {m['threads']} threads, {m['cpu_isa']}"
        + (", subnormals kept" if m.get("cpu_flush_denormal") is False else "")
        + (", no huge pages" if m.get("cpu_huge_pages") is False else ""))
    out = [f"# sepconv benchmark: {result['mode']}, batch {result['batch']}, {result['dtype']}",
           "", f"`{result['command']}`", "",
           f"- machine: {where}; torch {m['torch']}, oneDNN {m['onednn']}"
           + (f", cuDNN {m['cudnn']}, CUDA {m['cuda']}, driver {m['driver']}"
              if "gpu" in m else ""),
           f"- sepconv {m['sepconv']} at {(m['git_revision'] or 'unknown')[:12]}"
           + (" (uncommitted changes)" if m["git_dirty"] else ""),
           f"- measured: {p['compute_probe']} {p['compute_gflops']:.0f} GFLOP/s, "
           f"copy {p['copy_gbs']:.1f} GB/s"
           + (f"; after the run {result['peaks_after']['compute_gflops']:.0f} GFLOP/s"
              if "peaks_after" in result else "")
           + ("" if result.get("host_steady", True) else
              " (**the probe moved: a shared or throttled host, ratios unreliable**)"),
           f"- memory: {m.get('allocator') or 'system defaults'}",
           f"- the pair: ATen {m.get('pytorch_cpu_isa') or 'unknown'}, oneDNN "
           + (f"capped at {m['onednn_max_isa']}" if m.get("onednn_max_isa") else "uncapped")
           if m.get("device") != "cuda" else "- the pair: cuDNN / PyTorch's CUDA kernels "
           "(which ran: below each table)", ""]
    formats = result["formats"]
    for suite, rows in result["suites"].items():
        cols = _columns(formats)
        same = ", ".join(f"{FORMAT_LABEL[f]} vs {FORMAT_LABEL[f]} {suite_same_format(rows, f):.2f}x"
                         for f in formats)
        out += [f"## {suite}: {suite_speedup(rows, formats):.2f}x best vs best; {same}", "",
                "| layer | " + " | ".join(f"{h} ms" for _, h in cols)
                + "".join(f" | {FORMAT_LABEL[f]} x" for f in formats)
                + " | speedup | % peak | % BW |",
                "|---" * (len(cols) + len(formats) + 4) + "|"]
        out += [f"| {r['layer']} | " + " | ".join(f"{r[k] * 1e3:.3f}" for k, _ in cols)
                + "".join(f" | {same_format(r, f):.2f}" for f in formats)
                + f" | {r['speedup']:.2f} | {100 * r['fraction_compute_peak']:.0f}"
                f" | {100 * r['fraction_bandwidth']:.0f} |" for r in rows]
        out += ["| total | " + " | ".join(f"{sum(r[k] for r in rows) * 1e3:.3f}" for k, _ in cols)
                + "".join(f" | {suite_same_format(rows, f):.2f}" for f in formats)
                + f" | {suite_speedup(rows, formats):.2f} | | |"]
        libraries = pair_libraries(rows, formats)
        out += ["", libraries, ""] if libraries else [""]
        times = kernel_times(rows, formats)
        out += [times, ""] if times else []
    if result["models"]:
        out += ["## Whole networks", "",
                "As given (eval, batch norms as modules); then the same network with every "
                "conv + batch norm folded (nn.Conv2d, the PyTorch baseline) / "
                "`sepconv.fuse` of it (other convs folded alike).", "",
                "| model | format | batch | fused chains | as given b1 ms | "
                + " | ".join(f"{h} (pair / sepconv, gain)" for _, h, _ in MODEL_COLUMNS) + " |",
                "|---" * (5 + len(MODEL_COLUMNS)) + "|"]
        out += [f"| {r['model']} | {r['format']} | {r['batch']} | {r['fused_chains']} | "
                f"{r['given_latency_s'] * 1e3:.1f} | "
                + " | ".join(_model_cell(r, k, s) for k, _, s in MODEL_COLUMNS) + " |"
                for r in result["models"]]
        out.append("")
    if result["refused"]:
        out += ["## Refused (wrong result, not timed)", ""]
        out += [f"- {r['suite']} {r['config']}: {r['why'].splitlines()[0]}"
                for r in result["refused"]]
        out.append("")
    out += [f"![{name}]({name})" for name in plots]
    path.write_text("\n".join(out) + "\n")


def plot_speedup(path: Path, result: dict) -> bool:
    """Speedup over the best PyTorch pair, per layer, one panel per suite."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = result["suites"]
    if not suites:
        return False
    fig, axes = plt.subplots(len(suites), 1, figsize=(11, 2.8 * len(suites)), squeeze=False)
    for ax, (suite, rows) in zip(axes[:, 0], suites.items()):
        speed = [r["speedup"] for r in rows]
        ax.bar(range(len(rows)), speed, color=["tab:green" if s >= 1 else "tab:red"
                                               for s in speed])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=30, ha="right",
                      fontsize=7)
        ax.set_ylabel("speedup")
        ax.set_title(f"{suite}: {suite_speedup(rows, result['formats']):.2f}x overall",
                     fontsize=10)
    fig.suptitle(f"sepconv vs best PyTorch pair ({result['mode']}, batch {result['batch']}, "
                 f"{result['dtype']}, {result['machine_name']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_roofline(path: Path, result: dict) -> bool:
    """Each layer at its arithmetic intensity (FLOPs / minimum bytes) against the two
    measured ceilings; sepconv filled, the best pair hollow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(s, r) for s, rs in result["suites"].items() for r in rs]
    if not rows:
        return False
    peak, bw = result["peaks"]["compute_gflops"], result["peaks"]["copy_gbs"]
    ai = [r["flops"] / r["min_bytes"] for _, r in rows]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lo, hi = min(ai) / 2, max(max(ai) * 2, 2 * peak / bw)
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak, x * bw) for x in xs], color="black", linewidth=1,
            label=f"ceiling: {peak:.0f} GFLOP/s, {bw:.0f} GB/s")
    colours = {}
    for (suite, r), x in zip(rows, ai):
        c = colours.setdefault(suite, f"C{len(colours)}")
        ax.scatter(x, r["gflops"], color=c, s=22, label=suite)
        ax.scatter(x, r["pair_gflops"], facecolors="none", edgecolors=c, s=22)
    handles, labels = ax.get_legend_handles_labels()
    keep = dict(zip(labels, handles))  # one entry per suite
    ax.legend(keep.values(), keep.keys(), fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("arithmetic intensity (FLOPs / minimum bytes)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"Roofline, {result['machine_name']}: sepconv filled, best PyTorch pair "
                 f"hollow ({result['mode']}, batch {result['batch']}, {result['dtype']})",
                 fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
