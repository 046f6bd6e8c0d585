"""Importance criteria of IEE and its baselines (``ALGORITHMS.md`` section 5): what a prune-and-grow
decision ranks.  A criterion scores the entries of one :class:`~stp_fast.train.sparsity.Unit` (the
weights of a layer, or the channels of a channel group); higher = keep.  Gradient criteria observe the
gradients of an estimation or reactivation window (:meth:`Criterion.accumulate` after each backward),
so active and reactivated units are scored on the same batches and the same model state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from stp_fast.train.sparsity import Unit

__all__ = ["CRITERIA", "Criterion", "Magnitude", "Taylor", "grad_magnitude", "make_criterion", "register_criterion"]


class Criterion(ABC):
    """Importance of a unit's entries (higher = keep).  Criteria that need gradients collect them in
    :meth:`accumulate`, called after each backward of an estimation or reactivation window."""

    needs_grad: bool = False

    def reset(self) -> None:  # noqa: B027 - optional hook, a no-op for gradient-free criteria
        """Forget accumulated observations (start of a window)."""

    def accumulate(self, units: list[Unit], params: Mapping[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Observe the gradients now in ``params[n].grad``."""

    @abstractmethod
    def __call__(self, unit: Unit, params: Mapping[str, Tensor]) -> Tensor:
        """Scores of the unit's ``size`` entries, float (1-D)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict` (resume)."""


class Magnitude(Criterion):
    """|w| (unstructured); the mean |w| of a channel's producer filters, summed (channels)."""

    @torch.no_grad()
    def __call__(self, unit: Unit, params: Mapping[str, Tensor]) -> Tensor:
        return unit.reduce(lambda n: params[n].detach().abs().float(), "weights", mean=True)


class Taylor(Criterion):
    """First-order Taylor importance averaged over the observed iterations: ``(w g)^2`` per weight;
    per channel ``(sum over the channel's producer slices of w g)^2`` -- on the BN affine parameters
    (``on="bn"``, HALP's ``|gamma dL/dgamma + beta dL/dbeta|`` squared) or on the filters (``"weights"``)."""

    needs_grad = True

    def __init__(self, on: str = "bn") -> None:
        self.on = on
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    @torch.no_grad()
    def accumulate(self, units: list[Unit], params: Mapping[str, Tensor]) -> None:
        def wg(n: str) -> Tensor:
            p = params[n]
            return p.detach().float() * (p.grad.float() if p.grad is not None else 0.0)

        for u in units:
            v = u.reduce(wg, self.on).square()
            self.sums[u.name] = self.sums[u.name] + v if u.name in self.sums else v
        self.count += 1

    def __call__(self, unit: Unit, params: Mapping[str, Tensor]) -> Tensor:
        if not self.count:
            raise RuntimeError("Taylor criterion: no gradient observation yet (explore_steps must be >= 1)")
        return self.sums[unit.name] / self.count

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: Mapping) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])


def grad_magnitude(unit: Unit, params: Mapping[str, Tensor]) -> Tensor:
    """RigL's growth score: |dL/dw| (channels: mean |g| of the producer filters, summed)."""

    def g(n: str) -> Tensor:
        p = params[n]
        return p.grad.detach().abs().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)

    return unit.reduce(g, "weights", mean=True)


CRITERIA: dict[str, Callable[[], Criterion]] = {
    "magnitude": Magnitude,
    "taylor": Taylor,
    "taylor_weights": lambda: Taylor(on="weights"),
}


def register_criterion(name: str, factory: Callable[[], Criterion]) -> None:
    """Make ``factory()`` (a :class:`Criterion`) available as ``IEEConfig.criterion = name``."""
    CRITERIA[name] = factory


def make_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]()
