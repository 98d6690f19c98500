"""Build addrmem and its extension, addrmem._C.

The CUDA kernels are compiled when a CUDA build of torch and nvcc (CUDA_HOME)
are found, for TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": sm_80, sm_90 and
PTX for newer GPUs); otherwise, or with ADDRMEM_FORCE_CPU=1, a CPU-only
extension is built. Install with
`pip install --no-build-isolation .` so that the extension is compiled against
the torch already installed (see README.md, "Installing").
"""

import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "addrmem: torch must be installed before addrmem is built, and pip must not isolate the "
        "build: `pip install torch` then `pip install --no-build-isolation .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def cuda_problem():
    """Why the CUDA kernels cannot be built here, or None if they can."""
    if os.environ.get("ADDRMEM_FORCE_CPU") == "1":
        return "ADDRMEM_FORCE_CPU=1"
    if torch.version.cuda is None:
        return "this torch has no CUDA"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return f"no CUDA toolkit at CUDA_HOME={CUDA_HOME}; set CUDA_HOME, e.g. /usr/local/cuda"
    return None


problem = cuda_problem()
with_cuda = problem is None
sources = ["csrc/synthesize.cpp"]
cxx_flags = ["-O3"]
# at::parallel_for is inlined into the extension: without OpenMP it runs on one thread.
openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"addrmem: building the CUDA extension (CUDA {torch.version.cuda}, archs {archs}, CUDA_HOME={CUDA_HOME})")
    extension = CUDAExtension(
        "addrmem._C",
        sources + ["csrc/synthesize_cuda.cu"],
        extra_compile_args={"cxx": cxx_flags + openmp, "nvcc": ["-O3"]},
        extra_link_args=openmp,
    )
else:
    archs = ""
    print(f"addrmem: building the CPU-only extension ({problem})")
    extension = CppExtension("addrmem._C", sources, extra_compile_args={"cxx": cxx_flags + openmp},
                             extra_link_args=openmp)

# What the build was, for addrmem.build_info().
with open(os.path.join(HERE, "addrmem", "_build.py"), "w") as f:
    f.write(
        "# Written by setup.py at build time.\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if with_cuda else '')!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
    )

setup(
    name="addrmem",
    version="0.1.0",
    description="Distill image datasets into addressable memories (fused CPU/CUDA kernels)",
    packages=find_packages(include=["addrmem", "addrmem.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "torchvision", "numpy", "scikit-learn", "tqdm", "pyyaml", "matplotlib"],
    entry_points={"console_scripts": ["addrmem = addrmem.cli:main"]},
)
