"""pem_kernels.triton.products: the TF32 rounding and split, 3xTF32's accuracy, and the layouts
Triton gives its unchained products on Hopper.

Without a GPU the kernels run under the interpreter (where the module emulates the tensor cores'
TF32 products); the layout test compiles for sm_90 without one.
"""

from __future__ import annotations

import os

import pytest
import torch

from pem_kernels.triton import triton_unavailable_reason

from conftest import HAS_CUDA, SM90_COMPILE_PRELUDE

_REASON = triton_unavailable_reason()
if _REASON is None and not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    _REASON = "no GPU and TRITON_INTERPRET is not 1"
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

DEVICE = "cuda" if HAS_CUDA else "cpu"


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from pem_kernels.triton.products import dot_product, split_tf32  # noqa: E402


@triton.jit
def _split_kernel(x_ptr, big_ptr, small_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    big, small = split_tf32(tl.load(x_ptr + offs, mask=ok, other=0.0))
    tl.store(big_ptr + offs, big, mask=ok)
    tl.store(small_ptr + offs, small, mask=ok)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    rows, cols, ks = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * N + cols[None, :])
    out = dot_product(a, b, tl.float32, DOT_PRECISION)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out)


def _rna_tf32(x: torch.Tensor) -> torch.Tensor:
    """TF32 rounding to nearest, ties away from zero, in int64 arithmetic on the fp32 bits."""
    bits = x.view(torch.int32).to(torch.int64)
    sign, magnitude = bits & ~0x7FFFFFFF, bits & 0x7FFFFFFF
    rounded = ((magnitude + 0x1000) & ~0x1FFF) | sign
    return (rounded & 0xFFFFFFFF).to(torch.int64).to(torch.int32).view(torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf - inf
def test_split_rounds_to_nearest_tf32_and_keeps_the_remainder():
    one = 1.0
    ulp = 2.0**-10  # TF32's unit in the last place at 1
    values = [
        0.0, -0.0, one, -one, one + ulp / 2, -(one + ulp / 2),  # ties: away from zero
        one + ulp / 2 - 2.0**-23, one + 3 * ulp / 2, 3.0e38, -3.0e38, 1e-40, -1e-40,
        float("inf"), float("-inf"), float("nan"),
    ]
    x = torch.tensor(values + torch.randn(49).mul(1e3).tolist(), dtype=torch.float32,
                     device=DEVICE)
    big, small = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, big, small, x.numel(), BLOCK=64)
    finite = x.isfinite()
    expected = _rna_tf32(x.cpu()).to(DEVICE)
    assert torch.equal(big[finite], expected[finite])
    assert big[0].item() == 0.0 and big[2].item() == 1.0
    assert big[4].item() == one + ulp and big[5].item() == -(one + ulp)  # ties away from zero
    assert big[6].item() == one and big[7].item() == one + 2 * ulp
    assert (big.view(torch.int32)[finite] & 0x1FFF == 0).all()  # 10 mantissa bits left
    # big holds the leading 11 significant bits, small the rest: x - big is at most half a TF32
    # unit of x, and big + small is x up to what a TF32 product keeps of small (which the
    # interpreter rounds it to): 22 significant bits. (Relative to normal numbers: a subnormal
    # has fewer significant bits to begin with.)
    normal = finite & (x.abs() >= torch.finfo(torch.float32).tiny)
    assert ((x - big).abs() <= x.abs() * 2.0**-11)[normal].all()
    error = ((big.double() + small.double()) - x.double()).abs()
    assert (error <= x.double().abs() * 2.0**-21)[normal].all()
    assert big[12].item() == float("inf") and big[13].item() == float("-inf")
    assert big[14].isnan() and small[12:15].isnan().all()  # inf - inf: dot_3xtf32 drops those


def test_products_have_their_precision():
    """3xTF32 is about as accurate as IEEE fp32 products (within the project's fp32 tolerance of
    1e-5, and far better than TF32), one TF32 product is not: it keeps 11 significant bits of each
    operand. Errors relative to sum |a||b| over K = 32, the worst of 256 outputs."""
    torch.manual_seed(0)
    a = torch.randn(16, 32, device=DEVICE)
    b = torch.randn(32, 16, device=DEVICE)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    errors = {}
    for precision in ("tf32x3", "tf32", "ieee"):
        out = torch.empty(16, 16, device=DEVICE)
        _matmul_kernel[(1,)](a, b, out, M=16, N=16, K=32, DOT_PRECISION=precision)
        errors[precision] = ((out.double() - exact).abs() / scale).max().item()
    assert errors["ieee"] < 1e-6 and errors["tf32x3"] < 1e-5, errors
    assert 2e-5 < errors["tf32"] < 2e-3, errors  # TF32 really rounded the operands
    assert errors["tf32x3"] < errors["tf32"] / 20, errors


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf - inf
def test_3xtf32_keeps_infinities_and_nans():
    """An infinite operand gives the infinite IEEE product (its remainder's NaN cross terms are
    dropped); a NaN operand still gives NaN."""
    a = torch.ones(16, 16, device=DEVICE)
    a[0, 0] = float("inf")
    a[1, 0] = float("-inf")
    a[2, 3] = float("nan")
    b = torch.full((16, 16), 0.5, device=DEVICE)
    out = torch.empty(16, 16, device=DEVICE)
    _matmul_kernel[(1,)](a, b, out, M=16, N=16, K=16, DOT_PRECISION="tf32x3")
    assert (out[0] == float("inf")).all() and (out[1] == float("-inf")).all()
    assert out[2].isnan().all()
    assert (out[3:] == 8.0).all()


_LAYOUT_SCRIPT = """
import re
import torch
from pem_kernels.triton import prototype_select as K

# PEM's selection: 32-channel heads, 100 queries, fp32 with 3xTF32 products.
block_p, block_n, block_d, block_dc, _, _, _, num_warps = K._select_config(
    torch.device("cpu"), 8, 32768, 100, 32, "tf32x3")
pointers = {"keys_ptr": "*fp32", "queries_ptr": "*fp32", "mask_ptr": "*i1",
            "inverse_ptr": "*fp32", "partials_ptr": "*i64", "allowed_seen_ptr": "*i32"}
kernel = compile_sm90(K._select_kernel, lambda n: pointers.get(n, "i32"), dict(
    HAS_MASK=True, MASK_LOGITS=False, NORMALIZE=False, OFFICIAL=True, INTERPRETED=False,
    DOT_PRECISION="tf32x3", SCALE_KEYS=False, BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_D=block_d,
    BLOCK_DC=block_dc), num_warps=num_warps)
ttgir = kernel.asm["ttgir"]
layouts = set(re.findall(r"^(#mma\\d*) = #ttg.nvidia_mma", ttgir, re.M))
assert len(layouts) == 1, f"{len(layouts)} MMA layouts: {sorted(layouts)}"
print("compiled for sm_90")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernels' speed is benchmarked instead")
def test_3xtf32_products_share_one_mma_layout_on_sm90():
    """The point of dot_3xtf32: Triton's own 'tf32x3' chains its three dots, gives the selection
    kernel two MMA layouts on Hopper and converts its [64, 128] score tile between them through
    shared memory at every pixel tile; the unchained products keep one layout."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SM90_COMPILE_PRELUDE + _LAYOUT_SCRIPT], capture_output=True,
        text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled for sm_90" in result.stdout
