"""Set-up of the kernel/op suites.

* TF32 off: correctness tests compare fp32 kernels with exact fp32 PyTorch (see ``stp_fast.testing.tf32``);
  a test that checks TF32 itself requests the ``allow_tf32`` fixture.
* Marker ``gpu``: tests that run GPU code when a GPU is present (every Triton/CUDA-backend case; on a
  machine without one they run the Triton interpreter or skip).  The GPU run selects them with
  ``-m "gpu or cuda"`` (``cuda`` marks the tests that need a GPU and are skipped without one).
"""

from pathlib import Path

import pytest

from stp_fast.testing import mark_gpu_items, tf32

_HERE = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs GPU kernels when a GPU is present (selected by the GPU check)")


def pytest_collection_modifyitems(config, items):
    mark_gpu_items(items, _HERE, all_items=_HERE.name == "kernels")


@pytest.fixture(autouse=True)
def _no_tf32():
    with tf32(False):
        yield


@pytest.fixture
def allow_tf32(_no_tf32):
    with tf32(True):
        yield
