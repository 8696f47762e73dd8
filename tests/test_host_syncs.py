"""No host synchronization in the fused paths (GPU only).

PEM-sized calls are host-bound on a GPU: the host issues the kernels while the device runs the
previous ones. One synchronizing call (a device-to-host copy, ``.item()``, a blocking host-to-
device copy) makes the host wait for the device every call, so the latency becomes host time
plus device time. ``torch.cuda.set_sync_debug_mode("error")`` turns each such call into an error
naming it. The CUDA-graph tests cover the inference forwards of single ops; these also cover the
backwards and the whole model's inference forward. Each case runs once untimed first, so that
first-call work (Triton compiles, cuDNN and cuBLAS set-up) is not counted.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import pem_kernels
from pem_kernels.nn import DeformConv2d, PEMCrossAttention

from conftest import requires_cuda

pytestmark = requires_cuda


@contextlib.contextmanager
def syncs_are_errors():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def run_without_syncs(fn) -> None:
    fn()  # first call: compiles and library set-up
    torch.cuda.synchronize()
    with syncs_are_errors():
        fn()
    torch.cuda.synchronize()


def test_sync_debug_mode_catches_a_sync():
    # The premise of this file: a synchronizing call under the mode raises.
    x = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="synchronizing"), syncs_are_errors():
        x.sum().item()


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("mode", ["inference", "forward+backward"])
def test_pem_cross_attention(backend, mode):
    torch.manual_seed(0)
    layer = PEMCrossAttention(64, 4, backend=backend).cuda()
    q, b, h, w = 12, 2, 8, 16
    training = mode == "forward+backward"
    layer.train(training)
    tgt = torch.randn(q, b, 64, device="cuda", requires_grad=training)
    memory = torch.randn(b, 64, h, w, device="cuda", requires_grad=training)
    mask = torch.randn(b, q, h, w, device="cuda") - 0.5
    pos, query_pos = torch.randn(b, 64, h, w, device="cuda"), torch.randn(q, b, 64, device="cuda")

    def step():
        if training:
            layer(tgt, memory, mask, pos, query_pos).square().sum().backward()
        else:
            with torch.inference_mode():
                layer(tgt, memory, mask, pos, query_pos)

    run_without_syncs(step)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_prototype_select_forward_and_backward(backend, normalize_keys):
    keys = torch.randn(2, 500, 32, device="cuda", requires_grad=True)
    queries = torch.randn(2, 7, 32, device="cuda")
    logits = torch.randn(2, 7, 500, device="cuda")

    def step():
        prototypes, _ = pem_kernels.prototype_select(
            keys, queries, logits, 4, normalize_keys=normalize_keys, backend=backend
        )
        prototypes.sum().backward()

    run_without_syncs(step)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_deform_conv2d_forward_and_backward(backend, deterministic, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch's rule for its GEMMs
    torch.manual_seed(0)
    conv = DeformConv2d(16, 16, 3, padding=1).cuda()
    x = torch.randn(2, 16, 9, 11, device="cuda", requires_grad=True)
    offset = (torch.randn(2, 18, 9, 11, device="cuda") * 2).requires_grad_()
    mask = torch.rand(2, 9, 9, 11, device="cuda", requires_grad=True)

    def step():
        pem_kernels.deform_conv2d(
            x, offset, conv.weight, conv.bias, padding=1, mask=mask, backend=backend
        ).square().sum().backward()

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        run_without_syncs(step)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_model_inference_forward(backend, size):
    from pem.model import PEM

    torch.manual_seed(0)
    model = PEM("stdc1", 19, backend=backend).cuda().eval().requires_grad_(False)
    images = torch.rand(1, 3, *size, device="cuda") * 255

    def step():
        with torch.no_grad():
            model(images)

    run_without_syncs(step)
