"""``stp_fast.convert`` on real model families: function preservation, exact MACs, extraction to the user's
class, one batched pass == one pass per arch, and the depth/width plans found for each family."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from zoo import HF_KINDS, LOCAL_KINDS, build

import stp_fast
from stp_fast.dropin import ConvertedNet, apply_layout, convert

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = [pytest.param(k, marks=pytest.mark.hf) if k in HF_KINDS else k for k in HF_KINDS + LOCAL_KINDS]


def _hf_ok(name: str) -> None:
    if name in HF_KINDS:
        pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def converted():
    """(case, untouched copy of the model, converted net) per family, converted once per module."""
    cache = {}

    def get(name: str, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            case = build(name)
            original = copy.deepcopy(case.model)
            cache[key] = (case, original, convert(case.model, case.example, outputs=case.outputs, **kw))
        return cache[key]

    return get


def _out(case, model, x):
    out = model(x)
    return out.logits if case.outputs else out


def _archs(net: ConvertedNet, count: int = 5, seed: int = 0) -> list[stp_fast.Arch]:
    rng = random.Random(seed)
    return [net.space.smallest()] + [net.space.sample(rng) for _ in range(count - 1)]


@pytest.mark.parametrize("name", ALL)
def test_full_arch_is_the_original_model_and_keys_are_unchanged(name, converted):
    _hf_ok(name)
    case, original, net = converted(name)
    x = case.example
    with torch.no_grad():
        want = _out(case, original.eval(), x)
        got = net.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    state, ref = net.state_dict(), original.state_dict()
    assert list(state) == list(ref) == list(net.model.state_dict())  # the net shares the model's tree
    assert all(state[k].shape == ref[k].shape for k in ref)
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(state)  # the converted weights load into the user's class as they are
    with torch.no_grad():
        torch.testing.assert_close(_out(case, fresh.eval(), x), got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_extracted_model_is_the_users_class_smaller_with_exact_macs(name, converted):
    _hf_ok(name)
    case, original, net = converted(name, prune_residual=True)
    net.eval()
    size = tuple(case.example.shape[1:])
    for arch in _archs(net, 4):
        small = net.extract(arch)
        assert type(small) is type(original)
        assert not any(type(m).__module__.startswith("stp_fast") for m in small.modules())
        net.check_extracted(arch, small)  # eval output == net(x, arch=arch) within 1e-4
        macs, params = stp_fast.count_macs(small, size)
        assert (macs, params) == (net.space.macs(arch), net.space.params(arch))
    smallest = net.extract(net.space.smallest())
    assert sum(p.numel() for p in smallest.parameters()) < sum(p.numel() for p in original.parameters())


@pytest.mark.parametrize("name", ALL)
def test_forward_many_equals_one_pass_per_arch(name, converted):
    _hf_ok(name)
    case, _, net = converted(name, prune_residual=True)
    assert net.batched, net.notes.batched
    archs = [net.space.full(), *_archs(net, 4, seed=3)]
    x = case.example
    net.eval()
    with torch.no_grad():
        together = net.forward_many(x, archs)
        alone = [net(x, arch=a) for a in archs]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_gradients_of_one_batched_pass_equal_the_sum_of_separate_passes(converted):
    case, _, net = converted("tv_resnet18", prune_residual=True)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # running statistics do not move between the two computations
    archs = [net.space.full(), *_archs(net, 3, seed=5)]
    x = case.example

    def grads(fn):
        net.zero_grad()
        sum(o.square().mean() for o in fn()).backward()
        return {k: p.grad.clone() for k, p in net.named_parameters()}

    together = grads(lambda: net.forward_many(x, archs))
    alone = grads(lambda: [net(x, arch=a) for a in archs])
    for k in together:
        torch.testing.assert_close(together[k], alone[k], rtol=1e-4, atol=1e-5, msg=k)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1


def test_only_the_full_arch_updates_batchnorm_running_statistics(converted):
    case, _, net = converted("tv_resnet18")
    bns = [net.model.layer1[0].bn1, net.model.bn1]  # an elastic BN, and the stem's (a frozen residual stream)
    net.train()
    before = [bn.running_mean.clone() for bn in bns]
    with torch.no_grad():
        net.forward_many(case.example, _archs(net, 3))  # subnets only
    for bn, b in zip(bns, before):
        torch.testing.assert_close(bn.running_mean, b, rtol=0, atol=0)
    with torch.no_grad():
        net.forward_many(case.example, [net.space.full(), *_archs(net, 2)])
    assert all(not torch.equal(bn.running_mean, b) for bn, b in zip(bns, before))
    net.eval()


def test_expected_plans_on_known_layouts(converted):
    """The depth and width plans of the torchvision layouts (what a reader of torchvision would expect)."""
    _, _, r18 = converted("tv_resnet18")
    assert [st.blocks for st in r18.depth_stages] == [[f"layer{i}.0", f"layer{i}.1"] for i in range(1, 5)]
    assert sorted(r18.space.groups) == sorted(f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2))
    assert "fc" in r18.notes.frozen and "output" in r18.notes.frozen["fc"]
    assert any("residual stream" in why for why in r18.notes.frozen.values())
    _, _, r50 = converted("tv_resnet50")
    assert [len(st.blocks) for st in r50.depth_stages] == [3, 4, 6, 3]
    assert len(r50.space.groups) == 2 * 16  # both inner widths of every bottleneck
    _, _, mbv2 = converted("tv_mobilenetv2")
    assert all(st.container == "features" for st in mbv2.depth_stages)
    dw = mbv2.model.features[3].conv[1][0]
    assert dw.groups == dw.in_channels and type(dw).__name__.startswith("Elastic")  # depthwise is elastic


@pytest.mark.hf
def test_attention_groups_move_in_whole_heads_and_vit_depth_is_elastic(converted):
    pytest.importorskip("transformers")
    _, _, net = converted("vit")
    heads = [g for g in net.channel_groups if g.frozen is None and g.unit > 1]
    assert len(heads) == 4 and all(g.unit == 16 for g in heads)
    assert all(c % 16 == 0 for g in heads for c in net.space.choices(g.name))
    assert net.space.max_depth == (4,)


@pytest.mark.hf
def test_swin_runs_and_reports_its_frozen_groups(converted):
    pytest.importorskip("transformers")
    _, _, net = converted("swin")
    text = net.report()
    assert "relative_position_bias_table" in text and "frozen groups" in text
    assert any(g.frozen is None for g in net.channel_groups)


def test_layout_rebuilds_the_small_model_from_a_fresh_instance(converted):
    case, original, net = converted("tv_resnet50", prune_residual=True)
    arch = _archs(net, 3, seed=7)[-1]
    small = net.extract(arch).eval()
    layout = net.layout(arch)
    rebuilt = apply_layout(copy.deepcopy(original), layout)
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(case.example), small(case.example), rtol=0, atol=0)
    with pytest.raises(ValueError, match="format"):
        apply_layout(copy.deepcopy(original), {"modules": {}})


def test_importance_sort_puts_the_strongest_channels_first(converted):
    _, _, net = converted("tv_resnet18")
    w = net.model.layer2[1].conv1.weight.detach()
    norms = w.abs().flatten(1).sum(1)
    assert torch.all(norms[:-1] >= norms[1:])


def test_report_names_groups_blocks_and_macs(converted):
    _, _, net = converted("tv_resnet18")
    text = net.report()
    for part in ("elastic channel groups", "layer1.0.conv1", "frozen groups", "layer4: layer4.0, layer4.1", "MACs"):
        assert part in text
    summary = net.summary()
    assert summary["macs_full"] == stp_fast.count_macs(net.extract(net.space.full()), (3, 32, 32))[0]


class _Hidden(nn.Module):
    """Two linear layers coupled through a custom op the dependency graph cannot see into."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_groups_declared_by_hand_replace_the_traced_ones():
    x = torch.randn(5, 8)
    net = convert(_Hidden(), x, groups=[["fc1:out", "fc2:in"]], depth=False)
    assert list(net.space.groups) == ["fc1"] and net.space.groups["fc1"] == 12
    arch = net.space.smallest()
    small = net.extract(arch)
    assert small.fc1.out_features == small.fc2.in_features == net.space.choices("fc1")[0]
    net.check_extracted(arch, small)
    with pytest.raises(ValueError, match="one size"):
        convert(_Hidden(), x, groups=[["fc1:out", "fc2:out"]], depth=False)
    with pytest.raises(ValueError, match="'nope:out'"):
        convert(_Hidden(), x, groups=[["nope:out"]], depth=False)
