"""The fused ops and layers inside CUDA graphs (GPU only).

Deploying inference at a fixed resolution with CUDA graphs (or torch.compile's "reduce-overhead"
mode) removes the host's Python, dispatch and launch time, which dominates PEM-sized problems on a
GPU. That needs every kernel path to be capture-safe: no host synchronization, no allocation that
a replay would not repeat, launches on the capturing stream. Each test captures one forward,
replays it on new inputs copied into the captured ones, and compares with an eager call.
"""

from __future__ import annotations

import pytest
import torch

import pem_kernels
from pem_kernels.nn import DeformConv2d, PEMCrossAttention

from conftest import requires_cuda

pytestmark = requires_cuda


def capture(fn, *static_inputs):
    """(graph, static output) of ``fn(*static_inputs)``, warmed up on a side stream first."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        output = fn(*static_inputs)
    return graph, output


def replay_matches_eager(fn, make_inputs, atol: float = 1e-5) -> None:
    static_inputs = make_inputs()
    graph, static_output = capture(fn, *static_inputs)
    for _ in range(2):  # new values in the captured buffers, then one replay each
        fresh = make_inputs()
        for buffer, value in zip(static_inputs, fresh):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            expected = fn(*fresh)
        outputs = static_output if isinstance(static_output, tuple) else (static_output,)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for got, want in zip(outputs, expected):
            if got.is_floating_point():
                torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
            else:
                assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_pem_cross_attention_forward_replays(backend):
    torch.manual_seed(0)
    layer = PEMCrossAttention(64, 4, backend=backend).cuda().eval()
    q, b, h, w = 12, 2, 8, 16

    def make_inputs():
        return (
            torch.randn(q, b, 64, device="cuda"), torch.randn(b, 64, h, w, device="cuda"),
            torch.randn(b, q, h, w, device="cuda") - 0.5, torch.randn(b, 64, h, w, device="cuda"),
            torch.randn(q, b, 64, device="cuda"),
        )

    replay_matches_eager(layer, make_inputs)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_prototype_select_replays(backend, normalize_keys):
    def select(keys, queries, mask):
        return pem_kernels.prototype_select(
            keys, queries, mask, 4, normalize_keys=normalize_keys, backend=backend
        )

    def make_inputs():
        return (
            torch.randn(2, 500, 32, device="cuda"), torch.randn(2, 7, 32, device="cuda"),
            torch.rand(2, 7, 500, device="cuda") < 0.2,
        )

    replay_matches_eager(select, make_inputs)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_deform_conv2d_forward_replays(backend, channels_last):
    torch.manual_seed(0)
    conv = DeformConv2d(16, 16, 3, padding=1).cuda()

    def run(x, offset, mask):
        return pem_kernels.deform_conv2d(
            x, offset, conv.weight, conv.bias, padding=1, mask=mask, backend=backend
        )

    def make_inputs():
        x = torch.randn(2, 16, 9, 11, device="cuda")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x, torch.randn(2, 18, 9, 11, device="cuda") * 2,
                torch.rand(2, 9, 9, 11, device="cuda"))

    replay_matches_eager(run, make_inputs, atol=1e-4)
