"""``scripts/gpu_check.py`` in its CPU mode: the same code paths the GPU run takes, tiny shapes."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def test_gpu_check_cpu_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    fp32 = [r for r in results["correctness"] if r["dtype"] == "float32"]
    assert fp32 and all(r["random_equal"] and r["oracle_equal"] for r in fp32)
    assert {r["path"] for r in fp32} == {"custom", "stock"}
    curve = results["curve"]
    assert {p["path"] for p in curve} == {"ours", "stock"} and all(p["identical"] for p in curve)
    for point in curve:
        # the steered draft accepts exactly forced_tau - 1 drafts per cycle (the last cycle may be cut short)
        assert point["forced_tau"] - 0.25 <= point["measured_tau"] <= point["forced_tau"], point
        assert point["speedup"] > 0 and point["verify_ms_per_cycle"] > 0
    assert results["training"]["tokens_per_second"] > 0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "Speedup over plain generate vs acceptance length" in markdown and "Training throughput" in markdown
    assert (tmp_path / "speedup_vs_tau.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
