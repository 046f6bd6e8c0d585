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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).
    Tiny convolutions and training runs: on a busy 2-core machine OpenMP threads spin-wait far longer
    than they compute (a model test file measured ~14x slower with 2 threads); one thread is also the
    fastest when idle.  The thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)
