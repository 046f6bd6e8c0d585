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
    """Our Triton kernels are ``stp_fast.kernels`` only; a top-level ``kernels`` (PyPI has an unrelated package
    of that name, which transformers installs) must never be our folder."""
    code = (
        "import importlib.util as u, pathlib; s = u.find_spec('kernels'); ours = u.find_spec('stp_fast.kernels'); "
        "mine = pathlib.Path(ours.origin).parent.resolve(); "
        "print(s is None or pathlib.Path(s.origin or '.').parent.resolve() != mine, ours is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.stdout.split() == ["True", "True"], out.stderr
