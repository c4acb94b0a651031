"""The benchmark harness runs end to end and writes valid files (its timings are not
tested)."""

import csv
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.layers import check_agree
from benchmarks.machine import cpu_uarch, describe, machine_name

PNG = b"\x89PNG\r\n\x1a\n"


def test_tiny_run_writes_every_file(tmp_path, capsys):
    args = ["--suite", "tiny", "models", "--quick", "--resolution", "32", "--model-batch", "2",
            "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "total" in out and "whole networks" in out
    result = json.loads((tmp_path / "fwd_b1_float32.json").read_text())
    rows = result["suites"]["tiny"]
    assert len(rows) == 2 and all(r["speedup"] > 0 and r["gflops"] > 0 for r in rows)
    assert {r["model"] for r in result["models"]} == {
        "mobilenet_v1", "mobilenet_v2", "shufflenet_v2", "shufflenet_v1", "mobilenet_v3_large",
        "efficientnet_b0"}
    assert [r["fused_chains"] for r in result["models"]][::2] == [13, 17, 19, 16, 15, 16]
    assert result["machine"]["torch"] and result["peaks"]["copy_gbs"] > 0
    assert result["peaks_after"]["compute_gflops"] > 0 and "host_steady" in result
    assert result["machine"]["allocator"].startswith(("heap reuse", "system defaults"))
    with (tmp_path / "fwd_b1_float32.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and table[0]["suite"] == "tiny" and float(table[0]["speedup"]) > 0
    assert table[0]["machine_torch"] == result["machine"]["torch"]
    md = (tmp_path / "fwd_b1_float32.md").read_text()
    assert "| 8x12->16/s1/k3 |" in md and "mobilenet_v2" in md
    for plot in ("speedup", "roofline"):
        assert (tmp_path / f"fwd_b1_float32_{plot}.png").read_bytes().startswith(PNG)


def test_forward_backward_one_format(tmp_path):
    assert main(["--suite", "tiny", "--quick", "--mode", "fwdbwd", "--format", "channels_last",
                 "--malloc", "system", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fwdbwd_b1_float32.json").read_text())
    assert result["machine"]["allocator"] == "system defaults"
    md = (tmp_path / "fwdbwd_b1_float32.md").read_text()
    assert "- memory: system defaults" in md
    # the pair's instruction sets are named (ATen's always, oneDNN's cap when one is set)
    assert result["machine"]["pytorch_cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert f"- the pair: ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN " in md
    row = result["suites"]["tiny"][0]
    assert result["mode"] == "fwdbwd" and "sepconv_channels_last_s" in row
    assert "sepconv_nchw_s" not in row


def test_thread_count_other_than_the_default_keeps_its_own_files(tmp_path):
    import benchmarks.__main__ as cli
    try:
        assert main(["--suite", "tiny", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(cli.DEFAULT_THREADS)
    result = json.loads((tmp_path / "fwd_b1_float32_1threads.json").read_text())
    assert result["machine"]["threads"] == 1
    assert not (tmp_path / "fwd_b1_float32.json").exists()


def test_machine_names_are_folder_names():
    cpu = {"device": "cpu", "cpu": "AMD EPYC 7B13 64-Core Processor", "cpu_cores": 2,
           "cpu_isa": "avx512"}
    assert machine_name(cpu) == "amd-epyc-2core-avx512"  # microarchitecture unknown
    assert machine_name({**cpu, "cpu": "AMD EPYC", "cpu_uarch": "zen4", "cpu_isa": "avx2"}) \
        == "amd-zen4-2core-avx2"
    xeon = {**cpu, "cpu": "Intel(R) Xeon(R) Processor", "cpu_uarch": "sapphirerapids"}
    assert machine_name(xeon) == "intel-sapphirerapids-2core-avx512"
    assert machine_name({"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}) == \
        "nvidia-h100-80gb-hbm3"


def test_microarchitecture_from_family_and_flags():
    def info(vendor, family, flags):
        return {"vendor_id": vendor, "cpu family": str(family), "flags": flags}
    amd, intel = "AuthenticAMD", "GenuineIntel"
    assert cpu_uarch(info(amd, 25, "fma avx2 avx512f avx512_bf16")) == "zen4"
    assert cpu_uarch(info(amd, 25, "fma avx2")) == "zen3"  # same family, no AVX-512
    assert cpu_uarch(info(intel, 6, "avx2 avx512f avx512_vnni amx_tile amx_int8")) == \
        "sapphirerapids"
    spr = info(intel, 6, "avx2 avx512f amx_tile")  # a guest with AMX-FP16 hidden:
    assert cpu_uarch({**spr, "cache size": "107520 KB"}) == "sapphirerapids"
    assert cpu_uarch({**spr, "cache size": "491520 KB"}) == "graniterapids"  # its L3
    assert cpu_uarch(info(intel, 6, "avx2 avx512f avx512_vnni")) == "cascadelake"
    assert cpu_uarch({"vendor_id": "ARM"}) is None and cpu_uarch({}) is None
    here = describe("cpu")  # whatever this machine is, its name is a folder name
    assert re.fullmatch(r"[a-z0-9-]+", machine_name(here)) and here["cpu_caches"]["l2"] > 0


def test_default_folder_and_out_none(tmp_path, monkeypatch):
    import benchmarks.__main__ as cli
    monkeypatch.setattr(cli, "REPO", tmp_path)
    assert main(["--suite", "tiny", "--quick", "--out", "none"]) == 0
    assert not (tmp_path / "benchmarks").exists()
    assert main(["--suite", "tiny", "--quick"]) == 0
    (folder,) = (tmp_path / "benchmarks" / "results").iterdir()
    assert (folder / "fwd_b1_float32.json").exists()


def test_a_moved_probe_marks_the_run():
    from benchmarks.__main__ import steady_host
    assert steady_host({"compute_gflops": 500.0}, {"compute_gflops": 470.0})
    assert not steady_host({"compute_gflops": 500.0}, {"compute_gflops": 250.0})
    assert not steady_host({"compute_gflops": 250.0}, {"compute_gflops": 500.0})
    assert steady_host({"compute_gflops": float("nan")}, {"compute_gflops": 1.0})


def test_pair_library_from_kernel_names():
    from benchmarks.layers import pair_library
    aten = "void at::native::conv_depthwise2d_forward_kernel<3, float, int>(...)"
    assert pair_library([aten, "sm90_xmma_gemm_f32f32"]) == "aten depthwise"
    assert pair_library(["sm90_xmma_fprop_implicit_gemm_indexed_f16f16"]) == "cudnn"
    assert pair_library(["conv2d_c1_k1_nhwc_specialized", "nvjet_sm90_tst_32x384"]) == "cudnn"
    assert pair_library(["elementwise_kernel"]) == "other"


def test_wrong_result_is_refused_not_timed(tmp_path, monkeypatch):
    import benchmarks.layers as layers
    right = layers.fused
    monkeypatch.setattr(layers, "fused", lambda *a: (lambda x: right(*a)(x) * 1.01))
    assert main(["--suite", "tiny", "--quick", "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "fwd_b1_float32.json").read_text())
    assert result["suites"] == {} and len(result["refused"]) == 2
    assert "disagrees" in result["refused"][0]["why"]
    assert "Refused" in (tmp_path / "fwd_b1_float32.md").read_text()


def test_gradient_check_tolerates_an_activation_kink_flip_not_a_wrong_row():
    pair = torch.randn(32, 16, 28, 28, generator=torch.Generator().manual_seed(0))
    flip = pair.clone()
    flip[3, :, 5:8, 5:8] += 0.3  # one relu' flip: a 3x3 x C patch of grad_x moves
    check_agree([flip], [pair], "gradients", kinks=True)
    with pytest.raises(AssertionError, match="disagrees"):
        check_agree([flip], [pair], "output")  # forward outputs are compared elementwise
    wrong_row = pair.clone()
    wrong_row[:, :, -1] = 0  # a band's last row lost
    with pytest.raises(AssertionError, match="relative L2 error"):
        check_agree([wrong_row], [pair], "gradients", kinks=True)


def test_gpu_run_script_dry_run(tmp_path):
    """benchmarks/gpu_run.sh, the one command for a lent GPU machine, runs each of its
    steps (tests, layers forward and training, networks) on CPU, tiny, and packs the
    result files: a broken script is found here, not in a short GPU lease."""
    out = tmp_path / "out"
    run = subprocess.run(["bash", "benchmarks/gpu_run.sh", str(out), "--dry-run"],
                         cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         timeout=900)
    log = (out / "log.txt").read_text()
    assert run.returncode == 0 and "gpu_run: all steps passed" in log, log[-3000:]
    tests = (out / "tests.txt").read_text()
    assert " passed" in tests and " failed" not in tests
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"fwd_b1_float32.json", "fwdbwd_b1_float32.json", "models_b2_float32.json",
            "fwd_b2_float32.json", "fwd_b2_float64.json"} <= names


def test_percall_reports_every_path_in_both_formats(capsys):
    from benchmarks import percall
    assert percall.main(["--channels", "8", "--size", "3", "--min-run-time", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "8 channels, 3x3, batch 1" in out
    rows = percall.measure(8, 3, 0.01)
    assert len(rows) == 12 and {r["format"] for r in rows} == {"nchw", "channels_last"}
    assert all(r["us"] > 0 for r in rows) and torch.is_grad_enabled()
