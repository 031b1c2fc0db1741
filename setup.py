"""Build megatron_bridge_ext._C: a CUDAExtension when a CUDA torch and toolkit are present, else a CppExtension."""

import glob
import os

# torch locates the CUDA toolkit with `which nvcc`; a wrapper script on PATH (e.g. /usr/local/bin/nvcc) makes that
# resolve to a prefix without the CUDA libraries (link fails with "cannot find -lcudart"). Prefer the real toolkit.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    want_cuda = os.environ.get("BRIDGE_USE_CUDA", "1") != "0"
    use_cuda = want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    define_macros = []
    if use_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        print(f"megatron_bridge_ext: building CUDAExtension (torch CUDA {torch.version.cuda}, toolkit {CUDA_HOME}, "
              f"arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})")
        return CUDAExtension(
            "megatron_bridge_ext._C",
            sources + _sources("csrc/cuda/*.cu"),
            define_macros=define_macros + [("BRIDGE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    why = "BRIDGE_USE_CUDA=0" if not want_cuda else (
        "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found")
    print(f"megatron_bridge_ext: building CppExtension, CPU kernels only ({why})")
    return CppExtension(
        "megatron_bridge_ext._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["megatron_bridge_ext", "megatron_bridge_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
