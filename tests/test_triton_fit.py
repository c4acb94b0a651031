"""The Triton kernels compile for the GPUs they target (sm_90a, sm_80), fit their
shared memory and spill no register: benchmarks/triton_fit.py, run here without a GPU
(its --quick subset), with the installed triton and with each one under
SEPCONV_TRITON_FIT_PATHS (CI adds 3.6, the GPU machines' version: os.pathsep-separated
folders holding a triton package). A kernel of the quick set for which ptxas reports
a spill store fails, under every triton (the full tables, benchmarks/results/triton-fit/,
have none either)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")


OTHER_TRITONS = [p for p in os.environ.get("SEPCONV_TRITON_FIT_PATHS", "").split(os.pathsep)
                 if p]


@pytest.mark.parametrize("triton_path", [None] + OTHER_TRITONS)
def test_kernels_compile_fit_and_do_not_spill(tmp_path, triton_path):
    # a subprocess: the check swaps Triton's driver and launcher for compile-only ones
    env = dict(os.environ)
    if triton_path:
        assert (Path(triton_path) / "triton").is_dir(), triton_path
        env["PYTHONPATH"] = os.pathsep.join([triton_path, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "benchmarks.triton_fit", "--quick",
                          "--max-spill", "0",
                          "--out", str(tmp_path)], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=1200, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    version = "*"
    if triton_path:  # the tables must come from that triton, not the installed one
        version = next(Path(triton_path).glob("triton-*.dist-info")).name.split("-")[1] \
            .removesuffix(".dist")
    for cc in (90, 80):
        table = next(tmp_path.glob(f"sm{cc}_triton{version}_quick.md")).read_text()
        for kernel in ("_forward", "_forward (GRAD)", "_depthwise", "_forward (GEMM)",
                       "_forward (GRAD) (GEMM)", "_mid", "_pw_weight", "_dw_weight", "_input",
                       "_mean"):
            assert f"| {kernel} |" in table
        assert "| yes |" in table  # the autotune configs compiled too


def test_static_estimate_covers_every_layer(tmp_path):
    """benchmarks/triton_estimate.py: a predicted time for every benchmark layer in both
    layouts, from kernels compiled for sm_90a, and the suite sums it tests against."""
    from benchmarks.shapes import SUITES

    out = tmp_path / "estimate.md"
    run = subprocess.run([sys.executable, "-m", "benchmarks.triton_estimate", "--batch", "128",
                          "--out", str(out)], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| mobilenet") or line.startswith("| convnext")]
    layer_rows = [r for r in rows if len(r) == 8]
    want = {(s, layer.name(), fmt) for s in ("mobilenet_v1", "mobilenet_v2", "convnext")
            for layer in SUITES[s] for fmt in ("nchw", "channels_last")}
    assert {(r[0][2:], r[1], r[3]) for r in layer_rows} == want
    for r in layer_rows:
        predicted, floor = float(r[5]), float(r[6])
        assert predicted >= floor > 0, r  # nothing beats the bytes floor
    sums = [r for r in rows if len(r) == 6]  # (convnext's block changed since the GPU run)
    assert len(sums) == 4 and all(float(r[-1].rstrip("x |")) > 0 for r in sums)
