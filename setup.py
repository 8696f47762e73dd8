"""Builds the ``pem_kernels._C`` extension.

The extension always contains the CPU kernels and the one ``TORCH_LIBRARY`` block with every op
schema. The CUDA kernels (``csrc/cuda/*.cu``) are added when torch was built with CUDA and nvcc is
found; no GPU is needed to compile them.

Environment switches:
  PEM_KERNELS_CUDA=1|0      force the CUDA sources in (fails loudly if impossible) or out.
  PEM_KERNELS_SKIP_EXT=1    install the pure-Python package only (reference backend).
  TORCH_CUDA_ARCH_LIST      CUDA archs to build; defaults to the visible GPU's, or "8.0;9.0"
                            without one.
  DEBUG=1                   -O0 -g (and -lineinfo for nvcc).
  MAX_JOBS                  parallel compile jobs (ninja).
  PEM_KERNELS_NVCC_FLAGS    extra nvcc flags (space-separated), for experiments on a GPU, e.g.
                            "-maxrregcount=128" or a macro a source reads.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    """Returns the real CUDA toolkit folder.

    On the project's machines ``nvcc`` on PATH is a wrapper script, so torch's own guess (the parent
    of the folder holding ``nvcc``) is wrong; ask nvcc's real location through well-known prefixes.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc_on_path))))
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            with open(os.path.join(candidate, "bin", "nvcc"), "rb") as nvcc_file:
                # A shell-script wrapper is not the toolkit; the real nvcc is an ELF binary.
                if nvcc_file.read(4) == b"\x7fELF":
                    return candidate
    return None


def _pip_cuda_include_dirs() -> list[str]:
    """Headers (cuBLAS, cuSPARSE, ...) that ATen's CUDA headers include, from pip's nvidia-*
    wheels."""
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _build_extensions():
    if _env_flag("PEM_KERNELS_SKIP_EXT"):
        print("pem_kernels: PEM_KERNELS_SKIP_EXT=1, installing the pure-Python package only")
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    want_cuda = _env_flag("PEM_KERNELS_CUDA")
    cuda_possible = torch.version.cuda is not None and cuda_home is not None
    if want_cuda and not cuda_possible:
        raise RuntimeError(
            "PEM_KERNELS_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit found at {cuda_home!r}"
        )
    with_cuda = cuda_possible if want_cuda is None else want_cuda

    debug = bool(_env_flag("DEBUG"))
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []

    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # With no visible GPU torch would build for an empty arch list, which crashes the build.
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += _pip_cuda_include_dirs()
        nvcc_flags = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["--expt-relaxed-constexpr"]
        nvcc_flags += os.environ.get("PEM_KERNELS_NVCC_FLAGS", "").split()
        extra_compile_args["nvcc"] = nvcc_flags
        define_macros.append(("WITH_CUDA", None))
        extension_cls = CUDAExtension
    else:
        extension_cls = CppExtension

    print(
        f"pem_kernels build: with_cuda={with_cuda} cuda_home={cuda_home} "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')!r} debug={debug} "
        f"torch={torch.__version__} "
        f"PEM_KERNELS_NVCC_FLAGS={os.environ.get('PEM_KERNELS_NVCC_FLAGS', '')!r}"
    )
    extension = extension_cls(
        name="pem_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _build_extensions()

setup(
    packages=find_packages(include=["pem_kernels", "pem_kernels.*", "pem", "pem.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
