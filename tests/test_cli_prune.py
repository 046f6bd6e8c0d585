"""`stp-fast prune | train | eval` end to end on digits (short runs) and their bad-input handling."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from stp_fast.cli import main
from stp_fast.data import load_dataset
from stp_fast.train import commands

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
    names = {"pruned.pt2", "pruned_state_dict.pt", "arch.json", "report.json", "report.md", "pareto.png",
             "metrics.jsonl", "checkpoint.pt"}  # fmt: skip
    assert names == {p.name for p in pruned_run.iterdir()}  # no TorchScript pruned.pt, no temporary files
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


def test_exported_program_runs_without_stp_fast_at_any_batch_size_and_reproduces_the_top1(pruned_run, tmp_path):
    ds = load_dataset("digits")
    x, y = next(iter(ds.loader("test", batch_size=10_000)))
    torch.save({"x": x, "y": y}, tmp_path / "test.pt")
    script = textwrap.dedent(f"""
        import sys, warnings, torch
        warnings.simplefilter("error", DeprecationWarning)  # torch.export, not the deprecated TorchScript
        model = torch.export.load({str(pruned_run / "pruned.pt2")!r}).module()
        data = torch.load({str(tmp_path / "test.pt")!r})
        state = torch.load({str(pruned_run / "pruned_state_dict.pt")!r}, weights_only=True)
        with torch.no_grad():
            logits = model(data["x"])
            for b in (1, 7):  # a dynamic batch dimension
                assert torch.allclose(model(data["x"][:b]), logits[:b], atol=1e-5), b
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert not any(m.startswith("stp_fast") for m in sys.modules), "stp_fast was imported"
        print((logits.argmax(-1) == data["y"]).double().mean().item())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rep = json.loads((pruned_run / "report.json").read_text())
    assert float(out.stdout.strip()) == pytest.approx(rep["pruned"]["top1"], abs=1e-9)


def test_eval_command_reports_the_same_top1(pruned_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(pruned_run / "pruned.pt2"), "--dataset", "digits", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    rep = json.loads((pruned_run / "report.json").read_text())
    assert got["top1"] == pytest.approx(rep["pruned"]["top1"]) and got["kind"] == "torch.export program"


def test_eval_still_reads_the_torchscript_pruned_pt_of_older_runs(pruned_run, tmp_path, capsys):
    """The state dict and arch.json rebuild the pruned model; scripted, it is an older run's pruned.pt."""
    import warnings

    from stp_fast import models
    from stp_fast.arch.space import Arch

    net = models.create("resnet20", 10, 1, input_size=(1, 8, 8))
    plain = net.extract(Arch.from_json((pruned_run / "arch.json").read_text()))
    plain.load_state_dict(torch.load(pruned_run / "pruned_state_dict.pt", weights_only=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(plain.eval()).save(str(tmp_path / "pruned.pt"))
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "pruned.pt"), "--dataset", "digits", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    rep = json.loads((pruned_run / "report.json").read_text())
    assert got["top1"] == pytest.approx(rep["pruned"]["top1"]) and got["kind"] == "torchscript"


def test_eval_refuses_a_folder_a_class_count_mismatch_and_corrupt_files_in_one_line(pruned_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "three.npz", x_train=x, y_train=np.arange(30) % 3, x_test=x[:9], y_test=np.arange(9) % 3)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "half.pt2").write_bytes((pruned_run / "pruned.pt2").read_bytes()[:4000])
    cases = [(str(pruned_run), ["is a folder, not a model file", "pruned.pt2"]),
             (str(pruned_run / "pruned.pt2"), ["predicts 10 classes but npz:three.npz has 3"]),
             (str(pruned_run / "checkpoint.pt"), ["predicts 10 classes but npz:three.npz has 3"]),
             (str(tmp_path / "junk.pt"), ["junk.pt", "corrupt, truncated"]),
             (str(tmp_path / "half.pt2"), ["half.pt2", "corrupt, truncated"])]  # fmt: skip
    for model, messages in cases:
        capsys.readouterr()
        assert main(["eval", "--model", model, "--dataset", f"npz:{tmp_path / 'three.npz'}"]) == 2, model
        err = capsys.readouterr().err
        assert all(m in err for m in messages), err
        assert err.count("\n") == 1, err  # one line


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_output_folder_with_an_earlier_run_is_refused_and_left_untouched(pruned_run, capsys):
    before = _snapshot(pruned_run)
    code = main(["prune", "--model", "resnet20", "--flops-target", "0.2", "--out", str(pruned_run), *FAST])
    assert code == 2
    assert "earlier run" in capsys.readouterr().err
    assert _snapshot(pruned_run) == before


@pytest.fixture
def no_training(monkeypatch):
    """Any data loading or training fails the test: --out must be refused before either."""

    def trained(*_args, **_kw):
        raise AssertionError("data was loaded: --out was not checked first")

    monkeypatch.setattr(commands, "_load", trained)


EVERY_RUN_FILE = ("checkpoint.pt", "dense.pt", "pruned.pt2", "pruned_state_dict.pt", "pruned.pt", "arch.json",
                  "report.json", "report.md", "pareto.png", "metrics.jsonl")  # fmt: skip


def test_every_file_a_run_writes_counts_as_an_earlier_run():
    assert set(commands.RUN_FILES) == set(EVERY_RUN_FILE)


@pytest.mark.parametrize("name", EVERY_RUN_FILE)
def test_any_file_of_an_earlier_run_is_refused_before_training(tmp_path, capsys, no_training, name):
    (tmp_path / name).write_bytes(b"earlier")
    for command in (["prune", "--flops-target", "0.2"], ["train"]):
        assert main([*command, "--model", "resnet20", "--out", str(tmp_path), *FAST]) == 2
        assert f"already holds an earlier run ({name})" in capsys.readouterr().err
    assert (tmp_path / name).read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == [name]


def _read_only_folder(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if Path("/sys").is_dir() and _refuses_files(Path("/sys")):
        return Path("/sys")  # root writes everywhere except where the kernel refuses
    pytest.skip("running as root and no read-only folder to test with")


def _refuses_files(folder: Path) -> bool:
    try:
        (folder / ".stp_fast_probe").write_bytes(b"")
    except OSError:
        return True
    (folder / ".stp_fast_probe").unlink()
    return False


@pytest.mark.parametrize("kind", ["file", "under_a_file", "read_only", "read_only_parent"])
def test_an_unusable_out_is_refused_before_training(tmp_path, capsys, no_training, kind):
    (tmp_path / "f").write_text("x")
    out = {"file": lambda: tmp_path / "f", "under_a_file": lambda: tmp_path / "f" / "run",
           "read_only": lambda: _read_only_folder(tmp_path),
           "read_only_parent": lambda: _read_only_folder(tmp_path) / "new" / "run"}[kind]()  # fmt: skip
    message = {"file": "is a file, not a folder", "under_a_file": "cannot be created: ", "read_only": "is not writable",
               "read_only_parent": "cannot be created in"}[kind]  # fmt: skip
    assert main(["prune", "--model", "resnet20", "--flops-target", "0.2", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(out)!r} {message}" in err and err.count("\n") == 1, err
    left = [p for d in (out, out.parent) if d.is_dir() for p in d.iterdir() if p.name.startswith(".stp-fast-probe")]
    assert not left


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
    assert main(["train", "--model", "resnet20", "--out", str(dense), "--epochs", "2", "--train-limit", "700",
                 "--progress", "off"]) == 0  # fmt: skip
    assert (dense / "dense.pt").exists() and (dense / "report.json").exists()
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    code = main(["prune", "--model", "resnet56", "--flops-target", "0.15", "--init", str(dense / "dense.pt"),
                 "--out", str(tmp_path / "p56"), *FAST])  # fmt: skip
    assert code == 2
    assert "another model" in capsys.readouterr().err
    # eval of the saved dense.pt reproduces train's number to the digit: dense.pt holds the recalibrated BN
    # statistics, and eval normalises with the training images' statistics (--train-limit: not the full set's)
    assert main(["eval", "--model", str(dense / "dense.pt"), "--dataset", "digits", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert f"top-1 {100 * got['top1']:.2f}%" in printed, printed
    assert got["top1"] == json.loads((dense / "report.json").read_text())["full"]["top1"]


def test_a_corrupt_checkpoint_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"a": torch.zeros(3)}, tmp_path / "whole.pt")
    (tmp_path / "half.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    for name in ("junk.pt", "half.pt"):
        code = main(["prune", "--model", "resnet20", "--flops-target", "0.15", "--init", str(tmp_path / name),
                     "--out", str(tmp_path / "out"), *FAST])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and f"checkpoint {str(tmp_path / name)!r} cannot be read: " in err
        assert err.count("\n") == 1 and "weights_only" not in err and "miniz" not in err, err


def test_resume_refuses_a_checkpoint_of_another_data_set(tmp_path, capsys):
    for folder, seed in (("a", 1), ("b", 2)):  # same name, classes, channels and sizes; other images and labels
        rng = np.random.default_rng(seed)
        (tmp_path / folder).mkdir()
        x = rng.integers(0, 256, size=(150, 8, 8), dtype=np.uint8)
        np.savez(tmp_path / folder / "d.npz", x_train=x, y_train=rng.permutation(np.arange(150) % 3), x_test=x[:30],
                 y_test=np.arange(30) % 3)  # fmt: skip
    run = ["prune", "--model", "resnet20", "--flops-target", "0.3", "--out", str(tmp_path / "run"), *FAST]
    assert main([*run, "--dataset", f"npz:{tmp_path / 'a' / 'd.npz'}", "--batch-size", "32"]) == 0
    capsys.readouterr()
    a, b = f"npz:{tmp_path / 'a' / 'd.npz'}", f"npz:{tmp_path / 'b' / 'd.npz'}"
    for other, message in (([b], "(other labels or images)"), ([a, "--train-limit", "100"], "train_size 150 there")):
        assert main([*run, "--dataset", *other, "--batch-size", "32", "--resume"]) == 2
        err = capsys.readouterr().err
        assert "it was trained on another data set" in err and message in err and err.count("\n") == 1, err
    assert main([*run, "--dataset", a, "--batch-size", "32", "--resume"]) == 0


def test_two_identical_commands_give_identical_reports_and_weights(tmp_path, monkeypatch):
    """--seed governs everything: the initial weights too (not only data order, augmentation and archs)."""
    runs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        torch.manual_seed(len(runs))  # whatever the process drew before
        assert main(["prune", "--model", "resnet20", "--flops-target", "0.2", "--out", "run", "--seed", "3",
                     "--train-limit", "400", *FAST]) == 0  # fmt: skip
        runs.append(tmp_path / name / "run")
    timing = {"wall_s", "date", "images_per_s"}

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in timing}
        return [strip(v) for v in d] if isinstance(d, list) else d

    a, b = (json.loads((r / "report.json").read_text()) for r in runs)
    assert strip(a) == strip(b)
    for name in ("pruned_state_dict.pt", "checkpoint.pt"):
        sa, sb = (torch.load(r / name, weights_only=True) for r in runs)
        sa, sb = (s.get("state_dict", s) for s in (sa, sb))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_a_diverging_run_exits_2_and_says_so(tmp_path, capsys):
    code = main(["prune", "--model", "resnet20", "--flops-target", "0.15", "--out", str(tmp_path / "nan"),
                 "--lr", "1e12", "--epochs", "2", "--progress", "off"])  # fmt: skip
    assert code == 2
    assert "training diverged" in capsys.readouterr().err


def test_the_iee_table_never_calls_the_untrained_start_net_dense():
    from stp_fast.train.iee import render_markdown

    rep = {"full": {"top1": 0.1, "macs": 2e6, "params": 2e5}, "pruned": {"top1": 0.8, "macs": 5e5, "params": 4e4,
           "arch": {}}, "flops_reduction": 0.75, "fine_tuned": False, "wall_s": 3.0, "device": "cpu",
           "model": "resnet20", "dataset": "digits", "method": "iee", "structure": "channel", "flops_target": 0.25,
           "config": {}, "cycles": [], "skipped_groups": {}, "full_top1_of": "the initial (untrained) net"}  # fmt: skip
    for text in (commands.summary_table(rep), render_markdown(rep)):
        rows = [ln for ln in text.splitlines() if "10.00%" in ln]
        assert len(rows) == 1 and "dense" not in rows[0] and "untrained start" in rows[0], text
        assert "No dense model was trained with this recipe" in text
    rep["full_top1_of"] = "the --init checkpoint"
    assert "dense (the --init checkpoint)" in commands.summary_table(rep)
    assert "No dense model" not in commands.summary_table(rep)
    del rep["full_top1_of"]  # STP: its full net is trained with the same recipe
    assert commands.summary_table(rep).splitlines()[1].split()[0] == "dense"


def test_save_program_takes_any_batch_or_says_it_cannot(tmp_path):
    from torch import nn

    from stp_fast.train import report

    class Fixed(nn.Module):  # batch-size-specific code: no dynamic batch possible
        def forward(self, x):
            return x.reshape(2, -1)

    lin = nn.Linear(3, 4).train()
    report.save_program(lin, torch.randn(5, 3), tmp_path / "a.pt2", metadata={"normalization": 1})
    assert lin.training  # the caller's model is left as it was
    model, kind, meta = report.load_model_file(tmp_path / "a.pt2")
    assert kind == "torch.export program" and meta == {"normalization": 1}
    assert [model(torch.randn(b, 3)).shape[0] for b in (1, 2, 9)] == [1, 2, 9]
    with pytest.warns(UserWarning, match="exported for batch size 2 only"):
        report.save_program(Fixed(), torch.randn(5, 3), tmp_path / "b.pt2")
    assert torch.export.load(tmp_path / "b.pt2").module()(torch.ones(2, 3)).shape == (2, 3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # written atomically
