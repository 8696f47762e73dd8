"""prototype_select: the Triton backend against the pure-PyTorch reference.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), where every program step costs milliseconds: shapes stay small, but HW is never
a multiple of the pixel tile and the pixel axis is split over several programs, so the cross-program
merge (the finalize kernel's max over the splits' packed int64 partials) is always exercised. With
a GPU the same tests run on CUDA tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pem_kernels
from pem_kernels.reference import prototype_select_ref
from pem_kernels.triton import triton_unavailable_reason

from conftest import HAS_CUDA, assert_compiles_for_sm90, requires_cuda
from test_prototype_select import (
    assert_matches_reference,
    assert_same_up_to_ties,
    blob_masks,
    check_all_scores_negative,
    check_fp32_product_rules,
    check_mask_logits,
    check_official_rule_across_query_blocks,
    check_normalized_gradient_of_nan_and_zero_keys,
    gather_at,
    head_scores,
    make_inputs,
)

_TRITON_REASON = triton_unavailable_reason()
if _TRITON_REASON is None and not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    _TRITON_REASON = "no GPU and TRITON_INTERPRET is not 1"
pytestmark = pytest.mark.skipif(_TRITON_REASON is not None, reason=str(_TRITON_REASON))

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKEND = "triton"


@pytest.fixture
def kernels():
    from pem_kernels.triton import prototype_select as module

    return module


@pytest.fixture
def splits(monkeypatch, kernels):
    """Forces the number of pixel splits (programs along the pixel axis) of the select kernel."""

    def force(count):
        monkeypatch.setattr(kernels, "_SPLITS_OVERRIDE", count)

    return force


def check(keys, queries, mask, heads, *, empty="per_query", normalize_keys=False):
    return assert_matches_reference(
        keys, queries, mask, heads, empty=empty, normalize_keys=normalize_keys, backend=BACKEND
    )


SHAPES = [
    # (B, HW, C, N, heads): HW not a multiple of any pixel tile; N=1; D = 8 and 32
    (2, 150, 32, 5, 4),
    (1, 64, 32, 1, 1),
    # one 200-channel head (BLOCK_D = 256): scored in 64-channel chunks, the last one partial
    (1, 150, 200, 3, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("empty", ["per_query", "official"])
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_matches_reference_random(shape, empty, normalize_keys):
    batch, pixels, channels, queries, heads = shape
    keys, query, mask = make_inputs(batch, pixels, channels, queries, DEVICE)
    _, indices = check(keys, query, mask, heads, empty=empty, normalize_keys=normalize_keys)
    assert indices.device.type == DEVICE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_low_precision_matches_reference(dtype, normalize_keys):
    # Indices may differ only where fp32 scores tie within rounding (assert_matches_reference).
    keys, query, mask = make_inputs(2, 150, 32, 5, DEVICE, dtype)
    prototypes, _ = check(keys, query, mask, 4, normalize_keys=normalize_keys)
    assert prototypes.dtype == dtype


@pytest.mark.parametrize("count", [1, 3])
def test_any_pixel_split_gives_the_same_result(splits, count):
    keys, query, mask = make_inputs(2, 300, 16, 6, DEVICE)
    mask[0, 4] = False  # an empty query: its unmasked argmax is split too
    splits(None)
    _, default = check(keys, query, mask, 2, normalize_keys=True)
    splits(count)
    _, forced = check(keys, query, mask, 2, normalize_keys=True)
    assert torch.equal(default, forced)


@pytest.mark.parametrize("normalize_keys", [False, True])
def test_no_mask_selects_over_all_pixels(normalize_keys):
    keys, query, _ = make_inputs(2, 150, 32, 5, DEVICE)
    _, indices = check(keys, query, None, 4, normalize_keys=normalize_keys)
    scores = head_scores(keys, query, 4, normalize_keys)
    assert torch.equal(indices, scores.argmax(dim=2))


@pytest.mark.parametrize("empty", ["per_query", "official"])
def test_single_empty_query(empty):
    keys, query, mask = make_inputs(2, 150, 32, 5, DEVICE)
    mask[0, 2] = False
    _, indices = check(keys, query, mask, 4, empty=empty)
    scores = head_scores(keys, query, 4, False)
    if empty == "official":
        assert (indices[0, :, 2] == 0).all()  # the official code's argmax over an all -inf row
    else:
        assert torch.equal(indices[0, :, 2], scores[0, :, :, 2].argmax(dim=1))
    # the other queries of the image keep their masked argmax
    masked = scores.masked_fill(~mask.transpose(1, 2)[:, None], float("-inf"))
    assert torch.equal(indices[0, :, [0, 1, 3, 4]], masked[0, :, :, [0, 1, 3, 4]].argmax(dim=1))


@pytest.mark.parametrize("empty", ["per_query", "official"])
def test_all_queries_of_an_image_empty(empty):
    keys, query, mask = make_inputs(2, 150, 32, 5, DEVICE)
    mask[1] = False
    _, indices = check(keys, query, mask, 4, empty=empty)
    scores = head_scores(keys, query, 4, False)
    assert torch.equal(indices[1], scores[1].argmax(dim=1))  # both rules unmask the whole image


def test_ties_go_to_the_lowest_index_across_programs(splits):
    splits(3)  # 3 x 128-pixel tiles, one program each: every copy lives in another program
    keys, query, mask = make_inputs(1, 300, 16, 4, DEVICE)
    keys[0, 100:200] = keys[0, :100]  # every score appears at p, p + 100 and p + 200
    keys[0, 200:] = keys[0, :100]
    mask[:] = True
    mask[0, 1, :200] = False  # query 1 may only use the last copy
    mask[0, 2, :50] = False  # query 2: pixels 50..99 of the first copy, then both other copies
    _, indices = check(keys, query, mask, 2)
    assert (indices[0, :, [0, 3]] < 100).all()
    assert (indices[0, :, 1] >= 200).all()
    scores = head_scores(keys, query, 2, False)[0, :, :100, 2]  # [heads, 100]
    best_copy = scores.argmax(dim=1)
    expected = torch.where(best_copy >= 50, best_copy, best_copy + 100)
    assert torch.equal(indices[0, :, 2], expected)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on NaN
def test_nan_inf_and_signed_zero_follow_torch_argmax(splits):
    """NaN scores count as larger than any number (first NaN wins, also across programs); a blocked
    NaN is ignored; allowed pixels all scoring -inf give the first allowed one; +inf ties go to the
    lowest index; -0.0 and +0.0 tie."""
    splits(2)  # 2 x 128-pixel tiles
    keys, query, mask = make_inputs(1, 200, 8, 6, DEVICE)
    mask[:] = False
    mask[0, 0, [10, 50, 150, 190]] = True
    keys[0, 150, :4] = float("nan")  # head 0 of pixels 150 and 190 (second program) scores NaN,
    keys[0, 190, :4] = float("nan")
    keys[0, 50, :4] = float("nan")  # and so does pixel 50 (first program), which must win
    mask[0, 1, :] = True
    keys[0, 120, 4:] = float("nan")  # head 1 of pixel 120 is NaN but blocked for query 1
    mask[0, 1, 120] = False
    mask[0, 2, [30, 31, 180]] = True
    keys[0, [30, 31, 180]] = float("-inf")  # query 2 (positive) scores -inf at every allowed pixel
    query[0, 2] = 1.0
    mask[0, 3, 5] = True
    mask[0, 4, [60, 70, 140, 160]] = True
    keys[0, [70, 140, 160]] = float("inf")  # query 4 (positive) scores +inf at 70, 140 and 160
    query[0, 4] = 1.0
    mask[0, 5, [80, 90, 130]] = True
    keys[0, 80] = -1.0
    keys[0, 90] = 1.0
    query[0, 5] = 0.0  # scores -0.0 at pixel 80 and +0.0 at pixels 90 and 130: a three-way tie
    _, indices = check(keys, query, mask, 2)
    assert indices[0, 0, 0] == 50
    assert indices[0, 1, 1] != 120
    assert (indices[0, :, 2] == 30).all()
    assert (indices[0, :, 3] == 5).all()
    assert (indices[0, :, 4] == 70).all()
    assert (indices[0, :, 5] == 80).all()


def test_all_scores_negative(splits):
    splits(3)
    check_all_scores_negative(DEVICE, BACKEND)


def test_mask_logits(splits):
    splits(2)
    check_mask_logits(DEVICE, BACKEND)


def test_official_rule_across_query_blocks(splits):
    splits(2)
    check_official_rule_across_query_blocks(DEVICE, BACKEND)


def test_fp32_products_follow_the_rules(monkeypatch):
    """As for the CUDA kernel (test_prototype_select.check_fp32_product_rules); under the
    interpreter the products are the tensor cores' too (pem_kernels.triton.products rounds the
    operands to TF32 itself)."""
    check_fp32_product_rules(DEVICE, BACKEND, True, monkeypatch)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf - inf
def test_fp32_infinite_key_scores_infinite_not_nan(splits):
    """A -inf key channel has a NaN TF32 remainder (inf - inf): 3xTF32 must drop the NaN cross
    terms, so that the pixel scores -inf (as IEEE products do) and loses to a finite one, and a
    +inf key scores +inf and beats a finite one, instead of NaN (the largest score) winning."""
    splits(2)
    keys, query, mask = make_inputs(1, 200, 8, 2, DEVICE)
    query[:] = 1.0
    mask[:] = False
    mask[0, 0, [40, 150]] = True
    keys[0, 40, 0] = float("-inf")  # first program, before the finite pixel 150
    mask[0, 1, [60, 170]] = True
    keys[0, 170, 1] = float("inf")
    _, indices = check(keys, query, mask, 1)
    assert indices[0, 0, 0] == 150
    assert indices[0, 0, 1] == 170


def test_nan_key_with_normalize_keys_is_nan_in_every_head(splits):
    """With normalize_keys a NaN in one head's channels makes the pixel's norm NaN, so the pixel
    scores NaN in every head (as after F.normalize) and wins wherever it is allowed: the key norm
    must keep a NaN norm (GPU max instructions would return eps instead)."""
    splits(2)
    keys, query, mask = make_inputs(1, 300, 16, 3, DEVICE)
    mask[:] = True
    keys[0, 170, :4] = float("nan")  # head 0's channels only; head 1 has finite keys there
    _, indices = check(keys, query, mask, 2, normalize_keys=True)
    assert (indices[0] == 170).all()


def test_normalized_gradient_of_nan_and_zero_keys():
    check_normalized_gradient_of_nan_and_zero_keys(DEVICE, BACKEND)


def test_non_contiguous_inputs():
    keys = torch.randn(2, 32, 150, device=DEVICE).transpose(1, 2)  # [B, HW, C], strided
    query = torch.randn(2, 9, 64, device=DEVICE)[:, ::2, ::2]  # [B, 5, 32], strided
    mask = (torch.rand(2, 150, 5, device=DEVICE) < 0.3).transpose(1, 2)
    mask[0, :, 3] = False
    assert not keys.is_contiguous() and not query.is_contiguous() and not mask.is_contiguous()
    for normalize_keys in (False, True):
        check(keys, query, mask, 4, normalize_keys=normalize_keys)


def test_batch_zero_and_no_queries():
    for batch, queries in [(0, 4), (2, 0)]:
        keys, query, mask = make_inputs(batch, 50, 16, queries, DEVICE)
        keys.requires_grad_(True)
        prototypes, indices = pem_kernels.prototype_select(keys, query, mask, 4, backend=BACKEND)
        assert prototypes.shape == (batch, queries, 16) and indices.shape == (batch, 4, queries)
        (grad,) = torch.autograd.grad(
            prototypes.sum(), keys, allow_unused=True, materialize_grads=True
        )
        assert grad.shape == keys.shape and not grad.any()


@pytest.mark.parametrize("empty", ["per_query", "official"])
def test_zero_channels(empty):
    keys, query, mask = make_inputs(2, 9, 0, 3, DEVICE)
    mask[0, 1] = False
    for with_mask in (False, True):
        for normalize_keys in (False, True):
            check(keys, query, mask if with_mask else None, 2, empty=empty,
                  normalize_keys=normalize_keys)


@pytest.mark.parametrize(
    "dtype, normalize_keys",
    [(torch.float32, False), (torch.float32, True), (torch.float16, True)],
    ids=str,
)
def test_backward_matches_reference(dtype, normalize_keys):
    # Sparse masks: several queries (and heads) select the same pixels, so gradients accumulate.
    keys, query, mask = make_inputs(2, 150, 32, 12, DEVICE, dtype, density=0.02)
    mask[1, 3] = False
    keys.requires_grad_(True)
    grad_out = torch.randn(2, 12, 32, device=DEVICE, dtype=dtype)
    prototypes, indices = pem_kernels.prototype_select(
        keys, query, mask, 4, normalize_keys=normalize_keys, backend=BACKEND
    )
    (grad,) = torch.autograd.grad(prototypes, keys, grad_out)
    assert grad.dtype == dtype
    # fp64 gradient of the gather at the kernel's own indices
    keys64 = keys.detach().double().requires_grad_(True)
    gathered, _ = gather_at(keys64, indices, 4, normalize_keys)
    (expected,) = torch.autograd.grad(gathered, keys64, grad_out.double())
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grad.double(), expected, rtol=tol, atol=tol)
    if dtype == torch.float32:
        # and the reference op's own autograd, end to end, in fp32
        ref_keys = keys.detach().clone().requires_grad_(True)
        ref_prototypes, ref_indices = prototype_select_ref(
            ref_keys, query, mask, 4, normalize_keys=normalize_keys
        )
        assert torch.equal(indices, ref_indices)
        (ref_grad,) = torch.autograd.grad(ref_prototypes, ref_keys, grad_out)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    selected = torch.zeros(2, 150, dtype=torch.bool, device=DEVICE)
    selected.scatter_(1, indices.flatten(1), True)
    assert grad[~selected].abs().max() == 0  # gradient only at the selected pixels
    assert (indices.flatten(1)[:, :, None] == indices.flatten(1)[:, None, :]).sum() > 2 * 48
    # deterministic: the same call gives bit-identical gradients
    prototypes2, _ = pem_kernels.prototype_select(
        keys, query, mask, 4, normalize_keys=normalize_keys, backend=BACKEND
    )
    (grad2,) = torch.autograd.grad(prototypes2, keys, grad_out)
    assert torch.equal(grad, grad2)


@pytest.mark.parametrize("normalize_keys", [False, True])
def test_every_head_and_query_selecting_one_pixel_accumulate(normalize_keys):
    keys = -torch.rand(1, 40, 8, device=DEVICE) - 0.1
    keys[0, 7] = 10.0  # pixel 7 wins for every positive query in every head, normalized or not
    query = torch.rand(1, 6, 8, device=DEVICE) + 0.1
    keys.requires_grad_(True)
    prototypes, indices = pem_kernels.prototype_select(
        keys, query, None, 2, normalize_keys=normalize_keys, backend=BACKEND
    )
    assert (indices == 7).all()
    grad_out = torch.randn_like(prototypes).expand(1, 6, 8)  # (a stride-0 gradient is fine too)
    (grad,) = torch.autograd.grad(prototypes, keys, grad_out)
    g = grad_out[0].sum(0)
    if normalize_keys:  # the backward of k / ||k|| mixes both heads' channels of the pixel
        k = keys[0, 7].detach()
        norm = k.norm()
        g = (g - k * (k @ g) / norm**2) / norm
    torch.testing.assert_close(grad[0, 7], g, rtol=1e-5, atol=1e-6)
    assert grad[0, torch.arange(40, device=DEVICE) != 7].abs().max() == 0


def test_backward_of_a_zero_key_uses_eps():
    keys = torch.zeros(1, 20, 8, device=DEVICE)
    keys[0, 3:] = torch.randn(17, 8, device=DEVICE)
    query = torch.randn(1, 2, 8, device=DEVICE)
    mask = torch.zeros(1, 2, 20, dtype=torch.bool, device=DEVICE)
    mask[0, :, :2] = True  # both queries may only pick the all-zero pixels 0 and 1 (ties -> 0)
    keys.requires_grad_(True)
    prototypes, indices = pem_kernels.prototype_select(
        keys, query, mask, 2, normalize_keys=True, backend=BACKEND
    )
    assert (indices == 0).all() and not prototypes.any()
    grad_out = torch.randn_like(prototypes) * 1e-12
    (grad,) = torch.autograd.grad(prototypes, keys, grad_out)
    torch.testing.assert_close(grad[0, 0], grad_out[0].sum(0) / 1e-12)


def test_registered_ops_check_their_arguments(kernels):
    keys, query, mask = make_inputs(2, 30, 16, 3, DEVICE)
    with pytest.raises(RuntimeError, match="num_heads"):
        kernels.prototype_select_triton(keys, query, mask, 3, False, False)
    with pytest.raises(RuntimeError, match="dtype"):
        kernels.prototype_select_triton(keys.double(), query.double(), mask, 4, False, False)
    with pytest.raises(RuntimeError, match="mask"):
        kernels.prototype_select_triton(keys, query, mask[:, :, 1:], 4, False, False)
    with pytest.raises(RuntimeError, match="mask"):
        kernels.prototype_select_triton(keys, query, mask.int(), 4, False, False)
    with pytest.raises(RuntimeError, match="grad_prototypes"):
        indices = torch.zeros(2, 4, 3, dtype=torch.long, device=DEVICE)
        kernels.prototype_select_backward_triton(
            torch.randn(2, 2, 16, device=DEVICE), keys, indices, False
        )


def test_dispatch_and_availability():
    keys, query, mask = make_inputs(1, 30, 16, 3, DEVICE)
    assert "triton" in pem_kernels.available_backends("prototype_select", DEVICE, torch.float32)
    assert "triton" in pem_kernels.available_backends("prototype_select", DEVICE, torch.bfloat16)
    # fp64 is not supported by the kernel: an explicit request says so, "auto" never picks triton
    assert "triton" not in pem_kernels.available_backends("prototype_select", DEVICE, torch.float64)
    with pytest.raises(pem_kernels.BackendUnavailableError, match="float64"):
        pem_kernels.prototype_select(keys.double(), query.double(), mask, 4, backend="triton")
    from pem_kernels.ops.prototype_select import _BACKENDS

    for dtype in (torch.float32, torch.float64):
        assert _BACKENDS.resolve("auto", torch.device(DEVICE), dtype) != "triton"
    prototypes, indices = pem_kernels.prototype_select(keys, query, mask, 4, backend="triton")
    ref = prototype_select_ref(keys, query, mask, 4)
    assert torch.equal(indices, ref[1]) and torch.equal(prototypes, ref[0])


def test_triton_backend_unavailable_without_triton_or_interpreter():
    code = (
        "import os, sys\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "import torch, pem_kernels\n"
        "k, q = torch.randn(1, 10, 8), torch.randn(1, 2, 8)\n"
        "assert 'triton' not in pem_kernels.available_backends('prototype_select')\n"
        "try:\n"
        "    pem_kernels.prototype_select(k, q, None, 2, backend='triton')\n"
        "except pem_kernels.BackendUnavailableError as error:\n"
        "    print('unavailable:', error)\n"
        "assert 'triton' not in sys.modules, 'import pem_kernels must not import triton'\n"
        "sys.modules['triton'] = None\n"  # `import triton` now fails
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "assert 'triton' not in pem_kernels.available_backends('prototype_select')\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and result.stdout.rstrip().endswith("ok")


_SM90_COMPILE = """
import torch
from pem_kernels.triton import prototype_select as K

assert not K.INTERPRET
def select_pointers(dtype, mask):
    return {"keys_ptr": "*" + dtype, "queries_ptr": "*" + dtype, "mask_ptr": "*" + (mask or "i1"),
            "inverse_ptr": "*fp32", "partials_ptr": "*i64", "allowed_seen_ptr": "*i32"}

# The launch configurations of PEM's heads (32 channels) and of wide heads (256 and 512 channels,
# fp32: the largest shared-memory need), 100 queries, with a bool mask ("i1"), mask logits or none.
# fp32 with its default 3xTF32 products, and PEM's heads also with PEM_KERNELS_FP32_DOT=ieee.
cases = [("bf16", "i1", 32, "tf32"), ("bf16", None, 32, "tf32"), ("bf16", "bf16", 32, "tf32"),
         ("fp32", None, 32, "tf32x3"), ("fp32", "fp32", 32, "tf32x3"), ("fp32", "i1", 32, "ieee"),
         ("fp32", "i1", 256, "tf32x3"), ("fp32", "fp16", 512, "tf32x3"),
         ("bf16", "i1", 512, "tf32")]
for dtype, mask, head_dim, precision in cases:
    block_p, block_n, block_d, block_dc, _, _, _, num_warps = K._select_config(
        torch.device("cpu"), 8, 32768, 100, head_dim, precision)
    pointers = select_pointers(dtype, mask)
    compile_sm90(K._select_kernel, lambda n: pointers.get(n, "i32"), dict(
        HAS_MASK=mask is not None, MASK_LOGITS=mask not in (None, "i1"), NORMALIZE=True,
        OFFICIAL=True, INTERPRETED=False, DOT_PRECISION=precision,
        SCALE_KEYS=K.scales_key_tiles(True, precision, dtype == "fp32"), BLOCK_P=block_p,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DC=block_dc), num_warps=num_warps)
finalize = {"keys_ptr": "*bf16", "inverse_ptr": "*fp32", "partials_ptr": "*i64",
            "allowed_seen_ptr": "*i32", "indices_ptr": "*i64", "prototypes_ptr": "*bf16"}
compile_sm90(K._finalize_kernel, lambda n: finalize.get(n, "i32"),
             dict(HAS_MASK=True, OFFICIAL=True, NORMALIZE=True, BLOCK_H=8, BLOCK_D=32, BLOCK_S=64,
                  BLOCK_F=1024))
key_norm = {"keys_ptr": "*bf16", "inverse_ptr": "*fp32", "rows": "i64"}
compile_sm90(K._key_norm_kernel, lambda n: key_norm.get(n, "i32"), dict(BLOCK_R=16, BLOCK_C=128))
backward = {"grad_ptr": "*bf16", "keys_ptr": "*bf16", "indices_ptr": "*i64",
            "grad_keys_ptr": "*bf16"}
compile_sm90(K._backward_kernel, lambda n: backward.get(n, "i32"),
             dict(NORMALIZE=True, BLOCK_S=1024, BLOCK_NB=16, BLOCK_C=256))
print("compiled for sm_90")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU every kernel is compiled and run by the tests")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects (e.g. non-constexpr globals): compile the
    main specializations for an H100 (sm_90, PTX and cubin through Triton's bundled ptxas)."""
    assert_compiles_for_sm90(_SM90_COMPILE)


def _opcheck_samples():
    samples = []
    cases = [(False, False, True), (True, True, True), (True, False, False)]
    for requires_grad, normalize_keys, with_mask in cases:
        keys, query, mask = make_inputs(2, 40, 16, 3, DEVICE)
        mask[0, 1] = False
        keys.requires_grad_(requires_grad)
        samples.append((keys, query, mask if with_mask else None, 4, True, normalize_keys))
    return samples


# Under TRITON_INTERPRET=1, @triton.jit gives an InterpretedFunction and torch.library.wrap_triton
# returns it unwrapped (no triton_kernel_wrapper HOP), so whenever the triton_op body runs on
# FakeTensors (it is also the op's fake kernel: opcheck's test_faketensor and
# test_aot_dispatch_dynamic, and torch.compile) the interpreter launches the kernels on them and
# fails ("Attempted to set the storage of a tensor on device meta ..."). Without a GPU opcheck
# therefore runs only its schema and autograd-registration checks; on a GPU it runs all of them.
OPCHECK_KWARGS = {} if HAS_CUDA else {"test_utils": ("test_schema", "test_autograd_registration")}


def test_opcheck(kernels):
    for args in _opcheck_samples():
        torch.library.opcheck(kernels.prototype_select_triton, args, **OPCHECK_KWARGS)
        _, indices = kernels.prototype_select_triton(*args)
        grad = torch.randn(2, 3, 16, device=DEVICE)
        torch.library.opcheck(
            kernels.prototype_select_backward_triton, (grad, args[0].detach(), indices, args[5]),
            **OPCHECK_KWARGS,
        )


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("size", [(2, 32, 64), (1, 128, 256), (1, 256, 512)], ids=str)
@pytest.mark.parametrize("empty", ["per_query", "official"])
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_pem_sizes_match_reference(dtype, size, empty, normalize_keys):
    """PEM's real problem (C = 256, 8 heads, 100 queries) at the paper's 2048, 32768 and 131072
    pixels with model-like blob masks and empty queries: the default splits and tiles at scale
    (too slow for the interpreter, so GPU only)."""
    batch, height, width = size
    keys, queries, _ = make_inputs(batch, height * width, 256, 100, DEVICE, dtype)
    mask = blob_masks(batch, 100, height, width, DEVICE)
    if empty == "official":
        mask[-1] = False  # one image with every query empty: the official rule's unmasked pass
    prototypes, indices = pem_kernels.prototype_select(
        keys, queries, mask, 8, empty=empty, normalize_keys=normalize_keys, backend=BACKEND
    )
    _, ref_indices = prototype_select_ref(
        keys.float(), queries.float(), mask, 8, empty=empty, normalize_keys=normalize_keys
    )
    assert_same_up_to_ties(keys, queries, mask, 8, indices, ref_indices, normalize_keys)
    gathered, _ = gather_at(keys.float(), indices, 8, normalize_keys)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(prototypes.float(), gathered, rtol=tol, atol=tol)


@requires_cuda
@pytest.mark.parametrize("empty", ["per_query", "official"])
def test_torch_compile_fullgraph(empty):
    keys, query, mask = make_inputs(2, 200, 32, 5, DEVICE)
    mask[0, 1] = False
    keys.requires_grad_(True)

    def step(k, q, m):
        prototypes, indices = pem_kernels.prototype_select(
            k, q, m, 4, empty=empty, normalize_keys=True, backend=BACKEND
        )
        return (prototypes * 2).sum(), indices

    compiled = torch.compile(step, fullgraph=True)
    loss, indices = compiled(keys, query, mask)
    expected_loss, expected_indices = step(keys, query, mask)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(loss, expected_loss)
    (grad,) = torch.autograd.grad(loss, keys)
    (expected_grad,) = torch.autograd.grad(expected_loss, keys)
    torch.testing.assert_close(grad, expected_grad)
