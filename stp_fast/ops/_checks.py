"""Argument checks shared by the ops: each error names the op, the argument and what was expected.

Static checks (dtype, rank, shape, device) run in the public functions and in the fake kernels, so
``torch.compile`` reports them at trace time.  Value checks on index tensors (sorted, unique, in
range) need the values and run inside the op bodies, where they cost one device sync on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def normalize_index(index: Tensor | int | None, dim: int, *, op: str, arg: str) -> tuple[Tensor | None, int]:
    """Turn an index argument into (index tensor or None for a prefix, number of active channels).

    ``index`` is a 1-D int64 tensor of sorted unique channel indices, an int k ("the first k
    channels") or None ("all ``dim`` channels").
    """
    if index is None:
        return None, dim
    if isinstance(index, bool) or not isinstance(index, (int, Tensor)):
        raise TypeError(f"{op}: {arg} must be None, an int or a 1-D int64 tensor, got {type(index).__name__}")
    if isinstance(index, int):
        if not 0 <= index <= dim:
            raise ValueError(f"{op}: {arg}={index} must lie in [0, {dim}] (the layer has {dim} channels)")
        return None, index
    check_index_static(index, dim, op=op, arg=arg)
    return index, index.shape[0]


def check_index_static(index: Tensor, dim: int, *, op: str, arg: str) -> None:
    if index.dtype != torch.int64:
        raise TypeError(f"{op}: {arg} must be an int64 tensor, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: {arg} must be 1-D, got {index.dim()}-D of shape {tuple(index.shape)}")
    if index.shape[0] > dim:
        raise ValueError(f"{op}: {arg} has {index.shape[0]} entries but the layer has only {dim} channels")


def check_index_values(index: Tensor, dim: int, *, op: str, arg: str) -> None:
    """Sorted, unique and inside [0, dim); one host sync for CUDA tensors."""
    if index.numel() == 0:
        return
    lo, hi = index.aminmax()
    unsorted = (index[1:] <= index[:-1]).any() if index.numel() > 1 else torch.zeros((), dtype=torch.bool)
    lo_v, hi_v, unsorted_v = torch.stack([lo, hi, unsorted.to(lo.device, torch.int64)]).tolist()
    if lo_v < 0 or hi_v >= dim:
        raise ValueError(f"{op}: {arg} entries must lie in [0, {dim}), got min {lo_v} and max {hi_v}")
    if unsorted_v:
        raise ValueError(f"{op}: {arg} must be sorted in strictly increasing order (no duplicates)")


def check_float_tensor(t: Tensor, *, op: str, arg: str, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {arg} must be a tensor, got {type(t).__name__}")
    if dtype is None and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {arg} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {arg} has dtype {t.dtype} but x has {dtype}; all operands must share one dtype")


def check_device(t: Tensor | None, device: torch.device, *, op: str, arg: str) -> None:
    if t is not None and t.device != device:
        raise ValueError(f"{op}: {arg} is on {t.device} but x is on {device}")
