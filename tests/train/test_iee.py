"""IEE and its baselines: ERK allocation, masked/frozen updates, the cycle's invariants, channel
extraction, resume, and ``stp-fast prune --method iee`` end to end on digits."""

import json
import math

import pytest
import torch
from _synthetic import synthetic

from stp_fast import models
from stp_fast.cli import main
from stp_fast.train import checkpoint as ckpt
from stp_fast.train import iee
from stp_fast.train import sparsity as sp
from stp_fast.train.iee import IEEConfig, IEETrainer, extract_channels

TINY = dict(epochs=2, batch_size=25, calib_images=50, lr=0.05, cycle_steps=4, explore_steps=2, eval_every=0,
            final_fraction=0.2, flops_target=0.3)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # small nets: threads only add overhead


def _net(**kw):
    torch.manual_seed(0)
    return models.create("resnet20", 3, 1, **kw)


def _run(out=None, *, resume=False, on_event=None, stop_after=None, net_kw=None, **cfg):
    net = _net(**(net_kw or {}))
    train, val = synthetic()

    class Stop(Exception):
        pass

    def on_epoch(record):
        if stop_after and record["epoch"] == stop_after:
            raise Stop

    trainer = IEETrainer(net, train, val, IEEConfig(**(TINY | cfg)), out_dir=out, resume=resume, progress="off",
                         on_epoch=on_epoch, on_event=on_event)  # fmt: skip
    try:
        return net, trainer, trainer.fit()
    except Stop:
        return net, trainer, None


def _prunable(net):
    return {u.name: dict(net.named_parameters())[u.name] for u in sp.weight_units(net)}


# ---------------------------------------------------------------------------------------------- ERK
@pytest.mark.parametrize("model", ["resnet20", "resnet56", "mobilenetv3_large"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_erk_densities_reach_the_target_and_no_layer_exceeds_density_1(model, sparsity):
    net = models.create(model, 10, 3)
    shapes = {u.name: u.shapes[u.name] for u in sp.weight_units(net)}
    first, clf = sp.first_and_classifier(net)
    for dense in ((), (first,), (first, clf)):
        dens = sp.erk_densities(shapes, sparsity, dense)
        sizes = {k: math.prod(s) for k, s in shapes.items()}
        total = sum(sizes.values())
        achieved = 1 - sum(dens[k] * sizes[k] for k in shapes) / total
        assert abs(achieved - sparsity) < 1e-3
        assert max(dens.values()) <= 1.0 + 1e-12 and min(dens.values()) > 0
        assert all(dens[k] == 1.0 for k in dense)
        free = [k for k in shapes if dens[k] < 1.0]  # the ERK law holds between layers not clamped at 1
        raw = {k: sum(shapes[k]) / sizes[k] for k in free}
        assert all(dens[k] / raw[k] == pytest.approx(dens[free[0]] / raw[free[0]], rel=1e-9) for k in free)
        counts = sp.erk_counts(shapes, sparsity, dense)
        assert sum(counts.values()) == round((1 - sparsity) * total)  # exact after rounding
        assert all(1 <= counts[k] <= sizes[k] for k in shapes)


def test_erk_fix_point_makes_small_layers_dense_and_rejects_an_unreachable_target():
    shapes = {"tiny": (4, 1, 3, 3), "big": (512, 512, 3, 3), "fc": (10, 512)}
    dens = sp.erk_densities(shapes, 0.5)
    assert dens["tiny"] == 1.0 and dens["fc"] == 1.0 and dens["big"] < 0.5
    with pytest.raises(ValueError, match="unreachable"):
        sp.erk_densities({"a": (100, 100), "b": (10, 10)}, 0.99, dense=["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sp.erk_densities(shapes, 1.0)


# ---------------------------------------------------------------------------------------------- updates
def test_masked_entries_stay_exactly_zero_under_momentum_and_weight_decay():
    net = _net()
    units = sp.weight_units(net)
    state = sp.MaskState(net, units)
    params = dict(net.named_parameters())
    opt = sp.MaskedSGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for _ in range(2):  # dense steps first: every entry gets a nonzero momentum buffer (stale after pruning)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    state.set({u.name: torch.rand(u.size) < 0.2 for u in units})
    masks = state.param_masks()
    assert all(opt.state[params[n]]["momentum_buffer"][~m].abs().sum() > 0 for n, m in masks.items())
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        assert any(params[n].grad[~m].abs().sum() > 0 for n, m in masks.items())  # the dense gradient is there
        opt.update_masks = {params[n]: m for n, m in masks.items()}
        opt.step()  # no re-masking here: the optimizer alone must leave them at zero
        for n, m in masks.items():
            assert torch.equal(params[n][~m], torch.zeros_like(params[n][~m])), n
    # without masks it is torch.optim.SGD
    a, b = _net(), _net()
    opt_a = sp.MaskedSGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(3):
        for net_, opt_ in ((a, opt_a), (b, opt_b)):
            opt_.zero_grad()
            torch.nn.functional.cross_entropy(net_(x), y).backward()
            opt_.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)  # same update, other rounding order
    # the same stale momentum moves masked weights under torch.optim.SGD (gotcha 9)
    w = next(iter(_prunable(_net()).values()))
    w = torch.nn.Parameter(w.detach().clone())
    ref = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4)
    w.grad = torch.ones_like(w)
    ref.step()
    with torch.no_grad():
        w.zero_()
    w.grad = torch.zeros_like(w)
    ref.step()
    assert w.abs().sum() > 0


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_reactivation_trains_only_the_exploration_space_and_freezes_the_rest_bit_for_bit(structure):
    snaps = []

    def on_event(name, info):
        if name == "reactivated":
            snaps.append(({n: p.detach().clone() for n, p in net.named_parameters()},
                          {n: m.clone() for n, m in trainer.state.param_masks().items()}))  # fmt: skip
        elif name == "explored":
            before, masks = snaps[-1]
            changed = 0
            for n, p in net.named_parameters():
                m = masks.get(n, torch.ones_like(p, dtype=torch.bool))
                assert torch.equal(p.detach()[m], before[n][m]), f"active entries of {n} moved"
                changed += int((p.detach()[~m] != before[n][~m]).sum())
            assert changed > 0  # the exploration space was trained

    torch.manual_seed(0)
    net = models.create("resnet20", 3, 1)
    train, val = synthetic()
    trainer = IEETrainer(net, train, val, IEEConfig(**(TINY | {"structure": structure})), progress="off",
                         on_event=on_event)  # fmt: skip
    trainer.fit()
    assert len(snaps) >= 2


@pytest.mark.parametrize("method", ["iee", "rigl"])
def test_unstructured_sparsity_equals_the_target_after_every_cycle(method):
    seen = []

    def on_event(name, info):
        if name in ("pruned", "decided"):
            zeros = sum(int((w == 0).sum()) for w in _prunable(net).values())
            total = sum(w.numel() for w in _prunable(net).values())
            masks = trainer.state.param_masks()
            assert all(torch.all(p.detach()[~masks[n]] == 0) for n, p in _prunable(net).items())
            counts = {n: int(m.sum()) for n, m in trainer.state.unit_masks.items()}
            assert counts == trainer.targets
            seen.append((zeros, total))

    torch.manual_seed(0)
    net = models.create("resnet20", 3, 1)
    train, val = synthetic()
    cfg = IEEConfig(**(TINY | {"method": method, "sparsity": 0.9, "epochs": 3, "regrow_init": "restore"}))
    trainer = IEETrainer(net, train, val, cfg, progress="off", on_event=on_event)
    res = trainer.fit()
    target = round(0.1 * seen[0][1])
    assert len(seen) >= 4 and all(total - zeros == target for zeros, total in seen)
    assert abs(res.pruned["sparsity"] - 0.9) < 1e-3 and res.cycles[-1]["sparsity"] == res.pruned["sparsity"]
    zeros = sum(int((p == 0).sum()) for n, p in res.pruned_model.named_parameters() if n in trainer.targets)
    assert zeros == seen[0][1] - target  # saved with the masks applied
    assert max(res.densities.values()) <= 1.0


@pytest.mark.parametrize("method", ["iee", "rigl", "oneshot"])
def test_channel_budget_holds_after_every_decision(method):
    events = []

    def on_event(name, info):
        if name in ("pruned", "decided"):
            events.append(info)
            assert info["macs_ratio"] <= 0.3 + 1e-12

    net, trainer, res = _run(structure="channel", method=method, criterion="taylor", on_event=on_event)
    assert events and res.pruned["macs"] <= 0.3 * res.full["macs"]
    assert res.pruned["macs"] == net.space.macs(res.chosen, trainer.input_size)
    if method == "oneshot":
        assert [e["step"] for e in events] == [trainer.explore_end]
    elif method == "rigl":
        assert events[0]["step"] == 0 and len(events) == 1 + trainer.explore_end // 4
    else:  # the cycle ending at step 11 is skipped: its annealed cap allows no swap (see the test below)
        assert [e["step"] for e in events] == [0, 3, 7]


@pytest.mark.parametrize("structure", ["channel", "unstructured"])
def test_every_decision_says_how_many_units_it_swapped_and_why(structure):
    decisions = []

    def on_event(name, info):
        if name == "decided":
            decisions.append(info)

    kw = {"flops_target": 0.3} if structure == "channel" else {"sparsity": 0.8}
    _run(structure=structure, method="iee", on_event=on_event, **kw)
    assert decisions
    for d in decisions:
        assert {"candidates", "wanted", "cap", "grown", "reason"} <= set(d)
        assert 0 <= d["grown"] <= d["candidates"] and d["wanted"] >= 0
        if d["wanted"] == 0:
            assert d["grown"] == 0 and "no explored unit" in d["reason"]
        elif d["grown"] < d["wanted"]:
            assert d["reason"].startswith("capped")


def test_no_reactivation_window_when_the_annealed_cap_allows_no_swap():
    events = []
    _, trainer, _ = _run(structure="channel", on_event=lambda name, info: events.append((name, info)))
    reactivated = [i["step"] for n, i in events if n == "reactivated"]
    decided = [i for n, i in events if n == "decided"]
    # 16 steps, explore_end 12, cycles end at steps 3, 7, 11; t_exp 2.  The cosine cap at step 11 is 0.3 *
    # (1 + cos(11 pi / 12)) / 2 = 0.005 of the active channels: 0 swaps, so no window and no decision there.
    assert [d["step"] for d in decided] == [3, 7] and all(d["cap"] >= 1 for d in decided)
    assert reactivated == [2, 6] and not trainer._will_swap(11)
    assert [trainer._phase(s) for s in (9, 10, 11)] == ["exploit"] * 3  # the active net trains instead
    for structure in ("unstructured", "channel"):  # no swap allowed at all: IEE never freezes the active net
        events.clear()
        _run(structure=structure, swap_fraction=0.0, on_event=lambda name, info: events.append((name, info)))
        assert [n for n, _ in events] == ["pruned"]


def test_the_auto_defaults_t_exp_criterion_reactivation_and_ranking():
    cfg = dict(TINY, explore_steps=0, cycle_steps=10)
    for structure, frac, crit in (("unstructured", iee.AUTO_EXPLORE_FRACTION["unstructured"], "magnitude"),
                                  ("channel", iee.AUTO_EXPLORE_FRACTION["channel"], "taylor")):  # fmt: skip
        trainer = IEETrainer(_net(), *synthetic(), IEEConfig(**cfg, structure=structure), progress="off")
        assert trainer.t_exp == max(1, int(frac * 10 + 1e-9)) and trainer.criterion_name == crit
        assert isinstance(trainer.criterion, sp.Taylor) == (crit == "taylor")
        # unstructured: reactivated at zero and ranked within their set; channels: restored, raw Taylor
        assert (trainer.regrow, trainer.explore_norm) == (("zero", "set") if structure == "unstructured"
                                                          else ("restore", "none"))  # fmt: skip
    trainer = IEETrainer(_net(), *synthetic(), IEEConfig(**cfg, explore_fraction=0.5), progress="off")
    assert trainer.t_exp == 5
    trainer = IEETrainer(_net(), *synthetic(), IEEConfig(**(cfg | {"explore_fraction": 0.5, "explore_steps": 3})),
                         progress="off")  # fmt: skip
    assert trainer.t_exp == 3  # explicit steps win
    for method in ("rigl", "oneshot"):  # the baselines stay magnitude ("one-shot magnitude + fine-tuning")
        trainer = IEETrainer(_net(), *synthetic(), IEEConfig(**cfg, structure="channel", method=method), progress="off")
        assert trainer.criterion_name == "magnitude" and not trainer.criterion.needs_grad


def test_default_channel_exploration_changes_decisions():
    """Gotcha 11: by magnitude, channels reactivated for t_exp steps cannot outscore channels trained for
    the whole run; the default (Taylor accumulated over the window for the active and the reactivated
    channels alike: same batches, same model state) lets them compete, and the decisions grow them."""
    seen = []

    def on_event(name, info):
        if name == "explored":
            crit, masks = trainer.criterion, trainer.state.unit_masks
            assert crit.count == trainer.t_exp  # every window batch, scored for both sets
            on = torch.cat([crit.sums[k][masks[k]] for k in masks])
            off = torch.cat([crit.sums[k][~masks[k]] for k in masks])
            assert (on > 0).all() and (off > 0).any()
            seen.append(info)

    torch.manual_seed(0)
    trainer = IEETrainer(models.create("resnet20", 3, 1), *synthetic(), IEEConfig(**(TINY | {"structure": "channel"})),
                         progress="off", on_event=on_event)  # fmt: skip
    grown = sum(c["grown"] for c in trainer.fit().cycles if c["event"] == "decide")
    torch.manual_seed(0)
    by_magnitude = IEEConfig(**(TINY | {"structure": "channel", "criterion": "magnitude"}))
    old = IEETrainer(models.create("resnet20", 3, 1), *synthetic(), by_magnitude, progress="off")
    old_grown = sum(c["grown"] for c in old.fit().cycles if c["event"] == "decide")
    assert seen and grown >= 10 and old_grown <= 2  # 37 vs 2 when written


def test_set_normalised_scores_rank_entries_among_those_trained_as_long():
    scores = {"w": torch.tensor([4.0, 2.0, 0.02, 0.01, 0.03])}
    mask = {"w": torch.tensor([True, True, False, False, False])}
    norm = sp.normalize_by_set(scores, mask)["w"]
    torch.testing.assert_close(norm, torch.tensor([4 / 3, 2 / 3, 1.0, 0.5, 1.5]))
    # the raw top-2 keeps the trained pair; by set, the best reactivated entry outranks the weaker active one
    assert sp.topk_mask(scores["w"], 2).tolist() == [True, True, False, False, False]
    assert sp.topk_mask(norm, 2).tolist() == [True, False, False, False, True]


def test_zero_reactivation_explores_only_with_set_normalised_scores():
    """Weights reactivated at zero and trained t_exp steps are tiny next to the trained ones (gotcha 11): by
    raw magnitude none is grown; set-normalised, the decision swaps up to its cap (a multi-batch gradient
    preview ranks the growth, magnitude the drop)."""
    grown = {}
    for norm in ("none", "set"):
        _, _, res = _run(sparsity=0.8, regrow_init="zero", explore_norm=norm)
        decisions = [c for c in res.cycles if c["event"] == "decide"]
        grown[norm] = [c["grown"] for c in decisions]
        assert all(c["score_ratio"] < 0.05 for c in decisions)  # the raw scale gap, logged either way
    assert grown["none"] == [0, 0, 0]
    assert all(g > 0 for g in grown["set"]) and sum(grown["set"]) > 1000


# ---------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("kw", [{}, {"prune_residual": True}])
def test_channel_masks_extract_to_a_plain_model_equal_to_the_masked_model(kw):
    net = _net(**kw)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    units, skipped = sp.channel_units(net)
    assert not skipped and {u.name for u in units} == set(net.space.groups)
    state = sp.MaskState(net, units)
    g = torch.Generator().manual_seed(3)
    masks = {}
    for u in units:
        m = torch.rand(u.size, generator=g) < 0.4
        m[torch.randint(u.size, (1,), generator=g)] = True
        masks[u.name] = m
    state.set(masks)
    plain, arch = extract_channels(net, units, state.unit_masks)
    assert arch.widths == {u.name: int(masks[u.name].sum()) for u in units}
    x = torch.randn(6, 1, 8, 8)
    net.eval()
    plain.eval()
    with torch.no_grad():
        want, got = net(x), plain(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(not isinstance(m, type(net)) for m in plain.modules())


def test_the_trained_channel_result_is_the_masked_net_extracted():
    net, trainer, res = _run(structure="channel", epochs=1)
    plain, arch = extract_channels(net, trainer.units, trainer.state.unit_masks)
    assert arch == res.chosen
    x = torch.randn(5, 1, 8, 8)
    net.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), rtol=1e-5, atol=1e-5)
    assert res.pruned_model(x).shape == (5, 3)


# ---------------------------------------------------------------------------------------------- decisions
def test_swap_topk_is_the_top_k_when_no_cap_binds_and_caps_the_swaps_otherwise():
    scores = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])
    mask = torch.tensor([False, True, False, True, True, True])
    assert torch.equal(sp.swap_topk(scores, mask, 4, cap=10), sp.topk_mask(scores, 4))
    one = sp.swap_topk(scores, mask, 4, cap=1)  # grow the best (5.0), drop the worst active (0.5)
    assert one.tolist() == [True, True, False, False, True, True]
    assert torch.equal(sp.swap_topk(scores, mask, 4, cap=0), mask)
    rigl = sp.swap_rigl(scores, torch.tensor([0.0, 0, 9, 0, 0, 1]), mask, 1)
    assert rigl.tolist() == [False, True, True, False, True, True] and int(rigl.sum()) == 4


def test_channel_budget_refuses_an_unreachable_target():
    net = _net()
    with pytest.raises(ValueError, match="flops_target"):
        IEETrainer(net, *synthetic(), IEEConfig(**(TINY | {"structure": "channel", "flops_target": 0.01})),
                   progress="off")  # fmt: skip


# ---------------------------------------------------------------------------------------------- config, resume
@pytest.mark.parametrize(("kw", "message"), [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"sparsity": math.nan}, "sparsity"),
    ({"cycle_steps": 5, "explore_steps": 5}, "explore_steps"), ({"cycle_steps": 5, "explore_steps": 9}, "smaller"),
    ({"structure": "filters"}, "structure"), ({"criterion": "psychic"}, "criterion"), ({"method": "stp"}, "method"),
    ({"final_fraction": 1.0}, "final_fraction"), ({"regrow_init": "random"}, "regrow_init"), ({"lr": -1}, "lr"),
    ({"structure": "channel", "regrow_init": "zero"}, "cannot revive channels"),
    ({"explore_fraction": 1.0}, "explore_fraction"), ({"explore_fraction": -0.1}, "explore_fraction"),
    ({"explore_norm": "age"}, "explore_norm"),
])  # fmt: skip
def test_bad_knobs_raise_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        IEEConfig(**kw).validate()


def test_t_exp_not_below_a_one_epoch_cycle_is_refused():
    with pytest.raises(ValueError, match=r"t_exp=8\) must be smaller than the cycle \(8 steps = one epoch\)"):
        IEETrainer(_net(), *synthetic(), IEEConfig(**(TINY | {"cycle_steps": 0, "explore_steps": 8})), progress="off")


def test_resume_continues_bit_for_bit(tmp_path):
    kw = dict(epochs=3, cycle_steps=3, criterion="taylor")  # 8 steps/epoch: a reactivation spans epochs 1-2
    full, _, res = _run(tmp_path / "a", **kw)
    _run(tmp_path / "b", stop_after=1, **kw)
    assert ckpt.load(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    torch.manual_seed(1234)
    resumed, _, res2 = _run(tmp_path / "b", resume=True, **kw)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert res2.cycles == res.cycles and len(res2.history) == 3


# ---------------------------------------------------------------------------------------------- CLI
FAST = ["--model", "resnet20", "--epochs", "1", "--set", "cycle_steps=5", "--set", "explore_steps=2", "--set",
        "calib_images=200", "--progress", "off"]  # fmt: skip


def test_cli_prune_iee_unstructured_end_to_end(tmp_path, capsys):
    out = tmp_path / "u"
    assert main(["prune", "--method", "iee", "--sparsity", "0.8", "--out", str(out), *FAST]) == 0
    assert {"pruned.pt2", "arch.json", "report.json", "report.md", "metrics.jsonl", "checkpoint.pt"} <= \
        {p.name for p in out.iterdir()}  # fmt: skip
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "iee" and rep["structure"] == "unstructured" and rep["fine_tuned"] is False
    assert rep["bn_recalibrated"] is True and abs(rep["pruned"]["sparsity"] - 0.8) < 1e-3
    assert sum(c["event"] == "decide" for c in rep["cycles"]) == 3  # steps 5, 10, 15 of 22 (16 explore)
    arch = json.loads((out / "arch.json").read_text())
    assert arch["densities"] == rep["pruned"]["densities"] and max(arch["densities"].values()) <= 1
    model = torch.export.load(str(out / "pruned.pt2")).module()
    weights = [p for n, p in model.named_parameters() if n in arch["densities"]]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - 0.8) < 1e-3
    assert "sparsity 80.0% (ERK)" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "pruned.pt2"), "--dataset", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(rep["pruned"]["top1"])


def test_cli_prune_iee_channel_end_to_end(tmp_path):
    out = tmp_path / "c"
    assert main(["prune", "--method", "iee", "--structure", "channel", "--flops-target", "0.3", "--out", str(out),
                 *FAST]) == 0  # fmt: skip
    rep = json.loads((out / "report.json").read_text())
    assert rep["structure"] == "channel" and rep["pruned"]["macs"] <= 0.3 * rep["full"]["macs"]
    assert json.loads((out / "arch.json").read_text()) == rep["pruned"]["arch"]
    model = torch.export.load(str(out / "pruned.pt2")).module()
    assert sum(p.numel() for p in model.parameters()) == rep["pruned"]["params"]
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "iee", "--sparsity", "1.5"], "--sparsity must lie in [0, 1)"),
    (["--method", "iee", "--sparsity", "-0.2"], "--sparsity must lie in [0, 1)"),
    (["--method", "iee", "--set", "cycle_steps=4", "--set", "explore_steps=4"], "explore_steps"),
    (["--method", "iee", "--set", "explore_steps=40"], "smaller than the cycle"),
    (["--method", "iee", "--structure", "channel"], "needs --flops-target"),
    (["--method", "iee", "--structure", "channel", "--flops-target", "1.5"], "--flops-target must lie in"),
    (["--method", "iee", "--flops-target", "0.2", "--sparsity", "0.5"], "--flops-target is for --structure channel"),
    (["--method", "iee", "--structure", "channel", "--flops-target", "0.2", "--sparsity", "0.5"], "--sparsity is for"),
    (["--method", "stp"], "--flops-target F is required"),
    (["--method", "stp", "--flops-target", "0.2", "--sparsity", "0.5"], "apply to --method"),
    (["--method", "rigl", "--criterion", "psychic"], "criterion"),
])  # fmt: skip
def test_cli_bad_sparse_knobs_exit_2(tmp_path, capsys, args, message):
    assert main(["prune", "--model", "resnet20", "--out", str(tmp_path / "o"), "--progress", "off", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_cli_prune_iee_from_a_dense_checkpoint(tmp_path):
    dense = tmp_path / "dense"
    assert main(["train", "--model", "resnet20", "--out", str(dense), "--epochs", "1", "--progress", "off"]) == 0
    out = tmp_path / "i"
    assert main(["prune", "--method", "iee", "--sparsity", "0.5", "--init", str(dense / "dense.pt"), "--out", str(out),
                 *FAST]) == 0  # fmt: skip
    rep = json.loads((out / "report.json").read_text())
    dense_rep = json.loads((dense / "report.json").read_text())
    assert rep["full_top1_of"] == "the --init checkpoint" and rep["init"] == str(dense / "dense.pt")
    assert rep["full"]["top1"] == pytest.approx(dense_rep["full"]["top1"], abs=0.05)  # other BN calibration batches


def test_stp_trainer_with_an_iee_config_is_the_iee_method():
    from stp_fast.train import STPTrainer

    train, val = synthetic()
    cfg = IEEConfig(epochs=1, batch_size=25, sparsity=0.5, calib_images=50)
    trainer = STPTrainer(models.create("resnet20", 3, 1), train, val, cfg, progress="off")
    assert isinstance(trainer, IEETrainer)
