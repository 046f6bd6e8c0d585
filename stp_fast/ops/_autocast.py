"""``torch.autocast`` for the stp_fast ops.

Conv/linear ops (``masked_linear``, ``masked_conv2d``, ``multi_subnet_linear``, ``multi_subnet_conv2d``)
follow ``F.linear`` / ``F.conv2d``: inside an autocast region of their device, every float32/float16/
bfloat16 input (activations, weight, bias) is cast to the autocast dtype (bf16/fp16 on CUDA, bf16 on
CPU), float64 is left alone, the kernels accumulate in fp32 and the output has the autocast dtype.  The
casts are ordinary differentiable ``Tensor.to`` calls, so fp32 master weights receive fp32 gradients.
The op body then runs with autocast excluded (as ``torch.library.register_autocast`` does), so nothing
inside is cast a second time.

Two routes carry the same rule:

* the custom ops get a kernel on the ``AutocastCPU`` / ``AutocastCUDA`` dispatch keys (:func:`register`),
  so direct ``torch.ops.stp_fast.*`` calls, ``torch.compile`` and ``opcheck`` see it;
* the eager ``torch.autograd.Function`` twins (``_backend.eager_ok``) call :func:`cast` and
  :func:`excluded` in the public functions.

``multi_subnet_batch_norm`` follows PyTorch's native BatchNorm, which autocast does not cast: the input
keeps its dtype, statistics are fp32 and the affine parameters may stay fp32 (mixed-type BN, see the
op's checks); it needs no registration here.

``torch.library.register_autocast`` is not used because it fixes the cast dtype when registering,
whereas autocast's dtype is chosen per region (``torch.autocast(..., dtype=...)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

_DEVICES = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_lib = torch.library.Library("stp_fast", "FRAGMENT")


def dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type`` tensors, or None when autocast is off there."""
    if device_type not in _DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast_one(value, device_type: str, to: torch.dtype):
    if isinstance(value, Tensor):
        eligible = value.is_floating_point() and value.dtype != torch.float64 and value.device.type == device_type
        return value.to(to) if eligible and value.dtype != to else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_one(v, device_type, to) for v in value)
    return value


def cast(values: tuple, device_type: str, to: torch.dtype) -> tuple:
    """``values`` with every float32/float16/bfloat16 tensor on ``device_type`` (also inside lists) cast
    to ``to``; float64, integer tensors and non-tensors unchanged (autocast's eligibility rule)."""
    return tuple(_cast_one(v, device_type, to) for v in values)


@contextlib.contextmanager
def excluded(device_type: str) -> Iterator[None]:
    """Autocast off for ``device_type`` inside the block (the dispatch key excluded, no state change)."""
    key = getattr(torch._C.DispatchKey, _DEVICES[device_type])
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
        yield


def register(op: Callable, qualname: str) -> None:
    """Give the custom op ``qualname`` (``"stp_fast::name"``, callable as ``op``) autocast kernels for CPU
    and CUDA that cast its float inputs to the region's autocast dtype, then run it with autocast off."""
    name = qualname.split("::", 1)[1]
    for device_type, key_name in _DEVICES.items():
        key = getattr(torch._C.DispatchKey, key_name)

        def kernel(_keyset, *args, _device_type=device_type, _key=key):
            to = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*cast(args, _device_type, to))

        _lib.impl(name, kernel, key_name, with_keyset=True)


def inputs(device_type: str, *values):
    """For the public functions: ``values`` cast as :func:`cast` does when autocast is on for
    ``device_type``, else unchanged (so their dtype checks see what the op will compute in)."""
    to = dtype(device_type)
    return values if to is None else cast(values, device_type, to)
