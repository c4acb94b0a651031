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


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_uarch(info: dict) -> str | None:
    """The x86 microarchitecture, from the family number and the feature flags.

    VMs report a generic model name ("AMD EPYC", "Intel(R) Xeon(R) Processor") and at
    times a made-up model number, so AMD is told apart by family and AVX-512 (Zen 3
    and Zen 4 share family 25), Intel by the newest feature it has.
    """
    vendor, flags = info.get("vendor_id"), set(info.get("flags", "").split())
    try:
        family = int(info.get("cpu family", ""))
    except ValueError:
        return None
    if vendor == "AuthenticAMD":
        if family == 26:
            return "zen5"
        if family == 25:
            return "zen4" if "avx512f" in flags else "zen3"
        if family == 23:
            return "zen2" if "clwb" in flags else "zen1"
        return None
    if vendor == "GenuineIntel" and family == 6:
        # A guest may hide AMX-FP16 (and report a client's model number), but not the
        # L3: more than 320 MiB, Emerald Rapids' most, is a Granite Rapids host.
        l3_kib = int((re.findall(r"\d+", info.get("cache size", "")) or ["0"])[0])
        if "amx_tile" in flags and l3_kib > 320 * 1024:
            return "graniterapids"
        for flag, name in (("amx_fp16", "graniterapids"), ("amx_tile", "sapphirerapids"),
                           ("avx512_vp2intersect", "tigerlake"), ("avx512_vbmi2", "icelake"),
                           ("avx512_vnni", "cascadelake"), ("avx512f", "skylake-x"),
                           ("avx_vnni", "alderlake"), ("avx2", "haswell")):
            if flag in flags:
                return name
    return None


def _cpu_model(info: dict) -> str:
    return info.get("model name") or platform.processor() or platform.machine()


def describe(device: str) -> dict:
    """Hardware, software and revision, for the results files."""
    info = sepconv.backend_info()
    onednn = re.search(r"(?:MKL-DNN|oneDNN) v([\d.]+)", torch.__config__.show())
    cpu = _cpuinfo()
    d = {"device": device, "cpu": _cpu_model(cpu), "cpu_uarch": cpu_uarch(cpu),
         "cpu_family": cpu.get("cpu family"), "cpu_model_number": cpu.get("model"),
         "cpu_cores": os.cpu_count(), "cpu_isa": info["cpu_isa"],
         "cpu_isas": info["cpu_isas"], "cpu_caches": info.get("cpu_caches"),
         "cpu_flush_denormal": info.get("cpu_flush_denormal"),
         "cpu_huge_pages": info.get("cpu_huge_pages"),
         "threads": torch.get_num_threads(),
         # the pair's instruction sets: ATen's kernels, and oneDNN's cap where one is set
         # (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 with SEPCONV_ISA=avx2 stand
         # in for an AVX2-only CPU on both sides)
         "pytorch_cpu_isa": torch.backends.cpu.get_cpu_capability(),
         "onednn_max_isa": (os.environ.get("ONEDNN_MAX_CPU_ISA")
                            or os.environ.get("DNNL_MAX_CPU_ISA")),
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


def set_allocator(policy: str) -> str:
    """Fix how freed CPU memory comes back, the same for both sides; returns its description.

    glibc serves blocks over its mmap threshold (at most 32 MiB) with fresh pages, which
    the next call faults in and clears again, 4 KiB at a time. Below that, whether a
    block reuses freed heap memory depends on the heap's history. So one run of a layer
    with a 38 MB output measured the pair at 0.80x and the next at 2.00x, the kernels
    unchanged, and the pair, which also allocates its intermediate, faulted in millions
    of pages per layer. 'reuse' keeps every block on the heap (M_MMAP_MAX 0) and freed
    memory mapped (M_TRIM_THRESHOLD 1 GiB): calls after the first reuse memory, as under
    a caching allocator such as jemalloc or tcmalloc, and the kernels are compared
    with each other. 'system' leaves the C library's defaults.
    """
    if policy == "system":
        return "system defaults"
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError, TypeError):
        ok = False
    if not ok:
        return "system defaults (mallopt unavailable)"
    return "heap reuse (glibc mallopt: M_MMAP_MAX 0, M_TRIM_THRESHOLD 1 GiB)"


def machine_name(desc: dict) -> str:
    """A folder name: the GPU's name on CUDA; else the CPU's vendor and microarchitecture
    (its first model-name word where that is unknown), cores and the ISA the kernels
    ran with: a Zen 4 forced to AVX2 is amd-zen4-2core-avx2, not a Zen 3's folder."""
    if desc["device"] == "cuda":
        label = desc["gpu"]
    else:
        words = [w for w in re.split(r"[\s()]+", re.sub(r"\((R|TM)\)", " ", desc["cpu"]))
                 if w]
        uarch = desc.get("cpu_uarch") or " ".join(words[1:2])
        label = f"{' '.join(words[:1])} {uarch} {desc['cpu_cores']}core {desc['cpu_isa'] or ''}"
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
