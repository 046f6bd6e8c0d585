"""Build of stp_fast: the Python package, the Triton kernels (as ``stp_fast.kernels``) and the
compiled extension ``stp_fast._C``.

Environment knobs (all optional):

* ``STP_FAST_BUILD_EXT=auto|1|0`` -- build ``stp_fast._C`` (auto: when torch is importable in the
  build environment; 1: fail loudly if it cannot; 0: pure-Python package).
* ``STP_FAST_BUILD_CUDA=auto|1|0`` -- add the CUDA kernels (auto: when torch is a CUDA build and
  nvcc is found).  ``TORCH_CUDA_ARCH_LIST`` is respected; the default targets sm_80 and sm_90.
* ``STP_FAST_DEBUG=1`` -- ``-O0 -g`` (``-lineinfo`` for CUDA).
* ``MAX_JOBS`` -- parallel compile jobs (default: from the number of cores and free memory).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "stp_fast", "_build_info.json")


def _env_choice(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be one of auto, 0, 1 (got {value!r})")
    return value


def _default_max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gib = 8.0
    # nvcc on a template-heavy file peaks around 2-3 GiB; stay well inside free memory.
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gib // 3) or 1)))


def _extensions(want_ext: str, want_cuda: str) -> tuple[list, dict, dict]:
    info: dict = {"cpu": False, "cuda": False, "reason": ""}
    if want_ext == "0":
        info["reason"] = "STP_FAST_BUILD_EXT=0"
        return [], {}, info
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        if want_ext == "1":
            raise SystemExit(
                "STP_FAST_BUILD_EXT=1 but torch is not importable in the build environment; install torch "
                "first and build with `pip install --no-build-isolation .`"
            ) from exc
        warnings.warn(
            "torch is not importable in the build environment, so stp_fast._C is NOT built and the package "
            "will run on its pure-PyTorch and Triton backends only. Install torch first and reinstall with "
            "`pip install --no-build-isolation .` to get the C++/CUDA kernels.",
            stacklevel=1,
        )
        info["reason"] = "torch was not importable at build time (use pip install --no-build-isolation)"
        return [], {}, info

    debug = os.environ.get("STP_FAST_DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function"]
    # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it runs serially.
    link_flags = ["-fopenmp"]

    cuda_available = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" and not cuda_available:
        raise SystemExit(
            f"STP_FAST_BUILD_CUDA=1 but torch is not a CUDA build (torch.version.cuda={torch.version.cuda}) "
            f"or nvcc was not found (CUDA_HOME={CUDA_HOME})"
        )
    with_cuda = want_cuda == "1" or (want_cuda == "auto" and cuda_available)

    csrc = os.path.join("csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    include_dirs = [os.path.join(ROOT, csrc)]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        nvcc_flags = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["-std=c++17", "--use_fast_math"] if not debug else ["-std=c++17"]
        ext = CUDAExtension(
            "stp_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": [*cxx_flags, "-DWITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "stp_fast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    _default_max_jobs()
    info.update(
        cpu=True,
        cuda=with_cuda,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        debug=debug,
        python=sys.version.split()[0],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, info


def main() -> None:
    ext_modules, cmdclass, info = _extensions(_env_choice("STP_FAST_BUILD_EXT"), _env_choice("STP_FAST_BUILD_CUDA"))
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    setup(
        packages=find_packages(include=["stp_fast", "stp_fast.*"]),
        package_data={"stp_fast": ["_build_info.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


main()
