"""Test configuration shared by every test module.

Without a GPU, Triton kernels run under the interpreter; TRITON_INTERPRET must be set before
triton (or any module that imports it) is imported, so it is set here at collection time.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A benchmark deadline set for a GPU-suite step (or by hand) would make the benchmark scripts the
# tests run stop early with "partial" results: the tests set their own where they test it.
os.environ.pop("PEM_BENCH_DEADLINE", None)

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Devices a kernel test runs on: always the CPU, and CUDA where a GPU exists.
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def matmul_precision():
    """torch.set_float32_matmul_precision, restored after the test."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


# Prepended to every script of assert_compiles_for_sm90: compile_sm90(fn, signature_of, constants,
# num_warps, num_stages) compiles one specialization and checks its shared memory, which Triton
# itself checks only when the kernel is loaded on a GPU.
SM90_COMPILE_PRELUDE = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

H100_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

def compile_sm90(fn, signature_of, constants, num_warps=4, num_stages=3):
    signature = {
        name: "constexpr" if name in constants else signature_of(name) for name in fn.arg_names
    }
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    kernel = triton.compile(
        source, target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    shared = kernel.metadata.shared
    assert shared <= H100_SHARED_MEMORY, f"{fn.__name__} {constants}: {shared} B of shared memory"
    return kernel
"""


def assert_compiles_for_sm90(script: str, timeout: int = 400) -> None:
    """Runs ``script`` in a fresh process without TRITON_INTERPRET (the interpreter accepts code
    the compiler rejects): it compiles kernels for an H100 (sm_90, PTX and cubin through Triton's
    bundled ptxas) with :data:`SM90_COMPILE_PRELUDE`'s ``compile_sm90`` and prints ``compiled for
    sm_90`` at the end."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SM90_COMPILE_PRELUDE + script], capture_output=True, text=True,
        timeout=timeout, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled for sm_90" in result.stdout
