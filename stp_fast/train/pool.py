"""The architecture pool of STP's KD-guided exploration (``ALGORITHMS.md`` 2.2) [I].

Budget archs (MACs in ``[(1 - tol) B, B]``) are scored by an EMA of the KD loss they get when
trained as subnets (lower = the arch follows the full net better); periodically the worst are
dropped and replaced by mutations of the best and by random budget archs.

KD losses fall as training goes on, so an EMA of raw losses favours archs that joined late (their
history holds only the low recent values).  With ``baseline="trend"`` an arch's score is the EMA of
its KD loss divided by the pool's running mean KD at that moment: archs are compared with what their
contemporaries got, whatever their age.  ``init="balanced"`` draws each new arch's share of the MACs
cut that comes from depth uniformly, so the pool covers depth-heavy and width-heavy archs evenly
(random-gene shrinking favours shallow archs, whose depth steps cut the most MACs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from stp_fast.arch.space import Arch, Space


@dataclass
class Entry:
    arch: Arch
    macs: int
    score: float = math.inf  # EMA of the KD loss; inf until first trained
    seen: int = 0


class ArchPool:
    """A pool of budget archs of ``space``.

    Args:
        space: the supernet's architecture space.
        budget: the MACs budget B (per image, at ``input_size``).
        size: the number of archs N.
        rng: the ``random.Random`` every choice is drawn from (its state is checkpointed).
        tolerance: pool archs lie in ``[(1 - tolerance) * B, B]`` where the space allows.
        sampling: ``"multi"`` (depth and width) or ``"depth"`` (full widths; may not reach B).
    """

    def __init__(self, space: Space, budget: float, size: int, rng: random.Random, *, input_size: Sequence[int],
                 tolerance: float = 0.05, sampling: str = "multi", mutate_prob: float = 0.1, init: str = "fit",
                 baseline: str = "none") -> None:  # fmt: skip
        self.space, self.budget, self.size, self.rng = space, float(budget), size, rng
        self.input_size, self.tolerance = tuple(input_size), tolerance
        self.sampling, self.mutate_prob = sampling, mutate_prob
        self.init, self.baseline = init, baseline
        self.trend: float | None = None  # running mean KD of the pool's observations (baseline="trend")
        smallest = space.macs(space.smallest(), self.input_size)
        if smallest > self.budget:
            full = space.macs(space.full(), self.input_size)
            raise ValueError(f"flops_target: the budget ({self.budget / full:.3f} of the full MACs) is below the "
                             f"smallest subnet of this space ({smallest / full:.3f}); raise flops_target or use a "
                             f"space with narrower choices (e.g. prune_residual=True)")  # fmt: skip
        self.entries: list[Entry] = []
        self.refill()

    # ------------------------------------------------------------------ arch generation
    def macs(self, arch: Arch) -> int:
        return self.space.macs(arch, self.input_size)

    def _fit(self, arch: Arch) -> Arch:
        if self.sampling == "depth":
            arch = Arch.make(arch.depth, self.space.groups)
        return self.space.fit(arch, (1 - self.tolerance) * self.budget, self.budget, self.rng, self.input_size)

    def random_arch(self) -> Arch:
        """A random arch moved into the budget band (``init="balanced"``: see the module docstring)."""
        if self.init != "balanced" or self.sampling == "depth":
            return self._fit(self.space.sample(self.rng))
        space, r = self.space, self.rng
        full_macs = self.macs(space.full())
        depth_share = r.random()
        deep = space.shrink(space.full(), full_macs * (self.budget / full_macs) ** depth_share, r, self.input_size,
                            kinds=("depth",))  # fmt: skip
        arch = Arch.make(deep.depth, space.sample(r).widths)
        arch = space.fit(arch, (1 - self.tolerance) * self.budget, self.budget, r, self.input_size, kinds=("width",))
        return arch if self.macs(arch) <= self.budget else self._fit(arch)

    def mutation(self, arch: Arch) -> Arch:
        """A mutation of ``arch`` moved back into the budget band."""
        return self._fit(self.space.mutate(arch, self.rng, self.mutate_prob))

    def _add(self, arch: Arch) -> bool:
        if any(e.arch == arch for e in self.entries) or self.macs(arch) > self.budget:
            return False
        self.entries.append(Entry(arch, self.macs(arch)))
        return True

    def refill(self, parents: Sequence[Arch] = (), mutate_share: float = 0.0) -> None:
        """Fill the pool up to its size: mutations of ``parents`` for ``mutate_share`` of the free
        places, random budget archs for the rest (duplicates are redrawn, a bounded number of times)."""
        free = self.size - len(self.entries)
        n_mut = round(free * mutate_share) if parents else 0
        for tries in range(50 * max(free, 1)):
            if len(self.entries) >= self.size:
                break
            if n_mut > 0 and tries < 25 * free:
                if self._add(self.mutation(self.rng.choice(list(parents)))):
                    n_mut -= 1
            else:
                self._add(self.random_arch())

    # ------------------------------------------------------------------ training-time use
    def draw(self, pool_prob: float) -> Arch:
        """The budget arch to train next: a pool member with probability ``pool_prob``, else a
        mutation of one (exploration outside the pool)."""
        entry = self.rng.choice(self.entries)
        return entry.arch if self.rng.random() < pool_prob else self.mutation(entry.arch)

    def observe(self, arch: Arch, kd: float, ema: float) -> None:
        """Fold one KD-loss observation into ``arch``'s score (archs outside the pool only move the trend)."""
        value = kd
        if self.baseline == "trend":
            self.trend = kd if self.trend is None else ema * self.trend + (1 - ema) * kd
            value = kd / max(self.trend, 1e-12)  # a ratio: the same relative quality scores the same at any time
        for e in self.entries:
            if e.arch == arch:
                e.score = value if e.seen == 0 else ema * e.score + (1 - ema) * value
                e.seen += 1
                return

    def update(self, replace_fraction: float, mutate_share: float) -> int:
        """Drop the worst ``replace_fraction`` of the scored archs, refill with mutations of the best
        and random archs.  Returns how many were replaced."""
        scored = sorted((e for e in self.entries if e.seen), key=lambda e: e.score)
        n_drop = int(len(scored) * replace_fraction)
        if n_drop == 0:
            return 0
        drop = {id(e) for e in scored[-n_drop:]}
        self.entries = [e for e in self.entries if id(e) not in drop]
        best = [e.arch for e in scored[: max(1, len(scored) - n_drop)]][: max(1, n_drop)]
        self.refill(best, mutate_share)
        return n_drop

    def ranked(self) -> list[Entry]:
        """Entries by score, best first (never-trained archs last)."""
        return sorted(self.entries, key=lambda e: (e.score, -e.seen))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"entries": [{"arch": e.arch.to_json(), "macs": e.macs, "score": e.score, "seen": e.seen}
                            for e in self.entries], "trend": self.trend}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.entries = [Entry(Arch.from_json(d["arch"]), int(d["macs"]), float(d["score"]), int(d["seen"]))
                        for d in state["entries"]]  # fmt: skip
        self.trend = state.get("trend")
