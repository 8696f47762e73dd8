"""PEM-CA's fused query projection (C++ on CPU, CUDA, Triton) against the modules it replaces.

Triton runs under the interpreter on CPU tensors when there is no GPU; the CUDA backend's cases
run where a GPU exists (its source runs on the CPU in tests/test_cuda_emulation.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pem_kernels.nn import PEMCrossAttention
from pem_kernels.ops.query_projection import MAX_CHANNELS, fused_query_projection

from conftest import HAS_CUDA, assert_compiles_for_sm90

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU")),
            "triton"]


@pytest.fixture
def kernel():
    return pytest.importorskip("pem_kernels.triton.query_projection")


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("pem_kernels.triton.query_projection")
    return request.param


def device_of(backend: str) -> str:
    return "cpu" if backend == "cpu" else DEVICE


def make_modules(channels: int, out_channels: int, dtype=torch.float32, device: str = DEVICE):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(channels)
    linear = torch.nn.Linear(channels, out_channels)
    with torch.no_grad():  # a non-trivial affine
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm.to(device, dtype), linear.to(device, dtype)


def modules_result(norm, linear, tgt, query_pos):
    x = tgt + query_pos if query_pos is not None else tgt
    return F.normalize(linear(norm(x.transpose(0, 1))), dim=-1)


def fused(norm, linear, tgt, query_pos, backend="triton"):
    return fused_query_projection(
        backend, tgt, query_pos, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias
    )


@pytest.mark.parametrize("shape",
                         [(37, 2, 80, 64), (100, 1, 256, 256), (1, 1, 16, 16), (5, 3, 40, 48)],
                         ids=str)
@pytest.mark.parametrize("with_pos", [True, False])
def test_matches_the_modules_fp32(backend, shape, with_pos):
    queries, batch, channels, out_channels = shape
    device = device_of(backend)
    norm, linear = make_modules(channels, out_channels, device=device)
    tgt = torch.randn(queries, batch, channels, device=device) * 3 + 1
    query_pos = torch.randn(queries, batch, channels, device=device) if with_pos else None
    with torch.no_grad():
        expected = modules_result(norm, linear, tgt, query_pos)
        out = fused(norm, linear, tgt, query_pos, backend)
    assert out.shape == (batch, queries, out_channels)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_cpu_fp64_matches_the_modules_tightly():
    norm, linear = make_modules(48, 40, torch.float64, "cpu")
    tgt, query_pos = torch.randn(9, 2, 48, dtype=torch.float64), torch.randn(9, 2, 48,
                                                                             dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(norm, linear, tgt, query_pos, "cpu"),
                                   modules_result(norm, linear, tgt, query_pos),
                                   rtol=1e-12, atol=1e-12)


def test_bf16_is_close_to_fp32(backend):
    device = device_of(backend)
    norm32, linear32 = make_modules(64, 64, device=device)
    norm, linear = make_modules(64, 64, torch.bfloat16, device)
    tgt, query_pos = torch.randn(20, 2, 64, device=device), torch.randn(20, 2, 64, device=device)
    with torch.no_grad():
        expected = modules_result(norm32, linear32, tgt, query_pos)
        out = fused(norm, linear, tgt.bfloat16(), query_pos.bfloat16(), backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_a_nan_row_stays_nan_and_alone(backend):
    device = device_of(backend)
    norm, linear = make_modules(32, 32, device=device)
    tgt = torch.randn(6, 2, 32, device=device)
    tgt[4, 1, 7] = float("nan")  # row (query 4, image 1)
    with torch.no_grad():
        expected = modules_result(norm, linear, tgt, None)
        out = fused(norm, linear, tgt, None, backend)
    assert out[1, 4].isnan().all() and not out[0].isnan().any() and not out[1, :4].isnan().any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_wide_rows_and_other_backends_fall_back(backend):
    """Beyond a kernel's channel limit (Triton: 256 outputs, one program per row block; C++: 1024
    in or out, a CUDA row in shared memory) the op declines and the layer runs the modules."""
    device = device_of(backend)
    if backend == "triton":
        from pem_kernels.triton.query_projection import MAX_OUT_CHANNELS
        limits = [(16, MAX_OUT_CHANNELS + 16)]
    else:
        limits = [(16, MAX_CHANNELS + 1), (MAX_CHANNELS + 1, 16)]
    for channels, out_channels in limits:
        norm, linear = make_modules(channels, out_channels, device=device)
        assert fused(norm, linear, torch.randn(3, 1, channels, device=device), None,
                     backend) is None
    norm, linear = make_modules(16, 16, device=device)
    assert fused(norm, linear, torch.randn(3, 1, 16, device=device), None, "reference") is None


def test_differentiating_through_the_kernel_is_a_clear_error(backend):
    device = device_of(backend)
    norm, linear = make_modules(16, 16, device=device)
    tgt = torch.randn(3, 1, 16, device=device, requires_grad=True)
    out = fused(norm, linear, tgt, None, backend)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="has no backward"):
        out.sum().backward()


def test_pem_cross_attention_uses_it_for_inference_only(backend, monkeypatch):
    torch.manual_seed(0)
    device = device_of(backend)
    layer = PEMCrossAttention(32, 4, backend=backend).to(device).eval()
    reference = PEMCrossAttention(32, 4, backend="reference").to(device).eval()
    reference.load_state_dict(layer.state_dict())
    args = (torch.randn(6, 2, 32, device=device), torch.randn(2, 32, 5, 7, device=device),
            torch.randn(2, 6, 5, 7, device=device), torch.randn(2, 32, 5, 7, device=device),
            torch.randn(6, 2, 32, device=device))
    from pem_kernels.nn import pem_cross_attention

    calls = []
    original = pem_cross_attention.fused_query_projection

    def recording(*a):
        queries = original(*a)
        calls.append(a[0] if queries is not None else None)  # None: the modules ran
        return queries

    monkeypatch.setattr(pem_cross_attention, "fused_query_projection", recording)
    with torch.no_grad():
        torch.testing.assert_close(layer(*args), reference(*args), rtol=1e-4, atol=1e-4)
    assert calls == [backend]
    layer(*args).sum().backward()  # gradients: the modules run
    assert calls == [backend] and layer.query_proj[1].weight.grad is not None


def test_a_replaced_query_proj_runs_as_it_is(backend):
    device = device_of(backend)
    layer = PEMCrossAttention(16, 2, backend=backend).to(device).eval()
    layer.query_proj = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()).to(device)
    tgt, query_pos = torch.randn(3, 1, 16, device=device), torch.randn(3, 1, 16, device=device)
    with torch.no_grad():
        expected = F.normalize(layer.query_proj((tgt + query_pos).transpose(0, 1)), dim=-1)
        torch.testing.assert_close(layer._project_queries(tgt, query_pos, backend), expected)


def test_batch_zero_no_queries_and_strided_inputs(backend):
    device = device_of(backend)
    norm, linear = make_modules(16, 24, device=device)
    for queries, batch in [(0, 2), (3, 0)]:
        tgt = torch.randn(queries, batch, 16, device=device)
        assert fused(norm, linear, tgt, None, backend).shape == (batch, queries, 24)
    # [Q, B, C] views that are not contiguous (as a [B, Q, C] tensor transposed)
    tgt = torch.randn(2, 5, 16, device=device).transpose(0, 1)
    query_pos = torch.randn(2, 5, 16, device=device).transpose(0, 1)
    assert not tgt.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(fused(norm, linear, tgt, query_pos, backend),
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


CPP_OP_ERRORS = [
    ("tgt", lambda d: torch.randn(3, 16, device=d),
     r"tgt must be \[Q, B, C\], got shape \[3, 16\]"),
    ("query_pos", lambda d: torch.randn(3, 1, 16, device=d),
     r"query_pos must have tgt's shape \[3, 2, 16\], got \[3, 1, 16\]"),
    ("ln_weight", lambda d: torch.randn(15, device=d),
     r"ln_weight must be \[16\], got shape \[15\]"),
    ("weight", lambda d: torch.randn(24, 8, device=d),
     r"weight must be \[C_out, C\] with C = 16, got shape \[24, 8\]"),
    ("bias", lambda d: torch.randn(24, device=d, dtype=torch.float16),
     "bias dtype Half must equal tgt dtype Float"),
    ("ln_eps", lambda d: -1.0, "ln_eps must be finite and >= 0, got -1"),
    ("weight", lambda d: torch.randn(2000, 16, device=d), "at most 1024 channels in and out"),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="no GPU"))])
def test_cpp_op_bad_arguments_are_clear_errors(device):
    norm, linear = make_modules(16, 24, device=device)
    good = dict(tgt=torch.randn(3, 2, 16, device=device), query_pos=None,
                ln_weight=norm.weight.detach(), ln_bias=norm.bias.detach(), ln_eps=norm.eps,
                weight=linear.weight.detach(), bias=linear.bias.detach())
    op = torch.ops.pem_kernels.query_projection
    assert op(**good).shape == (2, 3, 24)
    for name, value, match in CPP_OP_ERRORS:
        with pytest.raises(RuntimeError, match=match):
            op(**{**good, name: value(device)})


@pytest.mark.skipif(not HAS_CUDA, reason="no GPU")
def test_cuda_op_checks_devices():
    norm, linear = make_modules(16, 24, device="cuda")
    args = [torch.randn(3, 2, 16, device="cuda"), None, norm.weight.detach(), norm.bias.detach(),
            norm.eps, linear.weight.detach(), linear.bias.detach()]
    device = args[0].device
    for index, name in [(2, "ln_weight"), (5, "weight")]:
        bad = list(args)
        bad[index] = bad[index].cpu()
        with pytest.raises(RuntimeError, match=f"{name} is on cpu, expected tgt's device {device}"):
            torch.ops.pem_kernels.query_projection(*bad)


def test_opcheck(backend):
    device = device_of(backend)
    norm, linear = make_modules(16, 24, device=device)
    args = (torch.randn(5, 2, 16, device=device), torch.randn(5, 2, 16, device=device),
            norm.weight.detach(), norm.bias.detach(), norm.eps, linear.weight.detach(),
            linear.bias.detach())
    if backend == "triton":
        from pem_kernels.triton.query_projection import query_projection_triton as op
    else:
        op = torch.ops.pem_kernels.query_projection.default
    # On a GPU opcheck's default checks run; on the CPU (the C++ op, or Triton under the
    # interpreter) the schema, fake-tensor and autograd ones.
    if device == "cuda":
        kwargs = {}
    elif backend == "triton":
        kwargs = {"test_utils": ("test_schema", "test_autograd_registration")}
    else:
        kwargs = {"test_utils": ("test_schema", "test_faketensor", "test_autograd_registration")}
    torch.library.opcheck(op, args, **kwargs)


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
