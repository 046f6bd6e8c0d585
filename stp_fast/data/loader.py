"""In-memory batch loader: seeded epoch order, DDP sharding, batched crop/flip and normalisation.

Images stay uint8 (N×C×H×W) until a batch is drawn; augmentation then runs on the whole batch as
one gather (no per-sample Python), followed by a fused scale-and-shift normalisation to float32.

Determinism: everything random in epoch ``e`` — the order, the crop offsets and the flips — is
drawn from a local ``torch.Generator`` seeded from ``(seed, e)`` alone, never from the global RNG.
The draws cover every position of the epoch before sharding, so rebuilding the loader for the same
``(seed, epoch)`` (a resumed run) reproduces its batches exactly, and a sample's augmentation does
not depend on the number of ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch)`` only (hashed, so nearby pairs are unrelated)."""
    digest = hashlib.blake2b(f"stp_fast.data:{seed}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def augment_batch(x: Tensor, offsets: Tensor | None, flips: Tensor | None, pad: int) -> Tensor:
    """Random crop with zero padding and optional horizontal flip, batched.

    Args:
        x: uint8 (or any dtype) images (B, C, H, W).
        offsets: int64 (B, 2) crop corners (row, column) in ``0..2*pad`` within the zero-padded
            (H + 2*pad, W + 2*pad) image; ``None`` (or ``pad == 0``) for no crop.
        flips: bool (B,), True mirrors that image left-right; ``None`` for no flip.
        pad: zero padding on each side.
    Returns:
        Images of the same shape and dtype as ``x``.
    """
    if (offsets is None or pad == 0) and flips is None:
        return x
    b, c, h, w = x.shape
    if offsets is None or pad == 0:
        offsets, pad = torch.zeros(b, 2, dtype=torch.long, device=x.device), 0
    hp, wp = h + 2 * pad, w + 2 * pad
    if pad:
        padded = x.new_zeros(b, c, hp, wp)
        padded[:, :, pad : pad + h, pad : pad + w] = x
    else:
        padded = x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = offsets[:, :1] + ar_h  # (B, H)
    cols = ar_w.expand(b, w) if flips is None else torch.where(flips[:, None], ar_w.flip(0), ar_w)
    cols = offsets[:, 1:] + cols  # (B, W); a flip just reads the columns of the crop in reverse
    idx = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, idx).reshape(b, c, h, w)


class ImageLoader:
    """Iterable over ``(x, y)`` batches of an in-memory uint8 image set, for one epoch.

    Args:
        images: uint8 (N, C, H, W).
        labels: int64 (N,).
        batch_size: images per batch (per rank).
        mean, std: per-channel statistics of ``images / 255``; batches are ``(images / 255 - mean) / std``.
        shuffle: draw a seeded permutation for the epoch (else the stored order).
        pad: crop padding (0 disables the random crop).
        flip: random horizontal flips.
        seed, epoch: everything random is a function of this pair (see the module docstring).
        rank, world_size: DDP sharding: each rank takes every ``world_size``-th position of the
            epoch's order, starting at ``rank``, after dropping the remainder of N / world_size, so
            shards are disjoint and all ranks run the same number of steps.
        drop_last: drop the last, partial batch.
        device: where augmentation and normalisation run and batches are returned (uint8 images are
            moved there first: 4× less traffic than float32); default CPU.
    Yields:
        ``x`` float32 (B, C, H, W) normalised, ``y`` int64 (B,).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        pad: int = 0,
        flip: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(
                f"mean and std need {images.shape[1]} values (one per channel), got {len(mean)}, {len(std)}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1} (world_size={world_size}), got {rank!r}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.images, self.labels = images, labels.long()
        self.batch_size, self.shuffle, self.pad, self.flip = batch_size, shuffle, int(pad), bool(flip)
        self.seed, self.epoch, self.rank, self.world_size, self.drop_last = seed, epoch, rank, world_size, drop_last
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_samples = images.shape[0] // world_size  # per rank
        if drop_last and 0 < self.num_samples < batch_size:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {self.num_samples} images of this rank's shard, so "
                "drop_last=True would yield no batch; lower batch_size or pass drop_last=False"
            )
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        # (x / 255 - mean) / std == x * scale + shift
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).view(1, -1, 1, 1).to(self.device)

    def __len__(self) -> int:
        """Batches per epoch (per rank)."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.images.shape[0]
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g) if self.pad else None
        flips = torch.randint(0, 2, (n,), generator=g).bool() if self.flip else None
        positions = torch.arange(self.rank, self.num_samples * self.world_size, self.world_size)
        for i in range(len(self)):
            pos = positions[i * self.batch_size : (i + 1) * self.batch_size]
            idx = order[pos]
            x = self.images[idx].to(self.device)
            y = self.labels[idx].to(self.device)
            off = offsets[pos].to(self.device) if offsets is not None else None
            fl = flips[pos].to(self.device) if flips is not None else None
            x = augment_batch(x, off, fl, self.pad)
            yield x.float().mul_(self._scale).add_(self._shift), y

    def __repr__(self) -> str:
        return (
            f"ImageLoader(n={self.images.shape[0]}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, pad={self.pad}, flip={self.flip}, seed={self.seed}, epoch={self.epoch}, "
            f"rank={self.rank}/{self.world_size})"
        )
