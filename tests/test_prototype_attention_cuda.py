"""The ``cuda`` backend of prototype_attention on a GPU: its CUDA kernel for calls that record no
gradient, the ATen composition otherwise. Without a GPU these skip; the kernels' source runs on
the CPU in tests/test_cuda_emulation.py."""

from __future__ import annotations

import importlib

import pytest
import torch

import pem_kernels

from conftest import HAS_CUDA

# The op's module, not the function pem_kernels.ops exports under the same name.
attention_ops = importlib.import_module("pem_kernels.ops.prototype_attention")

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def make_inputs(batch: int = 2, rows: int = 9, channels: int = 64,
                dtype: torch.dtype = torch.float32, device: str = "cuda") -> list[torch.Tensor]:
    """prototypes, queries, residual [B, N, C] and the layer's weights (alpha as its [1, 1, C]
    parameter; the weights scaled so that the Linear keeps the rows' magnitude)."""
    torch.manual_seed(0)
    scale = channels ** -0.5
    tensors = [torch.randn(batch, rows, channels) for _ in range(3)] + [
        torch.randn(channels, channels) * scale, torch.randn(channels),
        torch.randn(1, 1, channels), torch.randn(channels, channels) * scale,
        torch.randn(channels)]
    return [t.to(device, dtype) for t in tensors]


def recording_call_op(monkeypatch) -> list:
    calls = []
    original = attention_ops.call_op

    def recording(op, *args):
        calls.append(op)
        return original(op, *args)

    monkeypatch.setattr(attention_ops, "call_op", recording)
    return calls


@pytest.mark.parametrize("normalize", ["queries", "channels"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)],
                         ids=["fp32", "bf16"])
def test_inference_runs_the_kernel_and_matches_the_reference(monkeypatch, normalize, dtype,
                                                             tolerance):
    inputs = make_inputs(dtype=dtype)
    calls = recording_call_op(monkeypatch)
    with torch.no_grad():
        out = pem_kernels.prototype_attention(*inputs, normalize=normalize, backend="cuda")
    expected = pem_kernels.prototype_attention(
        *[t.float() for t in inputs], normalize=normalize, backend="reference")
    assert calls == [torch.ops.pem_kernels.prototype_attention.default]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


def test_gradients_take_the_aten_composition(monkeypatch):
    inputs = [t.requires_grad_() for t in make_inputs()]
    calls = recording_call_op(monkeypatch)
    out = pem_kernels.prototype_attention(*inputs, backend="cuda")
    grads = torch.autograd.grad(out.square().sum(), inputs)
    assert calls == []
    reference = [t.detach().clone().requires_grad_() for t in inputs]
    expected = pem_kernels.prototype_attention(*reference, backend="reference")
    expected_grads = torch.autograd.grad(expected.square().sum(), reference)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_the_cpp_op_refuses_to_differentiate():
    inputs = make_inputs()
    inputs[0].requires_grad_()
    out = torch.ops.pem_kernels.prototype_attention(*inputs, True)
    with pytest.raises(RuntimeError, match="CUDA inference kernel has no backward"):
        out.sum().backward()


def test_the_cpp_op_checks_devices():
    inputs = make_inputs()
    inputs[3] = inputs[3].cpu()
    with pytest.raises(RuntimeError, match="proj_weight is on cpu, expected prototypes' device"):
        torch.ops.pem_kernels.prototype_attention(*inputs, True)


def test_opcheck():
    torch.library.opcheck(torch.ops.pem_kernels.prototype_attention.default,
                          (*make_inputs(batch=2, rows=5, channels=16), True))


def test_the_layer_on_cuda_matches_the_reference_layer():
    torch.manual_seed(0)
    layer = pem_kernels.nn.PEMCrossAttention(64, 8, backend="cuda").cuda().eval()
    reference = pem_kernels.nn.PEMCrossAttention(64, 8, backend="reference").cuda().eval()
    reference.load_state_dict(layer.state_dict())
    args = (torch.randn(10, 2, 64), torch.randn(2, 64, 6, 9), torch.randn(2, 10, 6, 9),
            torch.randn(2, 64, 6, 9), torch.randn(10, 2, 64))
    args = tuple(t.cuda() for t in args)
    with torch.no_grad():
        torch.testing.assert_close(layer(*args), reference(*args), rtol=1e-4, atol=1e-4)
