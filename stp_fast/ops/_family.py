"""What every op family shares: backend registration under the naming convention, and the
reference backward computed by autograd through the reference forward.

Convention per family ``<f>``:

* reference: ``forward(*args)`` / ``backward(*args)`` written in the family's module;
* cpu / cuda: the private extension ops ``stp_fast::_<f>_fwd`` / ``stp_fast::_<f>_bwd``, which return
  empty tensors (or an empty list) for gradients that were not asked for;
* triton: ``stp_fast.kernels.<f>.<f>_fwd_triton`` / ``<f>_bwd_triton``, imported on first use (so
  ``import stp_fast`` never imports Triton), returning None for gradients not asked for.

Every backend's ``backward`` returns ``(grad_x or list of grad_x, grad_weight, grad_bias)`` with None
for what was not needed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from stp_fast.ops import _backend

NO_FLOAT64_TRITON = "the Triton kernels support float32, float16 and bfloat16, not float64"


def _ext_fns(family: str) -> dict[str, Callable]:
    def forward(*args):
        return getattr(torch.ops.stp_fast, f"_{family}_fwd")(*args)

    def backward(*args):
        need = args[-3:]
        outs = getattr(torch.ops.stp_fast, f"_{family}_bwd")(*args)
        return tuple(o if n else None for o, n in zip(outs, need))

    return {"forward": forward, "backward": backward}


def _triton_fns(family: str) -> dict[str, Callable]:
    def load(which: str) -> Callable:
        module = importlib.import_module(f"stp_fast.kernels.{family}")
        return getattr(module, f"{family}_{which}_triton")

    return {
        "forward": lambda *args: load("fwd")(*args),
        "backward": lambda *args: load("bwd")(*args),
    }


def register_family(
    family: str,
    *,
    ref_forward: Callable,
    ref_backward: Callable,
    triton_reasons: Callable[..., list[str]] | None = None,
    cuda_reasons: Callable[..., list[str]] | None = None,
) -> None:
    """Register the four backends of ``family`` under the convention above."""
    _backend.register(family, _backend.Impl("reference", {"forward": ref_forward, "backward": ref_backward}))
    for name in ("cpu", "cuda"):
        reasons = cuda_reasons if (name == "cuda" and cuda_reasons) else (lambda *a: [])
        _backend.register(family, _backend.Impl(name, _ext_fns(family), reasons, ext_op=f"_{family}_fwd"))

    def module_reasons() -> list[str]:
        return [] if _has_triton_module(family) else [f"stp_fast.kernels has no Triton kernels for {family}"]

    impl = _backend.Impl("triton", _triton_fns(family), triton_reasons or (lambda *a: []), None, module_reasons)
    _backend.register(family, impl)


@functools.cache
def _has_triton_module(family: str) -> bool:
    return importlib.util.find_spec(f"stp_fast.kernels.{family}") is not None


def triton_dtype_reasons(x: Tensor | Sequence[Tensor], *_args) -> list[str]:
    """The Triton kernels take no float64."""
    first = x[0] if isinstance(x, (list, tuple)) else x
    return [NO_FLOAT64_TRITON] if first.dtype == torch.float64 else []


def take_block(weight: Tensor, rows: Tensor | int, cols: Tensor | int | None) -> Tensor:
    """``weight[rows][:, cols]`` where an int means a prefix and ``cols=None`` keeps dim 1 whole."""
    w = weight.index_select(0, rows) if isinstance(rows, Tensor) else weight[:rows]
    if cols is None:
        return w
    return w.index_select(1, cols) if isinstance(cols, Tensor) else w[:, :cols]


def add_block(full: Tensor, block: Tensor, rows: Tensor | int, cols: Tensor | int | None) -> Tensor:
    """``full[rows][:, cols] += block`` in place (see take_block for the index forms); returns full."""
    block = block.to(full.dtype)
    if cols is None:
        if isinstance(rows, Tensor):
            full.index_add_(0, rows, block)
        else:
            full[:rows] += block
    elif isinstance(rows, Tensor) or isinstance(cols, Tensor):
        r = rows if isinstance(rows, Tensor) else torch.arange(rows, device=full.device)
        c = cols if isinstance(cols, Tensor) else torch.arange(cols, device=full.device)
        full.index_put_((r.unsqueeze(1), c.unsqueeze(0)), block, accumulate=True)
    else:
        full[:rows, :cols] += block
    return full


def put_block(like: Tensor, block: Tensor, rows: Tensor | int, cols: Tensor | int | None) -> Tensor:
    """A zero tensor shaped like ``like`` holding ``block`` at ``[rows][:, cols]`` (see take_block)."""
    return add_block(torch.zeros_like(like), block, rows, cols)


def like_param(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` with the strides ``torch.empty_like(param)`` has (what the fake kernels promise): the
    param's own strides when it is dense (e.g. a channels-last conv weight), else contiguous.  A copy
    only when a backend returned other strides."""
    expected = torch.empty_like(param, device="meta").stride()
    if grad.stride() == expected or grad.numel() <= 1:
        return grad
    out = torch.empty_like(param, dtype=grad.dtype)
    out.copy_(grad)
    return out
