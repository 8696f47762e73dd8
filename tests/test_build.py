"""The build itself: the extension is there, and the CUDA sources were compiled where they can
be."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import pem_kernels
from pem_kernels._extension import has_kernel


def test_extension_is_loaded():
    assert pem_kernels.EXTENSION_LOADED, pem_kernels.EXTENSION_ERROR
    for op in (
        "prototype_select", "_prototype_select_backward", "deform_conv2d",
        "_deform_conv2d_backward", "local_representation", "query_projection",
    ):
        assert has_kernel(op, "CPU"), op


def test_every_op_schema_is_registered():
    for op in (
        "prototype_select", "_prototype_select_backward", "prototype_attention", "deform_conv2d",
        "_deform_conv2d_backward", "local_representation", "query_projection",
    ):
        assert hasattr(torch.ops.pem_kernels, op), op


@pytest.mark.skipif(
    torch.version.cuda is None or shutil.which("nvcc") is None
    or os.environ.get("PEM_KERNELS_CUDA") == "0",
    reason="CPU-only torch, no nvcc, or CUDA build switched off",
)
def test_cuda_kernels_were_compiled():
    """With a CUDA torch and nvcc, setup.py must compile csrc/cuda/*.cu, GPU or not."""
    for op in (
        "prototype_select", "_prototype_select_backward", "deform_conv2d",
        "_deform_conv2d_backward", "local_representation", "query_projection",
        "prototype_attention",
    ):
        assert has_kernel(op, "CUDA"), op
