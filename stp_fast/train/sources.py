"""What the trainer reads data from: a *source* is a sized collection of labelled images that can
be split by index and turned into a deterministic loader.

``stp_fast.data`` sources implement this natively (in-memory, batched augmentation).  Any map-style
``torch.utils.data.Dataset`` yielding ``(image_tensor, label)`` works through :class:`TorchSource`
(its own transforms apply; ``augment`` is ignored there).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset


@runtime_checkable
class Source(Protocol):
    def __len__(self) -> int: ...

    def subset(self, indices: Tensor) -> Source: ...

    def loader(self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0, epoch: int = 0,
               rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterable: ...  # fmt: skip


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """This rank's share of a permutation of ``range(n)`` that depends only on (seed, epoch): equal
    disjoint shards (the remainder is dropped so every rank runs the same number of steps)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=g)
    per_rank = n // world_size
    return perm[rank * per_rank : (rank + 1) * per_rank] if world_size > 1 else perm


class TorchSource:
    """Adapter: a map-style torch ``Dataset`` as a :class:`Source`."""

    def __init__(self, dataset: Dataset, num_workers: int = 0) -> None:
        self.dataset, self.num_workers = dataset, num_workers

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def subset(self, indices: Tensor) -> TorchSource:
        return TorchSource(Subset(self.dataset, indices.tolist()), self.num_workers)

    def loader(self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0, epoch: int = 0,
               rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterable:  # fmt: skip
        n = len(self)
        if shuffle or world_size > 1:
            order = epoch_order(n, seed, epoch, rank, world_size) if shuffle else torch.arange(n)[rank::world_size]
            data: Dataset = Subset(self.dataset, order.tolist())
        else:
            data = self.dataset
        return DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=drop_last,
                          num_workers=self.num_workers)  # fmt: skip


def as_source(data) -> Source:
    """``data`` as a Source: Sources pass through, torch Datasets are wrapped."""
    if isinstance(data, Source):
        return data
    if isinstance(data, Dataset):
        return TorchSource(data)
    raise TypeError(f"expected an stp_fast data source or a torch Dataset, got {type(data).__name__}")
