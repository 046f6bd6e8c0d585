"""The compiled extension: present when the build says so, and required where the suite demands it."""

import os

import pytest

from stp_fast import _ext


def test_extension_matches_build_info():
    info = _ext.build_info()
    if not info.get("cpu"):
        pytest.skip(f"stp_fast._C was not built: {info.get('reason') or 'no build info'}")
    assert _ext.load(), f"built but not loadable: {_ext.load_error()}"
    assert _ext.has_kernel("_masked_linear_fwd", "cpu")
    assert _ext.has_kernel("_masked_linear_bwd", "cpu")
    assert _ext.has_kernel("_masked_linear_fwd", "cuda") == bool(info.get("cuda"))


def test_extension_required():
    """`make test` sets STP_FAST_REQUIRE_EXT=1 so a broken build cannot hide behind skipped tests."""
    if os.environ.get("STP_FAST_REQUIRE_EXT", "0") != "1":
        pytest.skip("STP_FAST_REQUIRE_EXT is not set")
    assert _ext.load(), f"stp_fast._C is required but not loaded: {_ext.load_error()}"
    assert _ext.has_kernel("_masked_linear_fwd", "cpu")
