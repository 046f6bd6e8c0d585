"""`import stp_fast` is lean: no Triton, no CUDA initialisation, no extension load at import time."""

import subprocess
import sys

CODE = """
import sys, torch
import stp_fast, stp_fast.ops
assert "triton" not in sys.modules, "importing stp_fast imported triton"
assert "stp_fast._C" not in sys.modules, "importing stp_fast loaded the extension"
assert not torch.cuda.is_initialized(), "importing stp_fast initialised CUDA"
assert not any(m == "kernels" or m.startswith("kernels.") for m in sys.modules), "top-level `kernels` imported"
print("ok")
"""


def test_import_is_lean():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_kernels_only_importable_as_subpackage():
    code = (
        "import importlib.util as u; print(u.find_spec('kernels') is None, u.find_spec('stp_fast.kernels') is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.stdout.split() == ["True", "True"], out.stderr
