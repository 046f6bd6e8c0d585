"""Checks and timings of the GPU check (``benchmarks/gpu_check.sh`` runs this after the test suites).

Sections, each recorded in ``<out>/checks.json`` (and merged into ``summary.json`` by the driver):

* ``ceilings``     -- measured bf16 matmul TFLOP/s (8192^3 on a GPU) and device-copy GB/s;
* ``correctness``  -- every op's fast path (Triton, and the CUDA extension when built) against its float64
  reference on the same device, at odd widths, NCHW/channels-last, prefix/index lists, S = 1 and 5, fp32
  (TF32 off) / bf16 / fp16: relative Frobenius error per output and gradient, exact zeros of pruned
  weight gradients, bitwise-identical weight gradients over two runs;
* ``warps``        -- GPU review item 5: the 3x3 implicit GEMM with 8 warps (``STP_FAST_CONV_WARPS=8``)
  against float64 (the default caps it at 4 until this passes);
* ``tf32``         -- relative error of Triton-TF32, cuDNN-TF32 and cuDNN-exact convolutions against float64;
* ``sync_capture`` -- a warm bf16-autocast multi-subnet step under ``torch.cuda.set_sync_debug_mode("error")``,
  and CUDA-graph capture + replay of a multi-subnet forward;
* ``masked``       -- kernel-only timings of ``masked_conv2d`` / ``masked_linear`` (the Triton launchers)
  against cuDNN/cuBLAS on pre-sliced weights, bf16 and fp32 (TF32 as PyTorch allows by default):
  CUDA events around a CUDA-graph replay (device time) and eager wall time;
* ``multi``        -- ``multi_subnet_conv2d`` (full + 4 subnets) against 5 sequential cuDNN calls on sliced
  weights at CIFAR and ImageNet shapes, forward and forward+backward, eager and graph-replayed;
* ``step``         -- the resnet50 STP training step in bf16 autocast (fp32 master weights) against the
  masked and sliced baselines, TFLOP/s against the measured matmul ceiling.

``targets`` compares the SPEC section 7 numbers.  Without CUDA (``--quick`` on the CPU, which the test
suite runs) every section runs at toy sizes or is recorded as skipped, so the script keeps working.
Usage: ``python benchmarks/gpu_check.py --out DIR [--quick] [--budget SECONDS]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TARGETS = {"masked_vs_sliced": 0.8, "multi_cifar_vs_seq": 1.5, "multi_imagenet_vs_seq": 0.9, "step_vs_masked": 2.0}


class Budget:
    """Wall-clock budget shared by the sections; a section past it is recorded as skipped."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


_SAVE: list[Path] = []  # where main() keeps checks.json up to date after every section


def section(results: dict, name: str, budget: Budget, need: float, fn: Callable[[], object]) -> None:
    """Run one section into ``results[name]``: its value, or {"skipped": why} / {"error": traceback};
    checks.json is rewritten after each section, so a run stopped from outside keeps what it measured."""
    t0 = time.monotonic()
    if budget.left() < need:
        results[name] = {"skipped": f"time budget: {budget.left():.0f} s left, section needs ~{need:.0f} s"}
    else:
        try:
            results[name] = fn()
        except Exception:  # a failing section must not stop the others
            results[name] = {"error": traceback.format_exc(limit=6)[-3000:]}
    if isinstance(results[name], dict):
        results[name]["seconds"] = round(time.monotonic() - t0, 1)
    print(f"[gpu_check] {name}: {time.monotonic() - t0:.1f} s", flush=True)
    for path in _SAVE:
        path.write_text(json.dumps(results, indent=1, default=str))


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def rel_err(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    ref = oracle.double()
    return ((actual.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------ timing
def wall_ms(fn: Callable[[], object], reps: int) -> float:
    """Mean wall time per call (host overhead included), after two warm-up calls."""
    for _ in range(2):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) * 1e3 / reps


def graph_ms(fn: Callable[[], object], reps: int) -> float | str:
    """Device time per call: ``reps`` calls captured in one CUDA graph, replayed between CUDA events
    (no host overhead).  Returns the error text when capture fails."""
    if not CUDA:
        return "no CUDA"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        graph.replay()
        _sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        return sorted(times)[len(times) // 2]
    except Exception as exc:  # capture may be impossible: record why
        return f"capture failed: {type(exc).__name__}: {str(exc)[:300]}"


def timings(fns: dict[str, Callable[[], object]], reps: int) -> dict:
    out = {}
    for name, fn in fns.items():
        out[name] = {"wall_ms": wall_ms(fn, reps), "graph_ms": graph_ms(fn, reps) if CUDA else None}
    return out


def _best(t: dict) -> float:
    """Graph-replayed device time when capture worked, else eager wall time."""
    g = t.get("graph_ms")
    return g if isinstance(g, float) else t["wall_ms"]


# ------------------------------------------------------------------------------------------------ ceilings
def ceilings(quick: bool) -> dict:
    n = 8192 if CUDA and not quick else (4096 if CUDA else 256)
    dt = torch.bfloat16
    a, b = torch.randn(n, n, device=DEV, dtype=dt), torch.randn(n, n, device=DEV, dtype=dt)
    t = wall_ms(lambda: a @ b, 10 if CUDA else 3)
    src = torch.empty(2**28 if CUDA and not quick else 2**22, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    tc = wall_ms(lambda: dst.copy_(src), 10 if CUDA else 3)
    return {"bf16_mm_tflops": 2 * n**3 / (t * 1e9), "mm_n": n, "copy_gbs": 2 * src.numel() / (tc * 1e6)}


# ------------------------------------------------------------------------------------------------ correctness
def _conv_cases(quick: bool) -> list[dict]:
    """(kernel, stride, padding, dilation, C_in, C_out, HW, subnets [(B, k, n)], depthwise)."""
    if quick:
        return [dict(name="3x3", k=3, s=1, p=1, d=1, cin=9, cout=11, hw=5, subs=[(2, 9, 11), (1, 5, 3)], dw=False),
                dict(name="dw3x3-s2", k=3, s=2, p=1, d=1, cin=6, cout=6, hw=5, subs=[(2, 6, 6), (1, 3, 3)], dw=True)]
    five = [(16, 127, 130), (8, 100, 61), (8, 61, 47), (8, 33, 17), (4, 3, 1)]
    return [
        dict(name="1x1", k=1, s=1, p=0, d=1, cin=127, cout=130, hw=14, subs=five, dw=False),
        dict(name="3x3", k=3, s=1, p=1, d=1, cin=127, cout=130, hw=14, subs=five, dw=False),
        dict(name="3x3-s2", k=3, s=2, p=1, d=1, cin=64, cout=257, hw=15, subs=[(8, 64, 257)], dw=False),
        dict(name="5x5-dil2", k=5, s=1, p=4, d=2, cin=33, cout=47, hw=13, subs=[(4, 33, 47), (4, 17, 3)], dw=False),
        dict(name="7x7-s2-stem", k=7, s=2, p=3, d=1, cin=3, cout=64, hw=57, subs=[(8, 3, 64), (8, 3, 17)], dw=False),
        dict(name="dw3x3", k=3, s=1, p=1, d=1, cin=130, cout=130, hw=14, subs=[(8, 130, 130), (8, 61, 61)], dw=True),
        dict(name="dw5x5-s2", k=5, s=2, p=2, d=1, cin=100, cout=100, hw=15, subs=[(8, 100, 100), (4, 33, 33)], dw=True),
    ]


def _run_conv(case: dict, dtype, backend: str, indexed: bool, layout: str, seed: int):
    """(outputs, grads of xs, grad W, grad bias) of multi_subnet_conv2d for one backend, plus the inputs."""
    from stp_fast.ops import force_backend, multi_subnet_conv2d

    g = torch.Generator().manual_seed(seed)
    cin_w = 1 if case["dw"] else case["cin"]
    w0 = torch.randn(case["cout"], cin_w, case["k"], case["k"], generator=g) / (cin_w * case["k"] ** 2) ** 0.5
    b0 = torch.randn(case["cout"], generator=g)
    xs0 = [torch.randn(b, k, case["hw"], case["hw"], generator=g) for b, k, _ in case["subs"]]
    widths = [n for *_, n in case["subs"]]
    ins = outs = None
    if indexed:
        outs = [torch.randperm(case["cout"], generator=g)[:n].sort().values.to(DEV) for n in widths]
        ins = outs if case["dw"] else [torch.randperm(case["cin"], generator=g)[:k].sort().values.to(DEV)
                                       for _, k, _ in case["subs"]]  # fmt: skip
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    w = w0.to(DEV, dtype).requires_grad_()
    b = b0.to(DEV, dtype).requires_grad_()
    xs = [x.to(DEV, dtype).contiguous(memory_format=fmt).requires_grad_() for x in xs0]
    with force_backend(backend):
        ys = multi_subnet_conv2d(xs, w, b, widths, in_indices=ins, out_indices=outs, stride=case["s"],
                                 padding=case["p"], dilation=case["d"], groups=case["cout"] if case["dw"] else 1)
        gen = torch.Generator().manual_seed(seed + 1)
        gys = [torch.randn(y.shape, generator=gen).to(DEV, dtype) for y in ys]
        grads = torch.autograd.grad(ys, [*xs, w, b], gys)
    return [y.detach() for y in ys], list(grads[:-2]), grads[-2], grads[-1], (ins, outs, widths)


def _serving(op: str, backends: list[str]) -> list[str]:
    """The backends among ``backends`` that have ``op`` on this device (no CUDA-extension multi-subnet ops)."""
    from stp_fast.ops import _backend

    return [b for b in backends if not _backend.reasons(op, b, DEV)]


def _used_mask(case, ins, outs, widths) -> torch.Tensor:
    cin_w = 1 if case["dw"] else case["cin"]
    m = torch.zeros(case["cout"], cin_w, dtype=torch.bool, device=DEV)
    for s, (_, k, n) in enumerate(case["subs"]):
        rows = outs[s] if outs is not None else torch.arange(n, device=DEV)
        cols = torch.zeros(1, dtype=torch.long, device=DEV) if case["dw"] else (
            ins[s] if ins is not None else torch.arange(k, device=DEV))
        m[rows[:, None], cols[None, :]] = True
    return m


def correctness(quick: bool, backends: list[str]) -> dict:
    from stp_fast.testing import tf32

    rows, failed = [], []
    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16]
    with tf32(False):
        for ci, case in enumerate(_conv_cases(quick)):
            for di, dtype in enumerate(dtypes[ci % len(dtypes):][:1] if quick else dtypes):
                indexed, layout = bool((ci + di) % 2), ("cl" if (ci + di) % 3 else "nchw")
                oracle = _run_conv(case, torch.float64, "reference", indexed, layout, seed=ci)
                for backend in _serving("multi_subnet_conv2d", backends):
                    try:
                        got = _run_conv(case, dtype, backend, indexed, layout, seed=ci)
                        again = _run_conv(case, dtype, backend, indexed, layout, seed=ci)
                    except Exception as exc:
                        failed.append(f"{case['name']}/{dtype}/{backend}: {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    errs = {"y": max(rel_err(a, o) for a, o in zip(got[0], oracle[0])),
                            "grad_x": max(rel_err(a, o) for a, o in zip(got[1], oracle[1])),
                            "grad_w": rel_err(got[2], oracle[2]), "grad_b": rel_err(got[3], oracle[3])}
                    used = _used_mask(case, *got[4])
                    zeros = bool((got[2].flatten(0, 1)[~used.flatten()] == 0).all())
                    bitwise = bool(torch.equal(got[2], again[2]))
                    nan = any(torch.isnan(t).any().item() for t in (*got[0], *got[1], got[2]))
                    ok = max(errs.values()) <= TOL[dtype] and zeros and bitwise and not nan
                    row = {"op": "multi_subnet_conv2d", "case": case["name"], "S": len(case["subs"]),
                           "dtype": str(dtype), "backend": backend, "indexed": indexed, "layout": layout,
                           "rel_err": errs, "tol": TOL[dtype], "pruned_grads_zero": zeros,
                           "grad_w_bitwise": bitwise, "nan": nan, "pass": ok}  # fmt: skip
                    rows.append(row)
                    if not ok:
                        failed.append(f"{case['name']}/{dtype}/{backend}/{'index' if indexed else 'prefix'}/{layout}")
        rows += _linear_and_bn(quick, dtypes, backends, failed)
    return {"cases": len(rows), "failed": failed, "rows": rows}


def _linear_and_bn(quick: bool, dtypes, backends, failed: list) -> list[dict]:
    from stp_fast.ops import force_backend, multi_subnet_batch_norm, multi_subnet_linear

    rows = []
    shapes = [(5, 7, 9)] if quick else [(1, 63, 1000), (77, 1000, 63), (1031, 3001, 1000)]
    for si, (m, n, k) in enumerate(shapes):
        g = torch.Generator().manual_seed(100 + si)
        w0, b0 = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
        xs0 = [torch.randn(m, k, generator=g), torch.randn(m, max(1, k // 3), generator=g)]
        widths = [n, max(1, n // 2 + 1)]

        def run(dtype, backend, xs0=xs0, w0=w0, b0=b0, widths=widths):
            w, b = w0.to(DEV, dtype).requires_grad_(), b0.to(DEV, dtype).requires_grad_()
            xs = [x.to(DEV, dtype).requires_grad_() for x in xs0]
            with force_backend(backend):
                ys = multi_subnet_linear(xs, w, b, widths)
                gys = [torch.ones_like(y) * 0.5 for y in ys]
                gr = torch.autograd.grad(ys, [*xs, w, b], gys)
            return [y.detach() for y in ys] + list(gr)

        oracle = run(torch.float64, "reference")
        for dtype in dtypes[:1] if quick else dtypes:
            for backend in _serving("multi_subnet_linear", backends):
                try:
                    got = run(dtype, backend)
                except Exception as exc:
                    failed.append(f"linear{m}x{n}x{k}/{dtype}/{backend}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                err = max(rel_err(a, o) for a, o in zip(got, oracle))
                rows.append({"op": "multi_subnet_linear", "case": f"M{m}-N{n}-K{k}", "dtype": str(dtype),
                             "backend": backend, "rel_err": err, "tol": TOL[dtype], "pass": err <= TOL[dtype]})
                if err > TOL[dtype]:
                    failed.append(f"linear M{m}-N{n}-K{k}/{dtype}/{backend}")
    bshapes = [(4, 6, 5, 5)] if quick else [(64, 130, 28, 28), (256, 64, 56, 56)]
    for si, shape in enumerate(bshapes):
        g = torch.Generator().manual_seed(200 + si)
        x0 = torch.randn(*shape, generator=g) * 2 + 0.5
        w0, b0 = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
        for layout in ("cl",) if quick else ("nchw", "cl"):
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format

            def run(dtype, backend, x0=x0, w0=w0, b0=b0, fmt=fmt):
                pd = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 affine (autocast's BN)
                w, b = w0.to(DEV, pd).requires_grad_(), b0.to(DEV, pd).requires_grad_()
                x = x0.to(DEV, dtype).contiguous(memory_format=fmt).requires_grad_()
                xs = [x, x[:, : x.shape[1] // 2 + 1]]
                with force_backend(backend):
                    ys = multi_subnet_batch_norm(xs, w, b, relu=True)
                    gr = torch.autograd.grad(ys, [x, w, b], [torch.ones_like(y) for y in ys])
                return [y.detach() for y in ys] + list(gr)

            oracle = run(torch.float64, "reference")
            for dtype in dtypes[1:] if quick else dtypes:
                for backend in _serving("multi_subnet_batch_norm", backends):
                    got = run(dtype, backend)
                    err = max(rel_err(a, o) for a, o in zip(got, oracle))
                    tol = max(TOL[dtype], 1e-2 if dtype != torch.float32 else 1e-5)
                    rows.append({"op": "multi_subnet_batch_norm", "case": f"{shape}-{layout}", "dtype": str(dtype),
                                 "backend": backend, "rel_err": err, "tol": tol, "pass": err <= tol})
                    if err > tol:
                        failed.append(f"bn {shape}/{layout}/{dtype}/{backend}")
    return rows


# ------------------------------------------------------------------------------------------------ warps, TF32
def warps() -> dict:
    """GPU review item 5: the 3x3 implicit GEMM with 8 warps (128x64 / 64x128 tiles) against float64."""
    from stp_fast.testing import tf32

    case = dict(name="3x3-warps", k=3, s=1, p=1, d=1, cin=128, cout=128, hw=28, subs=[(64, 128, 128), (64, 96, 80)],
                dw=False)  # fmt: skip
    out = {}
    old = os.environ.get("STP_FAST_CONV_WARPS")
    try:
        with tf32(False):
            oracle = _run_conv(case, torch.float64, "reference", False, "cl", seed=7)
            for w in ("4", "8"):
                os.environ["STP_FAST_CONV_WARPS"] = w
                for dtype in (torch.float32, torch.bfloat16):
                    got = _run_conv(case, dtype, "triton", False, "cl", seed=7)
                    err = max(rel_err(got[0][0], oracle[0][0]), rel_err(got[1][0], oracle[1][0]),
                              rel_err(got[2], oracle[2]))
                    out[f"warps{w}-{dtype}"] = {"rel_err": err, "pass": err <= TOL[dtype]}
    finally:
        if old is None:
            os.environ.pop("STP_FAST_CONV_WARPS", None)
        else:
            os.environ["STP_FAST_CONV_WARPS"] = old
    out["warps8_ok"] = all(v["pass"] for k, v in out.items() if k.startswith("warps8"))
    return out


def tf32_errors() -> dict:
    from stp_fast.ops import force_backend, masked_conv2d
    from stp_fast.testing import tf32

    out = {}
    for cin, cout in ((5, 7), (64, 64)):
        g = torch.Generator().manual_seed(3)
        x0, w0 = torch.randn(8, cin, 16, 16, generator=g), torch.randn(cout, cin, 3, 3, generator=g)
        ref = F.conv2d(x0.double().to(DEV), w0.double().to(DEV), padding=1)
        x, w = x0.to(DEV), w0.to(DEV)
        row = {}
        for allow in (False, True):
            with tf32(allow), torch.no_grad():
                row[f"cudnn_tf32={allow}"] = rel_err(F.conv2d(x, w, padding=1), ref)
                with force_backend("triton"):
                    row[f"triton_tf32={allow}"] = rel_err(masked_conv2d(x, w, padding=1), ref)
        out[f"{cin}->{cout}"] = row
    return out


# ------------------------------------------------------------------------------------------------ syncs, graphs
def sync_capture() -> dict:
    from stp_fast.ops import multi_subnet_batch_norm, multi_subnet_conv2d, multi_subnet_linear

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(*s, generator=g).to(DEV).requires_grad_()
              for s in ((32, 3, 3, 3), (32, 32, 3, 3), (32,), (32,), (10, 32))]  # fmt: skip
    x = torch.randn(64, 3, 32, 32, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    widths = [32, 24, 16, 16, 8]

    def step(ps, grad=True):
        w1, w2, bw, bb, fc = ps
        with torch.autocast(DEV, torch.bfloat16):
            h = multi_subnet_conv2d([x] * 5, w1, None, widths, padding=1)
            h = multi_subnet_batch_norm(h, bw, bb, relu=True)
            h = multi_subnet_conv2d(h, w2, None, widths, padding=1)
            out = multi_subnet_linear([t.float().mean((2, 3)) for t in h], fc, None, [10] * 5)
        loss = sum(t.float().square().sum() for t in out)
        if grad:
            loss.backward()
        return out

    result: dict = {}
    step(params)  # warm-up: JIT compiles, first-time index checks, metadata tables
    _sync()
    try:
        torch.cuda.set_sync_debug_mode("error")
        step(params)
        result["warm_step_sync_free"] = True
    except Exception as exc:
        result["warm_step_sync_free"] = False
        result["sync_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    frozen = [p.detach() for p in params]
    with torch.no_grad():
        fwd = lambda: step(frozen, grad=False)
        t = graph_ms(fwd, 1)
        result["cuda_graph_forward"] = "ok" if isinstance(t, float) else t
        if isinstance(t, float):
            result["graph_forward_ms"] = t
            result["eager_forward_ms"] = wall_ms(fwd, 20)
    return result


# ------------------------------------------------------------------------------------------------ masked ops
def _masked_conv_fns(bsz: int, c: int, hw: int, k: int, density: float, kind: str, dtype) -> dict:
    """Our Triton launchers (forward, backward) and cuDNN on the pre-sliced channels-last weight."""
    from stp_fast.kernels.masked_conv2d import masked_conv2d_bwd_triton, masked_conv2d_fwd_triton

    g = torch.Generator().manual_seed(0)
    act = round(density * c)
    cl = torch.channels_last
    w = (torch.randn(c, c, k, k, generator=g) / (c * k * k) ** 0.5).to(DEV, dtype)
    ii = torch.randperm(c, generator=g)[:act].sort().values.to(DEV) if kind == "index" else None
    oi = torch.randperm(c, generator=g)[:act].sort().values.to(DEV) if kind == "index" else None
    rows = oi if oi is not None else torch.arange(act, device=DEV)
    cols = ii if ii is not None else torch.arange(act, device=DEV)
    w_s = w[rows][:, cols].contiguous(memory_format=cl)
    x = torch.randn(bsz, act, hw, hw, generator=g).to(DEV, dtype).contiguous(memory_format=cl)
    gy = torch.randn(bsz, act, hw, hw, generator=g).to(DEV, dtype).contiguous(memory_format=cl)
    conv = ([1, 1], [k // 2] * 2, [1, 1], 1)
    return {
        "ours_fwd": lambda: masked_conv2d_fwd_triton(x, w, None, ii, oi, act, *conv),
        "cudnn_fwd": lambda: F.conv2d(x, w_s, None, 1, k // 2),
        "ours_bwd": lambda: masked_conv2d_bwd_triton(gy, x, w, ii, oi, act, *conv, True, True, False),
        "cudnn_bwd": lambda: torch.ops.aten.convolution_backward(gy, x, w_s, None, conv[0], conv[1], conv[2], False,
                                                                 [0, 0], 1, [True, True, False]),
    }  # fmt: skip


def _masked_linear_fns(m: int, kf: int, nf: int, dtype) -> dict:
    """Our Triton launchers (forward, backward) at ~half density with index lists, and cuBLAS on the
    pre-sliced weight."""
    from stp_fast.kernels.masked_linear import masked_linear_bwd_triton, masked_linear_fwd_triton

    g = torch.Generator().manual_seed(1)
    k, n = kf // 2 + 1, nf // 2 + 1
    w = (torch.randn(nf, kf, generator=g) / kf**0.5).to(DEV, dtype)
    ii = torch.randperm(kf, generator=g)[:k].sort().values.to(DEV)
    oi = torch.randperm(nf, generator=g)[:n].sort().values.to(DEV)
    w_s = w[oi][:, ii].contiguous()
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    gy = torch.randn(m, n, generator=g).to(DEV, dtype)
    return {
        "ours_fwd": lambda: masked_linear_fwd_triton(x, w, None, ii, oi, n),
        "cublas_fwd": lambda: F.linear(x, w_s),
        "ours_bwd": lambda: masked_linear_bwd_triton(gy, x, w, ii, oi, n, True, True, False),
        "cublas_bwd": lambda: (gy @ w_s, gy.T @ x),
    }


def masked(quick: bool) -> dict:
    """Kernel-only timings of the Triton launchers against cuDNN/cuBLAS on pre-sliced weights."""
    convs = [(128, 64, 32, 3), (64, 256, 14, 3), (64, 64, 56, 1), (64, 512, 7, 3)] if CUDA else [(4, 16, 8, 3)]
    linears = [(8192, 768, 3072), (4096, 2048, 1000)] if CUDA else [(64, 32, 48)]
    if quick:
        convs, linears = convs[:1], linears[:1]
    reps = 20 if CUDA else 2
    rows = []
    for dtype in (torch.bfloat16, torch.float32) if CUDA else (torch.float32,):
        for bsz, c, hw, k in convs:
            for density, kind in ((0.5, "index"), (0.75, "prefix")) if CUDA else ((0.5, "index"),):
                t = timings(_masked_conv_fns(bsz, c, hw, k, density, kind, dtype), reps)
                rows.append({"op": "masked_conv2d", "case": f"B{bsz}-C{c}-{hw}px-k{k}-d{density}-{kind}",
                             "dtype": str(dtype), **t, "fwd_ratio": _best(t["cudnn_fwd"]) / _best(t["ours_fwd"]),
                             "bwd_ratio": _best(t["cudnn_bwd"]) / _best(t["ours_bwd"])})  # fmt: skip
        for m, kf, nf in linears:
            t = timings(_masked_linear_fns(m, kf, nf, dtype), reps)
            rows.append({"op": "masked_linear", "case": f"M{m}-K{kf // 2 + 1}of{kf}-N{nf // 2 + 1}of{nf}-index",
                         "dtype": str(dtype), **t, "fwd_ratio": _best(t["cublas_fwd"]) / _best(t["ours_fwd"]),
                         "bwd_ratio": _best(t["cublas_bwd"]) / _best(t["ours_bwd"])})  # fmt: skip
    ratios = [min(r["fwd_ratio"], r["bwd_ratio"]) for r in rows]
    return {"rows": rows, "min_ratio": min(ratios) if ratios else None,
            "note": "ratio = cuDNN/cuBLAS time on the pre-sliced weight / stp_fast time (graph-replayed device "
                    "time when capture works, else eager wall time); fp32 with PyTorch's default TF32 settings"}


# ------------------------------------------------------------------------------------------------ multi-subnet
def multi(quick: bool) -> dict:
    from stp_fast.bench import multi_subnet as ms

    if CUDA:
        cases = [ms.Case("r20", 128, 16, 32), ms.Case("r20", 128, 32, 16), ms.Case("r20", 128, 64, 8),
                 ms.Case("r50", 64, 128, 28), ms.Case("r50", 64, 256, 14)]  # fmt: skip
        if quick:
            cases = cases[:1] + cases[3:4]
    else:
        cases = [ms.Case("r20", 4, 8, 8)]
    rows = []
    for dtype in (torch.bfloat16,) if CUDA else (torch.float32,):
        for case in cases:
            for mode in ms.MODES:
                fns = {p: ms.setup(case, p, mode, device=DEV, dtype=dtype) for p in ("stp_fast", "sequential")}
                t = timings(fns, 20 if CUDA else 2)
                rows.append({"case": case.label, "imagenet": case.name == "r50", "mode": mode, "dtype": str(dtype),
                             **t, "seq_over_stp_wall": t["sequential"]["wall_ms"] / t["stp_fast"]["wall_ms"],
                             "seq_over_stp": _best(t["sequential"]) / _best(t["stp_fast"])})  # fmt: skip
    cifar = [r["seq_over_stp_wall"] for r in rows if not r["imagenet"]]
    imnet = [r["seq_over_stp_wall"] for r in rows if r["imagenet"]]
    return {"rows": rows, "min_cifar_ratio": min(cifar) if cifar else None,
            "min_imagenet_ratio": min(imnet) if imnet else None,
            "note": "ratio = time of 5 sequential cuDNN calls on sliced weights / multi_subnet_conv2d; targets use "
                    "eager wall time (what a training step pays); graph-replayed device times are also recorded"}


# ------------------------------------------------------------------------------------------------ STP step
def step(quick: bool, ceiling: float | None) -> dict:
    from stp_fast.bench import step as st

    if CUDA:
        case = st.Case("resnet50", 32 if quick else 128, 224, num_classes=1000)
        dtype, reps = torch.bfloat16, 5
    else:  # toy size, stp_fast only: the CPU run just keeps the code path working (bf16 autocast step)
        case = st.Case("resnet20", 4, 16, subnets=2)
        dtype, reps = torch.bfloat16, 1
    out: dict = {"case": case.label, "dtype": str(dtype), "amp": "autocast, fp32 master weights"}
    for provider in ("stp_fast", "masked", "sliced") if CUDA else ("stp_fast",):
        fn = st.setup(case, provider, "step", device=DEV, dtype=dtype)
        out[provider + "_ms"] = wall_ms(fn, reps)
        del fn
        if CUDA:
            torch.cuda.empty_cache()
    out["ideal"] = st.ideal(case)
    out["tflops"] = st.flops(case, "step") / (out["stp_fast_ms"] * 1e9)
    if not CUDA:
        return out
    out["masked_over_stp"] = out["masked_ms"] / out["stp_fast_ms"]
    out["sliced_over_stp"] = out["sliced_ms"] / out["stp_fast_ms"]
    if ceiling:
        out["matmul_ceiling_tflops"] = ceiling
        out["fraction_of_ceiling"] = out["tflops"] / ceiling
    return out


def targets(results: dict) -> dict:
    def get(sec: str, key: str):
        v = results.get(sec, {})
        return v.get(key) if isinstance(v, dict) else None

    got = {
        "masked_vs_sliced": get("masked", "min_ratio"),
        "multi_cifar_vs_seq": get("multi", "min_cifar_ratio"),
        "multi_imagenet_vs_seq": get("multi", "min_imagenet_ratio"),
        "step_vs_masked": get("step", "masked_over_stp"),
    }
    return {k: {"value": v, "target": TARGETS[k], "met": None if v is None else v >= TARGETS[k]}
            for k, v in got.items()}  # fmt: skip


# ------------------------------------------------------------------------------------------------ env, summary
def env_info() -> dict:
    import platform
    import subprocess

    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": triton_version, "commit": run(["git", "rev-parse", "HEAD"]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
            "nvcc": run(["nvcc", "--version"]).splitlines()[-1:] or None,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}  # fmt: skip
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2**30, 1),
                    nvidia_smi=run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm",
                                    "--format=csv,noheader"]))  # fmt: skip
    return info


def _junit(path: Path) -> dict | None:
    if not path.exists():
        return None
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed_ids": failed[:100]}


def summarize(out: Path) -> dict:
    """Merge env.json, phases.jsonl, the junit files and checks.json into summary.json."""
    load = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None
    phases = [json.loads(line) for line in (out / "phases.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "phases.jsonl").exists() else []  # fmt: skip
    checks = load("checks.json") or {}
    brief = {}
    for name, value in checks.items():
        if isinstance(value, dict):
            brief[name] = {k: v for k, v in value.items() if k != "rows"}
    summary = {"schema": "stp_fast.gpu_check/1", "env": load("env.json"), "phases": phases,
               "tests": {"triton": _junit(out / "junit-triton.xml"), "cuda_ext": _junit(out / "junit-ext.xml")},
               "checks": brief, "targets": checks.get("targets"),
               "files": sorted(p.name for p in out.iterdir() if p.is_file())}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="fewer and smaller cases (the CPU CI mode)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for all sections")
    ap.add_argument("--env", action="store_true", help="only write <out>/env.json")
    ap.add_argument("--summary", action="store_true", help="only merge the results into <out>/summary.json")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.env:
        (args.out / "env.json").write_text(json.dumps(env_info(), indent=1))
        return 0
    if args.summary:
        s = summarize(args.out)
        print(json.dumps({"phases": s["phases"], "tests": {k: v and {a: b for a, b in v.items() if a != "failed_ids"}
                                                               for k, v in s["tests"].items()},
                          "targets": s["targets"]}, indent=1, default=str))  # fmt: skip
        return 0
    budget, results = Budget(args.budget), {}
    _SAVE.append(args.out / "checks.json")
    backends = ["triton", "cuda"] if CUDA else ["triton"]  # per op, those that serve it (``_serving``)
    results["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    results["backends"] = backends
    # Most wanted first (the test phase already covers correctness broadly): the SPEC targets, then
    # the audits, then the spot checks at GPU sizes.
    section(results, "ceilings", budget, 5, lambda: ceilings(args.quick))
    ceiling = results["ceilings"].get("bf16_mm_tflops") if isinstance(results.get("ceilings"), dict) else None
    section(results, "step", budget, 40, lambda: step(args.quick, ceiling if CUDA else None))
    section(results, "multi", budget, 20, lambda: multi(args.quick))
    section(results, "masked", budget, 20, lambda: masked(args.quick))
    if CUDA:
        section(results, "sync_capture", budget, 10, sync_capture)
        section(results, "warps", budget, 10, warps)
        section(results, "tf32", budget, 5, tf32_errors)
    else:
        for name in ("sync_capture", "warps", "tf32"):
            results[name] = {"skipped": "needs CUDA"}
    section(results, "correctness", budget, 20, lambda: correctness(args.quick, backends))
    results["targets"] = targets(results)
    (args.out / "checks.json").write_text(json.dumps(results, indent=1, default=str))
    errors = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    failed = results["correctness"].get("failed", []) if isinstance(results.get("correctness"), dict) else []
    print(f"[gpu_check] wrote {args.out / 'checks.json'}; sections with errors: {errors}; failed cases: {len(failed)}")
    return 1 if errors or failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
