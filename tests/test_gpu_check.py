"""benchmarks/gpu_check.sh in its quick CPU mode (what a GPU session runs in full): it must keep working
without a GPU -- every phase ends cleanly and summary.json has the documented structure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full GPU run is benchmarks/gpu_check.sh itself")
def test_gpu_check_quick_cpu_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_CPU_BUDGET": "480"}  # no section skipped for time
    env.pop("TRITON_INTERPRET", None)  # the script decides (interpreter without a GPU)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["schema"] == "stp_fast.gpu_check/1"
    phases = {p["name"]: p["rc"] for p in summary["phases"]}
    assert phases == {"env": 0, "triton": 0, "checks": 0}, phases
    assert summary["tests"]["triton"]["failures"] == 0 and summary["tests"]["triton"]["passed"] > 0
    checks = summary["checks"]
    assert checks["correctness"]["cases"] > 0 and checks["correctness"]["failed"] == []
    for name in ("warps", "tf32", "sync_capture"):
        assert "skipped" in checks[name]
    for name in ("ceilings", "masked", "multi", "step"):
        assert "error" not in checks[name] and "skipped" not in checks[name], (name, checks[name])
    assert checks["step"]["amp"].startswith("autocast")
    assert set(summary["targets"]) == {"masked_vs_sliced", "multi_cifar_vs_seq", "multi_imagenet_vs_seq",
                                       "step_vs_masked"}  # fmt: skip
    for name in ("checks.json", "env.json", "junit-triton.xml", "log.txt", "phases.jsonl", "summary.json"):
        assert (tmp_path / name).exists(), name
