"""The extension's CUDA sources, compiled as C++ and run on the CPU (see cuda_emulation.h).

``build("deform_conv2d")`` rewrites ``csrc/cuda/deform_conv2d.cu`` (CUDA headers out, the
emulation header in, ``kernel<<<...>>>(args)`` launches into ``pem_emulation::launch``, the
CUDA dispatch registration into an unused function), compiles it with torch's C++ extension
loader and returns a module whose functions call the file's host entry points on CPU tensors:
the same argument checks, launch geometry, kernels and ATen calls as on a GPU.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

from torch.utils.cpp_extension import load_inline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))

# kernel<template args> <<<grid, block, shared bytes, stream>>> (
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;{}]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)
CUDA_INCLUDE = re.compile(r"^#include <(?:ATen/cuda|c10/cuda)/.*>$", re.MULTILINE)
REGISTRATION = "TORCH_LIBRARY_IMPL(pem_kernels, CUDA, m)"

# Per source file: the host entry points (name in the file -> C++ signature of its parameters
# and return type) that the emulated module exposes under the same name.
ENTRY_POINTS = {
    "deform_conv2d": {
        "deform_conv2d_cuda": (
            "at::Tensor",
            ("const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset, "
             "const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, "
             "int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, "
             "int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups"),
        ),
        "deform_conv2d_backward_cuda": (
            "std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>",
            ("const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, "
             "const at::Tensor& offset, const std::optional<at::Tensor>& mask, "
             "int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, "
             "int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups"),
        ),
    },
    "local_representation": {
        "local_representation_cuda": (
            "at::Tensor",
            ("const at::Tensor& memory, const std::optional<at::Tensor>& pos, "
             "const at::Tensor& bn_mean, const at::Tensor& bn_var, "
             "const std::optional<at::Tensor>& bn_weight, "
             "const std::optional<at::Tensor>& bn_bias, double bn_eps, "
             "const at::Tensor& dw_weight, const at::Tensor& dw_bias, "
             "const at::Tensor& out_weight, const at::Tensor& out_bias, bool normalize"),
        ),
    },
    "prototype_attention": {
        "prototype_attention_cuda": (
            "at::Tensor",
            ("const at::Tensor& prototypes, const at::Tensor& queries, "
             "const at::Tensor& residual, const at::Tensor& proj_weight, "
             "const at::Tensor& proj_bias, const at::Tensor& alpha, "
             "const at::Tensor& out_weight, const at::Tensor& out_bias, "
             "bool normalize_over_queries"),
        ),
    },
    "query_projection": {
        "query_projection_cuda": (
            "at::Tensor",
            ("const at::Tensor& tgt, const std::optional<at::Tensor>& query_pos, "
             "const at::Tensor& ln_weight, const at::Tensor& ln_bias, double ln_eps, "
             "const at::Tensor& weight, const at::Tensor& bias"),
        ),
    },
    "prototype_select": {
        "prototype_select_cuda": (
            "std::tuple<at::Tensor, at::Tensor>",
            ("const at::Tensor& keys, const at::Tensor& queries, "
             "const std::optional<at::Tensor>& mask, int64_t num_heads, bool official_empty, "
             "bool normalize_keys"),
        ),
        "prototype_select_backward_cuda": (
            "at::Tensor",
            ("const at::Tensor& grad, const at::Tensor& keys, const at::Tensor& indices, "
             "bool normalize_keys"),
        ),
    },
}


def emulated_source(name: str) -> str:
    """The C++ translation unit that emulates ``csrc/cuda/<name>.cu``."""
    with open(os.path.join(ROOT, "csrc", "cuda", f"{name}.cu")) as f:
        source = f.read()
    launches = len(LAUNCH.findall(source))
    if launches == 0 or source.count("<<<") != launches:
        raise RuntimeError(f"{name}.cu: could not rewrite every kernel launch")
    if REGISTRATION not in source:
        raise RuntimeError(f"{name}.cu: no {REGISTRATION} block")
    source = CUDA_INCLUDE.sub("", source)
    source = LAUNCH.sub(r"::pem_emulation::launch(\1, \2)(", source)
    source = source.replace(
        REGISTRATION, "[[maybe_unused]] static void unused_cuda_registration(torch::Library& m)"
    )
    wrappers = []
    for function, (returns, parameters) in ENTRY_POINTS[name].items():
        arguments = ", ".join(p.split()[-1].lstrip("&") for p in parameters.split(", "))
        wrappers.append(
            f"{returns} {function}({parameters}) {{\n"
            f"  return pem_kernels::{function}({arguments});\n}}\n"
        )
    return '#include "cuda_emulation.h"\n' + source + "\n" + "\n".join(wrappers)


# PEM_EMULATION_SANITIZER=address or thread builds the emulation with that sanitizer: the same
# tests then act as compute-sanitizer's memcheck (reads and writes out of the tensors' storage)
# or racecheck (unsynchronized accesses to shared memory between the threads of a block). The
# Python process must have the sanitizer's runtime preloaded; see the README's Testing section.
SANITIZERS = ("address", "thread")


@functools.cache
def build(name: str) -> ModuleType:
    """Compiles the emulation of ``csrc/cuda/<name>.cu`` (about a minute on 2 cores) and imports
    it."""
    sanitizer = os.environ.get("PEM_EMULATION_SANITIZER", "")
    if sanitizer and sanitizer not in SANITIZERS:
        raise ValueError(
            f"PEM_EMULATION_SANITIZER={sanitizer!r}: expected one of {SANITIZERS} or nothing"
        )
    flags = [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-g"] if sanitizer else []
    suffix = f"_{sanitizer}" if sanitizer else ""
    # One build folder per checkout: two checkouts building at once must not share one.
    checkout = hashlib.sha1(ROOT.encode()).hexdigest()[:10]
    build_dir = os.path.join(
        tempfile.gettempdir(), f"pem_cuda_emulation_{os.getuid()}_{checkout}", name + suffix
    )
    os.makedirs(build_dir, exist_ok=True)
    return load_inline(
        name=f"pem_emulated_{name}{suffix}",
        cpp_sources=[emulated_source(name)],
        functions=list(ENTRY_POINTS[name]),
        extra_include_paths=[HERE, os.path.join(ROOT, "csrc", "include")],
        extra_cflags=["-O1", "-std=c++20", "-Wno-unknown-pragmas", *flags],
        extra_ldflags=flags,
        build_directory=build_dir,
        verbose=False,
    )



def build_all(names: list[str]) -> dict[str, ModuleType]:
    """:func:`build` for each of ``names``, as many at once as there are CPUs: each build is one
    compiler process (most of its half minute goes to parsing torch's headers), so on a 2-core
    machine two at a time halve the wait of a test session that needs several."""
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(build, names)))
