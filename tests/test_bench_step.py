"""The STP step benchmark (stp_fast.bench.step): its baselines compute the supernet's function, a quick
run times the three providers, and the table reports the ideal and the achieved ratios."""

from __future__ import annotations

import random

import pytest
import torch

from stp_fast import models
from stp_fast.bench import _resnet_baselines as base
from stp_fast.bench import step

pytestmark = pytest.mark.usefixtures("one_thread")


def _archs(net, count=4, seed=0):
    rng = random.Random(seed)
    return [net.space.full(), net.space.smallest()] + [net.space.sample(rng) for _ in range(count)]


@pytest.mark.parametrize(
    "name,kw,size",
    [("resnet20", {}, 16), ("resnet20", {"prune_residual": True}, 16),
     ("resnet50", {"width_mult": 0.125, "prune_residual": True}, 48)],
)  # fmt: skip
def test_baselines_compute_the_subnet(name, kw, size):
    """masked and sliced logits == net(x, arch=a) in train mode (per-subnet batch statistics), up to the float
    rounding of other kernels (stp_fast runs channels-last with its own BN kernels on the CPU); BN over
    resnet50's last 2x2 maps of 4 images amplifies that rounding, hence atol 1e-4 there."""
    torch.manual_seed(0)
    net = models.create(name, 10, **kw).train()
    x = torch.randn(4, 3, size, size)
    for a in _archs(net):
        ref = net(x, arch=a)
        sliced = base.sliced_forward(net, x, a, owner=False)
        masked = base.masked_forward(net, x, base.MaskedPlan(net, a, x), owner=False)
        atol = 1e-4 if name == "resnet50" else 1e-5
        torch.testing.assert_close(sliced, ref, rtol=1e-4, atol=atol)
        torch.testing.assert_close(masked, ref, rtol=1e-4, atol=atol)


def test_channels_last_baselines_compute_the_same_logits():
    case = step.Case("resnet20", 4, 16)
    logits = {}
    for provider in step.PROVIDERS + step.EXTRA_PROVIDERS + (step.HANDWRITTEN,):
        net, archs, x, _ = step._setup_net(case, "cpu", torch.float32)
        logits[provider] = step.forward_fn(provider, net, archs, x)()
    for provider, ys in logits.items():
        for y, ref in zip(ys, logits["stp_fast"]):
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5, msg=provider)


def test_render_channels_last_line():
    rows = [{"case": "c", "mode": "step", "provider": p, "p50": t, "ideal": 2.0, "gflops": 1.0}
            for p, t in [("stp_fast", 100.0), ("masked", 300.0), ("sliced", 150.0), ("masked_cl", 160.0),
                         ("sliced_cl", 105.0)]]  # fmt: skip
    text = step.render(rows)
    assert "3.00x" in text and "150%" in text and "1.50x" in text  # masked/stp, of ideal, sliced/stp
    line = next(ln for ln in text.splitlines() if "channels-last" in ln and "ms" in ln)
    assert "160.0 ms" in line and "1.60x" in line and "80%" in line and "1.05x" in line


def test_baseline_gradients_match_the_supernet():
    """One step of each provider leaves the parameter gradients of the same loss: each within 1e-3 of the
    largest entry of the float64 sliced step's (float32 BN backward in NCHW measures ~4e-4 here)."""
    case = step.Case("resnet20", 4, 16)

    def grads(provider: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        net, archs, x, labels = step._setup_net(case, "cpu", torch.float32)
        net, x = net.to(dtype), x.to(dtype)
        step.stp_loss(step.forward_fn(provider, net, archs, x)(), labels).backward()
        return {n: p.grad.double() for n, p in net.named_parameters()}

    oracle = grads("sliced", torch.float64)
    for provider in step.PROVIDERS:
        got = grads(provider, torch.float32)
        for n, ref in oracle.items():
            err = (got[n] - ref).abs().max().item()
            assert err <= 1e-3 * ref.abs().max().item(), f"{provider}: gradient of {n} off by {err:.2e}"


def test_only_the_full_arch_updates_running_stats():
    net = models.create("resnet20", 10).train()
    x = torch.randn(4, 3, 16, 16)
    a = net.space.smallest()
    before = net.stem.bn.running_mean.clone()
    base.sliced_forward(net, x, a, owner=False)
    base.masked_forward(net, x, base.MaskedPlan(net, a, x), owner=False)
    assert torch.equal(net.stem.bn.running_mean, before)
    base.sliced_forward(net, x, net.space.full(), owner=True)
    assert not torch.equal(net.stem.bn.running_mean, before)


def test_stp_loss_is_ce_plus_kd():
    torch.manual_seed(0)
    full, sub = torch.randn(8, 10), torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    p, q = full.softmax(1), sub.softmax(1)
    kd = (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(step.stp_loss([full, sub], labels), torch.nn.functional.cross_entropy(full, labels) + kd)


def test_ideal_is_the_macs_ratio():
    case = step.cases(quick=True)[0]
    net, archs, _, _ = step._setup_net(case, "cpu", torch.float32)
    macs = [net.space.macs(a) for a in archs]
    assert step.ideal(case) == pytest.approx(5 * macs[0] / sum(macs))
    assert 1.0 < step.ideal(case) < 5.0


def test_gpu_case_is_resnet50_224_batch_128():
    assert [(c.model, c.size, c.batch) for c in step.cases(device="cuda")] == [("resnet50", 224, 128)]


def test_quick_run_and_render(monkeypatch):
    """A quick run gives one row per provider; the table shows the times, the ideal, the ratios, the targets."""
    monkeypatch.setattr(step, "cases", lambda quick=False, device="cpu": [step.Case("resnet20", 4, 16)])
    rows = step.run(quick=True)
    assert sorted(r["provider"] for r in rows) == sorted(step.PROVIDERS)
    for r in rows:
        assert r["p50"] > 0 and r["mode"] == "step" and 1.0 < r["ideal"] < 5.0
    text = step.render(rows)
    ours = next(r["p50"] for r in rows if r["provider"] == "stp_fast")
    masked = next(r["p50"] for r in rows if r["provider"] == "masked")
    for token in ("stp_fast", "masked", "sliced", "ideal", "masked/stp", "of ideal", "sliced/stp", "80%", "1.10x",
                  f"{rows[0]['ideal']:.2f}x", f"{masked / ours:.2f}x"):  # fmt: skip
        assert token in text, token


def test_unknown_provider_and_mode():
    case = step.Case("resnet20", 2, 16)
    with pytest.raises(ValueError, match="provider"):
        step.setup(case, "nope", "step")
    with pytest.raises(ValueError, match="mode"):
        step.setup(case, "masked", "fwd")
