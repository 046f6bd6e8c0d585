"""Compile-check every CUDA source in csrc/ with plain nvcc (no GPU and no CUDA build of torch needed).

The .cu files are kept free of ATen/torch headers (KERNELS.md §6(iv)), so they must compile on their
own for the architectures the wheel targets (sm_80, sm_90).  Skipped when nvcc is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
NVCC_ARCH_FLAGS = [
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=sm_90",
]


def test_cuda_sources_exist() -> None:
    assert CU_FILES, f"no .cu files found under {CSRC}"


@pytest.mark.parametrize("cu_file", CU_FILES, ids=[str(p.relative_to(ROOT)) for p in CU_FILES])
def test_cu_compiles_with_nvcc(cu_file: Path, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH; CUDA sources are not compile-checked")
    out = tmp_path / (cu_file.stem + ".o")
    cmd = [nvcc, "-c", "-std=c++17", "-O2", "-I", str(CSRC), *NVCC_ARCH_FLAGS, "-o", str(out), str(cu_file)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nvcc timed out after 300 s: {' '.join(cmd)}")
    assert proc.returncode == 0, (
        f"nvcc failed (exit {proc.returncode}): {' '.join(cmd)}\n"
        f"--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    )
    assert out.is_file() and out.stat().st_size > 0
