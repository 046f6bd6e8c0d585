"""Which archs the converted model is running right now.

``ConvertedNet.forward_many`` pushes a :class:`Batch` (the archs, their widths and depths) for the
duration of the user's forward; skippable blocks push a sub-batch with the archs that keep them.
Elastic layers read the innermost batch: one arch -> that arch's channels; several -> one
multi-subnet op over all of them; none -> the layer's original forward (the full model).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from stp_fast.arch.space import Arch


@dataclass
class Batch:
    """The archs of one forward (or of a sub-range run by a skippable block).

    ``owner`` is the position of the arch whose batch statistics update BatchNorm running statistics
    (the full network, if present); ``widths``/``depths`` are each arch's group widths and stage depths.
    """

    archs: list[Arch]
    owner: int | None
    widths: list[dict[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.widths:
            self.widths = [a.widths for a in self.archs]

    def __len__(self) -> int:
        return len(self.archs)

    def subset(self, index: Sequence[int]) -> Batch:
        owner = index.index(self.owner) if self.owner is not None and self.owner in index else None
        return Batch([self.archs[i] for i in index], owner, [self.widths[i] for i in index])


_LOCAL = threading.local()


def current() -> Batch | None:
    """The innermost active batch (None: plain forward of the full model)."""
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


@contextmanager
def running(batch: Batch | None) -> Iterator[None]:
    """Make ``batch`` the active one inside the block (``None`` hides any outer batch: full model)."""
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    stack.append(batch)
    try:
        yield
    finally:
        stack.pop()


def single_widths() -> dict[str, int] | None:
    """The group widths when exactly one arch is active (dynamic module attributes read this)."""
    b = current()
    return b.widths[0] if b is not None and len(b) == 1 else None
