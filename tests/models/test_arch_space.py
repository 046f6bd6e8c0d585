"""Arch / Space: JSON round trip, validation naming the field, search moves that stay in the space."""

from __future__ import annotations

import random

import pytest

from stp_fast import models
from stp_fast.arch import Arch

MID = "stages.0.0.conv1"  # the inner width of block 0 of stage 0 (groups are named by their first layer)
RES1 = "stages.1.0.downsample.0"  # stage 1's residual stream (prune_residual=True)


@pytest.fixture(scope="module")
def space():
    return models.create("resnet20", 10, prune_residual=True).space


def test_json_round_trip(space):
    rng = random.Random(0)
    for _ in range(20):
        a = space.sample(rng)
        assert Arch.from_json(a.to_json()) == a
        assert hash(Arch.from_dict(a.to_dict())) == hash(a)


@pytest.mark.parametrize(
    "text,msg",
    [("[1, 2]", "keys 'depth' and 'width'"), ('{"depth": [1], "width": {}, "x": 1}', "keys"),
     ('{"depth": "3", "width": {}}', "depth must be a list of ints"), ("{not json", "not valid JSON"),
     ('{"depth": [1, 1, 1], "width": {"a": 1.5}}', "width must map group names to ints")],
)  # fmt: skip
def test_from_json_rejects_malformed(text, msg):
    with pytest.raises(ValueError, match=msg):
        Arch.from_json(text)


def test_validate_names_the_field(space):
    full = space.full()
    w = full.widths
    bad = [
        (Arch.make((0, 3, 3), w), r"arch.depth\[0\]=0 must lie in \[1, 3\]"),
        (Arch.make((3, 4, 3), w), r"arch.depth\[1\]=4"),
        (Arch.make((3, 3), w), r"arch.depth has 2 entries but the network has 3 stages"),
        (Arch.make((3, 3, 3), {**w, MID: 17}), rf"arch.width\['{MID}'\]=17 must lie in \[1, 16\]"),
        (Arch.make((3, 3, 3), {**w, MID: 0}), rf"arch.width\['{MID}'\]=0"),
        (Arch.make((3, 3, 3), {**w, "stages.9.0.conv1": 4}), r"unknown groups \['stages.9.0.conv1'\]"),
        (Arch.make((3, 3, 3), {k: v for k, v in w.items() if k != RES1}), rf"lacks groups \['{RES1}'\]"),
    ]
    for arch, msg in bad:
        with pytest.raises(ValueError, match=msg):
            space.validate(arch)
    with pytest.raises(TypeError, match=r"must be an stp_fast\.arch\.Arch"):
        space.validate({"depth": [3, 3, 3]})


def test_full_smallest_sample_bounds(space):
    rng = random.Random(1)
    lo, hi = space.macs(space.smallest()), space.macs(space.full())
    assert lo < hi
    for _ in range(30):
        a = space.validate(space.sample(rng))
        assert lo <= space.macs(a) <= hi
        assert space.contains(space.full(), a) and space.contains(a, space.smallest())
    assert all(space.choices(g)[-1] == c for g, c in space.groups.items())


def test_mutate_changes_and_stays_valid(space):
    rng = random.Random(2)
    for _ in range(30):
        a = space.sample(rng)
        b = space.validate(space.mutate(a, rng))
        assert b != a


def test_expand_reaches_target_and_contains(space):
    rng = random.Random(3)
    full = space.macs(space.full())
    for _ in range(15):
        a = space.smallest() if rng.random() < 0.3 else space.sample(rng)
        target = space.macs(a) + rng.random() * (full - space.macs(a))
        b = space.expand(a, target, rng)
        assert space.macs(b) >= target
        assert space.contains(b, a), "expansion must keep every block and channel of the original"


def test_canonical_ignores_dropped_blocks(space):
    a = Arch.make((1, 3, 3), {**space.full().widths, "stages.0.2.conv1": 2})
    assert space.canonical(a).widths["stages.0.2.conv1"] == 16
    assert space.macs(a) == space.macs(space.canonical(a))


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'; known models: .*resnet20"):
        models.create("resnet21", 10)
