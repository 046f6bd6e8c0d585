"""The pruning-quality study harness (benchmarks/accuracy.py) in its ``--smoke`` form: scikit-learn's
digits (no ../shared data needed), 1 seed, 300 images, 1 epoch.  Every method runs on the same
training images, the validation split is STPTrainer's holdout, Torch-Pruning reaches each budget with
every importance, and the JSON, the plot, the merged mean +- std table and the goal check come out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning", reason="the harness's Torch-Pruning baseline needs torch-pruning")
pytest.importorskip("sklearn", reason="the smoke run uses scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the harness draws the top-1 vs MACs plot")

pytestmark = pytest.mark.usefixtures("one_thread")

HARNESS = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy.py"


def _harness():
    spec = importlib.util.spec_from_file_location("stp_accuracy_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    acc = _harness()
    out = tmp_path_factory.mktemp("accuracy")
    assert acc.main(["--smoke", "--json", str(out / "smoke.json"), "--plot", str(out / "smoke.png")]) == 0
    return acc, out, json.loads((out / "smoke.json").read_text())


def test_smoke_rows(smoke):
    acc, out, data = smoke
    budgets = data["args"]["budgets"]
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    for method in ("dense", "stp-full", "st-full", "tp-dense"):
        assert (method, 1.0) in rows
    tp = [f"tp-{i}" for i in acc.IMPORTANCES]
    for b in budgets:
        for method in ("stp", "st", "scratch", *tp):
            assert (method, b) in rows, (method, b)
        for method in ("stp", "st"):  # pool archs lie in the budget band (where the space's steps allow)
            assert 0.8 * b <= rows[(method, b)]["macs_ratio"] <= b + 1e-9
        assert rows[("scratch", b)]["macs_ratio"] == pytest.approx(rows[("stp", b)]["macs_ratio"], rel=1e-6)
        for method in tp:
            r = rows[(method, b)]
            assert r["budget_reached"] and r["macs_ratio"] <= b  # pruned to (a little below) the budget
            assert r["ft_lr"] in data["args"]["ft_lrs"] and len(r["grid"]) == len(data["args"]["ft_lrs"])
            assert r["val_top1"] == max(g["val_top1"] for g in r["grid"] if g["budget_reached"])
    for r in data["rows"]:
        assert 0.0 <= r["top1"] <= 1.0 and r["wall_s"] >= 0.0
        assert r["train_images"] == 270 and r["val_images"] == 30 and r["seed"] == 0
    assert data["command"] and data["date"] and data["machine"]
    assert (out / "smoke.png").stat().st_size > 0


def test_summary_goals_and_merge(smoke, tmp_path):
    acc, out, data = smoke
    # a second "seed": the same rows relabelled, to exercise mean +- std over seeds
    twin = dict(data, rows=[dict(r, seed=1, top1=r["top1"] * 0.5) for r in data["rows"]])
    (tmp_path / "twin.json").write_text(json.dumps(twin))
    assert acc.main(["--merge", str(out / "smoke.json"), str(tmp_path / "twin.json"),
                     "--json", str(tmp_path / "merged.json")]) == 0  # fmt: skip
    merged = json.loads((tmp_path / "merged.json").read_text())
    stp = next(s for s in merged["summary"] if s["method"] == "stp" and s["budget"] == 0.15)
    assert stp["n"] == 2 and stp["seeds"] == [0, 1] and stp["top1_std"] > 0
    goals = {g["goal"] for g in merged["goals"]}
    assert any("scratch" in g for g in goals) and any("Torch-Pruning" in g for g in goals)
    assert merged["cost"]["budgets"] == 2 and len(merged["cost"]["scratch_per_budget_s"]) == 2
    table = acc.render(merged)
    assert "| kept MACs | method |" in table and "±" in table and "one STP run serving 2 budgets" in table
    # FILE::methods keeps only those rows of that file
    assert acc.main(["--merge", str(out / "smoke.json"), str(tmp_path / "twin.json") + "::dense,stp",
                     "--json", str(tmp_path / "part.json")]) == 0  # fmt: skip
    part = json.loads((tmp_path / "part.json").read_text())
    assert {r["method"] for r in part["rows"] if r["seed"] == 1} == {"dense", "stp"}
    assert {r["method"] for r in part["rows"] if r["seed"] == 0} == {r["method"] for r in data["rows"]}
    assert part["merged_from"][1]["methods"] == ["dense", "stp"]


def test_validation_split_is_the_trainers_holdout():
    """The harness's validation images are exactly STPTrainer's holdout (the fairness of the study)."""
    import torch

    from stp_fast import models
    from stp_fast.train import STPConfig, STPTrainer

    acc = _harness()
    args = acc.parse(["--smoke"])
    ds, full, val, train, _ = acc.load_split(args, seed=3)
    assert len(val) + len(train) == len(full) == 300
    net = models.create("resnet20", ds.num_classes, ds.in_chans, input_size=ds.input_size)
    trainer = STPTrainer(net, full, full, STPConfig(epochs=1, batch_size=64, seed=3, holdout=args.val_fraction,
                                                    eval_every=0, device="cpu"), progress="off")  # fmt: skip
    assert torch.equal(trainer.holdout.images, val.images) and torch.equal(trainer.train.images, train.images)


def test_scratch_from_a_recorded_stp_run(smoke, tmp_path):
    """``--archs-from``: scratch rows for the archs a recorded STP run chose (no second STP run)."""
    acc, out, data = smoke
    assert acc.main(["--smoke", "--methods", "scratch", "--archs-from", str(out / "smoke.json"),
                     "--json", str(tmp_path / "scratch.json")]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "scratch.json").read_text())["rows"]
    stp = {r["budget"]: r for r in data["rows"] if r["method"] == "stp"}
    assert sorted(r["budget"] for r in rows) == sorted(stp) and all(r["method"] == "scratch" for r in rows)
    for r in rows:
        assert r["macs_ratio"] == pytest.approx(stp[r["budget"]]["macs_ratio"], rel=1e-6)
    with pytest.raises(SystemExit, match="scratch needs STP's chosen arch"):
        acc.main(["--smoke", "--methods", "scratch", "--json", str(tmp_path / "none.json")])
