"""What a benchmark ran on, and the ceilings measured on it in the same run."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils import benchmark as tbench

import sepconv

REPO = Path(__file__).resolve().parent.parent


def _run(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> dict:
    """Hardware, software and revision, for the results files."""
    info = sepconv.backend_info()
    onednn = re.search(r"(?:MKL-DNN|oneDNN) v([\d.]+)", torch.__config__.show())
    d = {"device": device, "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
         "cpu_isa": info["cpu_isa"], "threads": torch.get_num_threads(),
         "python": sys.version.split()[0], "torch": torch.__version__,
         "onednn": onednn.group(1) if onednn else None, "sepconv": info["version"],
         "platform": platform.platform(), "git_revision": _run("git", "rev-parse", "HEAD"),
         # results written by an earlier run do not make the code dirty
         "git_dirty": bool(_run("git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!benchmarks/results"))}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        d.update(gpu=props.name, gpu_sms=props.multi_processor_count,
                 gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version(),
                 driver=_run("nvidia-smi", "--query-gpu=driver_version",
                             "--format=csv,noheader"))
        try:
            import triton
            d["triton"] = triton.__version__
        except ImportError:
            d["triton"] = None
    return d


def machine_name(desc: dict) -> str:
    """A folder name: the GPU's name on CUDA, else CPU vendor/model, cores and ISA."""
    if desc["device"] == "cuda":
        label = desc["gpu"]
    else:
        words = [w for w in re.split(r"[\s()]+", desc["cpu"]) if w and w not in ("(R)", "(TM)")]
        label = " ".join(words[:2]) + f" {desc['cpu_cores']}core {desc['cpu_isa'] or ''}"
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _median_seconds(stmt: str, **env) -> float:
    return tbench.Timer(stmt, globals=env, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=1.0).median


def measure_peaks(device: str, dtype: torch.dtype) -> dict:
    """Compute and bandwidth ceilings: on CPU an FMA loop compiled into sepconv._C
    (the BLAS is far below the FMA peak on some CPUs), on GPU a large matmul in the
    benchmark's dtype; a copy far beyond the caches."""
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
