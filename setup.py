"""Builds neuralmem_fast._C.

The C++ sources under csrc/ (CPU kernels, op schemas, the sum tree) are always
compiled. The CUDA sources under csrc/cuda/ are compiled too whenever torch is
a CUDA build and nvcc can be found, so that a CPU-only machine with the CUDA
toolkit still proves that the GPU code compiles and links. NEURALMEM_NO_CUDA=1
skips them.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda():
    if os.environ.get("NEURALMEM_NO_CUDA", "0") == "1":
        return False, None
    import torch

    if torch.version.cuda is None:
        return False, None
    home = _find_cuda_home()
    if home is None:
        return False, None
    os.environ["CUDA_HOME"] = home
    return True, home


def _extensions():
    with_cuda, _ = _want_cuda()  # sets CUDA_HOME before cpp_extension reads it
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda p: os.path.relpath(p, ROOT)
    cpp = sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    debug = os.environ.get("NEURALMEM_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp"]
    native = os.environ.get("NEURALMEM_NATIVE", "0") == "1"
    if native:
        cxx.append("-march=native")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda and cu:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-DNEURALMEM_WITH_CUDA"]
        return [
            CUDAExtension(
                "neuralmem_fast._C",
                cpp + cu,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx + ["-DNEURALMEM_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "neuralmem_fast._C",
            cpp,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
