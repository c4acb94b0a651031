"""The Triton kernels compile for the GPUs they target (sm_90a, sm_80) and fit their
shared memory: benchmarks/triton_fit.py, run here without a GPU (its --quick subset)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")


def test_kernels_compile_and_fit_shared_memory(tmp_path):
    # a subprocess: the check swaps Triton's driver and launcher for compile-only ones
    run = subprocess.run([sys.executable, "-m", "benchmarks.triton_fit", "--quick", "--out",
                          str(tmp_path)], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    for cc in (90, 80):
        table = next(tmp_path.glob(f"sm{cc}_triton*_quick.md")).read_text()
        for kernel in ("_forward", "_forward (GRAD)", "_mid", "_pw_weight", "_dw_weight",
                       "_input"):
            assert f"| {kernel} |" in table
        assert "| yes |" in table  # the autotune configs compiled too
