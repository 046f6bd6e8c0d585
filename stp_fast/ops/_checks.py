"""Argument checks shared by the ops: each error names the op, the argument and what was expected.

Static checks (dtype, rank, shape, device) run in the public functions and in the fake kernels, so
``torch.compile`` reports them at trace time.  Value checks on index tensors (sorted, unique, in
range) need the values and run inside the op bodies; on CUDA each costs one device sync, so by default
an index tensor is checked once and remembered (see :func:`index_check_mode`, ``STP_FAST_CHECK_INDICES``).
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def normalize_index(index: Tensor | int | None, dim: int, *, op: str, arg: str) -> tuple[Tensor | None, int]:
    """Turn an index argument into (index tensor or None for a prefix, number of active channels).

    ``index`` is a 1-D int64 tensor of sorted unique channel indices, an int k ("the first k
    channels") or None ("all ``dim`` channels").
    """
    if index is None:
        return None, dim
    if isinstance(index, bool) or not isinstance(index, (int, torch.SymInt, Tensor)):
        raise TypeError(f"{op}: {arg} must be None, an int or a 1-D int64 tensor, got {type(index).__name__}")
    if not isinstance(index, Tensor):  # an int (a SymInt under torch.compile with dynamic shapes)
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


_MODES = {"once": "once", "": "once", "always": "always", "1": "always", "never": "never", "0": "never"}
# Index tensors whose values were checked: tensor -> (version counter, min, max, sorted and unique).
_checked: WeakIdKeyDictionary = WeakIdKeyDictionary()


def index_check_mode() -> str:
    """``STP_FAST_CHECK_INDICES``: "once" (default) checks each index tensor the first time an op sees
    it and again only after an in-place change (its version counter moved) -- one host sync per new
    tensor on CUDA, none in steady state when callers reuse their index tensors; "always" (or "1")
    checks on every call; "never" (or "0") trusts the caller (no sync ever; out-of-range indices are
    then undefined behaviour on the GPU).  Checks are skipped while a CUDA graph is being captured."""
    value = os.environ.get("STP_FAST_CHECK_INDICES", "once").strip().lower()
    if value not in _MODES:
        raise ValueError(f"STP_FAST_CHECK_INDICES must be one of once, always, never (or 1/0), got {value!r}")
    return _MODES[value]


def _index_stats(index: Tensor) -> tuple[int, int, bool]:
    """(min, max, unsorted) of a non-empty index: one device-to-host copy."""
    lo, hi = index.aminmax()
    unsorted = (index[1:] <= index[:-1]).any() if index.numel() > 1 else torch.zeros((), dtype=torch.bool)
    lo_v, hi_v, unsorted_v = torch.stack([lo, hi, unsorted.to(lo.device, torch.int64)]).tolist()
    return lo_v, hi_v, bool(unsorted_v)


def check_index_values(index: Tensor, dim: int, *, op: str, arg: str) -> None:
    """Sorted, unique and inside [0, dim) (see :func:`index_check_mode` for when this syncs)."""
    if index.numel() == 0:
        return
    mode = index_check_mode()
    if mode == "never" or (index.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    cached = _checked.get(index) if mode == "once" else None
    if cached is not None and cached[0] == index._version:
        lo_v, hi_v, unsorted_v = cached[1:]
    else:
        lo_v, hi_v, unsorted_v = _index_stats(index)
        if mode == "once":
            _checked[index] = (index._version, lo_v, hi_v, unsorted_v)
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


_equal_checked: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_same_index(a: Tensor, b: Tensor, message: str) -> None:
    """Raise ValueError(message) unless the index tensors a and b hold the same channels (depthwise layers
    name one channel set twice).  Same object: no check; otherwise one sync on CUDA, remembered like
    :func:`check_index_values` under ``STP_FAST_CHECK_INDICES``."""
    if a is b:
        return
    mode = index_check_mode()
    if mode == "never" or (a.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    hit = _equal_checked.get(a) if mode == "once" else None
    if hit is not None and hit[0] == a._version and hit[1]() is b and hit[2] == b._version:
        return
    if not torch.equal(a, b):
        raise ValueError(message)
    if mode == "once":
        _equal_checked[a] = (a._version, weakref.ref(b), b._version)
