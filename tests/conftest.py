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


def assert_compiles_for_sm90(script: str, timeout: int = 400) -> None:
    """Runs ``script`` in a fresh process without TRITON_INTERPRET (the interpreter accepts code
    the compiler rejects): it compiles kernels for an H100 (sm_90, PTX and cubin through Triton's
    bundled ptxas) and prints ``compiled for sm_90`` at the end."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled for sm_90" in result.stdout
