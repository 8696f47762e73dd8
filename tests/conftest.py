"""Test configuration shared by every test module.

Without a GPU, Triton kernels run under the interpreter; TRITON_INTERPRET must be set before
triton (or any module that imports it) is imported, so it is set here at collection time.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Devices a kernel test runs on: always the CPU, and CUDA where a GPU exists.
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
