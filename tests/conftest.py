"""Suite-wide set-up: Triton runs in its interpreter on machines without a GPU (it must be set before
any Triton kernel module is imported), numpy's BLAS stays single-threaded (its spinning threads slow
the interpreter and torch down), and every test starts from a fixed seed.

The kernel/op suites (tests/ops, tests/kernels) also get:

* TF32 off: correctness tests compare fp32 kernels with exact fp32 PyTorch (see ``stp_fast.testing.tf32``);
  a test that checks TF32 itself requests the ``allow_tf32`` fixture.
* Marker ``gpu``: tests that run GPU code when a GPU is present (every Triton/CUDA-backend case; on a
  machine without one they run the Triton interpreter or skip).  The GPU run selects them with
  ``-m "gpu or cuda"`` (``cuda`` marks the tests that need a GPU and are skipped without one).
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

from stp_fast.testing import mark_gpu_items, tf32

_HERE = Path(__file__).resolve().parent
_KERNEL_SUITES = (_HERE / "ops", _HERE / "kernels")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs GPU kernels when a GPU is present (selected by the GPU check)")


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


@pytest.fixture(autouse=True)
def _no_tf32(request):
    path = Path(str(request.node.path)).resolve()
    if any(suite in path.parents for suite in _KERNEL_SUITES):
        with tf32(False):
            yield
    else:
        yield


@pytest.fixture
def allow_tf32(_no_tf32):
    with tf32(True):
        yield


def pytest_collection_modifyitems(config, items):
    for suite in _KERNEL_SUITES:
        mark_gpu_items(items, suite, all_items=suite.name == "kernels")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)
