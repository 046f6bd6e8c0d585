"""DDP plumbing: process-group set-up from ``torchrun``'s environment (gloo on the CPU, nccl on
CUDA), the DDP wrapper, and a mean all-reduce of small metric tensors."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


def resolve_device(pref: str) -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={pref!r} but no CUDA GPU is visible")
    return torch.device(pref)


def setup(pref: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device).  Starts the process group when launched by ``torchrun`` with
    WORLD_SIZE > 1 (and it is not started yet); each rank uses GPU LOCAL_RANK on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(pref)
    if world <= 1 and not dist.is_initialized():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over ``module``; parameters and buffers are broadcast from rank 0
    here, BN running statistics again at every forward (DDP's default)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def all_mean(t: Tensor) -> Tensor:
    """The mean of ``t`` over all ranks (a copy)."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def sync_buffers(module: nn.Module) -> None:
    """Broadcast every buffer (BN running statistics) from rank 0, so replicas end an epoch equal:
    the last forward of an epoch updated each rank's statistics from its own shard."""
    for buf in module.buffers():
        dist.broadcast(buf, src=0)
