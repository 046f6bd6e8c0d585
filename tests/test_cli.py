"""The `stp-fast` command: info and bench run and report honestly."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from stp_fast import cli


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "stp_fast", *args], capture_output=True, text=True, timeout=timeout)


def test_info_text_and_json():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    for key in ("torch", "triton", "stp_fast._C", "CPU kernels", "CUDA kernels", "GPU visible", "masked_linear"):
        assert key in out.stdout
    data = json.loads(_run("info", "--json").stdout)
    assert data["torch"]
    assert set(data["ops"]["masked_linear"]) == {"cpu", "cuda"}


def test_console_script_installed():
    exe = shutil.which("stp-fast", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("stp-fast console script not on this interpreter's bin path")
    out = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "masked_linear" in out.stdout


def test_bench_quick_writes_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main(["bench", "masked_linear", "--quick", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "measured now on" in table and "vs masked" in table
    record = json.loads(path.read_text())
    providers = {r["provider"] for r in record["rows"]}
    assert providers == {"stp_fast", "stp_fast_prefix", "sliced", "masked"}
    assert all(r["p50"] > 0 for r in record["rows"])


def test_bad_arguments_exit_2():
    assert _run("bench", "nonsense").returncode == 2
    assert _run("frobnicate").returncode == 2
