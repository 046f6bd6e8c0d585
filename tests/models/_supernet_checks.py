"""Checks shared by the supernet model tests (imported as ``from _supernet_checks import ...``: pytest puts
the test file's folder on sys.path).  Each ``check_*`` draws its inputs from torch's RNG in the order the
tests always have, so a test that calls it sees the same numbers as when the body was written out."""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

import stp_fast

SEED_ARCHS = 30  # archs checked by the extract-vs-subnet test (full, smallest and random ones)
MODES = ["train", "eval"]


def randomise_bn(net: nn.Module, x, *, momentum: float | None = None, conv_bias: float | None = None) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics from two train-mode passes; returns the net
    in eval mode.  ``x`` is the batch for both passes, or a shape to draw a fresh batch per pass (after the
    parameters).  With ``momentum`` the passes use cumulative averages (the running statistics become the
    data's, not ~(0, 1)) and BN momentum is set to it afterwards.  With ``conv_bias`` conv biases are drawn
    from U(-conv_bias, conv_bias)."""
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif conv_bias is not None and isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-conv_bias, conv_bias)
        if momentum is not None:
            for m in bns:
                m.momentum = None
        for _ in range(2):
            net(x if isinstance(x, torch.Tensor) else torch.randn(*x))
    if momentum is not None:
        for m in bns:
            m.momentum = momentum
    return net.eval()


def sample_archs(net, count: int, seed: int = 0) -> list[stp_fast.Arch]:
    """The full and the smallest arch, then ``count - 2`` random ones."""
    rng = random.Random(seed)
    return [net.space.full(), net.space.smallest()] + [net.space.sample(rng) for _ in range(count - 2)]


def macs(net, a, size: Sequence[int]) -> int:
    """The analytic MACs at ``size`` (through the default-size call where ``size`` is the space's own)."""
    return net.space.macs(a) if tuple(size) == tuple(net.space.input_size) else net.space.macs(a, tuple(size))


def assert_counts_match(net, a, size: Sequence[int], plain: nn.Module | None = None) -> None:
    """Counted MACs and parameters of the extracted model == the space's analytic ones."""
    plain = stp_fast.extract(net, a) if plain is None else plain
    assert stp_fast.count_macs(plain, tuple(size)) == (macs(net, a, size), net.space.params(a))


def assert_descending(s: torch.Tensor, what: str = "channels") -> None:
    assert torch.all(s[:-1] >= s[1:]), f"{what} must be in descending L1 order"


def check_extracted_equals_subnet(net, size: Sequence[int], count: int) -> None:
    """For ``count`` archs: the extracted plain-torch model computes the subnet (<= 1e-5 relative) and its
    counted MACs and parameters equal the analytic ones."""
    x = torch.randn(2, *size)
    worst = 0.0
    for a in sample_archs(net, count):
        plain = stp_fast.extract(net, a).eval()
        with torch.no_grad():
            y, yp = net(x, arch=a), plain(x)
        worst = max(worst, ((y - yp).abs().max() / yp.abs().max()).item())
        assert_counts_match(net, a, size, plain)
        assert not any(type(m).__module__.startswith("stp_fast.dropin") for m in plain.modules()), \
            "extract must hold no stp_fast layers"  # fmt: skip
    assert worst <= 1e-5, f"extracted model differs from the subnet by {worst:.2e} (relative)"


@contextlib.contextmanager
def in_float64(net: nn.Module):
    """``net`` in float64 inside the block; its float32 parameters and buffers are restored afterwards."""
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        yield net.double()
    finally:
        net.float()
        net.load_state_dict(saved)


# forward_many and one pass per arch run different float32 kernels (the multi-subnet ops vs the model's own
# layers).  Deep nets with train-mode BatchNorm amplify their rounding far past 1e-5 (resnet50 at 1/8 width:
# logits ~1e-4 off the float64 result either way, some gradients several % off).  Where the float32 results
# differ, the two must agree in float64 (the same function) and forward_many must be no farther from the
# float64 result than twice the per-arch float32 passes are, plus a small atol (STYLE.md 5.4, FlashAttention).


def assert_forward_many_matches(net, x: torch.Tensor, archs) -> None:
    """``forward_many`` == one pass per arch (within 1e-5, else see the note above)."""
    with torch.no_grad():
        many = net.forward_many(x, archs)
        single = [net(x, arch=a) for a in archs]
    assert len(many) == len(single) == len(archs)
    if all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(many, single)):
        return
    with in_float64(net), torch.no_grad():
        many64 = net.forward_many(x.double(), archs)
        ref = [net(x.double(), arch=a) for a in archs]
    for i, (a, b, a64, r) in enumerate(zip(many, single, many64, ref)):
        torch.testing.assert_close(a64, r, rtol=1e-9, atol=1e-9, msg=f"arch {i}: forward_many differs in float64")
        err, base = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-5, f"arch {i}: forward_many is {err:.2e} from float64, one pass {base:.2e}"


def check_forward_many_equals_separate_passes(net, mode: str, size: Sequence[int]):
    """One batched pass over 6 archs == 6 separate passes, in ``mode``; returns the batch and the archs."""
    net.train(mode == "train")
    x = torch.randn(4, *size)
    archs = sample_archs(net, 6, seed=5)
    assert_forward_many_matches(net, x, archs)
    return x, archs


def _gradients(net, x: torch.Tensor, archs, batched: bool) -> dict[str, torch.Tensor]:
    net.zero_grad()
    if batched:
        sum(y.square().mean() for y in net.forward_many(x, archs)).backward()
    else:
        for a in archs:
            net(x, arch=a).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    return grads


def check_forward_many_gradients(net, size: Sequence[int]) -> None:
    """Gradients of the summed losses of one batched pass over 4 archs == those of 4 separate passes (within
    rtol 1e-4, else see the note above: over all parameters, the L2 error against float64)."""
    net.train()
    x = torch.randn(4, *size)
    archs = sample_archs(net, 4, seed=7)
    batched, separate = _gradients(net, x, archs, True), _gradients(net, x, archs, False)
    if all(torch.allclose(batched[n], separate[n], rtol=1e-4, atol=1e-6) for n in batched):
        return
    with in_float64(net):
        batched64, ref = _gradients(net, x.double(), archs, True), _gradients(net, x.double(), archs, False)
    for n in ref:
        torch.testing.assert_close(batched64[n], ref[n], rtol=1e-7, atol=1e-10, msg=f"float64 gradient of {n}")

    def dist(g: dict) -> float:
        return sum((g[n].double() - ref[n]).square().sum().item() for n in ref) ** 0.5

    scale = dist({n: torch.zeros_like(g) for n, g in ref.items()})
    err, base = dist(batched), dist(separate)
    assert err <= 2 * base + 1e-6 * scale, f"forward_many's gradients are {err:.2e} from float64, one pass {base:.2e}"


def check_only_full_arch_updates_running_stats(net, bns: Sequence[nn.Module], size: Sequence[int]) -> None:
    """A batched train pass without the full arch leaves every BN in ``bns`` as it was; with it, changes each."""
    net.train()
    before = [bn.running_mean.clone() for bn in bns]
    net.forward_many(torch.randn(4, *size), [net.space.smallest(), net.space.sample(1)])
    for bn, b in zip(bns, before):
        assert torch.equal(bn.running_mean, b), "a subnet pass changed the shared running statistics"
    net.forward_many(torch.randn(4, *size), [net.space.smallest(), net.space.full()])
    for bn, b in zip(bns, before):
        assert not torch.equal(bn.running_mean, b), "the full arch's pass left the running statistics"


def check_macs_agree_with_torch_pruning(net, size: Sequence[int], count: int = 5) -> None:
    """Torch-Pruning's MAC count is within 1% of the analytic one, its parameter count equal."""
    tp = pytest.importorskip("torch_pruning")
    for a in sample_archs(net, count, seed=11):
        plain = stp_fast.extract(net, a)
        ops, params = tp.utils.count_ops_and_params(plain, torch.zeros(1, *size))
        assert abs(ops - macs(net, a, size)) <= 0.01 * ops
        assert params == net.space.params(a)


def check_sort_channels_keeps_the_function(net, size: Sequence[int]) -> None:
    x = torch.randn(2, *size)
    with torch.no_grad():
        before = net(x)
        net.sort_channels()
        after = net(x)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)


def check_export_and_reload(net, size: Sequence[int], make_fresh: Callable[[], nn.Module], tmp_path):
    """A sampled subnet's plain model survives TorchScript save/load and a weights_only state-dict round
    trip; the full arch's state dict loads into a fresh supernet (built by ``make_fresh``, after the batch
    is drawn) that then computes the same.  Returns the plain model and the batch."""
    plain = stp_fast.extract(net, net.space.sample(3)).eval()
    x = torch.randn(2, *size)
    path = tmp_path / "pruned.pt"
    torch.jit.script(plain).save(str(path))
    torch.testing.assert_close(torch.jit.load(str(path))(x), plain(x))
    # state dicts load with weights_only=True, into the plain model and (for the full arch) the supernet
    plain.load_state_dict(weights_only_round_trip(plain.state_dict()))
    full_sd = stp_fast.extract(net, net.space.full()).state_dict()
    assert set(full_sd) == set(net.state_dict())
    fresh = make_fresh()
    fresh.load_state_dict(full_sd)
    fresh.eval()
    torch.testing.assert_close(fresh(x), net(x))
    return plain, x


def check_onnx_export(net, size: Sequence[int]) -> None:
    """A sampled subnet's plain model exports to ONNX and onnxruntime computes the same."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    plain = stp_fast.extract(net, net.space.sample(4)).eval()
    x = torch.randn(2, *size)
    buf = io.BytesIO()
    torch.onnx.export(plain, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    y = ort.InferenceSession(buf.getvalue()).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), plain(x).detach(), rtol=1e-4, atol=1e-5)


def weights_only_round_trip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_reference_state_dict_loads(net: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """The reference implementation's state dict (through a weights_only round trip) has the supernet's
    keys and shapes, loads into it and gives the same outputs on ``x``; the extracted full model's state
    dict loads back into the reference layout."""
    sd = weights_only_round_trip(ref.state_dict())
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    net.load_state_dict(sd)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)
    ref.load_state_dict(stp_fast.extract(net, net.space.full()).state_dict())
