import random

import pytest
import torch
import torch.nn.functional as F

from stp_fast import models
from stp_fast.train import ArchPool, STPConfig
from stp_fast.train.losses import kd_loss, stp_losses


@pytest.mark.parametrize(("field", "value"), [
    ("flops_target", 0.0), ("flops_target", 1.0), ("flops_target", -0.2), ("epochs", 0), ("method", "iee2"),
    ("expansion", "both"), ("lr", 0.0), ("kd_temperature", 0.0), ("holdout", 1.5), ("holdout", -1),
    ("pool_size", 0), ("score_ema", 1.5), ("batch_size", 2.5), ("device", "tpu"), ("subnets_per_step", -1),
])  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        STPConfig(**{field: value}).validate()


def test_config_round_trip_and_unknown_fields():
    cfg = STPConfig(epochs=3, expansion="assistant")
    assert STPConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        STPConfig.from_dict({"epochs": 2, "nope": 1})


def _pool(target=0.15, size=12, seed=0):
    net = models.create("resnet20", 10, 1)
    full = net.space.macs(net.space.full(), (1, 8, 8))
    return net, full, ArchPool(net.space, target * full, size, random.Random(seed), input_size=(1, 8, 8))


def test_pool_archs_lie_in_the_budget_band_and_are_distinct():
    net, full, pool = _pool()
    assert len(pool.entries) == 12
    assert len({e.arch for e in pool.entries}) == 12
    for e in pool.entries:
        assert 0.95 * 0.15 * full <= e.macs <= 0.15 * full
        assert e.macs == net.space.macs(e.arch, (1, 8, 8))


def test_pool_scores_are_an_ema_and_update_replaces_the_worst():
    _, full, pool = _pool()
    archs = [e.arch for e in pool.entries]
    for i, a in enumerate(archs):
        pool.observe(a, float(i), ema=0.5)
    pool.observe(archs[0], 2.0, ema=0.5)
    assert pool.entries[0].score == pytest.approx(1.0) and pool.entries[0].seen == 2
    worst = set(archs[-3:])  # scores 9, 10, 11
    assert pool.update(replace_fraction=0.25, mutate_share=0.67) == 3
    assert len(pool.entries) == 12
    assert not worst & {e.arch for e in pool.entries}
    assert all(e.macs <= 0.15 * full for e in pool.entries)
    assert pool.ranked()[0].arch == archs[0]


def test_pool_state_dict_round_trip():
    _, _, pool = _pool()
    pool.observe(pool.entries[3].arch, 0.25, ema=0.9)
    _, _, other = _pool(seed=5)
    other.load_state_dict(pool.state_dict())
    assert [(e.arch, e.score, e.seen) for e in other.entries] == [(e.arch, e.score, e.seen) for e in pool.entries]


def test_pool_budget_below_the_smallest_subnet_is_a_clear_error():
    with pytest.raises(ValueError, match="smallest subnet"):
        _pool(target=0.01)


def test_kd_loss_matches_the_formula_and_never_reaches_the_teacher():
    s = torch.randn(7, 5, requires_grad=True)
    t = torch.randn(7, 5, requires_grad=True)
    loss = kd_loss(s, t, temperature=2.0)
    q = F.softmax(t.detach() / 2, -1)
    manual = (q * (q.log() - F.log_softmax(s.detach() / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(loss.detach(), manual)
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_stp_losses_routes_each_subnet_to_its_teacher():
    z = [torch.randn(4, 3) for _ in range(4)]
    y = torch.tensor([0, 1, 2, 1])
    total, ce, kds = stp_losses(z, y, [0, 0, 2], temperature=1.0, kd_weight=0.5)
    expect = [kd_loss(z[1], z[0]), kd_loss(z[2], z[0]), kd_loss(z[3], z[2])]
    torch.testing.assert_close(kds, torch.stack(expect))
    torch.testing.assert_close(ce, F.cross_entropy(z[0], y))
    torch.testing.assert_close(total, ce + 0.5 * kds.sum())
