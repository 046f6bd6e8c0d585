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
