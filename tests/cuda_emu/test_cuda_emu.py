"""The CUDA kernels of csrc/ executed on the CPU by the emulator (README.md here) against float64 references.

The .cu files are compiled unchanged by g++ (launches rewritten at build time, cuda_emu_harness.py),
and their plain-C launchers are called through ctypes on CPU tensors exactly as the torch glue calls
them on GPU tensors.  Every block runs with real __syncthreads() barriers and shared memory, so this
checks indexing, tiling, tails, gathers, split-K and epilogues; see README.md for what it cannot see.
Outputs live inside guard buffers (NaN where the kernel must write, a sentinel around the view) so
that unwritten elements and stray writes are caught, and pruned weight-gradient entries must be
exactly zero.
"""

from __future__ import annotations

import math
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stp_fast.testing import assert_gemm_close

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the harness module sits next to this file (any pytest import mode)
import cuda_emu_harness as harness  # noqa: E402

CU_FILES = [
    harness.CSRC / "masked_linear" / "masked_linear_cuda.cu",
    harness.CSRC / "masked_conv2d" / "masked_conv2d_cuda.cu",
    HERE / "kernels" / "emu_selftest.cu",
]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SENTINEL = 1234.0
SCHEDULES = {"forward": 0, "reverse": 1, "shuffled": 2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulator library, built once per test module (STP_FAST_EMU_BUILD_DIR reuses a build)."""
    if harness.find_cxx() is None:
        pytest.skip("no C++ compiler (g++) on PATH: the CUDA emulator tests compile the .cu files with it")
    build_dir = os.environ.get("STP_FAST_EMU_BUILD_DIR")
    build_dir = Path(build_dir) if build_dir else tmp_path_factory.mktemp("cuda_emu")
    lib = harness.build(CU_FILES, sorted((HERE / "bindings").glob("*.cpp")), build_dir)
    lib.emu_set_schedule(0, 0)
    return lib


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The references here are tiny: intra-op threads only add spin-wait overhead (seconds per
    call on a loaded 2-core machine), so the module runs torch single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def schedule(emu):
    """Sets the emulator's thread schedule for one test, restoring index order afterwards."""

    def set_mode(name: str, seed: int = 1) -> None:
        emu.emu_set_schedule(SCHEDULES[name], seed)

    yield set_mode
    emu.emu_set_schedule(0, 0)


# ----------------------------------------------------------------------------------------------
# Helpers


def ptr(t: torch.Tensor | None) -> int | None:
    """Data pointer for the launcher; empty tensors pass null, as a CUDA caching allocator may."""
    return None if t is None or t.numel() == 0 else t.data_ptr()


def launch(lib, fn, op: int, dtype: torch.dtype, ints: list[int], ptrs: list[int | None]) -> None:
    lib.emu_clear_error_message()
    err = harness.call(fn, op, DTYPE_CODE[dtype], ints, ptrs)
    assert err == 0, f"launcher returned cudaError {err}: {lib.emu_last_error_message().decode()}"


def layout_strides(shape: tuple[int, ...], layout: str) -> list[int]:
    """Element strides of a dense tensor of `shape` in `layout` (contig/nchw, T, cl)."""
    if layout == "T":  # column-major 2-D
        return [1, max(shape[0], 1)]
    if layout == "cl":  # channels-last 4-D
        _, c, h, w = shape
        return [h * w * c, 1, w * c, c]
    strides, acc = [], 1
    for s in reversed(shape):
        strides.insert(0, acc)
        acc *= max(s, 1)
    return strides


def make(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A copy of `values` with the given memory layout; "gap" = every stride doubled, offset 3."""
    gap = layout == "gap"
    strides = layout_strides(tuple(values.shape), "contig" if gap else layout)
    if gap:
        strides = [2 * s for s in strides]
    offset = 3 if gap else 0
    span = offset + sum((s - 1) * st for s, st in zip(values.shape, strides)) + 1 + (3 if gap else 0)
    buf = torch.full((max(span, 1),), SENTINEL, dtype=values.dtype)
    view = buf.as_strided(values.shape, strides, offset)
    view.copy_(values)
    return view


def guarded(shape: tuple[int, ...], dtype: torch.dtype, layout: str, fill: float = math.nan) -> torch.Tensor:
    """An output view in `layout` filled with `fill` inside a buffer holding SENTINEL elsewhere."""
    return make(torch.full(shape, fill, dtype=dtype), layout)


def check_guard(view: torch.Tensor, name: str) -> None:
    """Nothing outside `view` was written, and (for NaN-filled views) every element inside was."""
    buf = torch.empty(0, dtype=view.dtype).set_(view.untyped_storage())
    outside = buf.clone()
    outside.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(SENTINEL)
    assert (outside == SENTINEL).all(), f"{name}: the kernel wrote outside the output view"
    assert not view.isnan().any(), f"{name}: {int(view.isnan().sum())} output elements were never written"


def pick(full: int, count: int, indexed: bool, gen: torch.Generator) -> torch.Tensor | None:
    """A sorted index of `count` of `full` channels, or None (the prefix)."""
    return torch.randperm(full, generator=gen)[:count].sort().values if indexed else None


def positions(index: torch.Tensor | None, count: int) -> torch.Tensor:
    return torch.arange(count) if index is None else index


def seeded(*key) -> torch.Generator:
    """A generator seeded from the test's parameters (stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulator type (split-K workspace): double for float64, else float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def variant_id(v: tuple) -> str:
    """Test id of an (in indexed, out indexed, layout[, weight layout]) variant."""
    parts = [f"in{'I' if v[0] else 'P'}", f"out{'I' if v[1] else 'P'}", v[2], *(f"w{w}" for w in v[3:])]
    return "-".join(parts)


def check_grad_weight(actual, baseline, oracle_full, mask, name):
    """Active entries within the GEMM rule, every pruned entry exactly zero."""
    assert (actual[~mask] == 0).all(), f"{name}: pruned entries are not exactly zero"
    assert_gemm_close(actual[mask], baseline[mask], oracle_full[mask], name=name)


# ----------------------------------------------------------------------------------------------
# The emulator itself


def test_rewrite_launches_keeps_lines_and_template_arguments():
    src = "a\n  k<Op<T>, 3> <<<grid,\n   NT, 0, s>>> (x, y);\nk2<<<1, 2>>>();\n"
    out, count = harness.rewrite_launches(src)
    assert count == 2
    flat = " ".join(out.split())
    assert "::emu::Launch(grid, NT, 0, s).bind(k<Op<T>, 3>)( x, y);" in flat
    assert "::emu::Launch(1, 2).bind(k2)();" in flat
    assert out.count("\n") == src.count("\n") and out.splitlines()[3].startswith("::emu::Launch(1, 2)")


def test_rewrite_shared_registers_each_array():
    src = "__global__ void k() {\n  __shared__ typename Op::KInfo ks[2][BK];  // c\n  // __shared__ float no;\n}\n"
    out, count = harness.rewrite_shared(src)
    assert count == 1 and "::emu::shared_region(&ks, sizeof(ks));" in out
    with pytest.raises(ValueError, match="one declarator"):
        harness.rewrite_shared("  __shared__ float a[4], b[4];\n")


@pytest.mark.parametrize("mode", list(SCHEDULES))
def test_emulator_detects_a_missing_barrier(emu, schedule, mode):
    schedule(mode)
    x = torch.arange(128, dtype=torch.float32)
    expected = x.view(2, 64).flip(1).flatten()
    for with_barrier in (True, False):
        out = torch.zeros(128)
        assert emu.emu_selftest(0 if with_barrier else 1, x.data_ptr(), out.data_ptr(), 2) == 0
        if with_barrier:
            assert torch.equal(out, expected)
        else:  # threads read shared memory that is still poisoned (NaN): the race is visible
            assert out.isnan().any()


def test_emulator_reports_divergent_barriers_and_bad_launches(emu):
    out = torch.zeros(64)
    for which, message in [(2, "divergent __syncthreads()"), (3, "wait at different __syncthreads()")]:
        emu.emu_clear_error_message()
        assert emu.emu_selftest(which, None, out.data_ptr(), 10) != 0
        assert message in emu.emu_last_error_message().decode()
    ids = torch.full((6 * 24 * 2,), -1, dtype=torch.int64)
    assert emu.emu_selftest(4, None, ids.data_ptr(), 0) == 0  # grid (3, 2), block (4, 3, 2)
    pairs = ids.view(6, 24, 2)
    assert torch.equal(pairs[..., 0], torch.arange(24).expand(6, 24))
    assert torch.equal(pairs[..., 1], torch.arange(6).unsqueeze(1).expand(6, 24))
    emu.emu_clear_error_message()
    assert emu.emu_selftest(5, None, ids.data_ptr(), 0) == 9  # cudaErrorInvalidConfiguration
    assert "block=(2048,1,1)" in emu.emu_last_error_message().decode()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_stand_ins_match_torch_bit_for_bit(emu, dtype):
    to_float, from_float = (
        (emu.emu_half_to_float, emu.emu_float_to_half)
        if dtype == torch.float16
        else (emu.emu_bf16_to_float, emu.emu_float_to_bf16)
    )
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).float()
    got = torch.empty(65536, dtype=torch.float32)
    to_float(bits.data_ptr(), got.data_ptr(), 65536)
    assert torch.equal(got.isnan(), values.isnan()) and torch.equal(got[~got.isnan()], values[~values.isnan()])
    # Rounding: every representable value, the midpoints between neighbours (ties to even) and
    # random floats over the whole exponent range (subnormals, overflow to inf).
    finite = values[values.isfinite()].unique()
    mids = (finite[1:].double() + finite[:-1].double()).div(2).float()
    gen = torch.Generator().manual_seed(0)
    rnd = torch.randn(200000, generator=gen) * torch.pow(2.0, torch.randint(-30, 20, (200000,), generator=gen).float())
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, 65519.0, 65520.0, 1e-8, 2.0**-25, 3e38])
    src = torch.cat([finite, mids, rnd, specials]).contiguous()
    out = torch.empty(src.numel(), dtype=torch.int16)
    from_float(src.data_ptr(), out.data_ptr(), src.numel())
    assert torch.equal(out, src.to(dtype).view(torch.int16))


# ----------------------------------------------------------------------------------------------
# masked_linear: stp_fast_gathered_gemm_launch through the masked_linear_*_gemm helpers

LINEAR_SHAPES = [  # (M, k, n, N, K)
    (1, 1, 1, 1, 1),
    (7, 5, 3, 9, 11),
    (70, 33, 65, 80, 40),  # tails in every dimension, two column tiles
    (130, 64, 64, 64, 64),  # whole tiles plus a 2-row tail
    (0, 5, 4, 8, 8),  # empty batch
    (3, 0, 4, 8, 8),  # no active inputs: y = bias, grad_x empty
    (5, 17, 0, 8, 20),  # no active outputs
]
LINEAR_VARIANTS = [  # (in indexed, out indexed, layout of x / grad_out / weight / outputs)
    (False, False, "contig"),
    (True, True, "T"),
    (True, False, "gap"),
    (False, True, "T"),
]


def linear_launch(lib, op, dtype, a, b, out, *, M, k, n, in_index, out_index, bias=None, split=1, acc=False):
    """op 0: y = x W^T; 1: grad_x = g W; 2: grad_W (full, scattered).  (a, b) = (x|g, W|x)."""
    ws = None
    if split > 1:
        rows, cols = (n, k) if op == 2 else (M, n if op == 0 else k)
        ws = torch.full((split * rows * cols,), math.nan, dtype=accumulator(dtype))
    bias_s0 = bias.stride(0) if bias is not None else 1
    ints = [M, k, n, *a.stride(), *b.stride(), bias_s0, *out.stride(), split, int(acc)]
    ptrs = [ptr(a), ptr(b), ptr(in_index), ptr(out_index), ptr(bias), ptr(out), ptr(ws)]
    launch(lib, lib.emu_masked_linear, op, dtype, ints, ptrs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "M{}_k{}_n{}_N{}_K{}".format(*s))
@pytest.mark.parametrize("variant", LINEAR_VARIANTS, ids=variant_id)
def test_masked_linear(emu, dtype, shape, variant):
    M, k, n, N, K = shape
    in_idx, out_idx, layout = variant
    gen = seeded(shape, variant)
    in_index, out_index = pick(K, k, in_idx, gen), pick(N, n, out_idx, gen)
    rows, cols = positions(out_index, n), positions(in_index, k)
    w64, x64, g64, b64 = rand(gen, N, K), rand(gen, M, k), rand(gen, M, n), rand(gen, N)
    w, x, g = (make(t.to(dtype), layout) for t in (w64, x64, g64))
    b = make(b64.to(dtype), "gap" if layout == "gap" else "contig")
    wq, xq, gq, bq = w.double(), x.double(), g.double(), b.double()  # the rounded inputs
    wc, wc_d = wq[rows][:, cols], w[rows][:, cols]

    for bias in (None, b):
        y = guarded((M, n), dtype, layout)
        linear_launch(emu, 0, dtype, x, w, y, M=M, k=k, n=n, in_index=in_index, out_index=out_index, bias=bias)
        check_guard(y, "y")
        oracle = xq @ wc.T + (bq[rows] if bias is not None else 0)
        assert_gemm_close(y, F.linear(x, wc_d, b[rows] if bias is not None else None), oracle, name="y")

    gx = guarded((M, k), dtype, layout)
    linear_launch(emu, 1, dtype, g, w, gx, M=M, k=k, n=n, in_index=in_index, out_index=out_index)
    check_guard(gx, "grad_x")
    assert_gemm_close(gx, g @ wc_d, gq @ wc, name="grad_x")

    mask = torch.zeros(N, K, dtype=torch.bool)
    mask[rows.unsqueeze(1), cols.unsqueeze(0)] = True
    oracle = torch.zeros(N, K, dtype=torch.float64)
    oracle[rows.unsqueeze(1), cols.unsqueeze(0)] = gq.T @ xq
    baseline = torch.zeros(N, K, dtype=dtype)
    baseline[rows.unsqueeze(1), cols.unsqueeze(0)] = g.T @ x
    for split in (1, 3):
        gw = make(torch.zeros(N, K, dtype=dtype), layout)
        linear_launch(emu, 2, dtype, g, x, gw, M=M, k=k, n=n, in_index=in_index, out_index=out_index, split=split)
        check_grad_weight(gw, baseline, oracle, mask, f"grad_weight split={split}")


def test_masked_linear_split_k_and_accumulate(emu):
    gen = torch.Generator().manual_seed(3)
    M, k, n = 1000, 70, 9  # long reduction: P not a multiple of the 16-deep step
    x, g = rand(gen, M, k).float(), rand(gen, M, n).float()
    oracle = g.double().T @ x.double()
    for split in (1, 2, 5, 64, 1000):
        gw = torch.zeros(n, k)
        linear_launch(emu, 2, torch.float32, g, x, gw, M=M, k=k, n=n, in_index=None, out_index=None, split=split)
        assert_gemm_close(gw, g.T @ x, oracle, name=f"split={split}")
    # accumulate into a transposed (column-major) output
    x, w = rand(gen, 37, 19).float(), rand(gen, 23, 19).float()
    c0 = make(rand(gen, 37, 23).float(), "T")
    expected, baseline = c0.double() + x.double() @ w.double().T, c0 + x @ w.T
    linear_launch(emu, 0, torch.float32, x, w, c0, M=37, k=19, n=23, in_index=None, out_index=None, acc=True)
    assert_gemm_close(c0, baseline, expected, name="accumulate")
    assert emu.emu_ml_pick_split_k(64, 64, 100000, 132) == 64
    assert emu.emu_ml_pick_split_k(4096, 4096, 4096, 132) == 1


# ----------------------------------------------------------------------------------------------
# masked_conv2d: the implicit-GEMM and depthwise launchers of masked_conv2d_cuda.cu


def conv_out_size(size, kernel, stride, pad, dil):
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


def conv_launch(lib, op, dtype, *, x, w, g, out, geom, in_index, out_index, bias=None, split=1, depthwise=False):
    """Calls emu_masked_conv2d (op 0 fwd, 1 grad_x, 2 grad_w; +3 for depthwise)."""
    (B, k, H, W), (n, OH, OW), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geom
    ws = None
    if split > 1:
        per_slice = k * kh * kw if depthwise else n * k * kh * kw
        ws = torch.full((split * per_slice,), math.nan, dtype=accumulator(dtype))
    strides = lambda t: list(t.stride()) if t is not None else [0, 0, 0, 0]
    ints = [B, k, H, W, n, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, *strides(x), *strides(w), *strides(g),
            bias.stride(0) if bias is not None else 1, *out.stride(), split]  # fmt: skip
    ptrs = [ptr(x), ptr(w), ptr(g), ptr(in_index), ptr(out_index), ptr(bias), ptr(out), ptr(ws)]
    launch(lib, lib.emu_masked_conv2d, op + (3 if depthwise else 0), dtype, ints, ptrs)


def conv_reference(x, wc, bias, g, stride, padding, dilation, groups):
    """(y, grad_x, grad_wc) by autograd in x's dtype, with zero channel counts done by hand:
    F.conv2d rejects zero output channels and returns a wrongly shaped y for zero input channels."""
    if wc.shape[0] == 0 or wc.shape[1] == 0:
        y = bias.view(1, -1, 1, 1).expand(g.shape).clone() if wc.shape[1] == 0 else g.new_zeros(g.shape)
        return y, torch.zeros_like(x), torch.zeros_like(wc)
    # Contiguous copies: PyTorch's CPU convolutions take slow paths for mixed or strided layouts.
    x = x.detach().contiguous().requires_grad_(True)
    wc = wc.detach().contiguous().requires_grad_(True)
    g = g.contiguous()
    y = F.conv2d(x, wc, bias, stride, padding, dilation, groups)
    y.backward(g)
    return y.detach(), x.grad, wc.grad


CONV_CASES = {  # name: (B, C_in, C_out, k, n, H, W, (kh, kw), stride, padding, dilation)
    "1x1": (2, 12, 10, 7, 6, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1)),
    "3x3_pad1": (2, 9, 20, 6, 13, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1)),
    "3x3_stride2_70out": (3, 8, 80, 5, 70, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1)),
    "5x5_dil2": (1, 5, 6, 4, 5, 11, 10, (5, 5), (1, 1), (3, 3), (2, 2)),
    "3x3_asym": (2, 6, 7, 5, 4, 8, 9, (3, 3), (2, 1), (0, 2), (1, 2)),
    "2x3_stride3": (2, 4, 5, 3, 5, 10, 11, (2, 3), (3, 3), (1, 0), (1, 1)),
    "3x3_many_rows": (2, 16, 16, 16, 16, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1)),
    "empty_batch": (0, 4, 6, 3, 4, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    "no_inputs": (2, 4, 6, 0, 4, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    "no_outputs": (2, 4, 6, 3, 0, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
}
CONV_VARIANTS = [  # (in indexed, out indexed, layout of x / grad_out / outputs, layout of weight)
    (False, False, "contig", "contig"),
    (True, True, "cl", "cl"),
    (True, False, "gap", "contig"),
    (False, True, "cl", "gap"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("variant", CONV_VARIANTS, ids=variant_id)
def test_masked_conv2d(emu, dtype, case, variant):
    B, C_in, C_out, k, n, H, W, (kh, kw), stride, padding, dilation = CONV_CASES[case]
    in_idx, out_idx, layout, w_layout = variant
    gen = seeded(case, variant)
    in_index = pick(C_in, k, in_idx and k > 0, gen)
    out_index = pick(C_out, n, out_idx and n > 0, gen)
    rows, cols = positions(out_index, n), positions(in_index, k)
    OH, OW = (conv_out_size(s, kk, st, p, d) for s, kk, st, p, d in zip((H, W), (kh, kw), stride, padding, dilation))
    geom = ((B, k, H, W), (n, OH, OW), (kh, kw), stride, padding, dilation)
    w = make(rand(gen, C_out, C_in, kh, kw).to(dtype), w_layout)
    b = rand(gen, C_out).to(dtype)
    x = make(rand(gen, B, k, H, W).to(dtype), layout)
    g = make(rand(gen, B, n, OH, OW).to(dtype), layout)
    wc = w[rows][:, cols]
    geometry = (stride, padding, dilation, 1)
    y64, gx64, gwc64 = conv_reference(x.double(), wc.double(), b.double()[rows], g.double(), *geometry)
    y_d, gx_d, gwc_d = conv_reference(x, wc, b[rows], g, *geometry)
    common = dict(geom=geom, in_index=in_index, out_index=out_index)

    y = guarded((B, n, OH, OW), dtype, layout)
    conv_launch(emu, 0, dtype, x=x, w=w, g=None, out=y, bias=b, **common)
    check_guard(y, "y")
    assert_gemm_close(y, y_d, y64, name="y")

    gx = guarded((B, k, H, W), dtype, layout)
    conv_launch(emu, 1, dtype, x=None, w=w, g=g, out=gx, **common)
    check_guard(gx, "grad_x")
    assert_gemm_close(gx, gx_d, gx64, name="grad_x")

    mask = torch.zeros(C_out, C_in, kh, kw, dtype=torch.bool)
    mask[rows.unsqueeze(1), cols.unsqueeze(0)] = True
    oracle = torch.zeros(C_out, C_in, kh, kw, dtype=torch.float64)
    oracle[rows.unsqueeze(1), cols.unsqueeze(0)] = gwc64
    baseline = torch.zeros(C_out, C_in, kh, kw, dtype=dtype)
    baseline[rows.unsqueeze(1), cols.unsqueeze(0)] = gwc_d
    for split in (1, 4):
        gw = make(torch.zeros(C_out, C_in, kh, kw, dtype=dtype), w_layout)
        conv_launch(emu, 2, dtype, x=x, w=None, g=g, out=gw, split=split, **common)
        check_grad_weight(gw, baseline, oracle, mask, f"grad_weight split={split}")


DEPTHWISE_CASES = {  # name: (B, C, k, H, W, (kh, kw), stride, padding, dilation)
    "3x3_pad1": (2, 14, 10, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    "5x5_stride2": (2, 9, 9, 11, 10, (5, 5), (2, 2), (2, 2), (1, 1)),
    "3x3_dil2_asym": (3, 6, 5, 9, 7, (3, 3), (2, 1), (1, 2), (2, 2)),
    "40_channels_long": (2, 48, 40, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # > 32 channels, P = 512
    "empty_batch": (0, 6, 4, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    "no_channels": (2, 6, 0, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
}
DEPTHWISE_VARIANTS = [(False, "contig", "contig"), (True, "cl", "contig"), (True, "gap", "gap"), (False, "cl", "cl")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
@pytest.mark.parametrize("variant", DEPTHWISE_VARIANTS, ids=lambda v: f"{'index' if v[0] else 'prefix'}-{v[1]}-w{v[2]}")
def test_masked_conv2d_depthwise(emu, dtype, case, variant):
    B, C, k, H, W, (kh, kw), stride, padding, dilation = DEPTHWISE_CASES[case]
    indexed, layout, w_layout = variant
    gen = seeded(case, variant)
    index = pick(C, k, indexed and k > 0, gen)
    chans = positions(index, k)
    OH, OW = (conv_out_size(s, kk, st, p, d) for s, kk, st, p, d in zip((H, W), (kh, kw), stride, padding, dilation))
    geom = ((B, k, H, W), (k, OH, OW), (kh, kw), stride, padding, dilation)
    w = make(rand(gen, C, 1, kh, kw).to(dtype), w_layout)
    b = rand(gen, C).to(dtype)
    x = make(rand(gen, B, k, H, W).to(dtype), layout)
    g = make(rand(gen, B, k, OH, OW).to(dtype), layout)
    wc = w[chans]
    if k > 0:
        geometry = (stride, padding, dilation, k)
        y64, gx64, gwc64 = conv_reference(x.double(), wc.double(), b.double()[chans], g.double(), *geometry)
        y_d, gx_d, gwc_d = conv_reference(x, wc, b[chans], g, *geometry)
    else:
        y64 = y_d = g.new_zeros(g.shape)
        gx64 = gx_d = torch.zeros_like(x)
        gwc64 = gwc_d = torch.zeros_like(wc)
    common = dict(geom=geom, in_index=index, out_index=index.clone() if index is not None else None, depthwise=True)

    y = guarded((B, k, OH, OW), dtype, layout)
    conv_launch(emu, 0, dtype, x=x, w=w, g=None, out=y, bias=b, **common)
    check_guard(y, "y")
    assert_gemm_close(y, y_d, y64, name="y")

    gx = guarded((B, k, H, W), dtype, layout)
    conv_launch(emu, 1, dtype, x=None, w=w, g=g, out=gx, **common)
    check_guard(gx, "grad_x")
    assert_gemm_close(gx, gx_d, gx64, name="grad_x")

    mask = torch.zeros(C, 1, kh, kw, dtype=torch.bool)
    mask[chans] = True
    oracle = torch.zeros(C, 1, kh, kw, dtype=torch.float64)
    oracle[chans] = gwc64.double()
    baseline = torch.zeros(C, 1, kh, kw, dtype=dtype)
    baseline[chans] = gwc_d
    for split in (1, 3):
        gw = make(torch.zeros(C, 1, kh, kw, dtype=dtype), w_layout)
        conv_launch(emu, 2, dtype, x=x, w=None, g=g, out=gw, split=split, **common)
        check_grad_weight(gw, baseline, oracle, mask, f"grad_weight split={split}")


@pytest.mark.parametrize("mode", ["reverse", "shuffled"])
def test_conv_results_do_not_depend_on_the_thread_schedule(emu, schedule, mode):
    """Bitwise the same results under another order of the threads between barriers: every
    shared-memory exchange is ordered by a barrier (a missing one would change or NaN the result)."""
    gen = torch.Generator().manual_seed(7)
    B, k, n, H, W = 2, 20, 70, 9, 9
    geom = ((B, k, H, W), (n, 5, 5), (3, 3), (2, 2), (1, 1), (1, 1))
    x, w, g = rand(gen, B, k, H, W).float(), rand(gen, 80, 24, 3, 3).float(), rand(gen, B, n, 5, 5).float()
    in_index, out_index = pick(24, k, True, gen), pick(80, n, True, gen)
    xd = make(rand(gen, B, 40, 9, 9).float(), "cl")
    gdw = make(rand(gen, B, 40, 9, 9).float(), "cl")
    dgeom = ((B, 40, 9, 9), (40, 9, 9), (3, 3), (1, 1), (1, 1), (1, 1))

    def run_all():
        y, gx, gw = torch.empty(B, n, 5, 5), torch.empty(B, k, H, W), torch.zeros(80, 24, 3, 3)
        common = dict(geom=geom, in_index=in_index, out_index=out_index)
        conv_launch(emu, 0, torch.float32, x=x, w=w, g=None, out=y, **common)
        conv_launch(emu, 1, torch.float32, x=None, w=w, g=g, out=gx, **common)
        conv_launch(emu, 2, torch.float32, x=x, w=None, g=g, out=gw, split=2, **common)
        dw = torch.zeros(48, 1, 3, 3)
        conv_launch(emu, 2, torch.float32, x=xd, w=None, g=gdw, out=dw, geom=dgeom, in_index=None, out_index=None,
                    depthwise=True)  # fmt: skip
        return [y, gx, gw, dw]

    reference = run_all()
    schedule(mode)
    for name, a, b in zip(["y", "grad_x", "grad_w", "depthwise grad_w"], run_all(), reference):
        assert torch.equal(a, b), f"{name} changed under the {mode} schedule"


def test_conv_tiling_and_launcher_checks(emu):
    """The grid the launcher picks (blocks counted by the emulator) and its argument checks."""
    gen = torch.Generator().manual_seed(11)
    B, k, n, H, W = 3, 5, 70, 9, 9
    geom = ((B, k, H, W), (n, 5, 5), (3, 3), (2, 2), (1, 1), (1, 1))
    x, w = rand(gen, B, k, H, W).float(), rand(gen, n, k, 3, 3).float()
    y = torch.empty(B, n, 5, 5)
    emu.emu_reset_stats()
    conv_launch(emu, 0, torch.float32, x=x, w=w, g=None, out=y, geom=geom, in_index=None, out_index=None)
    blocks, phases, _ = harness.stats(emu)
    assert blocks == 2 * 2  # rows 75 -> 2 row tiles, 70 channels -> 2 column tiles
    assert phases == blocks * (1 + 2 * 3)  # k*kh*kw = 45 -> 3 sixteen-deep steps, 2 barriers each
    bad = dict(geom=((B, k, H, W), (n, 5, 5), (3, 3), (0, 2), (1, 1), (1, 1)), in_index=None, out_index=None)
    with pytest.raises(AssertionError, match="cudaError 1"):
        conv_launch(emu, 0, torch.float32, x=x, w=w, g=None, out=y, **bad)
    assert emu.emu_conv_gemm_split_k(64, 64, 100000, 132) == 64
    assert emu.emu_conv_gemm_split_k(256, 1152, 4096, 132) == 4  # 72 tiles: 4 slices of 1024
    assert emu.emu_conv_gemm_split_k(512, 4608, 4096, 132) == 1
    assert emu.emu_conv_depthwise_split_k(64, 3, 3, 1 << 20, 132) == 1
    assert emu.emu_conv_depthwise_split_k(8, 3, 3, 1 << 20, 132) > 1
