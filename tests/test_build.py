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


@pytest.mark.skipif(
    torch.version.cuda is None or shutil.which("nvcc") is None
    or os.environ.get("PEM_KERNELS_CUDA") == "0",
    reason="CPU-only torch, no nvcc, or CUDA build switched off",
)
def test_extra_nvcc_flags_reach_the_cuda_sources():
    """PEM_KERNELS_NVCC_FLAGS (an experiment's build, e.g. the deform forward's occupancy) is
    appended to nvcc's flags; setup() is replaced by a recorder, nothing is built."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import setuptools\n"
        "captured = {}\n"
        "setuptools.setup = lambda **kw: captured.update(kw)\n"
        "import setup\n"
        "print('NVCC', captured['ext_modules'][0].extra_compile_args['nvcc'])\n"
    )
    env = dict(os.environ, PEM_KERNELS_NVCC_FLAGS=" -DPEM_EXPERIMENT=2  -DX=1 ")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    flags = next(line for line in done.stdout.splitlines() if line.startswith("NVCC"))
    assert flags.endswith("'-DPEM_EXPERIMENT=2', '-DX=1']"), flags


def test_package_without_the_extension_says_it_was_not_built(tmp_path):
    """A copy of the package without _C (as PEM_KERNELS_SKIP_EXT=1 installs it) imports with one
    warning that says the extension was not built (Python's own message blamed a circular
    import), runs the reference backend, and a compiled backend's error gives the same reason
    (it said the extension was built without the kernel)."""
    import subprocess
    import sys
    from pathlib import Path

    source = Path(pem_kernels.__file__).parent
    shutil.copytree(source, tmp_path / "pem_kernels",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    script = (
        # An editable install's finder would map pem_kernels._C to the checkout's build.
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import pem_kernels\n"
        "print('WARNING', [str(w.message) for w in caught])\n"
        "k, q = torch.randn(1, 6, 8), torch.randn(1, 2, 8)\n"
        "out = pem_kernels.prototype_select(k, q, None, num_heads=2)[0]\n"
        "print('REFERENCE', tuple(out.shape))\n"
        "try:\n"
        "    pem_kernels.prototype_select(k, q, None, num_heads=2, backend='cpu')\n"
        "except pem_kernels.BackendUnavailableError as error:\n"
        "    print('ERROR', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "it was not built" in out.split("REFERENCE")[0] and "circular" not in out, out
    assert "REFERENCE (1, 2, 8)" in out
    error = out.split("ERROR", 1)[1]
    assert "not loaded: it was not built" in error and "built without" not in error, out
