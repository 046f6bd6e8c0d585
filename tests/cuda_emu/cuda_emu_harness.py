"""Build helper of the CUDA-on-CPU emulator (see README.md): turns .cu files into one shared library.

Steps, all with plain g++ (no CUDA toolkit, no torch headers):

1. Each .cu file is copied into the build directory with its kernel launches rewritten
   (``rewrite_launches``): ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
   ``::emu::Launch(grid, block, smem, stream).bind(kernel)(args)``.  The copy starts with
   ``#include "emu_runtime.h"`` and a ``#line 1 "<original path>"`` directive, and keeps the line
   count of the original, so compiler messages and barrier checks point at the real source.
   Every ``__shared__`` declaration is followed by a call that registers the array, so that the
   runtime can poison it (0xFF bytes, NaN) at the start of each block (``rewrite_shared``).
   The .cu file itself is never modified.
2. The copies, the scheduler (emu_runtime.cpp) and the ctypes bindings (bindings/*.cpp) are compiled
   with ``-D__CUDACC__`` (headers take their device-side, ATen-free branch) and ``-I include`` (the
   stand-in cuda_runtime.h / cuda_fp16.h / cuda_bf16.h), in parallel, then linked into one .so.
3. The library is loaded with ctypes.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
INCLUDE = HERE / "include"
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-D__CUDACC__", "-DSTP_FAST_CUDA_EMU", "-w"]
if os.environ.get("STP_FAST_EMU_UCONTEXT") == "1":  # portable but ~50x slower thread switches
    CXXFLAGS.append("-DEMU_USE_UCONTEXT")

_IDENT = re.compile(r"[A-Za-z0-9_:]")


def find_cxx() -> str | None:
    """The C++ compiler to use: $CXX if set and found, else g++."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends at ``end`` (a name with optional template arguments)."""
    j = end
    if j > 0 and src[j - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while j > 0:
            j -= 1
            if src[j] == ">":
                depth += 1
            elif src[j] == "<":
                depth -= 1
                if depth == 0:
                    break
        while j > 0 and src[j - 1].isspace():
            j -= 1
    while j > 0 and _IDENT.match(src[j - 1]):
        j -= 1
    return j


def rewrite_launches(src: str) -> tuple[str, int]:
    """Rewrites every ``kernel<<<cfg>>>(`` into ``::emu::Launch(cfg).bind(kernel)(``.

    Returns the new text and the number of launches rewritten.  Newlines inside a rewritten launch
    are kept (moved after it), so every following line keeps its number.
    """
    out: list[str] = []
    pos = count = 0
    while (open_at := src.find("<<<", pos)) >= 0:
        end = open_at
        while end > 0 and src[end - 1].isspace():
            end -= 1
        start = _kernel_start(src, end)
        kernel = src[start:end]
        close_at = src.find(">>>", open_at)
        paren = close_at + 3
        while paren < len(src) and src[paren].isspace():
            paren += 1
        if not kernel or close_at < 0 or paren >= len(src) or src[paren] != "(":
            line = src.count("\n", 0, open_at) + 1
            raise ValueError(f"cannot parse the kernel launch at line {line}")
        config = src[open_at + 3 : close_at]
        replaced = src[start : paren + 1]
        text = f"::emu::Launch({' '.join(config.split())}).bind({' '.join(kernel.split())})("
        out += [src[pos:start], text, "\n" * replaced.count("\n")]
        pos = paren + 1
        count += 1
    out.append(src[pos:])
    return "".join(out), count


_SHARED_DECL = re.compile(r"^[ \t]*__shared__\s+([^;{}]+?);", re.MULTILINE)


def rewrite_shared(src: str) -> tuple[str, int]:
    """Appends ``::emu::shared_region(&name, sizeof(name));`` after every ``__shared__`` declaration.

    The runtime fills each registered array with 0xFF bytes (NaN for every float type) the first
    time a block reaches the declaration, so reading shared memory that the block did not write
    shows up as NaN instead of as a stale value from an earlier block.  Supports one declarator per
    statement, at the start of a line, inside a function body (the form stp_fast's kernels use).
    """
    count = 0

    def register(m: re.Match) -> str:
        nonlocal count
        decl = m.group(1)
        head = decl.split("[", 1)[0]
        top_level, depth = [], 0
        for ch in decl:
            depth += ch in "[(<"
            depth -= ch in "])>"
            top_level.append(ch if depth == 0 else " ")
        if "," in "".join(top_level) or "=" in decl:
            raise ValueError(f"unsupported __shared__ declaration (one declarator, no initializer): {decl!r}")
        names = re.findall(r"[A-Za-z_]\w*", head)
        count += 1
        return f"{m.group(0)} ::emu::shared_region(&{names[-1]}, sizeof({names[-1]}));"

    return _SHARED_DECL.sub(register, src), count


def _compile(cxx: str, source: Path, obj: Path) -> None:
    cmd = [cxx, *CXXFLAGS, "-I", str(INCLUDE), "-I", str(CSRC), "-c", str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator build failed: {' '.join(cmd)}\n{proc.stderr[-6000:]}")


def build(cu_files: list[Path], bindings: list[Path], build_dir: Path) -> ctypes.CDLL:
    """Compiles the .cu files (launches rewritten), the scheduler and the bindings into one library.

    The library name carries a hash of every input, so a reused ``build_dir`` never serves a stale
    build.  Raises RuntimeError with the compiler's output on failure.
    """
    cxx = find_cxx()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    build_dir.mkdir(parents=True, exist_ok=True)
    units: list[tuple[Path, Path]] = []
    digest = hashlib.sha256(" ".join([cxx, *CXXFLAGS]).encode())
    for cu in cu_files:
        text, launches = rewrite_launches(cu.read_text())
        text, _ = rewrite_shared(text)
        if launches == 0:
            raise ValueError(f"{cu}: no kernel launch found")
        copy = build_dir / (cu.stem + ".emu.cpp")
        copy.write_text(f'#include "emu_runtime.h"\n#line 1 "{cu}"\n{text}')
        units.append((copy, build_dir / (cu.stem + ".emu.o")))
    for src in [HERE / "emu_runtime.cpp", *bindings]:
        units.append((src, build_dir / (src.stem + ".o")))
    headers = sorted(INCLUDE.glob("*.h")) + sorted(CSRC.rglob("*.h")) + sorted(CSRC.rglob("*.cuh"))
    for path in [*(u[0] for u in units), *headers]:
        digest.update(path.read_bytes())
    lib = build_dir / f"libstp_fast_emu_{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        workers = max(1, min(len(units), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(_compile, cxx, src, obj) for src, obj in units]:
                future.result()
        cmd = [cxx, "-shared", "-o", str(lib), *(str(obj) for _, obj in units)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"emulator link failed: {' '.join(cmd)}\n{proc.stderr[-6000:]}")
    return _declare(ctypes.CDLL(str(lib)))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64p, vpp = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)
    lib.emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64]
    lib.emu_last_error_message.restype = ctypes.c_char_p
    lib.emu_stats.argtypes = [i64p]
    for name in ("emu_masked_linear", "emu_masked_conv2d"):
        if hasattr(lib, name):
            getattr(lib, name).argtypes = [ctypes.c_int, ctypes.c_int, i64p, vpp]
    if hasattr(lib, "emu_selftest"):
        lib.emu_selftest.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    i64 = ctypes.c_int64
    for name, args in [
        ("emu_ml_pick_split_k", [i64, i64, i64, ctypes.c_int]),
        ("emu_conv_gemm_split_k", [i64, i64, i64, ctypes.c_int]),
        ("emu_conv_depthwise_split_k", [i64, i64, i64, i64, ctypes.c_int]),
    ]:
        if hasattr(lib, name):
            getattr(lib, name).argtypes = args
    for name in ("emu_half_to_float", "emu_float_to_half", "emu_bf16_to_float", "emu_float_to_bf16"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def call(fn, op: int, dtype_code: int, ints: list[int], ptrs: list[int | None]) -> int:
    """Calls an ``emu_*(op, dtype, int64 array, pointer array)`` binding; returns its cudaError_t."""
    return fn(op, dtype_code, (ctypes.c_int64 * len(ints))(*ints), (ctypes.c_void_p * len(ptrs))(*ptrs))


def stats(lib: ctypes.CDLL) -> tuple[int, int, int]:
    """(blocks run, barrier phases, thread resumes) since the last ``emu_reset_stats``."""
    out = (ctypes.c_int64 * 3)()
    lib.emu_stats(out)
    return out[0], out[1], out[2]
