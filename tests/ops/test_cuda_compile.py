"""Compile-only check of the CUDA sources with nvcc (no GPU needed, no link).

(a) csrc/cuda/kernels.cuh on its own, without torch, with every kernel template instantiated for every unit size;
(b) every csrc/cuda/*.cu against the installed torch's headers, as setup.py's CUDAExtension would compile it (and
    with it the shared csrc/common/*.h);
(c) tests/cuda_host/copy_plan_host.cu, linked against torch's libc10 and run on the host: it plans random strided
    copies with the CUDA CopyPlan and executes the planned segments with the kernels' semantics on the CPU.
Parsing torch's headers dominates the cost, so the .cu files are compiled as JOBS unity translation units (each
includes several .cu files; the sources keep their helpers uniquely named for this) next to (a), all at once.
Each test reads the result of the unit that holds its file; nvcc's messages name the failing file.
Skipped when nvcc is absent.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import pathlib
import shutil
import subprocess
import sysconfig
import tempfile
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
PLAN_HOST = ROOT / "tests" / "cuda_host" / "copy_plan_host.cu"
TIMEOUT_S = 900
JOBS = 2


def _nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, CUDA_PATH)")

INSTANTIATIONS = "\n".join(
    [f"template __global__ void copy_rows_kernel<{b}>(const CopySeg*, int);" for b in (1, 2, 4, 8, 16)]
    + [f"template __global__ void copy_tiled_kernel<{b}>(const CopySeg*, int);" for b in (1, 2, 4, 8, 16)]
    + [f"template __global__ void copy_nd_kernel<{b}>(const NdCopy);" for b in (1, 2, 4, 8, 16)]
)

KERNELS_ONLY = f"""// Every kernel of kernels.cuh for every unit size, compiled without torch.
#include "kernels.cuh"
namespace bridge {{
namespace kernels {{
{INSTANTIATIONS}
}}  // namespace kernels
}}  // namespace bridge
"""

# c10/cuda/impl/cuda_cmake_macros.h is generated at torch build time and missing from CPU wheels.
CMAKE_MACROS_SHIM = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def _torch_flags(shim_dir: pathlib.Path) -> List[str]:
    import torch
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()]
    if not any((pathlib.Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        (shim_dir / "c10/cuda/impl").mkdir(parents=True, exist_ok=True)
        (shim_dir / "c10/cuda/impl/cuda_cmake_macros.h").write_text(CMAKE_MACROS_SHIM)
        flags.append(f"-I{shim_dir}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return flags + [
        f"-I{sysconfig.get_paths()['include']}",
        "-std=c++20",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DBRIDGE_WITH_CUDA=1",
        "--expt-relaxed-constexpr",
    ]


def _compile(args: List[str]) -> Tuple[int, str]:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"nvcc timed out after {TIMEOUT_S} s: {' '.join(args)}"
    return proc.returncode, proc.stderr


@functools.lru_cache(maxsize=None)
def _results() -> Dict[str, Tuple[int, str, List[str]]]:
    """Runs every compile once (JOBS at a time); maps a name to (returncode, stderr, command)."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bridge_nvcc_"))
    # Host code at -O0: this checks that the sources compile, not how fast they run; device code keeps -O3.
    common = [NVCC, "-c", "-arch", "sm_90", "-Xcompiler", "-O0", "-Xcompiler", "-fPIC"]
    jobs: Dict[str, List[str]] = {}
    (tmp / "kernels_only.cu").write_text(KERNELS_ONLY)
    jobs["kernels_only"] = common + ["-std=c++17", f"-I{CUDA_DIR}", str(tmp / "kernels_only.cu"), "-o",
                                     str(tmp / "kernels_only.o")]
    torch_flags = _torch_flags(tmp / "shim")
    unit_of: Dict[str, str] = {}
    for i in range(min(JOBS, len(CU_SOURCES))):
        members = CU_SOURCES[i::JOBS]
        unit = tmp / f"unity_{i}.cu"
        unit.write_text("".join(f'#include "{CUDA_DIR / m}"\n' for m in members))
        jobs[unit.name] = common + torch_flags + [f"-I{CUDA_DIR}", str(unit), "-o", str(tmp / f"unity_{i}.o")]
        unit_of.update({m: unit.name for m in members})
    import torch

    torch_lib = pathlib.Path(torch.__file__).parent / "lib"
    jobs["copy_plan_host"] = [NVCC, "-Xcompiler", "-O1"] + torch_flags + [
        f"-I{CUDA_DIR}", str(PLAN_HOST), "-o", str(BIN_DIR / "copy_plan_host"), f"-L{torch_lib}", "-lc10",
        "-Xlinker", "-rpath", "-Xlinker", str(torch_lib)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(_compile, cmd) for name, cmd in jobs.items()}
        done = {name: (*f.result(), jobs[name]) for name, f in futures.items()}
    shutil.rmtree(tmp, ignore_errors=True)
    out = {"kernels_only": done["kernels_only"], "copy_plan_host": done["copy_plan_host"]}
    out.update({m: done[u] for m, u in unit_of.items()})
    return out


BIN_DIR = pathlib.Path(tempfile.mkdtemp(prefix="bridge_nvcc_bin_"))


def _check(name: str) -> None:
    rc, stderr, cmd = _results()[name]
    assert rc == 0, f"nvcc failed on {name} (exit {rc}):\n{' '.join(cmd)}\n{stderr}"


def test_cuda_sources_exist() -> None:
    assert CU_SOURCES, f"no .cu files under {CUDA_DIR}"


def test_kernels_header_compiles_without_torch() -> None:
    _check("kernels_only")


@pytest.mark.parametrize("name", CU_SOURCES)
def test_cuda_source_compiles_against_torch(name: str) -> None:
    _check(name)


def test_copy_plan_segments_on_host() -> None:
    _check("copy_plan_host")
    try:
        proc = subprocess.run([str(BIN_DIR / "copy_plan_host")], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(BIN_DIR, ignore_errors=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), f"copy_plan_host: {proc.stdout}{proc.stderr}"
