"""Suite-wide set-up: Triton runs in its interpreter on machines without a GPU (it must be set before
any Triton kernel module is imported), numpy's BLAS stays single-threaded (its spinning threads slow
the interpreter and torch down), and every test starts from a fixed seed."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)
