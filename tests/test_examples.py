"""The scripts in examples/ run as documented (short settings): they are part of the README's promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_own_loop_example_prunes_and_saves(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "own_loop.py"), "--epochs", "1", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no fine-tuning" in out.stdout and "MyNet rebuilt" in out.stdout
    program = torch.export.load(str(tmp_path / "pruned.pt2")).module()
    y = program(torch.randn(3, 1, 8, 8))
    assert y.shape == (3, 10)
    assert (tmp_path / "layout.json").is_file() and (tmp_path / "pruned_state_dict.pt").is_file()
