"""The IEE quality study harness (benchmarks/accuracy_iee.py) in its ``--smoke`` form: scikit-learn's
digits (no ../shared data needed), 1 seed, 300 images, 2 epochs.  Every row trains on the STP study's
split, every decision's record is kept, the shared one-shot dense phase gives what a stand-alone
one-shot run gives, STP rows are borrowed only from a study of the same protocol, and the JSON, the
plot, the merged mean +- std table and the goal check come out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the smoke run uses scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the harness draws the top-1 vs MACs plot")

pytestmark = pytest.mark.usefixtures("one_thread")

HARNESS = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy_iee.py"


def _harness():
    spec = importlib.util.spec_from_file_location("iee_accuracy_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    acc = _harness()
    out = tmp_path_factory.mktemp("accuracy_iee")
    assert acc.main(["--smoke", "--json", str(out / "smoke.json"), "--plot", str(out / "smoke.png")]) == 0
    return acc, out, json.loads((out / "smoke.json").read_text())


def test_smoke_rows(smoke):
    _, out, data = smoke
    rows = {(r["method"], r["structure"], r["budget"]): r for r in data["rows"]}
    assert ("dense", "-", 1.0) in rows
    for method in ("iee", "rigl", "oneshot"):
        u, c = rows[(method, "unstructured", 0.9)], rows[(method, "channel", 0.3)]
        assert u["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert c["macs_ratio"] <= 0.3 + 1e-9 and c["arch"]
    for method in ("iee", "rigl"):
        for structure, budget in (("unstructured", 0.9), ("channel", 0.3)):
            r = rows[(method, structure, budget)]
            assert r["decisions"] == len(r["decision_log"]) > 0
            assert r["grown"] == sum(d["grown"] for d in r["decision_log"])
            assert all({"candidates", "wanted", "cap", "grown", "reason"} <= set(d) for d in r["decision_log"])
    assert rows[("oneshot", "channel", 0.3)]["shared_dense_epochs"] >= 1
    for r in data["rows"]:
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["val_top1"] <= 1.0 and r["wall_s"] >= 0.0
        assert r["train_images"] == 270 and r["val_images"] == 30 and r["seed"] == 0
    assert data["command"] and data["date"] and data["machine"] and "git_commit" in data
    assert {g["goal"].split(":")[0] for g in data["goals"]} == {"90% sparse (ERK)", "30% MACs kept"}
    assert (out / "smoke.png").stat().st_size > 0


def test_shared_oneshot_dense_phase_equals_a_stand_alone_run(smoke):
    acc, _, data = smoke
    args = acc.parse(["--smoke"])
    study = acc._study()
    ds, _, val, train, test = study.load_split(args, 0)
    alone = acc.run_sparse(ds, train, val, test, "channel", "oneshot", 0.3, args, 0)
    shared = next(r for r in data["rows"] if r["method"] == "oneshot" and r["structure"] == "channel")
    assert shared["shared_dense_epochs"] >= 1
    assert (alone["top1"], alone["val_top1"], alone["arch"]) == (shared["top1"], shared["val_top1"], shared["arch"])


def test_summary_goals_merge_and_borrowed_stp_rows(smoke, tmp_path):
    acc, out, data = smoke
    # a second "seed": the same rows relabelled, to exercise mean +- std over seeds
    twin = dict(data, rows=[dict(r, seed=1, top1=r["top1"] * 0.5) for r in data["rows"]])
    (tmp_path / "twin.json").write_text(json.dumps(twin))
    stp = {"args": {k: data["args"][k] for k in acc.PROTOCOL},
           "rows": [{"method": "stp", "budget": 0.3, "seed": s, "top1": 0.4, "macs_ratio": 0.29, "wall_s": 1.0}
                    for s in (0, 1, 7)]}  # fmt: skip
    (tmp_path / "stp.json").write_text(json.dumps(stp))
    assert acc.main(["--merge", str(out / "smoke.json"), str(tmp_path / "twin.json"), "--stp-json",
                     str(tmp_path / "stp.json"), "--json", str(tmp_path / "merged.json")]) == 0  # fmt: skip
    merged = json.loads((tmp_path / "merged.json").read_text())
    iee = next(s for s in merged["summary"] if s["method"] == "iee" and s["structure"] == "channel")
    assert iee["n"] == 2 and iee["seeds"] == [0, 1] and iee["top1_std"] > 0
    borrowed = next(s for s in merged["summary"] if s["method"] == "stp")
    assert borrowed["seeds"] == [0, 1] and borrowed["source"] == ["stp.json"]  # seed 7 is not in the study
    assert len(merged["goals"]) == 2 and all(g["seeds"] == 2 for g in merged["goals"])
    table = acc.render(merged)
    assert "| structure | target | method |" in table and "±" in table and "from the STP study" in table
    # another protocol is refused
    (tmp_path / "other.json").write_text(json.dumps(dict(stp, args=dict(stp["args"], epochs=99))))
    with pytest.raises(SystemExit, match="another protocol"):
        acc.merge([str(out / "smoke.json")], [str(tmp_path / "other.json")])


def test_a_channel_target_below_the_inner_widths_floor_also_prunes_the_residual_widths():
    acc = _harness()
    args = acc.parse(["--smoke"])
    ds, _, _, train, test = acc._study().load_split(args, 0)
    assert acc._trainer(ds, train, test, acc.iee_config(args, 0, "channel", "iee", 0.3)).channel_space == "inner widths"
    low = acc._trainer(ds, train, test, acc.iee_config(args, 0, "channel", "iee", 0.03))  # below 1 channel per block
    assert low.channel_space == "inner + residual widths" and low.budget == 0.03 * low.full_macs
    assert any("downsample" in u.name or "stem" in u.name for u in low.units)
