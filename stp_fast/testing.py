"""Test helpers: the tolerance table, comparison helpers and skip decorators used by the suite.

Tolerance rules (one table for the whole project):

* The oracle is the op's pure-PyTorch reference evaluated in float64 on the same inputs.
* GEMM-like reductions follow the FlashAttention rule: the error of the fast path may be at most
  ``GEMM_ERROR_FACTOR`` (2x) the error of the same-precision PyTorch computation, plus a small
  absolute floor scaled by the magnitude of the result (``atol_scale * max|ref|``).
* float32 on CPU / under the Triton interpreter is exact fp32 (IEEE): the FA rule applies directly.
* On a GPU, float32 may use TF32 (Triton and cuDNN defaults when allowed); the PyTorch baseline
  is then computed under the same TF32 setting, so the 2x rule still holds.  bf16/fp16 inputs
  accumulate in fp32; the baseline is PyTorch's own bf16/fp16 op.
* Index and mask results are compared exactly; pruned gradient entries must be exactly zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

GEMM_ERROR_FACTOR = 2.0

# Absolute floor, relative to max|ref|, added to the 2x rule (covers results whose same-precision
# PyTorch error happens to be ~0, e.g. tiny reductions that are exact in that precision).
ATOL_SCALE = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


# TF32 (GPU fp32 with TF32 tensor cores): relative Frobenius error ||y - ref|| / ||ref|| against float64.
# TF32 keeps 10 mantissa bits (unit roundoff 2**-11 ~ 4.9e-4); KERNELS.md's GPU fp32-with-TF32 tolerance.
TF32_REL_FRO = 5e-3


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """PyTorch's TF32 permission for cuDNN convolutions and cuBLAS matmuls inside the block (the Triton
    kernels follow the same settings, see ``stp_fast.kernels._common.input_precision``).

    The correctness suites run with TF32 off (tests/conftest.py): the fast
    path and its same-precision PyTorch baseline are then both exact fp32, as on the CPU, and the 2x rule
    holds.  Without that, cuDNN may pick an exact kernel for small odd channel counts while Triton uses
    TF32, and the rule fails by ~100x (GPU review, item 1).  TF32 itself is checked separately against
    ``TF32_REL_FRO``."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def rel_fro_err(actual: Tensor, oracle: Tensor) -> float:
    """||actual - oracle||_F / ||oracle||_F in float64 (0 for empty tensors)."""
    if actual.numel() == 0:
        return 0.0
    ref = oracle.double()
    return ((actual.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def max_err(actual: Tensor, expected: Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def assert_gemm_close(actual: Tensor, baseline: Tensor, oracle: Tensor, *, name: str = "output") -> None:
    """FlashAttention rule: ``err(actual) <= 2 * err(baseline) + atol``.

    ``baseline`` is the same-precision PyTorch result, ``oracle`` the float64 reference.
    """
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert actual.dtype == baseline.dtype, f"{name}: dtype {actual.dtype} != {baseline.dtype}"
    scale = oracle.double().abs().max().item() if oracle.numel() else 0.0
    atol = ATOL_SCALE[actual.dtype] * max(scale, 1.0)
    err, base_err = max_err(actual, oracle), max_err(baseline, oracle)
    assert err <= GEMM_ERROR_FACTOR * base_err + atol, (
        f"{name}: max error {err:.3g} > {GEMM_ERROR_FACTOR} x PyTorch's {base_err:.3g} + {atol:.3g}"
    )


def backend_device(backend: str) -> str:
    """The device a backend is tested on here: CUDA for cuda (and Triton when a GPU exists), else CPU."""
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def skip_unless_backend(op: str, backend: str, device: str, *args) -> None:
    """Skip the calling test, with the backend's own reasons, when it cannot serve ``op`` here."""
    from stp_fast.ops import _backend

    why = _backend.reasons(op, backend, device, *args)
    if why:
        pytest.skip(f"{backend} backend unavailable for {op}: {'; '.join(why)}")


def _flatten(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)]


def _prepare(value, device: str, dtype: torch.dtype, leaves: list[Tensor]):
    if isinstance(value, (list, tuple)):
        return [_prepare(v, device, dtype, leaves) for v in value]
    if isinstance(value, Tensor) and value.is_floating_point():
        t = value.to(device, dtype).requires_grad_(True)
        leaves.append(t)
        return t
    if isinstance(value, Tensor):
        return value.to(device)
    return value


def run_with_grads(fn, inputs: list, *, device: str, dtype: torch.dtype, seed: int = 0, backend: str | None = None):
    """Run ``fn(*inputs)`` with the float inputs cast to (device, dtype) as leaves requiring grad, then
    backpropagate fixed random output gradients; returns (outputs, grads of the leaves) as flat lists.
    ``backend`` forces a backend for the call (None: whatever ``fn`` does)."""
    from stp_fast.ops import force_backend

    leaves: list[Tensor] = []
    args = [_prepare(v, device, dtype, leaves) for v in inputs]
    with force_backend(backend):
        outs = _flatten(fn(*args))
        gen = torch.Generator().manual_seed(seed)
        gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device, dtype) for o in outs]
        pairs = [(o, g) for o, g in zip(outs, gouts) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    return [o.detach() for o in outs], list(grads)


def check_against_reference(fn, ref, inputs: list, *, backend: str, dtype: torch.dtype, device: str,
                            seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """``fn`` under ``backend`` against ``ref``: outputs and every input gradient, by the 2x rule
    (oracle: ``ref`` in float64; baseline: ``ref`` in ``dtype``).  Returns the actual (outputs, grads)."""
    oracle = run_with_grads(ref, inputs, device=device, dtype=torch.float64, seed=seed, backend="reference")
    baseline = run_with_grads(ref, inputs, device=device, dtype=dtype, seed=seed, backend="reference")
    actual = run_with_grads(fn, inputs, device=device, dtype=dtype, seed=seed, backend=backend)
    for kind, a_list, b_list, o_list in zip(("output", "grad"), actual, baseline, oracle):
        assert len(a_list) == len(o_list), f"{kind}: {len(a_list)} tensors, expected {len(o_list)}"
        for i, (a, b, o) in enumerate(zip(a_list, b_list, o_list)):
            assert_gemm_close(a, b, o, name=f"{backend}/{kind}[{i}]")
    return actual


def _autocast_leaves(value, dt, device: str, leaves: list[Tensor]):
    """``value`` (float64 originals, nested lists) as fresh leaves of dtype ``dt`` (same nesting)."""
    if isinstance(value, (list, tuple)):
        dts = dt if isinstance(dt, (list, tuple)) else [dt] * len(value)
        return [_autocast_leaves(v, d, device, leaves) for v, d in zip(value, dts)]
    if isinstance(value, Tensor) and value.is_floating_point():
        t = value.to(device, dt).requires_grad_(True)
        leaves.append(t)
        return t
    return value.to(device) if isinstance(value, Tensor) else value


def _cast_like(value, dt):
    """``value`` (leaves, nested lists) cast to ``dt`` (same nesting as ``value``, or one dtype for all)."""
    if isinstance(value, (list, tuple)):
        dts = dt if isinstance(dt, (list, tuple)) else [dt] * len(value)
        return [_cast_like(v, d) for v, d in zip(value, dts)]
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dt)
    return value


def check_under_autocast(fn, by_hand, inputs: list, *, backend: str, device: str, dtype: torch.dtype = torch.bfloat16,
                         input_dtypes: list | None = None, hand_dtypes: list | None = None,
                         seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """``fn`` under ``torch.autocast(device, dtype)`` against the same computation done by hand.

    The float ``inputs`` (float64 values, possibly nested in lists) become leaves of ``input_dtypes``
    (default float32: fp32 master weights and activations).  ``fn`` runs on them under autocast with
    ``backend`` forced; ``by_hand`` runs with autocast off on the leaves cast to ``hand_dtypes``
    (default ``dtype``: what F.conv2d / F.linear compute under autocast), with the reference backend.
    The oracle is ``by_hand`` in float64 on the hand-rounded inputs.  Checks: every output has the
    hand computation's dtype; outputs and every leaf gradient obey the 2x rule of
    :func:`assert_gemm_close` (gradients compared in the hand dtype of their input, since they
    carry that precision); leaf gradients have the leaf's dtype (fp32 masters get fp32 gradients).
    Returns the actual (outputs, leaf gradients)."""
    from stp_fast.ops import force_backend

    input_dtypes = input_dtypes or [torch.float32] * len(inputs)
    hand_dtypes = hand_dtypes or [dtype] * len(inputs)

    def run(call, leaf_dtypes, cast_to, autocast: bool, name: str | None, out_dtypes=None):
        leaves: list[Tensor] = []
        args = [_autocast_leaves(v, d, device, leaves) for v, d in zip(inputs, leaf_dtypes)]
        if cast_to is not None:
            args = [_cast_like(a, d) for a, d in zip(args, cast_to)]
        with force_backend(name), torch.autocast(device, dtype=dtype, enabled=autocast):
            outs = _flatten(call(*args))
        gen = torch.Generator().manual_seed(seed)
        dts = out_dtypes or [o.dtype for o in outs]
        gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device, d).to(o.dtype)
                 for o, d in zip(outs, dts)]  # fmt: skip
        pairs = [(o, g) for o, g in zip(outs, gouts) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
        return [o.detach() for o in outs], list(grads)

    def flat_dtypes(dts) -> list[torch.dtype]:
        flat: list[torch.dtype] = []
        for v, d in zip(inputs, dts):
            if isinstance(v, (list, tuple)):
                flat += [x for x, t in zip(d if isinstance(d, (list, tuple)) else [d] * len(v), v) if _is_float(t)]
            elif _is_float(v):
                flat.append(d)
        return flat

    hand = run(by_hand, input_dtypes, hand_dtypes, False, "reference")
    actual = run(fn, input_dtypes, None, True, backend)
    oracle = run(by_hand, hand_dtypes, [torch.float64] * len(inputs), False, "reference",
                 out_dtypes=[o.dtype for o in hand[0]])  # fmt: skip
    assert len(actual[0]) == len(hand[0]), f"{len(actual[0])} outputs, expected {len(hand[0])}"
    for i, (a, h, o) in enumerate(zip(actual[0], hand[0], oracle[0])):
        assert a.dtype == h.dtype, f"{backend}/output[{i}]: dtype {a.dtype} under autocast, by hand {h.dtype}"
        assert_gemm_close(a, h, o, name=f"{backend}/autocast output[{i}]")
    leaf_dtypes, grad_dtypes = flat_dtypes(input_dtypes), flat_dtypes(hand_dtypes)
    for i, (a, h, o, ld, gd) in enumerate(zip(actual[1], hand[1], oracle[1], leaf_dtypes, grad_dtypes)):
        assert a.dtype == ld, f"{backend}/grad[{i}]: dtype {a.dtype}, expected the leaf's {ld}"
        assert_gemm_close(a.to(gd), h.to(gd), o, name=f"{backend}/autocast grad[{i}]")
    return actual


def _is_float(t) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


GPU_BACKENDS = ("triton", "cuda")


def mark_gpu_items(items, directory, *, all_items: bool) -> None:
    """Add the ``gpu`` marker to the collected tests under ``directory`` that exercise GPU kernels: all of
    them (``all_items``), or those parametrised with a GPU backend, marked ``cuda``, or naming a GPU
    backend in their id (tests/ops)."""
    from pathlib import Path

    root = Path(directory).resolve()
    for item in items:
        path = Path(str(getattr(item, "path", item.fspath))).resolve()
        if root not in path.parents:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        gpu = all_items or params.get("backend") in GPU_BACKENDS or "cuda" in item.keywords
        gpu = gpu or any(b in item.name.split("[", 1)[0] for b in GPU_BACKENDS)
        if gpu:
            item.add_marker(pytest.mark.gpu)
