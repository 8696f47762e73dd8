"""prototype_select: every compiled backend against the pure-PyTorch reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pem_kernels
from pem_kernels.reference import prototype_select_ref

from conftest import DEVICES, HAS_CUDA, requires_cuda

pytestmark = pytest.mark.skipif(
    not pem_kernels.EXTENSION_LOADED, reason="pem_kernels._C is not built"
)

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def backend_for(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def make_inputs(batch, pixels, channels, queries, device="cpu", dtype=torch.float32, density=0.3):
    keys = torch.randn(batch, pixels, channels, device=device, dtype=dtype)
    query = torch.randn(batch, queries, channels, device=device, dtype=dtype)
    mask = torch.rand(batch, queries, pixels, device=device) < density
    return keys, query, mask


def head_scores(keys, queries, num_heads, normalize_keys):
    """fp64 scores [B, heads, HW, N] of the kernel's computation, for judging near-ties."""
    keys, queries = keys.double(), queries.double()
    if normalize_keys:
        keys = F.normalize(keys, dim=-1)
    batch, pixels, channels = keys.shape
    head_dim = channels // num_heads
    k = keys.view(batch, pixels, num_heads, head_dim).transpose(1, 2)
    q = queries.view(batch, -1, num_heads, head_dim).transpose(1, 2)
    return torch.einsum("bhpd,bhnd->bhpn", k, q)


def assert_matches_reference(keys, queries, mask, num_heads, *, empty, normalize_keys, backend):
    prototypes, indices = pem_kernels.prototype_select(
        keys, queries, mask, num_heads, empty=empty, normalize_keys=normalize_keys, backend=backend
    )
    # Fused backends accumulate low precision in fp32, so they are judged against the fp32
    # reference.
    reference_dtype = torch.float32 if keys.dtype in LOW_PRECISION else keys.dtype
    ref_prototypes, ref_indices = prototype_select_ref(
        keys.to(reference_dtype), queries.to(reference_dtype), mask, num_heads,
        empty=empty, normalize_keys=normalize_keys,
    )
    assert indices.dtype == torch.int64 and indices.shape == ref_indices.shape
    assert prototypes.dtype == keys.dtype and prototypes.shape == ref_prototypes.shape
    differ = indices != ref_indices
    # Different pixels are fine only when their scores tie within the products' rounding: fp32
    # accumulation of low precision, and 3xTF32 (fp32 accuracy, not IEEE's bits) for fp32 on the
    # tensor cores of the cuda and triton backends. fp64 must match exactly.
    near_tie = {torch.float32: 1e-5}.get(keys.dtype, 1e-4)
    if keys.dtype != torch.float64 and differ.any():
        scores = head_scores(keys, queries, num_heads, normalize_keys)
        chosen = scores.gather(2, indices[:, :, None]).squeeze(2)
        expected = scores.gather(2, ref_indices[:, :, None]).squeeze(2)
        gap = (chosen - expected).abs()[differ]
        assert gap.max().item() < near_tie, f"score gap {gap.max().item()}"
        assert differ.float().mean().item() < 0.02
    else:
        assert not differ.any(), f"{int(differ.sum())} indices differ from the reference"
    # The prototype is exactly the (normalized) key chunk at the kernel's own index.
    gathered_ref, _ = gather_at(keys.to(reference_dtype), indices, num_heads, normalize_keys)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(keys.dtype, 1e-2)
    torch.testing.assert_close(
        prototypes.to(reference_dtype), gathered_ref.to(reference_dtype), rtol=tol, atol=tol,
        equal_nan=True,
    )
    return prototypes, indices


def gather_at(keys, indices, num_heads, normalize_keys):
    source = F.normalize(keys, dim=-1) if normalize_keys else keys
    batch, pixels, channels = keys.shape
    head_dim = channels // num_heads
    by_head = source.view(batch, pixels, num_heads, head_dim).transpose(1, 2)
    picked = by_head.gather(2, indices[..., None].expand(-1, -1, -1, head_dim))
    return picked.transpose(1, 2).reshape(batch, indices.shape[2], channels), indices


SHAPES = [
    # (B, HW, C, N, heads): HW deliberately not a multiple of the 512-pixel CPU tile.
    (2, 1000, 64, 7, 4),
    (1, 513, 32, 1, 1),
    (3, 37, 16, 5, 2),
    (1, 1, 8, 3, 8),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("empty", ["per_query", "official"])
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_matches_reference_random(device, dtype, shape, empty, normalize_keys):
    batch, pixels, channels, queries, heads = shape
    keys, query, mask = make_inputs(batch, pixels, channels, queries, device, dtype)
    assert_matches_reference(
        keys, query, mask, heads, empty=empty, normalize_keys=normalize_keys,
        backend=backend_for(device),
    )


def blob_masks(batch, queries, height, width, device, empty_queries=3):
    """Masks shaped like a model's (thresholded upsampled logits: blobs, not noise), with the
    first ``empty_queries`` queries of every image empty."""
    logits = torch.randn(batch, queries, max(height // 8, 1), max(width // 8, 1), device=device)
    mask = F.interpolate(logits, size=(height, width), mode="bilinear") > 0.5
    mask[:, :empty_queries] = False
    return mask.flatten(2)


def assert_same_up_to_ties(keys, queries, mask, num_heads, indices, ref_indices, normalize_keys):
    """Indices equal to the reference's, or (different summation orders) pixels whose fp64 scores
    tie with the reference's choice within 1e-5 relative; chosen pixels are allowed ones."""
    scores = head_scores(keys, queries, num_heads, normalize_keys)  # [B, heads, HW, N]
    chosen = scores.gather(2, indices[:, :, None]).squeeze(2)
    expected = scores.gather(2, ref_indices[:, :, None]).squeeze(2)
    differ = indices != ref_indices
    scale = scores.abs().amax().item()
    gap = (chosen - expected).abs()[differ]
    assert gap.numel() == 0 or gap.max().item() < 1e-5 * scale, f"score gap {gap.max().item()}"
    assert differ.float().mean().item() < 0.01
    has_allowed = mask.any(-1)  # [B, N]
    allowed = mask[:, None].expand(-1, num_heads, -1, -1).transpose(2, 3)  # [B, heads, HW, N]
    picked_allowed = allowed.gather(2, indices[:, :, None]).squeeze(2)
    assert picked_allowed[has_allowed[:, None].expand_as(picked_allowed)].all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", [(2, 32, 64), (1, 128, 256)], ids=str)  # 2048, 32768 pixels
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_pem_sizes_match_reference(device, dtype, size, normalize_keys):
    """PEM's real problem (C = 256, 8 heads, 100 queries) at the paper's 2048 and 32768 pixels,
    model-like blob masks with empty queries: the kernel's splits, tiles and merges at scale."""
    batch, height, width = size
    keys, queries, _ = make_inputs(batch, height * width, 256, 100, device, dtype)
    mask = blob_masks(batch, 100, height, width, device)
    prototypes, indices = pem_kernels.prototype_select(
        keys, queries, mask, 8, normalize_keys=normalize_keys, backend=backend_for(device)
    )
    ref_prototypes, ref_indices = prototype_select_ref(
        keys.float(), queries.float(), mask, 8, normalize_keys=normalize_keys
    )
    assert_same_up_to_ties(keys, queries, mask, 8, indices, ref_indices, normalize_keys)
    gathered, _ = gather_at(keys.float(), indices, 8, normalize_keys)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(prototypes.float(), gathered, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_normalized_parallel_keys_tie_to_the_lowest_pixel(device, dtype):
    """With one channel every key normalizes to exactly +1 or -1 (sqrt(k * k) == |k|), so the
    normalized scores of all keys of a sign tie exactly and the lowest allowed pixel of that sign
    wins, as in the reference. (The kernel must normalize the keys before the product: dividing
    the scores k * q by |k| afterwards rounds them apart.)"""
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 700, 1, generator=generator, dtype=dtype)
    queries = torch.randn(2, 9, 1, generator=generator, dtype=dtype)
    mask = torch.rand(2, 9, 700, generator=generator) < 0.5
    keys, queries, mask = keys.to(device), queries.to(device), mask.to(device)
    _, indices = pem_kernels.prototype_select(
        keys, queries, mask, 1, normalize_keys=True, backend=backend_for(device)
    )
    _, ref_indices = prototype_select_ref(keys, queries, mask, 1, normalize_keys=True)
    same_sign = (keys[:, None, :, 0] > 0) == (queries[:, :, None, 0] > 0)  # [B, N, HW]
    candidates = torch.where(same_sign & mask, torch.arange(700, device=device), 700)
    expected = candidates.min(-1).values
    assert torch.equal(ref_indices[:, 0], expected)
    assert torch.equal(indices[:, 0], expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_no_mask_selects_over_all_pixels(device, normalize_keys):
    keys, query, _ = make_inputs(2, 700, 32, 6, device)
    assert_matches_reference(
        keys, query, None, 4, empty="per_query", normalize_keys=normalize_keys,
        backend=backend_for(device),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("empty", ["per_query", "official"])
def test_single_empty_query(device, empty):
    keys, query, mask = make_inputs(2, 300, 32, 5, device)
    mask[0, 2] = False
    _, indices = assert_matches_reference(
        keys, query, mask, 4, empty=empty, normalize_keys=False, backend=backend_for(device)
    )
    scores = head_scores(keys, query, 4, False)
    if empty == "official":
        assert (indices[0, :, 2] == 0).all()  # the official code's argmax over an all -inf row
    else:
        assert torch.equal(indices[0, :, 2], scores[0, :, :, 2].argmax(dim=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("empty", ["per_query", "official"])
@pytest.mark.parametrize("pixels, normalize_keys", [(300, False), (1500, True)])
def test_all_queries_of_an_image_empty(device, empty, pixels, normalize_keys):
    keys, query, mask = make_inputs(2, pixels, 32, 5, device)
    mask[1] = False
    if pixels > 1000:
        # Several pixel tiles; the unmasked selection also follows the NaN rule (first NaN wins).
        keys[1, 1200, :8] = float("nan")
        keys[1, 1300, :8] = float("nan")
    _, indices = assert_matches_reference(
        keys, query, mask, 4, empty=empty, normalize_keys=normalize_keys,
        backend=backend_for(device),
    )
    # Both conventions unmask the whole image when all its queries are empty.
    scores = head_scores(keys, query, 4, normalize_keys)
    assert torch.equal(indices[1], scores[1].argmax(dim=1))
    if pixels > 1000:
        assert (indices[1, 0] == 1200).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lowest_index(device):
    keys, query, mask = make_inputs(1, 900, 16, 4, device)
    keys[0, 300:600] = keys[0, :300]  # every score appears at p, p + 300 and p + 600
    keys[0, 600:] = keys[0, :300]
    mask[:] = True
    mask[0, 1, :600] = False  # query 1 may only use the copies
    _, indices = assert_matches_reference(
        keys, query, mask, 2, empty="per_query", normalize_keys=False, backend=backend_for(device)
    )
    assert (indices[0, :, [0, 2, 3]] < 300).all()
    assert (indices[0, :, 1] >= 600).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    keys = torch.randn(2, 64, 600, device=device).transpose(1, 2)  # [B, HW, C], strided
    query = torch.randn(2, 9, 128, device=device)[:, ::2, ::2]  # [B, 5, 64], strided
    mask = (torch.rand(2, 600, 5, device=device) < 0.3).transpose(1, 2)
    assert not keys.is_contiguous() and not query.is_contiguous() and not mask.is_contiguous()
    for normalize_keys in (False, True):
        assert_matches_reference(
            keys, query, mask, 4, empty="per_query", normalize_keys=normalize_keys,
            backend=backend_for(device),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_follow_torch_argmax(device):
    """NaN scores count as larger than any number (first NaN wins); a blocked NaN is ignored;
    a query whose allowed pixels all score -inf takes its first allowed pixel."""
    keys, query, mask = make_inputs(1, 200, 8, 4, device, torch.float64)
    mask[:] = False
    mask[0, 0, [10, 50, 90]] = True
    keys[0, 50, :4] = float("nan")  # head 0 of pixel 50 scores NaN
    mask[0, 1, :] = True
    keys[0, 120, :4] = float("nan")
    mask[0, 1, 120] = False  # query 1: the NaN pixel is blocked
    mask[0, 2, [30, 31]] = True
    query[0, 2] = 0.0
    keys[0, 30] = float("-inf")
    keys[0, 31] = float("-inf")
    query[0, 2] = 1.0  # query 2 scores -inf at both of its allowed pixels
    mask[0, 3, 5] = True
    _, indices = assert_matches_reference(
        keys, query, mask, 2, empty="per_query", normalize_keys=False, backend=backend_for(device)
    )
    assert indices[0, 0, 0] == 50
    assert indices[0, 0, 1] != 120
    assert (indices[0, :, 2] == 30).all()
    assert (indices[0, :, 3] == 5).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batch_zero_and_no_queries(device):
    for batch, queries in [(0, 4), (2, 0)]:
        keys, query, mask = make_inputs(batch, 50, 16, queries, device)
        prototypes, indices = pem_kernels.prototype_select(keys, query, mask, 4,
                                                           backend=backend_for(device))
        assert prototypes.shape == (batch, queries, 16) and indices.shape == (batch, 4, queries)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("empty", ["per_query", "official"])
def test_zero_channels(device, with_mask, empty):
    """C = 0: every score is 0, so each query takes its first allowed pixel (or the empty
    rule's)."""
    keys, query, mask = make_inputs(2, 9, 0, 3, device)
    mask[0, 1] = False
    for normalize_keys in (False, True):
        assert_matches_reference(
            keys, query, mask if with_mask else None, 2, empty=empty,
            normalize_keys=normalize_keys, backend=backend_for(device),
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_backward_matches_reference(device, dtype, normalize_keys):
    keys, query, mask = make_inputs(2, 300, 32, 12, device, dtype, density=0.02)
    keys.requires_grad_(True)
    grad_out = torch.randn(2, 12, 32, device=device, dtype=dtype)
    prototypes, indices = pem_kernels.prototype_select(
        keys, query, mask, 4, normalize_keys=normalize_keys, backend=backend_for(device)
    )
    (grad,) = torch.autograd.grad(prototypes, keys, grad_out)
    # Reference gradient through the same indices, in fp64.
    keys64 = keys.detach().double().requires_grad_(True)
    gathered, _ = gather_at(keys64, indices, 4, normalize_keys)
    (expected,) = torch.autograd.grad(gathered, keys64, grad_out.double())
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(grad.double(), expected, rtol=tol, atol=tol)
    selected = torch.zeros(2, 300, dtype=torch.bool, device=device)
    selected.scatter_(1, indices.flatten(1), True)
    assert grad[~selected].abs().max() == 0  # gradient only at selected pixels
    # Deterministic: the same call gives bit-identical gradients.
    prototypes2, _ = pem_kernels.prototype_select(
        keys, query, mask, 4, normalize_keys=normalize_keys, backend=backend_for(device)
    )
    (grad2,) = torch.autograd.grad(prototypes2, keys, grad_out)
    assert torch.equal(grad, grad2)


def check_normalized_gradient_of_nan_and_zero_keys(device, backend):
    """With normalize_keys, the gradient at a selected NaN key row is NaN and at a selected zero
    row g / eps (F.normalize's clamp: no gradient through the norm), as autograd gives."""
    keys, query, mask = make_inputs(1, 40, 8, 3, device, torch.float32)
    keys[0, 3] = float("nan")
    keys[0, 5] = 0.0
    mask[:] = False
    mask[0, 0, 3] = True  # query 0 may only take the NaN row, query 1 only the zero row
    mask[0, 1, 5] = True
    mask[0, 2, 10:20] = True
    keys.requires_grad_(True)
    prototypes, indices = pem_kernels.prototype_select(
        keys, query, mask, 2, normalize_keys=True, backend=backend
    )
    assert (indices[0, :, 0] == 3).all() and (indices[0, :, 1] == 5).all()
    grad_out = torch.randn_like(prototypes)
    (grad,) = torch.autograd.grad(prototypes, keys, grad_out)
    keys64 = keys.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(gather_at(keys64, indices, 2, True)[0], keys64,
                                      grad_out.double())
    assert grad[0, 3].isnan().all() and expected[0, 3].isnan().all()
    assert grad[0, 5].abs().max() > 1e6  # g / 1e-12
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_normalized_gradient_of_nan_and_zero_keys(device):
    check_normalized_gradient_of_nan_and_zero_keys(device, backend_for(device))


@pytest.mark.parametrize("device", DEVICES)
def test_several_queries_selecting_one_pixel_accumulate(device):
    keys = torch.randn(1, 40, 8, device=device, dtype=torch.float64)
    keys[0, 7] = 10.0  # pixel 7 wins for every positive query
    query = torch.rand(1, 6, 8, device=device, dtype=torch.float64) + 0.1
    keys.requires_grad_(True)
    prototypes, indices = pem_kernels.prototype_select(keys, query, None, 2,
                                                       backend=backend_for(device))
    assert (indices == 7).all()
    grad_out = torch.randn_like(prototypes)
    (grad,) = torch.autograd.grad(prototypes, keys, grad_out)
    torch.testing.assert_close(grad[0, 7], grad_out[0].sum(0))
    assert grad[0, torch.arange(40, device=device) != 7].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize_keys", [False, True])
@pytest.mark.parametrize("empty", ["per_query", "official"])
def test_gradcheck(device, normalize_keys, empty):
    keys, query, mask = make_inputs(2, 20, 8, 3, device, torch.float64, density=0.4)
    mask[0, 1] = False
    keys.requires_grad_(True)

    def select(k):
        return pem_kernels.prototype_select(
            k, query, mask, 2, empty=empty, normalize_keys=normalize_keys,
            backend=backend_for(device),
        )[0]

    assert torch.autograd.gradcheck(select, (keys,), eps=1e-6, atol=1e-6)


def opcheck_samples(device):
    samples = []
    for requires_grad in (False, True):
        for normalize_keys in (False, True):
            keys, query, mask = make_inputs(2, 40, 16, 3, device, torch.float32)
            keys.requires_grad_(requires_grad)
            samples.append((keys, query, mask, 4, False, normalize_keys))
    keys, query, _ = make_inputs(1, 33, 8, 2, device, torch.float64)
    samples.append((keys, query, None, 2, True, False))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in opcheck_samples(device):
        torch.library.opcheck(torch.ops.pem_kernels.prototype_select.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device):
    keys, query, mask = make_inputs(2, 40, 16, 3, device)
    _, indices = pem_kernels.prototype_select(keys, query, mask, 4, backend=backend_for(device))
    grad = torch.randn(2, 3, 16, device=device)
    for normalize_keys in (False, True):
        torch.library.opcheck(
            torch.ops.pem_kernels._prototype_select_backward.default,
            (grad, keys, indices, normalize_keys),
        )


@pytest.mark.parametrize("normalize_keys", [False, True])
def test_backward_op_rejects_out_of_range_indices_on_cpu(normalize_keys):
    keys, grad = torch.randn(1, 10, 8), torch.randn(1, 2, 8)
    for bad in (10, -1):
        indices = torch.tensor([[[3, bad]]])
        with pytest.raises(RuntimeError, match=f"index {bad} out of range \\[0, 10\\)"):
            torch.ops.pem_kernels._prototype_select_backward(grad, keys, indices, normalize_keys)


@requires_cuda
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_backward_op_stops_on_out_of_range_indices_on_cuda(normalize_keys):
    """A bad index stops the CUDA kernel with a device-side assert (never a write out of bounds);
    the assert poisons the CUDA context, so the call runs in a child process."""
    code = (
        "import torch, pem_kernels\n"
        "keys, grad = torch.randn(1, 10, 8, device='cuda'), torch.randn(1, 2, 8, device='cuda')\n"
        "indices = torch.tensor([[[3, 10]]], device='cuda')\n"
        "try:\n"
        "    torch.ops.pem_kernels._prototype_select_backward("
        f"grad, keys, indices, {normalize_keys})\n"
        "    torch.cuda.synchronize()\n"
        "except RuntimeError as error:\n"
        "    print('raised:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert "device-side assert" in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    keys, query, mask = make_inputs(2, 200, 32, 5, device)
    keys.requires_grad_(True)

    def step(k, q, m):
        prototypes, indices = pem_kernels.prototype_select(
            k, q, m, 4, normalize_keys=True, backend=backend_for(device)
        )
        return (prototypes * 2).sum(), indices

    compiled = torch.compile(step, fullgraph=True,
                             backend="aot_eager" if device == "cpu" else "inductor")
    loss, indices = compiled(keys, query, mask)
    expected_loss, expected_indices = step(keys, query, mask)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(loss, expected_loss)
    (grad,) = torch.autograd.grad(loss, keys)
    (expected_grad,) = torch.autograd.grad(expected_loss, keys)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda k, q, m: (k[0], q, m, 4), "keys"),
        (lambda k, q, m: (k, q[:, :, :8], m, 4), "queries"),
        (lambda k, q, m: (k, q.double(), m, 4), "queries"),
        (lambda k, q, m: (k.int(), q.int(), m, 4), "keys"),
        (lambda k, q, m: (k, q, m, 3), "num_heads"),
        (lambda k, q, m: (k, q, m, 0), "num_heads"),
        (lambda k, q, m: (k, q, m.int(), 4), "mask"),
        (lambda k, q, m: (k, q, m[:, :, :-1], 4), "mask"),
        (lambda k, q, m: (k, q.to("meta"), m, 4), "queries"),
        (lambda k, q, m: (k, q, m.to("meta"), 4), "mask"),
        (lambda k, q, m: (k[:, :0], q, m[:, :, :0], 4), "keys"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input_names_the_argument(make_args, match, backend):
    keys, query, mask = make_inputs(2, 30, 16, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        pem_kernels.prototype_select(*make_args(keys, query, mask), backend=backend)


def test_bad_empty_rule_and_backend():
    keys, query, mask = make_inputs(1, 30, 16, 3)
    with pytest.raises(ValueError, match="empty"):
        pem_kernels.prototype_select(keys, query, mask, 4, empty="mask2former")
    with pytest.raises(ValueError, match="backend"):
        pem_kernels.prototype_select(keys, query, mask, 4, backend="fast")
    with pytest.raises(pem_kernels.BackendUnavailableError, match="triton"):
        pem_kernels.prototype_select(keys.double(), query.double(), mask, 4, backend="triton")
    if not HAS_CUDA:
        with pytest.raises(pem_kernels.BackendUnavailableError, match="cuda"):
            pem_kernels.prototype_select(keys, query, mask, 4, backend="cuda")


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(2, 30, 16), torch.randn(2, 3, 16), None, 5, False, False), "num_heads"),
        ((torch.randn(2, 30, 16), torch.randn(1, 3, 16), None, 4, False, False), "queries"),
        ((torch.randn(2, 30, 16), torch.randn(2, 3, 16), torch.ones(2, 3, 30).double(), 4, False,
          False),
         "mask"),
    ],
)
def test_registered_op_checks_its_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pem_kernels.prototype_select(*args)


def test_auto_backend_and_environment_override(monkeypatch):
    keys, query, mask = make_inputs(1, 30, 16, 3)
    assert "cpu" in pem_kernels.available_backends("prototype_select", "cpu")
    monkeypatch.setenv("PEM_KERNELS_BACKEND", "reference")
    ref = pem_kernels.prototype_select(keys, query, mask, 4)
    monkeypatch.setenv("PEM_KERNELS_BACKEND", "cpu")
    fused = pem_kernels.prototype_select(keys, query, mask, 4)
    assert torch.equal(ref[1], fused[1])
    monkeypatch.setenv("PEM_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PEM_KERNELS_BACKEND"):
        pem_kernels.prototype_select(keys, query, mask, 4)


def test_one_ops_environment_variable_overrides_the_global_one(monkeypatch):
    """PEM_KERNELS_BACKEND_<OP> moves one op, and only that one, off "auto" (a benchmark times
    the PEM-CA layer with one op on another kernel so); it wins over PEM_KERNELS_BACKEND."""
    from pem_kernels.ops.local_representation import PROJECTION_BACKENDS
    from pem_kernels.ops.prototype_attention import _BACKENDS as ATTENTION_BACKENDS
    from pem_kernels.ops.prototype_select import _BACKENDS

    cpu = torch.device("cpu")
    assert _BACKENDS.environment_variable == "PEM_KERNELS_BACKEND_PROTOTYPE_SELECT"
    assert PROJECTION_BACKENDS.environment_variable == "PEM_KERNELS_BACKEND_PEM_CA_PROJECTIONS"
    monkeypatch.setenv("PEM_KERNELS_BACKEND_PROTOTYPE_SELECT", "reference")
    assert _BACKENDS.resolve("auto", cpu, torch.float32) == "reference"
    assert ATTENTION_BACKENDS.resolve("auto", cpu, torch.float32) == "cpu"
    # An explicit backend is not overridden.
    assert _BACKENDS.resolve("cpu", cpu, torch.float32) == "cpu"
    monkeypatch.setenv("PEM_KERNELS_BACKEND", "cpu")
    assert _BACKENDS.resolve("auto", cpu, torch.float32) == "reference"
    monkeypatch.setenv("PEM_KERNELS_BACKEND", "reference")
    monkeypatch.setenv("PEM_KERNELS_BACKEND_PROTOTYPE_SELECT", "")  # empty: unset
    assert _BACKENDS.resolve("auto", cpu, torch.float32) == "reference"
    monkeypatch.delenv("PEM_KERNELS_BACKEND")
    monkeypatch.setenv("PEM_KERNELS_BACKEND_PROTOTYPE_SELECT", "fast")
    with pytest.raises(ValueError, match="PEM_KERNELS_BACKEND_PROTOTYPE_SELECT.*'fast'"):
        _BACKENDS.resolve("auto", cpu, torch.float32)
    # The op on the reference through it: the same selection as on the cpu kernel.
    monkeypatch.setenv("PEM_KERNELS_BACKEND_PROTOTYPE_SELECT", "reference")
    keys, query, mask = make_inputs(1, 30, 16, 3)
    moved = pem_kernels.prototype_select(keys, query, mask, 4)
    monkeypatch.delenv("PEM_KERNELS_BACKEND_PROTOTYPE_SELECT")
    assert torch.equal(moved[1], pem_kernels.prototype_select(keys, query, mask, 4)[1])


def test_auto_picks_triton_for_fp32_and_the_cuda_kernel_otherwise_on_cuda_tensors():
    """fp32 keys on a GPU go to the Triton kernel (the faster there, see the auto order), the
    other dtypes to the CUDA C++ one; each falls back in order when its kernel is missing."""
    from pem_kernels._extension import has_kernel
    from pem_kernels.ops.prototype_select import _BACKENDS

    cuda = torch.device("cuda")
    compiled = "cuda" if has_kernel("prototype_select", "CUDA") else "reference"
    for dtype in ALL_DTYPES:
        triton_runs = _BACKENDS.unavailable_reason("triton", cuda, dtype) is None
        expected = "triton" if dtype == torch.float32 and triton_runs else compiled
        assert _BACKENDS.resolve("auto", cuda, dtype) == expected


def test_a_dtype_specific_auto_order_takes_precedence_over_the_devices():
    from pem_kernels._backends import OpBackends

    missing = {"a"}
    backends = OpBackends(
        "toy",
        availability={name: (lambda name: lambda device, dtype: (
            "missing" if name in missing else None))(name) for name in ("a", "b", "c")},
        auto_order={"cuda": ("c",), ("cuda", torch.float32): ("a", "b", "c")},
    )
    cuda = torch.device("cuda")
    assert backends.resolve("auto", cuda, torch.float32) == "b"  # "a" is unavailable
    assert backends.resolve("auto", cuda, torch.float16) == "c"
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "reference"
    missing.update("bc")
    assert backends.resolve("auto", cuda, torch.float32) == "reference"


def test_import_without_extension_falls_back_to_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['pem_kernels._C'] = None\n"  # makes `from pem_kernels import _C` fail
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import pem_kernels, torch\n"
        "assert not pem_kernels.EXTENSION_LOADED\n"
        "assert sum('reference' in str(w.message) for w in caught) == 1, "
        "[str(w.message) for w in caught]\n"
        "k, q = torch.randn(1, 10, 8), torch.randn(1, 2, 8)\n"
        "p, i = pem_kernels.prototype_select(k, q, None, 2)\n"
        "assert pem_kernels.available_backends('prototype_select') == ['reference']\n"
        "print('fallback-ok', tuple(p.shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        | {"PYTHONWARNINGS": "default"},
    )
    assert result.returncode == 0, result.stderr
    assert "fallback-ok (1, 2, 8)" in result.stdout


def test_backend_choice_is_logged_once_at_debug_level(caplog, monkeypatch):
    from pem_kernels import _backends

    monkeypatch.setattr(_backends, "_logged_choices", set())
    keys, query, mask = make_inputs(1, 30, 16, 3)
    with caplog.at_level("DEBUG", logger="pem_kernels"):
        pem_kernels.prototype_select(keys, query, mask, 4, backend="reference")
        pem_kernels.prototype_select(keys, query, mask, 4, backend="reference")
    messages = [r.getMessage() for r in caplog.records if r.name == "pem_kernels"]
    assert messages == [
        "pem_kernels: prototype_select runs on the 'reference' backend for cpu tensors"
    ]


def check_all_scores_negative(device, backend: str) -> None:
    """Every score is negative (negative keys, positive queries): the least negative must win.
    The kernels order scores by integer keys made from the float bits, where negative floats
    order backwards unless their magnitude bits are flipped; the other tests mostly find their
    answer among positive scores."""
    keys, queries, mask = make_inputs(2, 300, 16, 5, device)
    keys, queries = -keys.abs() - 0.01, queries.abs() + 0.01
    # An empty query takes the unmasked argmax, where a kernel that scores the rows past the last
    # pixel tile (300 is no multiple of a tile) as zeros must not let them win.
    mask[0, 1] = False
    for normalize_keys in (False, True):
        for allowed in (None, mask):
            assert_matches_reference(keys, queries, allowed, 2, empty="per_query",
                                     normalize_keys=normalize_keys, backend=backend)


def check_official_rule_across_query_blocks(device, backend: str) -> None:
    """130 queries (more than one query block of the fused kernels) with only the last one
    allowed any pixel, in image 0; image 1 blocks everything. Under the official rule image 0's
    empty queries must see that allowed pixel in another block (-> pixel 0) and image 1 must be
    unmasked; under the per-query rule every empty query takes its unmasked argmax."""
    keys, queries, _ = make_inputs(2, 70, 16, 130, device)
    mask = torch.zeros(2, 130, 70, dtype=torch.bool, device=device)
    mask[0, 129, [5, 40, 66]] = True
    scores = head_scores(keys, queries, 2, False)  # [B, heads, HW, N]
    unmasked = scores.argmax(dim=2)  # [B, heads, N]
    for empty in ("official", "per_query"):
        _, indices = assert_matches_reference(keys, queries, mask, 2, empty=empty,
                                              normalize_keys=False, backend=backend)
        allowed_best = torch.tensor([5, 40, 66], device=device)[
            scores[0, :, [5, 40, 66], 129].argmax(dim=1)]
        assert torch.equal(indices[0, :, 129], allowed_best)
        assert torch.equal(indices[1], unmasked[1])
        if empty == "official":
            assert (indices[0, :, :129] == 0).all()
        else:
            assert torch.equal(indices[0, :, :129], unmasked[0, :, :129])


def check_mask_logits(device, backend: str) -> None:
    """Floating mask logits select exactly as the bool mask ``~(logits < 0)``: a negative logit
    blocks; 0.0, -0.0, positive logits and NaN allow; the smallest negative denormal blocks. In
    fp32, fp16 and bf16 (which the triton kernel reads itself) and fp64 (converted first)."""
    keys, queries, _ = make_inputs(2, 150, 32, 5, device)
    logits = torch.randn(2, 5, 150, device=device, dtype=torch.float64)
    logits[0, 0, :40] = float("nan")
    logits[0, 1] = -0.0
    logits[0, 2] = -1.0  # an empty query
    logits[1, 3] = -1.0
    logits[1, 3, ::7] = 0.0
    logits[1, 4] = -1.0
    logits[1, 4, 9] = -float.fromhex("0x1p-149")  # negative: blocked; only pixel 30 allows
    logits[1, 4, 30] = float("inf")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        mask_logits = logits.to(dtype)
        allowed = ~(mask_logits < 0)
        for empty in ("per_query", "official"):
            expected = pem_kernels.prototype_select(keys, queries, allowed, 4, empty=empty,
                                                    backend=backend)
            got = pem_kernels.prototype_select(keys, queries, mask_logits, 4, empty=empty,
                                               backend=backend)
            assert torch.equal(got[1], expected[1]), (dtype, empty)
            assert torch.equal(got[0], expected[0]), (dtype, empty)
    assert (got[1][1, :, 4] == 30).all()


def test_cpu_op_reads_fp32_mask_logits_and_names_the_dtypes_it_takes():
    """The C++ CPU op itself on fp32 logits (vector blocks of 32 pixels and the tail: 150 px),
    with NaN, -0.0 and an empty query; other logit dtypes are a clear error (the public op
    converts them)."""
    keys, queries, _ = make_inputs(2, 150, 32, 5)
    logits = torch.randn(2, 5, 150)
    logits[0, 0, :70] = float("nan")
    logits[0, 1] = -0.0
    logits[1, 2] = -1.0
    for official in (False, True):
        got = torch.ops.pem_kernels.prototype_select(keys, queries, logits, 4, official, True)
        expected = torch.ops.pem_kernels.prototype_select(keys, queries, ~(logits < 0), 4,
                                                          official, True)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
    with pytest.raises(RuntimeError, match=r"mask must be bool or mask logits \(Float\), got "
                                           r"dtype Half"):
        torch.ops.pem_kernels.prototype_select(keys, queries, logits.half(), 4, False, False)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_logits(device):
    check_mask_logits(device, backend_for(device))
    check_mask_logits(device, "reference")


@pytest.mark.parametrize("device", DEVICES)
def test_official_rule_across_query_blocks(device):
    check_official_rule_across_query_blocks(device, backend_for(device))


@pytest.mark.parametrize("device", DEVICES)
def test_all_scores_negative(device):
    check_all_scores_negative(device, backend_for(device))


def check_fp32_product_rules(device, backend: str, tf32_rounds: bool, monkeypatch) -> None:
    """Pixel 20's key is 1 + 2^-14 where pixel 10's is 1 (the query is all ones): exact products
    score 8 + 2^-11 against 8, so pixel 20 wins, as it must with 3xTF32 (the default of the
    tensor-core kernels) and IEEE products (PEM_KERNELS_FP32_DOT=ieee). Where torch allows TF32,
    a single TF32 product (``tf32_rounds``) rounds 1 + 2^-14 to 1 and the tie goes to pixel 10."""
    keys = torch.full((1, 70, 8), -1.0, device=device)
    keys[0, 10] = 1.0
    keys[0, 20] = 1.0 + 2.0**-14
    queries = torch.ones(1, 1, 8, device=device)

    def selected() -> int:
        return pem_kernels.prototype_select(keys, queries, None, 1, backend=backend)[1].item()

    assert selected() == 20
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert selected() == (10 if tf32_rounds else 20)
    finally:
        torch.set_float32_matmul_precision(previous)
    monkeypatch.setenv("PEM_KERNELS_FP32_DOT", "ieee")
    assert selected() == 20


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_products_follow_the_rules(device, monkeypatch):
    """:func:`check_fp32_product_rules`: the CUDA kernel's products are tensor-core products, the
    CPU kernel's stay IEEE."""
    backend = backend_for(device)
    check_fp32_product_rules(device, backend, backend == "cuda", monkeypatch)

