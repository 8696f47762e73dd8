"""The fused Triton prototype attention against the reference (under the interpreter on a CPU)."""

from __future__ import annotations

import re

import pytest
import torch

from pem_kernels.reference import prototype_attention_ref

from conftest import HAS_CUDA, assert_compiles_for_sm90

triton_attention = pytest.importorskip("pem_kernels.triton.prototype_attention")
DEVICE = "cuda" if HAS_CUDA else "cpu"
NORMS = ["queries", "channels"]


def make_args(batch, queries, channels, dtype=torch.float32, device=DEVICE):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    return [
        rand(batch, queries, channels), rand(batch, queries, channels),
        rand(batch, queries, channels),
        rand(channels, channels, scale=channels**-0.5), rand(channels),
        rand(1, 1, channels) + 1.0,
        rand(channels, channels, scale=channels**-0.5), rand(channels),
    ]


def run_triton(args, normalize):
    return triton_attention.prototype_attention_triton(*args, normalize == "queries")[0]


@pytest.mark.parametrize("normalize", NORMS)
@pytest.mark.parametrize("shape", [(2, 10, 32), (1, 100, 64), (3, 1, 16), (1, 17, 80)], ids=str)
def test_forward_matches_reference_fp32(normalize, shape):
    args = make_args(*shape)
    expected = prototype_attention_ref(*args, normalize=normalize)
    torch.testing.assert_close(run_triton(args, normalize), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalize", NORMS)
def test_a_nan_prototype_spreads_as_in_the_reference(normalize):
    """A NaN entering a normalized vector makes its norm NaN and the whole vector NaN, as
    F.normalize does (the divisor clamp must keep a NaN norm: the GPU's fmax would not)."""
    args = make_args(2, 6, 32)
    args[0][1, 2, 5] = float("nan")
    expected = prototype_attention_ref(*args, normalize=normalize)
    got = run_triton(args, normalize)
    assert expected[1].isnan().any() and not expected[0].isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", NORMS)
def test_forward_low_precision_within_torchs_own_error(dtype, normalize):
    args = make_args(2, 12, 32, dtype)
    exact = prototype_attention_ref(*[a.double() for a in args], normalize=normalize)
    torch_error = (prototype_attention_ref(*args, normalize=normalize).double() - exact).abs().max()
    ours = run_triton(args, normalize)
    assert ours.dtype == dtype
    assert (ours.double() - exact).abs().max() <= 2 * torch_error + 1e-3


@pytest.mark.parametrize("normalize", NORMS)
@pytest.mark.parametrize("shape", [(2, 10, 32), (1, 17, 80)], ids=str)
def test_backward_matches_reference_fp32(normalize, shape):
    args = [a.requires_grad_(True) for a in make_args(*shape)]
    grad_out = torch.randn(shape, device=DEVICE)
    expected = torch.autograd.grad(prototype_attention_ref(*args, normalize=normalize), args,
                                   grad_out)
    got = torch.autograd.grad(run_triton(args, normalize), args, grad_out)
    names = ["prototypes", "queries", "residual", "proj_weight", "proj_bias", "alpha", "out_weight",
             "out_bias"]
    for name, g, e in zip(names, got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=name)
    again = torch.autograd.grad(run_triton(args, normalize), args, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # deterministic


PEM_LAYER = (100, 256)  # (queries, channels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", NORMS)
@pytest.mark.parametrize("batch", [1, 2])
def test_pem_size_forward_and_backward(dtype, normalize, batch):
    """PEM's real layer (100 queries, C = 256): forward and every gradient against the fp64
    reference on the same values; fp32 elementwise, bf16 within a relative error of 1e-2 of the
    whole tensor (its GEMM operands are bf16)."""
    queries, channels = PEM_LAYER
    args = [a.requires_grad_(True) for a in make_args(batch, queries, channels, dtype)]
    exact_args = [a.detach().double().requires_grad_(True) for a in args]
    grad_out = torch.randn(batch, queries, channels, device=DEVICE, dtype=torch.float64)
    exact = prototype_attention_ref(*exact_args, normalize=normalize)
    expected = [exact, *torch.autograd.grad(exact, exact_args, grad_out)]
    out = run_triton(args, normalize)
    got = [out, *torch.autograd.grad(out, args, grad_out.to(dtype))]
    names = ["output", "prototypes", "queries", "residual", "proj_weight", "proj_bias", "alpha",
             "out_weight", "out_bias"]
    for name, g, e in zip(names, got, expected):
        assert g.shape == e.shape and g.dtype == dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=name)
        else:
            error = (g.double() - e).norm() / e.norm()
            assert error < 1e-2, f"{name}: relative error {error:.2e}"


def test_fp32_products_follow_torchs_matmul_precision(matmul_precision, monkeypatch):
    import triton.language as tl

    from pem_kernels.triton import dot_operands

    monkeypatch.delenv("PEM_KERNELS_FP32_DOT", raising=False)
    matmul_precision("highest")  # fp32 accuracy: 3xTF32 by default, IEEE products on request
    assert dot_operands(torch.float32, False) == (tl.float32, "tf32x3")
    monkeypatch.setenv("PEM_KERNELS_FP32_DOT", "ieee")
    assert dot_operands(torch.float32, False) == (tl.float32, "ieee")
    monkeypatch.setenv("PEM_KERNELS_FP32_DOT", "tf32")
    with pytest.raises(ValueError, match=r"PEM_KERNELS_FP32_DOT: expected one of .*'tf32'"):
        dot_operands(torch.float32, False)
    monkeypatch.setenv("PEM_KERNELS_FP32_DOT", "ieee")
    assert dot_operands(torch.bfloat16, False)[0] == tl.bfloat16
    matmul_precision("high")  # TF32 allowed, as for torch's own fp32 matmuls, whatever the variable
    assert dot_operands(torch.float32, False) == (tl.float32, "tf32")
    # the interpreter follows the same rules (pem_kernels.triton.products emulates TF32 there)
    assert dot_operands(torch.float32, True) == (tl.float32, "tf32")
    assert dot_operands(torch.bfloat16, True) == (tl.float32, "ieee")  # exact fp32 products
    # GPUs before sm_80 have no TF32 tensor cores: IEEE products there, whatever the precision
    import pem_kernels.triton as pt

    gpu = torch.device("cuda", 0)
    for capability, expected in [((7, 5), "ieee"), ((8, 0), "tf32"), ((9, 0), "tf32")]:
        monkeypatch.setattr(pt, "_CAPABILITY", {0: capability})
        assert dot_operands(torch.float32, False, gpu) == (tl.float32, expected)
    monkeypatch.delenv("PEM_KERNELS_FP32_DOT")
    matmul_precision("highest")
    assert dot_operands(torch.float32, False, gpu) == (tl.float32, "tf32x3")
    monkeypatch.setattr(pt, "_CAPABILITY", {0: (7, 0)})
    assert dot_operands(torch.float32, False, gpu) == (tl.float32, "ieee")
    assert dot_operands(torch.float32, True, gpu) == (tl.float32, "tf32x3")  # interpreter
    assert dot_operands(torch.bfloat16, False, gpu)[0] == tl.bfloat16
    args = make_args(2, 10, 64)
    for normalize in NORMS:
        expected = prototype_attention_ref(*args, normalize=normalize)
        torch.testing.assert_close(run_triton(args, normalize), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(
    not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without the new API"
)
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_fp32_products_follow_torchs_per_backend_precision_setting(setting, monkeypatch):
    """The per-backend API of newer torch, also mixed with the legacy one (after which
    torch.get_float32_matmul_precision() raises)."""
    import triton.language as tl

    from pem_kernels.triton import dot_operands

    monkeypatch.delenv("PEM_KERNELS_FP32_DOT", raising=False)
    matmul = torch.backends.cuda.matmul
    try:
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = setting
        expected = "tf32" if setting == "tf32" else "tf32x3"
        assert dot_operands(torch.float32, False) == (tl.float32, expected)
    finally:
        matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")
    assert torch.get_float32_matmul_precision() == "highest"  # the legacy API answers again


def test_too_many_queries_is_a_clear_error():
    args = make_args(1, triton_attention.MAX_QUERIES + 1, 16)
    with pytest.raises(RuntimeError, match="at most 512 queries per image"):
        run_triton(args, "queries")


@pytest.mark.parametrize("position, bad, message", [
    (1, lambda c: torch.randn(2, 5, c // 2), "queries must have shape [2, 5, 16], got [2, 5, 8]"),
    (3, lambda c: torch.randn(c, c // 2), "proj_weight must have shape [16, 16], got [16, 8]"),
    (5, lambda c: torch.ones(4), "alpha must have shape [16], got [4]"),
    (7, lambda c: torch.randn(4), "out_bias must have shape [16], got [4]"),
    (2, lambda c: torch.randn(2, 5, c).half(), "residual must be torch.float32"),
])
def test_the_op_checks_its_operands(position, bad, message):
    """Called directly (the layer skips the public op's checks), the kernels would index a
    wrong operand out of bounds: each is a clear error naming it."""
    args = make_args(2, 5, 16)
    args[position] = bad(16).to(DEVICE)
    with pytest.raises(RuntimeError, match=re.escape(f"prototype_attention_triton: {message}")):
        run_triton(args, "queries")


@pytest.mark.parametrize("normalize", NORMS)
def test_no_queries_give_zero_gradients(normalize):
    """N = 0: no kernel runs, and every gradient, alpha's included, is zero (alpha's was the
    uninitialized memory of its buffer)."""
    args = [a.requires_grad_(True) for a in make_args(2, 0, 16)]
    out = run_triton(args, normalize)
    assert out.shape == (2, 0, 16)
    grads = torch.autograd.grad(out.sum(), args, allow_unused=True)
    for grad in grads:
        assert grad is None or (grad == 0).all()
    assert grads[5] is not None and grads[5].shape == args[5].shape


def test_clamped_norm_uses_the_constant_divisor():
    """A column of A that is all zero has norm 0 < eps: its gradient is dAn / eps, as
    F.normalize."""
    args = [a.requires_grad_(True) for a in make_args(1, 4, 16)]
    with torch.no_grad():
        args[3][5].zero_()  # proj_weight row 5 and proj_bias[5] = 0 -> A[:, 5] == 0
        args[4][5] = 0.0
    grad_out = torch.randn(1, 4, 16, device=DEVICE)
    expected = torch.autograd.grad(prototype_attention_ref(*args, normalize="queries"), args,
                                   grad_out)
    got = torch.autograd.grad(run_triton(args, "queries"), args, grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_public_op_dispatches_to_triton():
    import pem_kernels

    args = make_args(2, 5, 16)
    out = pem_kernels.prototype_attention(*args, normalize="channels", backend="triton")
    torch.testing.assert_close(out, prototype_attention_ref(*args, normalize="channels"),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile over a triton_op needs a GPU")
def test_compiles_fullgraph():
    import pem_kernels

    args = make_args(2, 100, 256)

    def attend(*a):
        return pem_kernels.prototype_attention(*a, backend="triton")

    torch.testing.assert_close(torch.compile(attend, fullgraph=True)(*args), attend(*args))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    args = [a.requires_grad_(requires_grad) for a in make_args(2, 5, 16)]
    # The interpreter cannot run a triton_op on fake tensors (it touches their storage), so the
    # fake-tensor and AOT-dispatch checks run only on a GPU.
    test_utils = None if HAS_CUDA else ("test_schema", "test_autograd_registration")
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    for by_queries in (True, False):
        torch.library.opcheck(
            torch.ops.pem_kernels.prototype_attention_triton.default, (*args, by_queries), **kwargs
        )
    # The backward op is once-differentiable (autograd calls it on saved, detached tensors; a
    # double backward is a clear error), so its own check runs on tensors without grad.
    grad_out = torch.randn(2, 5, 16, device=DEVICE)
    with torch.no_grad():
        out, _x, an, _m, div = triton_attention.prototype_attention_triton(*args, True)
    saved = [a.detach() for a in args]
    torch.library.opcheck(
        torch.ops.pem_kernels._prototype_attention_backward_triton.default,
        (grad_out, saved[0], saved[1], saved[3], saved[5], saved[6], an, div, True),
        **kwargs,
    )


def test_double_backward_is_a_clear_error():
    args = [a.requires_grad_(True) for a in make_args(1, 3, 16)]
    out = run_triton(args, "queries")
    (grad_prototypes,) = torch.autograd.grad(out.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad_prototypes.sum().backward()


_SM90_COMPILE = """
import torch
from pem_kernels.triton import prototype_attention as K

assert not K.INTERPRET
SCRATCH = ("x_ptr", "a_ptr", "an_ptr", "m_ptr", "div_ptr", "partial_ptr", "da_ptr", "dan_ptr",
           "dp_ptr", "dq_ptr", "dalpha_ptr")

# Launch configurations of PEM's 100 queries and of the most queries the op takes (fp32 has the
# largest tiles), and one in between.
cases = [(torch.bfloat16, "bf16", 100, True), (torch.float32, "fp32", 100, False),
         (torch.float32, "fp32", 200, True),
         (torch.float32, "fp32", K.MAX_QUERIES, True),
         (torch.float32, "fp32", K.MAX_QUERIES, False)]
for kernel in (K._fwd_a_kernel, K._fwd_y_kernel, K._bwd_dm_kernel, K._bwd_dx_kernel):
    for dtype, name, queries, over_queries in cases:
        constants = K._launch_config(queries, dtype)
        options = {key: constants.pop(key) for key in ("num_warps", "num_stages")}
        signature_of = lambda n: ("i32" if n in ("N", "C") else "*fp32" if n in SCRATCH
                                  else "*" + name)
        compile_sm90(kernel, signature_of, dict(NORM_OVER_QUERIES=over_queries, **constants),
                     **options)
print("compiled for sm_90")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU every kernel is compiled and run by the tests")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects: compile the forward and backward kernels
    for an H100 (sm_90, through Triton's bundled ptxas) in a process without TRITON_INTERPRET."""
    assert_compiles_for_sm90(_SM90_COMPILE)
