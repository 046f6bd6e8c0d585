"""Architectures of a supernet and the space they live in.

An :class:`Arch` has a *depth* (blocks kept per stage: a prefix, the first block of a stage is never
dropped) and a *width* (channels kept per prunable channel group: a prefix of the group's channels,
after an optional one-time importance sort).  A :class:`Space` knows the limits and the width
choices of one supernet and its exact MACs (:mod:`stp_fast.arch.counting` conventions).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

RNG = random.Random | int | None

# Width choices as fractions of a group's channels (ALGORITHMS.md 2.1: 0.1 ... 1.0) [I].
DEFAULT_WIDTH_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _rng(rng: RNG) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


@dataclass(frozen=True)
class Arch:
    """Depth per stage and kept channels per channel group; hashable, JSON round-trips."""

    depth: tuple[int, ...]
    width: tuple[tuple[str, int], ...]

    @classmethod
    def make(cls, depth: Sequence[int], width: Mapping[str, int]) -> Arch:
        return cls(tuple(int(d) for d in depth), tuple(sorted((str(k), int(v)) for k, v in width.items())))

    @property
    def widths(self) -> dict[str, int]:
        return dict(self.width)

    def to_dict(self) -> dict:
        return {"depth": list(self.depth), "width": self.widths}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> Arch:
        if not isinstance(data, Mapping) or set(data) != {"depth", "width"}:
            keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"Arch: expected an object with keys 'depth' and 'width', got {keys}")
        depth, width = data["depth"], data["width"]
        if not isinstance(depth, Sequence) or not all(isinstance(d, int) and not isinstance(d, bool) for d in depth):
            raise ValueError(f"Arch: depth must be a list of ints, got {depth!r}")
        if not isinstance(width, Mapping) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                     for v in width.values()):  # fmt: skip
            raise ValueError(f"Arch: width must map group names to ints, got {width!r}")
        return cls.make(depth, width)

    @classmethod
    def from_json(cls, text: str) -> Arch:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Arch: not valid JSON ({exc})") from exc
        return cls.from_dict(data)


@dataclass
class Space:
    """The architecture space of one supernet.

    Args:
        max_depth: blocks per stage of the full network.
        groups: full channel count of every prunable channel group, in network order.
        group_block: for groups inside a droppable block, its (stage, block) -- such a group is
            irrelevant when the block is dropped; groups outside blocks are absent here.
        macs_fn: ``macs_fn(arch, input_size) -> int``, exact MACs of the arch's plain model.
        params_fn: ``params_fn(arch) -> int``.
        input_size: default (C, H, W) for :meth:`macs`.
        width_ratios: width choices as fractions of each group's channels.
        divisor: kept channel counts are multiples of this (at least one multiple).
        min_depth: the fewest blocks a stage may keep (>= 1: a stage's first block stays).
        group_choices: explicit channel-count choices for some groups (e.g. whole attention heads),
            overriding ``width_ratios``/``divisor`` there.
    """

    max_depth: tuple[int, ...]
    groups: dict[str, int]
    group_block: dict[str, tuple[int, int]]
    macs_fn: Callable[[Arch, tuple[int, ...]], int]
    params_fn: Callable[[Arch], int]
    input_size: tuple[int, ...]
    width_ratios: tuple[float, ...] = DEFAULT_WIDTH_RATIOS
    divisor: int = 1
    min_depth: int = 1
    group_choices: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _choices: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.min_depth < 1:
            raise ValueError(f"Space: min_depth must be >= 1 (a stage keeps its first block), got {self.min_depth}")
        for name, full in self.groups.items():
            counts = {min(full, max(self.divisor, self.divisor * round(r * full / self.divisor)))
                      for r in self.width_ratios}  # fmt: skip
            self._choices[name] = tuple(sorted(counts | {full}))
        for name, counts in self.group_choices.items():
            if name not in self.groups or not counts or not all(1 <= c <= self.groups[name] for c in counts):
                raise ValueError(
                    f"Space: group_choices[{name!r}]={counts!r} must be counts in [1, {self.groups.get(name)}]"
                )
            self._choices[name] = tuple(sorted(set(counts) | {self.groups[name]}))

    # ------------------------------------------------------------------ basic archs
    def choices(self, group: str) -> tuple[int, ...]:
        """Allowed channel counts of ``group``, ascending (the last is the full width)."""
        return self._choices[group]

    def full(self) -> Arch:
        return Arch.make(self.max_depth, self.groups)

    def smallest(self) -> Arch:
        return Arch.make([min(self.min_depth, d) for d in self.max_depth], {g: c[0] for g, c in self._choices.items()})

    def sample(self, rng: RNG = None) -> Arch:
        """Uniform depth per stage and uniform width choice per group."""
        r = _rng(rng)
        depth = [r.randint(min(self.min_depth, d), d) for d in self.max_depth]
        return Arch.make(depth, {g: r.choice(c) for g, c in self._choices.items()})

    # ------------------------------------------------------------------ validation
    def validate(self, arch: Arch) -> Arch:
        """Raise ValueError naming the offending field unless ``arch`` belongs to this space."""
        if not isinstance(arch, Arch):
            raise TypeError(f"arch must be an stp_fast.arch.Arch, got {type(arch).__name__}")
        if len(arch.depth) != len(self.max_depth):
            raise ValueError(f"arch.depth has {len(arch.depth)} entries but the network has {len(self.max_depth)} "
                             f"stages")  # fmt: skip
        for s, (d, m) in enumerate(zip(arch.depth, self.max_depth)):
            if not min(self.min_depth, m) <= d <= m:
                raise ValueError(f"arch.depth[{s}]={d} must lie in [{min(self.min_depth, m)}, {m}]")
        widths = arch.widths
        unknown = sorted(set(widths) - set(self.groups))
        if unknown:
            raise ValueError(f"arch.width has unknown groups {unknown}; known: {sorted(self.groups)}")
        missing = sorted(set(self.groups) - set(widths))
        if missing:
            raise ValueError(f"arch.width lacks groups {missing}")
        for g, w in widths.items():
            if not 1 <= w <= self.groups[g]:
                raise ValueError(f"arch.width[{g!r}]={w} must lie in [1, {self.groups[g]}]")
        return arch

    def canonical(self, arch: Arch) -> Arch:
        """``arch`` with the widths of groups in dropped blocks set to full (they do not matter)."""
        widths = arch.widths
        for g, (stage, block) in self.group_block.items():
            if block >= arch.depth[stage]:
                widths[g] = self.groups[g]
        return Arch.make(arch.depth, widths)

    # ------------------------------------------------------------------ cost
    def macs(self, arch: Arch, input_size: Sequence[int] | None = None) -> int:
        """Exact MACs of ``extract(net, arch)`` for one image (``count_macs`` conventions)."""
        return int(self.macs_fn(self.validate(arch), tuple(input_size or self.input_size)))

    def params(self, arch: Arch) -> int:
        return int(self.params_fn(self.validate(arch)))

    # ------------------------------------------------------------------ search moves
    def _genes(self, arch: Arch, kinds: Sequence[str] = ("depth", "width")) -> list[tuple[str, object]]:
        genes: list[tuple[str, object]] = [("depth", s) for s in range(len(self.max_depth))] if "depth" in kinds else []
        return genes + [("width", g) for g in self.groups if "width" in kinds and not self._dropped(arch, g)]

    def _dropped(self, arch: Arch, group: str) -> bool:
        where = self.group_block.get(group)
        return where is not None and where[1] >= arch.depth[where[0]]

    def _step(self, arch: Arch, gene: tuple[str, object], delta: int) -> Arch | None:
        kind, key = gene
        depth, widths = list(arch.depth), arch.widths
        if kind == "depth":
            new = depth[key] + delta
            if not min(self.min_depth, self.max_depth[key]) <= new <= self.max_depth[key]:
                return None
            depth[key] = new
        else:
            c = self._choices[key]
            pos = min(range(len(c)), key=lambda i: abs(c[i] - widths[key]))  # nearest choice (exact if allowed)
            if not 0 <= pos + delta < len(c):
                return None
            widths[key] = c[pos + delta]
        return Arch.make(depth, widths)

    def mutate(self, arch: Arch, rng: RNG = None, prob: float = 0.1) -> Arch:
        """Move each gene one step (depth +-1 block, width +-1 choice) with probability ``prob``;
        at least one gene moves."""
        r = _rng(rng)
        genes = self._genes(self.validate(arch))
        out = arch
        for gene in genes:
            if r.random() < prob:
                out = self._step(out, gene, r.choice((-1, 1))) or out
        while out == arch:
            gene = r.choice(genes)
            out = self._step(arch, gene, r.choice((-1, 1))) or arch
            if all(self._step(arch, g, d) is None for g in genes for d in (-1, 1)):
                break
        return out

    def expand(self, arch: Arch, target_macs: float, rng: RNG = None, input_size: Sequence[int] | None = None) -> Arch:
        """Grow ``arch`` (random genes, one step at a time) until its MACs reach ``target_macs``.

        The result is a superset of ``arch``: every depth and width is at least as large, so it
        contains all of ``arch``'s weights (subnet mutating expansion)."""
        r = _rng(rng)
        out = self.validate(arch)
        while self.macs(out, input_size) < target_macs:
            grown = [a for a in (self._step(out, g, 1) for g in self._genes(out)) if a is not None]
            if not grown:
                break
            out = r.choice(grown)
        return out

    def shrink(self, arch: Arch, target_macs: float, rng: RNG = None, input_size: Sequence[int] | None = None,
               kinds: Sequence[str] = ("depth", "width")) -> Arch:  # fmt: skip
        """Reduce ``arch`` (random genes of ``kinds``, one step down at a time) until its MACs are at most
        ``target_macs`` (or nothing can shrink further).  The result is contained in ``arch``."""
        r = _rng(rng)
        out = self.validate(arch)
        while self.macs(out, input_size) > target_macs:
            smaller = [a for a in (self._step(out, g, -1) for g in self._genes(out, kinds)) if a is not None]
            if not smaller:
                break
            out = r.choice(smaller)
        return out

    def fit(self, arch: Arch, low: float, high: float, rng: RNG = None, input_size: Sequence[int] | None = None,
            kinds: Sequence[str] = ("depth", "width")) -> Arch:  # fmt: skip
        """Move ``arch`` into the MACs band ``[low, high]``: shrink random genes (of ``kinds``) while above
        ``high``, then grow random genes -- only by steps that stay within ``high`` -- while below ``low``.
        The result is at most ``high`` unless even the smallest arch exceeds it; it may stay below
        ``low`` when no single step fits (coarse spaces)."""
        r = _rng(rng)
        out = self.shrink(arch, high, r, input_size, kinds)
        while self.macs(out, input_size) < low:
            grown = [a for a in (self._step(out, g, 1) for g in self._genes(out, kinds)) if a is not None]
            grown = [a for a in grown if self.macs(a, input_size) <= high]
            if not grown:
                break
            out = r.choice(grown)
        return self.canonical(out)

    def contains(self, big: Arch, small: Arch) -> bool:
        """Whether ``big`` keeps every block and channel that ``small`` keeps."""
        return all(b >= s for b, s in zip(big.depth, small.depth)) and all(
            big.widths[g] >= w or self._dropped(small, g) for g, w in small.widths.items()
        )
