"""The fused Triton feature projection of PEM-CA against the modules (under the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from pem_kernels.nn import PEMCrossAttention
from pem_kernels.nn.pem_cross_attention import LocalRepresentation

from conftest import HAS_CUDA, assert_compiles_for_sm90

fused = pytest.importorskip("pem_kernels.triton.local_representation")
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _module(channels: int, dtype: torch.dtype = torch.float32) -> LocalRepresentation:
    torch.manual_seed(0)
    module = LocalRepresentation(channels)
    with torch.no_grad():  # non-trivial BN statistics and affine
        module.bn.running_mean.uniform_(-1, 1)
        module.bn.running_var.uniform_(0.5, 2)
        module.bn.weight.uniform_(0.5, 1.5)
        module.bn.bias.uniform_(-0.5, 0.5)
    return module.to(device=DEVICE, dtype=dtype).eval()


@pytest.mark.parametrize("shape", [(2, 32, 5, 7), (1, 48, 9, 4), (1, 16, 1, 1), (1, 64, 16, 12),
                                   (1, 16, 3, 150), (1, 160, 2, 40)],
                         ids=str)
@pytest.mark.parametrize("with_pos", [True, False])
def test_matches_the_modules_fp32(shape, with_pos):
    module = _module(shape[1])
    memory = torch.randn(shape, device=DEVICE)
    pos = torch.randn(shape, device=DEVICE) if with_pos else None
    with torch.no_grad():
        expected = module(memory + pos if with_pos else memory)
        out = module.project(memory, pos, "triton")
    assert out.shape == (shape[0], shape[2] * shape[3], shape[1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_close_to_fp32(dtype):
    module32 = _module(32)
    module = _module(32, dtype)
    memory, pos = torch.randn(2, 32, 6, 5, device=DEVICE), torch.randn(2, 32, 6, 5, device=DEVICE)
    with torch.no_grad():
        expected = module32(memory + pos)
        out = module.project(memory.to(dtype), pos.to(dtype), "triton")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)


def test_pem_cross_attention_uses_it_for_inference_only(monkeypatch):
    torch.manual_seed(0)
    layer = PEMCrossAttention(32, 4, backend="triton").to(DEVICE).eval()
    reference = PEMCrossAttention(32, 4, backend="reference").to(DEVICE).eval()
    reference.load_state_dict(layer.state_dict())
    args = (torch.randn(6, 2, 32, device=DEVICE), torch.randn(2, 32, 5, 7, device=DEVICE),
            torch.randn(2, 6, 5, 7, device=DEVICE), torch.randn(2, 32, 5, 7, device=DEVICE),
            torch.randn(6, 2, 32, device=DEVICE))
    calls = []
    original = fused.local_representation_triton
    monkeypatch.setattr(fused, "local_representation_triton",
                        lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        out = layer(*args)
        expected = reference(*args)
    assert calls == [1]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # With gradients (or BN in training mode) the modules run, so autograd sees every op.
    out = layer(*args)
    out.sum().backward()
    assert calls == [1] and layer.feature_proj.out.weight.grad is not None
    with torch.no_grad():
        layer.train()(*args)
    assert calls == [1]


def test_empty_batch():
    module = _module(16)
    with torch.no_grad():
        out = module.project(torch.randn(0, 16, 3, 3, device=DEVICE), None, "triton")
    assert out.shape == (0, 9, 16)


_SM90_COMPILE = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from pem_kernels.triton import local_representation as K

assert not K.INTERPRET
fn = K._local_representation_kernel
for dtype, dot, ieee in [("bf16", tl.bfloat16, False), ("fp32", tl.float32, True)]:
    pointers = {name: "*" + dtype for name in ("x_ptr", "pos_ptr", "dw_weight_ptr", "dw_bias_ptr",
                                             "weight_ptr", "bias_ptr", "out_ptr")}
    pointers.update(scale_ptr="*fp32", shift_ptr="*fp32")
    constants = dict(HAS_POS=True, BLOCK_P=32, BLOCK_N=256, BLOCK_K=32, DOT_DTYPE=dot, IEEE=ieee)
    signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in fn.arg_names}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
print("compiled for sm_90")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernel is compiled and run by the tests")
def test_kernel_compiles_for_sm90_without_a_gpu():
    assert_compiles_for_sm90(_SM90_COMPILE)
