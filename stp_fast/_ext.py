"""Loads the compiled extension ``stp_fast._C`` once, on first use.

The extension only registers kernels (``TORCH_LIBRARY_IMPL``) for private ops whose schemas are
defined in Python (``stp_fast.ops.*``), so the package works without it: every op then runs on
its Triton or pure-PyTorch backend.  Set ``STP_FAST_NO_EXT=1`` to skip loading it.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

_BUILD_INFO = Path(__file__).with_name("_build_info.json")


@functools.cache
def load() -> bool:
    """Import ``stp_fast._C`` (once); return whether it is loaded. Warns once when it fails."""
    if os.environ.get("STP_FAST_NO_EXT", "0") == "1":
        return False
    try:
        importlib.import_module("stp_fast._C")
    except ImportError as exc:
        _load_error.append(str(exc))
        if build_info().get("cpu"):
            # Built but not loadable (ABI mismatch with the installed torch, missing library...).
            warnings.warn(f"stp_fast._C failed to load ({exc}); using the Triton/PyTorch backends", stacklevel=2)
        return False
    return True


_load_error: list[str] = []


def load_error() -> str:
    """Why the extension is not loaded ('' when it is, or has not been tried)."""
    if os.environ.get("STP_FAST_NO_EXT", "0") == "1":
        return "STP_FAST_NO_EXT=1"
    reason = build_info().get("reason", "")
    if reason:  # the build skipped the extension: that is the real reason, not the ImportError
        return f"not built: {reason}"
    return _load_error[0] if _load_error else ""


def build_info() -> dict[str, Any]:
    """The flags ``setup.py`` recorded when it built the package (empty when it never ran)."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


@functools.cache
def has_kernel(op: str, device_type: str) -> bool:
    """Whether the extension registered a kernel for ``stp_fast::<op>`` on ``device_type`` (cpu/cuda)."""
    if not load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"stp_fast::{op}", key)
    except RuntimeError:
        return False
