"""Optional CUDA extension build (fastvl._C). Metadata lives in pyproject.toml.

By default the extension is built only when torch sees a CUDA device and nvcc is present.
FASTVL_BUILD_CUDA=1 forces the build (nvcc is enough, no GPU needed: CI compiles it on the CPU),
FASTVL_SKIP_CUDA_BUILD=1 skips it. TORCH_CUDA_ARCH_LIST picks the targets (default 8.0;9.0 without a GPU).
"""

import glob
import os
import shutil

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda"]
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def _extensions():
    if _flag("FASTVL_SKIP_CUDA_BUILD"):
        return [], {}
    force = _flag("FASTVL_BUILD_CUDA")
    cuda_home = _find_cuda_home()
    try:
        import torch
    except ImportError:
        if force:
            raise RuntimeError(
                "FASTVL_BUILD_CUDA=1 needs torch installed first (pip install --no-build-isolation)"
            ) from None
        return [], {}
    has_gpu = torch.cuda.is_available()
    if not (force or has_gpu):
        return [], {}
    if torch.version.cuda is None:
        if force:
            raise RuntimeError(f"FASTVL_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        return [], {}
    if cuda_home is None:
        if force:
            raise RuntimeError(
                "FASTVL_BUILD_CUDA=1 but no CUDA toolkit (nvcc, cuda_runtime.h) was found; set CUDA_HOME"
            )
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home
    if not has_gpu and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + ["csrc/bindings.cpp"]
    ext = CUDAExtension(
        name="fastvl._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
        },
    )
    jobs = os.environ.get("MAX_JOBS")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")) and jobs != "1")}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
