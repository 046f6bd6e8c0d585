"""``stp-fast info``: versions, what the compiled extension holds, and which backend each op uses."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import torch

from stp_fast import __version__, _ext
from stp_fast.ops import _backend

ENV_VARS = {
    "STP_FAST_BACKEND": "force one backend for every op: reference | cpu | cuda | triton | auto",
    "STP_FAST_NO_EXT": "1: do not load the compiled extension stp_fast._C",
    "STP_FAST_BUILD_EXT": "build time: auto | 1 | 0 -- build stp_fast._C",
    "STP_FAST_BUILD_CUDA": "build time: auto | 1 | 0 -- add the CUDA kernels to stp_fast._C",
    "STP_FAST_DEBUG": "build time: 1 builds -O0 -g",
    "TRITON_INTERPRET": "1: run Triton kernels in the interpreter (CPU tensors; used by the CPU tests)",
}


def _tool_version(cmd: list[str], first_line: bool = False) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return "not runnable"
    lines = [ln for ln in out if ln.strip()]
    line = (lines[0] if first_line else lines[-1]) if lines else ""
    return line.strip() or exe


def _triton_version() -> str:
    if not _backend.triton_importable():
        return "not installed"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return "installed (version unknown)"


def _triton_mode(gpu: bool) -> str:
    if _backend.triton_interpreted():
        return "interpreter (TRITON_INTERPRET=1)"
    return "native (GPU)" if gpu else "unused here: no GPU (TRITON_INTERPRET=1 runs it in the interpreter)"


def collect() -> dict[str, object]:
    """Everything ``stp-fast info`` prints, as a dict (also used by benchmarks to label results)."""
    loaded = _ext.load()
    gpu = torch.cuda.is_available()
    ops = {}
    for family in _backend.families():
        ops[family] = {dev: _backend.describe(family, dev) for dev in ("cpu", "cuda")}
    return {
        "stp_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "triton_mode": _triton_mode(gpu),
        "cxx": _tool_version(["c++", "--version"], first_line=True),
        "nvcc": _tool_version(["nvcc", "--version"]),
        "ext_loaded": loaded,
        "ext_error": "" if loaded else _ext.load_error(),
        "ext_cpu_kernels": _ext.has_kernel("_masked_linear_fwd", "cpu"),
        "ext_cuda_kernels": _ext.has_kernel("_masked_linear_fwd", "cuda"),
        "build": _ext.build_info(),
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "cpu_threads": torch.get_num_threads(),
        "ops": ops,
        "env": {k: os.environ.get(k) for k in ENV_VARS},
    }


def render(info: dict[str, object]) -> str:
    def yes(v: object) -> str:
        return "yes" if v else "no"

    ext_line = yes(info["ext_loaded"]) + ("" if info["ext_loaded"] else f"  ({info['ext_error'] or 'not built'})")
    lines = [
        f"stp_fast        {info['stp_fast']}",
        f"python          {info['python']}",
        f"torch           {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'})",
        f"triton          {info['triton']}, {info['triton_mode']}",
        f"c++ compiler    {info['cxx']}",
        f"nvcc            {info['nvcc']}",
        f"stp_fast._C     loaded: {ext_line}",
        f"  CPU kernels   {yes(info['ext_cpu_kernels'])}",
        f"  CUDA kernels  {yes(info['ext_cuda_kernels'])}",
        f"GPU visible     {info['gpu'] or 'no'}",
        f"CPU threads     {info['cpu_threads']}",
        "",
        "op backends (automatic choice; STP_FAST_BACKEND overrides):",
    ]
    for family, per_dev in info["ops"].items():  # type: ignore[union-attr]
        for dev, (name, skipped) in per_dev.items():
            why = "; ".join(f"{b}: {', '.join(r)}" for b, r in skipped.items())
            lines.append(f"  {family:<24} {dev:<5} -> {name}" + (f"  (skipped {why})" if why else ""))
    lines += ["", "environment:"]
    for key, value in info["env"].items():  # type: ignore[union-attr]
        lines.append(f"  {key:<20} {value if value is not None else '-':<8} {ENV_VARS[key]}")
    return "\n".join(lines)


def main() -> int:
    print(render(collect()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
