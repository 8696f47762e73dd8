"""pytest-benchmark microbenchmarks of the CPU kernels.

Deselected from the default run (pyproject's ``-m "not microbenchmark"``); run them with
``pytest -m microbenchmark`` (add ``--benchmark-json=FILE`` to keep the numbers). Each one also
checks the kernel's result against the reference once, so a fast wrong kernel cannot pass.
"""

from __future__ import annotations

import pytest
import torch

import pem_kernels
from pem_kernels.reference import deform_conv2d_ref, prototype_select_ref

pytestmark = [
    pytest.mark.microbenchmark,
    pytest.mark.skipif(not pem_kernels.EXTENSION_LOADED, reason="pem_kernels._C is not built"),
]


@pytest.mark.parametrize("pixels", [2048, 8192])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_prototype_select_forward(benchmark, pixels, backend):
    keys, queries = torch.randn(1, pixels, 256), torch.randn(1, 100, 256)
    mask = torch.rand(1, 100, pixels) < 0.3
    prototypes, indices = benchmark(
        pem_kernels.prototype_select, keys, queries, mask, 8, backend=backend
    )
    assert torch.equal(indices, prototype_select_ref(keys, queries, mask, 8)[1])


def test_prototype_select_backward(benchmark):
    keys = torch.randn(1, 8192, 256, requires_grad=True)
    queries, mask = torch.randn(1, 100, 256), torch.rand(1, 100, 8192) < 0.3
    prototypes, _ = pem_kernels.prototype_select(keys, queries, mask, 8, normalize_keys=True,
                                                 backend="cpu")
    grad = torch.randn_like(prototypes)
    (grad_keys,) = benchmark(torch.autograd.grad, prototypes, keys, grad, retain_graph=True)
    assert grad_keys.abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_deform_conv2d_forward(benchmark, backend):
    x = torch.randn(1, 128, 32, 64)
    offset, mask = torch.randn(1, 18, 32, 64), torch.rand(1, 9, 32, 64)
    weight = torch.randn(128, 128, 3, 3) / 34.0
    out = benchmark(pem_kernels.deform_conv2d, x, offset, weight, None, 1, 1, 1, mask,
                    backend=backend)
    torch.testing.assert_close(out, deform_conv2d_ref(x, offset, weight, None, 1, 1, 1, mask),
                               rtol=1e-4, atol=1e-4)
