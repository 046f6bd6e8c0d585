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

import os
import shutil
from contextlib import contextmanager

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


def nvcc_path() -> str | None:
    return shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextmanager
def env(**values: str | None):
    """Temporarily set (or with None, unset) environment variables."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
