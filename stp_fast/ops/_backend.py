"""Backend registry and selection for stp_fast ops.

Every op family registers one :class:`Impl` per backend.  A backend is one of

* ``reference`` -- the pure-PyTorch implementation beside the op; serves any device and dtype;
* ``cpu``       -- the C++ kernels of the compiled extension ``stp_fast._C`` (CPU tensors);
* ``cuda``      -- the CUDA kernels of ``stp_fast._C`` (CUDA tensors; built only with a CUDA torch);
* ``triton``    -- the Triton kernels in ``stp_fast.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how the CPU test suite checks them).

Selection (:func:`pick`): ``STP_FAST_BACKEND=<name>`` (or :func:`force_backend`) forces one backend
and raises :class:`BackendUnavailableError` listing the reasons when it cannot serve the inputs.
Otherwise the first backend of the device's priority list that can serve them is used, silently
(the choice is logged once at DEBUG level).  The reference accepts everything, so automatic
selection never fails.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from stp_fast import _ext

log = logging.getLogger("stp_fast.ops")

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Order of preference per device type.  On CUDA, Triton comes first: its tile sizes adapt to the
# shape and it gathers index lists inside the kernel; the CUDA extension is the fallback when
# Triton is unavailable.  (Not yet tuned per shape on a GPU: see README, "Backend selection".)
PRIORITY: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the given inputs; the message lists why."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op family.

    ``fns`` maps entry-point names (e.g. ``"forward"``, ``"backward"``) to callables.
    ``input_reasons(*args)`` returns why this implementation cannot serve these particular inputs
    (dtype, shape limits...); device-level availability is checked by :func:`device_reasons`.
    ``ext_op`` names the private ``stp_fast::`` op whose extension kernel this backend needs;
    ``static_reasons()`` reports what is missing whatever the inputs (e.g. no kernel module).
    """

    backend: str
    fns: dict[str, Callable]
    input_reasons: Callable[..., list[str]] = field(default=lambda *args: [])
    ext_op: str | None = None
    static_reasons: Callable[[], list[str]] = field(default=lambda: [])


_REGISTRY: dict[str, dict[str, Impl]] = {}
_forced: list[str] = []


def register(family: str, impl: Impl) -> None:
    if impl.backend not in BACKENDS:
        raise ValueError(f"unknown backend {impl.backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(family, {})[impl.backend] = impl


def families() -> list[str]:
    return sorted(_REGISTRY)


def forced_backend() -> str | None:
    """The backend forced by :func:`force_backend` or ``STP_FAST_BACKEND`` (None when automatic)."""
    name = _forced[-1] if _forced else os.environ.get("STP_FAST_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"STP_FAST_BACKEND must be one of {(*BACKENDS, 'auto')}, got {name!r}")
    return name


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for every op inside the block (None or "auto": automatic selection)."""
    name = (name or "auto").lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reasons(impl: Impl, device_type: str) -> list[str]:
    """Why ``impl`` cannot run on ``device_type`` at all (empty when it can)."""
    name = impl.backend
    if name == "reference":
        return []
    static = impl.static_reasons()
    if static:
        return list(static)
    if name in ("cpu", "cuda"):
        reasons = []
        if device_type != name:
            reasons.append(f"the {name} backend serves {name} tensors, got {device_type} tensors")
        elif not _ext.load():
            reasons.append(f"the compiled extension stp_fast._C is not loaded ({_ext.load_error() or 'not built'})")
        elif impl.ext_op and not _ext.has_kernel(impl.ext_op, name):
            reasons.append(f"stp_fast._C has no {name} kernel for stp_fast::{impl.ext_op} (see `stp-fast info`)")
        return reasons
    # triton
    reasons = []
    if not triton_importable():
        reasons.append("triton is not installed")
    if device_type == "cpu" and not triton_interpreted():
        reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
    elif device_type not in ("cpu", "cuda"):
        reasons.append(f"triton does not run on {device_type} tensors")
    return reasons


def reasons(family: str, backend: str, device_type: str, *args) -> list[str]:
    """Every reason ``backend`` cannot serve ``family`` on these inputs (empty when it can)."""
    impl = _REGISTRY.get(family, {}).get(backend)
    if impl is None:
        return [f"{family} has no {backend} implementation"]
    out = device_reasons(impl, device_type)
    if not out and args:
        out = list(impl.input_reasons(*args))
    return out


def pick(family: str, device_type: str, *args) -> Impl:
    """The implementation of ``family`` to run on these inputs (see the module docstring)."""
    impls = _REGISTRY[family]
    forced = forced_backend()
    if forced is not None:
        why = reasons(family, forced, device_type, *args)
        if why:
            raise BackendUnavailableError(
                f"STP_FAST_BACKEND={forced} cannot run {family} on these inputs: " + "; ".join(why)
            )
        return impls[forced]
    for name in PRIORITY.get(device_type, ("reference",)):
        if name in impls and not reasons(family, name, device_type, *args):
            _log_choice(family, device_type, name)
            return impls[name]
    return impls["reference"]


def describe(family: str, device_type: str) -> tuple[str, dict[str, list[str]]]:
    """For ``stp-fast info``: the backend auto-selection would use for ``device_type`` tensors of a
    supported dtype, and why each backend ahead of it was skipped."""
    skipped: dict[str, list[str]] = {}
    for name in PRIORITY.get(device_type, ("reference",)):
        impl = _REGISTRY[family].get(name)
        if impl is None:
            continue
        why = device_reasons(impl, device_type)
        if not why:
            return name, skipped
        skipped[name] = why
    return "reference", skipped


# Devices on which the public multi-subnet functions run their backend directly from a
# torch.autograd.Function in eager mode (see eager_ok).  Measured on the CPU (the custom-op
# machinery -- argument defaults, pytree flattening, redispatch, in forward and backward -- cost
# ~0.4 ms per layer call: a full + 4 subnet resnet20 STP step on 8x8 inputs, where little else
# remains, went from 79 to 38 ms on one core).  On CUDA the GPU review measured the same host cost
# (custom-op route 3.0-3.8 ms forward+backward per multi_subnet_conv2d call with S=5 and null kernels,
# eager twin 0.8-1.05 ms) against 2-20 us of GPU work per CIFAR layer, so CUDA takes the twin too
# (the same checks, autocast rule and kernels; benchmarks/gpu_check.sh times it).
EAGER_DEVICES = ("cpu", "cuda")


def eager_ok(device_type: str, tensors: tuple) -> bool:
    """Whether a public multi-subnet function may call its backend directly (a torch.autograd.Function)
    instead of going through its custom op.

    Only in plain eager mode: not while torch.compile / export traces, not under a
    ``__torch_dispatch__`` mode (fake tensors, make_fx), not inside torch.func transforms and not
    for tensor subclasses with ``__torch_function__`` -- those need the registered op and its fake."""
    if device_type not in EAGER_DEVICES or torch.compiler.is_compiling():
        return False
    if is_in_torch_dispatch_mode() or torch._C._are_functorch_transforms_active():
        return False
    return not torch.overrides.has_torch_function(tensors)


@functools.cache
def _log_choice(family: str, device_type: str, name: str) -> None:
    log.debug("stp_fast: %s on %s tensors uses the %s backend", family, device_type, name)
