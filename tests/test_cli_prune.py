"""`stp-fast prune | train | eval` end to end on digits (short runs) and their bad-input handling."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stp_fast.cli import main
from stp_fast.data import load_dataset

FAST = ["--epochs", "1", "--set", "pool_size=6", "--set", "final_candidates=2", "--set", "calib_images=200",
        "--progress", "log"]  # fmt: skip
SCHEMA = {"model": str, "dataset": str, "method": str, "full": dict, "pruned": dict, "flops_reduction": float,
          "fine_tuned": bool, "bn_recalibrated": bool, "wall_s": float, "device": str}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # small nets: threads only add overhead


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "run"
    torch.set_num_threads(1)
    assert main(["prune", "--model", "resnet20", "--dataset", "digits", "--flops-target", "0.15", "--out", str(out),
                 *FAST]) == 0  # fmt: skip
    return out


def test_prune_writes_every_output_and_the_report_follows_the_schema(pruned_run):
    names = {"pruned.pt", "arch.json", "report.json", "report.md", "pareto.png", "metrics.jsonl", "checkpoint.pt"}
    assert names <= {p.name for p in pruned_run.iterdir()}
    rep = json.loads((pruned_run / "report.json").read_text())
    for key, typ in SCHEMA.items():
        assert isinstance(rep[key], typ), key
    assert set(rep["full"]) == {"top1", "macs", "params"}
    assert set(rep["pruned"]) == {"top1", "macs", "params", "arch"}
    assert rep["fine_tuned"] is False and rep["bn_recalibrated"] is True and rep["method"] == "stp"
    assert rep["flops_reduction"] == pytest.approx(1 - rep["pruned"]["macs"] / rep["full"]["macs"])
    assert rep["flops_reduction"] >= 0.85
    assert json.loads((pruned_run / "arch.json").read_text()) == rep["pruned"]["arch"]
    lines = [json.loads(s) for s in (pruned_run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["event"] for ln in lines] == ["epoch", "final"]
    assert (pruned_run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (pruned_run / "report.md").read_text()
    assert "no fine-tuning" in md and f"{100 * rep['pruned']['top1']:.2f}%" in md


def test_torchscript_model_runs_without_stp_fast_and_reproduces_the_top1(pruned_run, tmp_path):
    ds = load_dataset("digits")
    x, y = next(iter(ds.loader("test", batch_size=10_000)))
    torch.save({"x": x, "y": y}, tmp_path / "test.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        model = torch.jit.load({str(pruned_run / "pruned.pt")!r})
        data = torch.load({str(tmp_path / "test.pt")!r})
        with torch.no_grad():
            top1 = (model(data["x"]).argmax(-1) == data["y"]).double().mean().item()
        assert not any(m.startswith("stp_fast") for m in sys.modules), "stp_fast was imported"
        print(top1)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rep = json.loads((pruned_run / "report.json").read_text())
    assert float(out.stdout.strip()) == pytest.approx(rep["pruned"]["top1"], abs=1e-9)


def test_eval_command_reports_the_same_top1(pruned_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(pruned_run / "pruned.pt"), "--dataset", "digits", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    rep = json.loads((pruned_run / "report.json").read_text())
    assert got["top1"] == pytest.approx(rep["pruned"]["top1"])


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_output_folder_with_an_earlier_run_is_refused_and_left_untouched(pruned_run, capsys):
    before = _snapshot(pruned_run)
    code = main(["prune", "--model", "resnet20", "--flops-target", "0.2", "--out", str(pruned_run), *FAST])
    assert code == 2
    assert "earlier run" in capsys.readouterr().err
    assert _snapshot(pruned_run) == before


@pytest.mark.parametrize(("args", "message"), [
    (["--flops-target", "1.5"], "--flops-target must lie in"),
    (["--flops-target", "0"], "--flops-target must lie in"),
    (["--flops-target", "0.15", "--model", "resnet21"], "unknown; known models"),
    (["--flops-target", "0.15", "--dataset", "mnistt"], "digits"),
    (["--flops-target", "0.15", "--dataset", "npz", "--data", "/nonexistent/x.npz"], "/nonexistent/x.npz"),
    (["--flops-target", "0.15", "--set", "kd_weight=-1"], "kd_weight"),
    (["--flops-target", "0.15", "--set", "bogus=1"], "bogus"),
    (["--flops-target", "0.15", "--resume"], "--resume"),
])  # fmt: skip
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    argv = ["prune", "--model", "resnet20", "--out", str(tmp_path / "out"), *args]
    if "--model" in args:
        argv = ["prune", "--out", str(tmp_path / "out"), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_corrupt_data_exits_2(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((4, 8, 8), np.uint8))  # no labels, no test split
    assert main(["prune", "--model", "resnet20", "--flops-target", "0.15", "--dataset", f"npz:{tmp_path}/bad.npz",
                 "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "bad.npz" in err and "y_train" in err


def test_dense_train_then_prune_from_it_and_init_of_another_model_is_refused(tmp_path, capsys):
    dense = tmp_path / "dense"
    assert main(["train", "--model", "resnet20", "--out", str(dense), "--epochs", "1", "--progress", "off"]) == 0
    assert (dense / "dense.pt").exists() and (dense / "report.json").exists()
    code = main(["prune", "--model", "resnet56", "--flops-target", "0.15", "--init", str(dense / "dense.pt"),
                 "--out", str(tmp_path / "p56"), *FAST])  # fmt: skip
    assert code == 2
    assert "another model" in capsys.readouterr().err
    assert main(["eval", "--model", str(dense / "dense.pt"), "--dataset", "digits"]) == 0


def test_a_diverging_run_exits_2_and_says_so(tmp_path, capsys):
    code = main(["prune", "--model", "resnet20", "--flops-target", "0.15", "--out", str(tmp_path / "nan"),
                 "--lr", "1e12", "--epochs", "2", "--progress", "off"])  # fmt: skip
    assert code == 2
    assert "training diverged" in capsys.readouterr().err
