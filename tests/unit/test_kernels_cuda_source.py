"""The CUDA kernels' source compiles, here, without a GPU: nvcc (CUDA 13, from PyPI, in the
dev dependencies) builds engine_adapters/kernels/csrc/block_copy.cu for Hopper against the
installed torch's headers, as torch.utils.cpp_extension does where CUDA exists. What it
cannot check, the kernels' results, tests/gpu/test_kernels_cuda.py checks on a GPU."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from engine_adapters.kernels.cuda import EXTENSION_NAME, SOURCE

pytestmark = pytest.mark.slow

CUDA = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13"
NVCC = CUDA / "bin" / "nvcc"
TORCH = Path(torch.__file__).parent / "include"


def test_the_kernels_compile_for_hopper(tmp_path: Path) -> None:
    assert NVCC.exists(), f"nvcc is not installed at {NVCC} (pip install -e '.[dev]')"
    # The CPU build of torch ships c10/cuda's headers but not the one its CUDA build generates.
    generated = tmp_path / "generated" / "c10" / "cuda" / "impl"
    generated.mkdir(parents=True)
    (generated / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    out = tmp_path / "block_copy.o"
    command = [
        str(NVCC),
        "-c",
        str(SOURCE),
        "-o",
        str(out),
        "-std=c++20",  # as torch 2.1x builds its extensions
        "-O3",
        "--expt-relaxed-constexpr",  # torch.utils.cpp_extension's flag for CUDA sources
        "-gencode=arch=compute_90,code=sm_90",
        f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
        "-Xcompiler=-fPIC",
        f"-I{tmp_path / 'generated'}",
        f"-I{TORCH}",
        f"-I{TORCH / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{CUDA / 'include'}",
        f"-I{CUDA / 'include' / 'cccl'}",
    ]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stderr[-4000:]
    ours = [line for line in built.stderr.splitlines() if SOURCE.name in line and "warning" in line]
    assert not ours, "\n".join(ours)  # torch's own headers warn; the kernels' source must not
    symbols = out.read_bytes()
    for name in (f"PyInit_{EXTENSION_NAME}", "copy_segments", "copy_blocks_memcpy", "device_address"):
        assert name.encode() in symbols, f"{name} is missing from the object file"
    print(f"compiled {SOURCE.name} with {NVCC} for sm_90 (Python {sys.version_info[:2]})")
