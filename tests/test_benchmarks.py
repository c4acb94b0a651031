"""The benchmark harness runs end to end (its timings are not tested)."""

import json

from benchmarks.__main__ import main


def test_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--suite", "xception", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["suites"]["xception"]
    assert len(rows) == 3 and all(r["speedup"] > 0 and r["gflops"] > 0 for r in rows)
    assert "total" in capsys.readouterr().out


def test_benchmark_forward_backward(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--suite", "xception", "--quick", "--mode", "fwdbwd", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "fwdbwd" and len(result["suites"]["xception"]) == 3
