"""PEM-CA's fused query projection (Triton) against the modules it replaces.

Triton runs under the interpreter on CPU tensors when there is no GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pem_kernels.nn import PEMCrossAttention
from pem_kernels.ops.query_projection import fused_query_projection

from conftest import HAS_CUDA, assert_compiles_for_sm90

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def kernel():
    return pytest.importorskip("pem_kernels.triton.query_projection")


def make_modules(channels: int, out_channels: int, dtype=torch.float32):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(channels)
    linear = torch.nn.Linear(channels, out_channels)
    with torch.no_grad():  # a non-trivial affine
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm.to(DEVICE, dtype), linear.to(DEVICE, dtype)


def modules_result(norm, linear, tgt, query_pos):
    x = tgt + query_pos if query_pos is not None else tgt
    return F.normalize(linear(norm(x.transpose(0, 1))), dim=-1)


def fused(norm, linear, tgt, query_pos):
    return fused_query_projection(
        "triton", tgt, query_pos, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias
    )


@pytest.mark.parametrize("shape",
                         [(37, 2, 80, 64), (100, 1, 256, 256), (1, 1, 16, 16), (5, 3, 40, 48)],
                         ids=str)
@pytest.mark.parametrize("with_pos", [True, False])
def test_matches_the_modules_fp32(kernel, shape, with_pos):
    queries, batch, channels, out_channels = shape
    norm, linear = make_modules(channels, out_channels)
    tgt = torch.randn(queries, batch, channels, device=DEVICE) * 3 + 1
    query_pos = torch.randn(queries, batch, channels, device=DEVICE) if with_pos else None
    with torch.no_grad():
        expected = modules_result(norm, linear, tgt, query_pos)
        out = fused(norm, linear, tgt, query_pos)
    assert out.shape == (batch, queries, out_channels)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bf16_is_close_to_fp32(kernel):
    norm32, linear32 = make_modules(64, 64)
    norm, linear = make_modules(64, 64, torch.bfloat16)
    tgt, query_pos = torch.randn(20, 2, 64, device=DEVICE), torch.randn(20, 2, 64, device=DEVICE)
    with torch.no_grad():
        expected = modules_result(norm32, linear32, tgt, query_pos)
        out = fused(norm, linear, tgt.bfloat16(), query_pos.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_a_nan_row_stays_nan_and_alone(kernel):
    norm, linear = make_modules(32, 32)
    tgt = torch.randn(6, 2, 32, device=DEVICE)
    tgt[4, 1, 7] = float("nan")  # row (query 4, image 1)
    with torch.no_grad():
        expected = modules_result(norm, linear, tgt, None)
        out = fused(norm, linear, tgt, None)
    assert out[1, 4].isnan().all() and not out[0].isnan().any() and not out[1, :4].isnan().any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_wide_outputs_and_other_backends_fall_back(kernel):
    norm, linear = make_modules(16, kernel.MAX_OUT_CHANNELS + 16)
    tgt = torch.randn(3, 1, 16, device=DEVICE)
    assert fused(norm, linear, tgt, None) is None
    assert fused_query_projection(
        "cpu", tgt, None, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias
    ) is None


def test_differentiating_through_the_kernel_is_a_clear_error(kernel):
    norm, linear = make_modules(16, 16)
    tgt = torch.randn(3, 1, 16, device=DEVICE, requires_grad=True)
    out = kernel.query_projection_triton(tgt, None, norm.weight, norm.bias, norm.eps,
                                         linear.weight, linear.bias)
    with pytest.raises(RuntimeError, match="has no backward"):
        out.sum().backward()


def test_pem_cross_attention_uses_it_for_inference_only(kernel, monkeypatch):
    torch.manual_seed(0)
    layer = PEMCrossAttention(32, 4, backend="triton").to(DEVICE).eval()
    reference = PEMCrossAttention(32, 4, backend="reference").to(DEVICE).eval()
    reference.load_state_dict(layer.state_dict())
    args = (torch.randn(6, 2, 32, device=DEVICE), torch.randn(2, 32, 5, 7, device=DEVICE),
            torch.randn(2, 6, 5, 7, device=DEVICE), torch.randn(2, 32, 5, 7, device=DEVICE),
            torch.randn(6, 2, 32, device=DEVICE))
    from pem_kernels.nn import pem_cross_attention

    calls = []
    original = pem_cross_attention.fused_query_projection

    def recording(*a):
        calls.append(a[0])
        return original(*a)

    monkeypatch.setattr(pem_cross_attention, "fused_query_projection", recording)
    with torch.no_grad():
        torch.testing.assert_close(layer(*args), reference(*args), rtol=1e-4, atol=1e-4)
    assert calls == ["triton"]
    layer(*args).sum().backward()  # gradients: the modules run
    assert calls == ["triton"] and layer.query_proj[1].weight.grad is not None


def test_a_replaced_query_proj_runs_as_it_is(kernel):
    layer = PEMCrossAttention(16, 2, backend="triton").to(DEVICE).eval()
    layer.query_proj = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()).to(DEVICE)
    tgt, query_pos = torch.randn(3, 1, 16, device=DEVICE), torch.randn(3, 1, 16, device=DEVICE)
    with torch.no_grad():
        expected = F.normalize(layer.query_proj((tgt + query_pos).transpose(0, 1)), dim=-1)
        torch.testing.assert_close(layer._project_queries(tgt, query_pos, "triton"), expected)


def test_batch_zero_no_queries_and_strided_inputs(kernel):
    norm, linear = make_modules(16, 24)
    for queries, batch in [(0, 2), (3, 0)]:
        tgt = torch.randn(queries, batch, 16, device=DEVICE)
        assert fused(norm, linear, tgt, None).shape == (batch, queries, 24)
    # [Q, B, C] views that are not contiguous (as a [B, Q, C] tensor transposed)
    tgt = torch.randn(2, 5, 16, device=DEVICE).transpose(0, 1)
    query_pos = torch.randn(2, 5, 16, device=DEVICE).transpose(0, 1)
    assert not tgt.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(fused(norm, linear, tgt, query_pos),
                                   modules_result(norm, linear, tgt, query_pos),
                                   rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_clear_errors(kernel):
    norm, linear = make_modules(16, 24)
    good = dict(tgt=torch.randn(3, 2, 16, device=DEVICE), query_pos=None,
                ln_weight=norm.weight.detach(), ln_bias=norm.bias.detach(), ln_eps=norm.eps,
                weight=linear.weight.detach(), bias=linear.bias.detach())
    cases = [
        ("tgt", torch.randn(3, 16, device=DEVICE), r"tgt must be \[Q, B, C\]"),
        ("query_pos", torch.randn(3, 1, 16, device=DEVICE),
         r"query_pos must have shape \[3, 2, 16\]"),
        ("ln_weight", torch.randn(15, device=DEVICE), r"ln_weight must have shape \[16\]"),
        ("weight", torch.randn(24, 8, device=DEVICE), r"weight must have shape \[24, 16\]"),
        ("bias", torch.randn(24, device=DEVICE, dtype=torch.float16), "bias must be torch.float32"),
        ("tgt", torch.randn(3, 2, 16, device=DEVICE, dtype=torch.float64), "dtype torch.float64"),
    ]
    for name, value, match in cases:
        with pytest.raises(RuntimeError, match=match):
            kernel.query_projection_triton(**{**good, name: value})


def test_opcheck(kernel):
    norm, linear = make_modules(16, 24)
    args = (torch.randn(5, 2, 16, device=DEVICE), torch.randn(5, 2, 16, device=DEVICE),
            norm.weight.detach(), norm.bias.detach(), norm.eps, linear.weight.detach(),
            linear.bias.detach())
    # On a GPU opcheck's default checks run; under the interpreter the schema and autograd ones.
    kwargs = {} if HAS_CUDA else {"test_utils": ("test_schema", "test_autograd_registration")}
    torch.library.opcheck(kernel.query_projection_triton, args, **kwargs)


_SM90_COMPILE = """
import torch
from pem_kernels.triton import query_projection as K

assert not K.INTERPRET
for dtype, name in [(torch.bfloat16, "bf16"), (torch.float32, "fp32")]:
    pointers = {n: "*" + name for n in ("x_ptr", "pos_ptr", "ln_weight_ptr", "ln_bias_ptr",
                                         "weight_ptr", "bias_ptr", "out_ptr")}
    for out_channels in (16, 256):
        constants = K._launch_config(out_channels, dtype)
        options = {"num_warps": constants.pop("num_warps")}
        constants.update(HAS_POS=True, LN_EPS=1e-5)
        compile_sm90(K._query_projection_kernel, lambda n: pointers.get(n, "i32"), constants,
                     **options)
print("compiled for sm_90")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernel is compiled and run by the tests")
def test_kernel_compiles_for_sm90_without_a_gpu(kernel):
    assert_compiles_for_sm90(_SM90_COMPILE)
