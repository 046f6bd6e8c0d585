"""Host-side helpers shared by the Triton launchers (installed as ``stp_fast.kernels._common``).

* :func:`interpreted`, :func:`block`, :func:`num_sms`: tile heuristics.
* :func:`input_precision`: the ``tl.dot`` precision of float32 operands, following PyTorch's own TF32
  setting for the same kind of op, so a Triton kernel and the cuDNN/cuBLAS call it replaces round alike:
  convolutions follow cuDNN's conv setting (TF32 by default in PyTorch), matmuls cuBLAS's (IEEE by
  default).  Under the interpreter it is always "ieee" (the interpreter ignores TF32: triton#5895).
* :func:`device_table`: per-launch metadata tables on the device without host syncs (cached).
* :func:`vec`: the alignment facts (``tl.multiple_of`` hints) a launcher may promise for activations
  whose pointers and strides come from a metadata table (Triton cannot specialise those, unlike
  kernel arguments).
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Iterable

import torch
import triton
from torch import Tensor


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for other devices)."""
    if device.type != "cuda":
        return 1
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def tf32_enabled(kind: str) -> bool:
    """Whether PyTorch lets float32 ``kind`` ("conv": cuDNN convolutions, "matmul": cuBLAS) use TF32.

    torch >= 2.9: the first of (op, backend, global) ``fp32_precision`` that is not "none" decides
    (the legacy ``allow_tf32`` flags write the op level); reading the legacy flag can raise there when
    both APIs were mixed.  Older torch: the legacy flags.
    """
    b = torch.backends
    try:
        if kind == "conv":
            levels = [b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, b.fp32_precision]
        else:
            levels = [b.cuda.matmul.fp32_precision, b.fp32_precision]
    except (AttributeError, RuntimeError):
        return bool(b.cudnn.allow_tf32 if kind == "conv" else b.cuda.matmul.allow_tf32)
    for p in levels:
        if p not in (None, "none"):
            return p == "tf32"
    return False


def input_precision(dtype: torch.dtype, device: torch.device, kind: str) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: "tf32" only for float32 on a GPU when
    PyTorch allows TF32 for ``kind`` (see :func:`tf32_enabled`), else "ieee"."""
    if dtype == torch.float32 and device.type == "cuda" and not interpreted() and tf32_enabled(kind):
        return "tf32"
    return "ieee"


def vec(ptrs: Iterable[int], strides: Iterable[int], elsize: int) -> int:
    """v = 16 bytes / elsize when every data pointer is 16-byte aligned and every stride or extent given
    (in elements) is a multiple of v, else 1.  With v > 1 the kernels promise ``tl.multiple_of(ptr, 16)``
    and ``tl.multiple_of(.., v)`` on offsets and bounds, which lets Triton issue 16-byte vector (and
    ``cp.async``) accesses along a unit-stride axis (checked in the sm_90 PTX)."""
    v = max(1, 16 // elsize)
    if any(p % 16 for p in ptrs) or any(s % v for s in strides):
        return 1
    return v


# ----------------------------------------------------------------------------------------------
# Metadata tables without host syncs
# ----------------------------------------------------------------------------------------------

_TABLES: collections.OrderedDict = collections.OrderedDict()
_TABLES_MAX = 2048
_CAPTURED: list = []  # tables made while a CUDA graph was being captured: kept for the process's lifetime


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_table(rows: list[list[int]], device: torch.device) -> Tensor:
    """The int64 [len(rows), len(rows[0])] metadata table of a launch, on ``device``, without a host sync.

    Tables are cached by content (data pointers, sizes, strides, index-list pointers): the caching
    allocator hands a training step the same activation addresses step after step, so in steady state
    a launch finds its table and copies nothing; the table of a new configuration is staged in pinned
    memory and copied with ``non_blocking=True`` (no ``cudaStreamSynchronize``, unlike a copy from
    pageable memory).  Tables made during CUDA-graph capture are never evicted: the graph's copy node
    reads the pinned buffer again at every replay.  Cached tables are only ever read by the kernels.
    """
    key = (device, len(rows), tuple(v for r in rows for v in r))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit[1]
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)
    else:
        table = host.to(device)
    _TABLES[key] = (host, table)
    if _capturing(device):
        _CAPTURED.append((host, table))
    while len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return table


def clear_tables() -> None:
    """Drop the cached metadata tables (not those captured in CUDA graphs)."""
    _TABLES.clear()
