"""``prototype_select`` in Triton: a split-pixel tensor-core argmax, merged without atomics.

Semantics are those of :func:`pem_kernels.reference.prototype_select_ref`. The forward runs two
kernels (three with ``normalize_keys``) and fills no buffer; none of them materializes the
[B, heads, HW, N] similarity or normalized keys:

1. ``_key_norm_kernel`` (only with ``normalize_keys``): ``max(||keys[b, p, :]||, eps)`` per pixel,
   an fp32 vector of B*HW divisors, stored as their correctly rounded reciprocals (the keys
   themselves are never rewritten; the kernels below multiply by them).
2. ``_select_kernel``, grid ``(pixel splits, query blocks, B * heads)``. A program owns the queries
   ``[BLOCK_N]`` of one (image, head) and a contiguous range of pixel tiles. Per tile it computes
   the scores ``[BLOCK_P pixels, D] @ [D, BLOCK_N queries]`` on tensor cores (fp32 accumulation),
   turns each score into an order-preserving int32 key (NaN -> largest key, -0.0 -> +0.0) and
   keeps, per element of the tile, the best key so far and its tile, where an allowed pixel (a True
   byte of a bool mask, or a mask logit that is not < 0, read as is) beats every pixel the mask
   blocks and among equals a strict '>' keeps the earlier tile (the lower pixel). That one running
   argmax is the masked argmax of a query with an allowed pixel and the unmasked argmax, which an
   empty query falls back to, of one without: no second pass over the pixels. After the last tile
   each query's best is the max over the tile's rows of the int64
   ``blocked << 63 | (key + 2^31) << 31 | (INT32_MAX - pixel)`` (``blocked``: the pixel is masked
   out): a plain integer max ranks
   allowed pixels first, then larger scores, then, among equal scores, the lower pixel. Each
   program stores that per query into ``partials[split]`` (and, for the ``official`` rule, whether
   it saw an allowed pixel at all): every entry is written, so nothing is filled first.
3. ``_finalize_kernel``, one program per (image, query): the max over the splits' partials (max is
   associative and commutative: the result does not depend on program order, deterministic),
   the empty rule (``official`` with an allowed pixel somewhere in the image -> pixel 0 for an
   empty query), the indices, and the gather (and normalization) of the prototype rows of every
   head.

Backward (``_backward_kernel``, one program per (image, head * N + query)): the program holding the
first (head, query) slot of the image that selected a pixel sums, in a fixed order and in fp32, the
gradient of every slot that selected the same pixel, over all C channels, applies the L2-normalize
backward if needed (the normalization mixes every head's channels of the pixel) and writes the row.
Every other program writes nothing. There are no atomics, so gradients are bit-reproducible.

fp32, fp16 and bf16 are supported (fp32 scores are tensor-core products, 3xTF32 for fp32 accuracy
or TF32 where ``torch.get_float32_matmul_precision()`` allows it, as PyTorch's own matmuls:
:func:`pem_kernels.triton.fp32_dot_precision` and :mod:`pem_kernels.triton.products`; the queries'
TF32 split is made once per program). fp64 is not: the packed 32-bit score key cannot order fp64
scores exactly, so the backend reports it unavailable and dispatch falls back. Under the
interpreter (``TRITON_INTERPRET=1``, CPU tensors) half-precision dot operands are cast to fp32
first (the interpreter's bf16 ``tl.dot`` is wrong), and fp32 products are the tensor cores' (the
products module emulates TF32 there).
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from pem_kernels.ops.prototype_select import MASK_LOGIT_DTYPES, autograd_functions
from pem_kernels.triton import (
    block_size,
    call_triton_op,
    cdiv,
    check,
    dot_operands,
    launcher,
    pem_triton_op,
)
from pem_kernels.triton.products import dot_3xtf32, dot_product, split_tf32

__all__ = ["prototype_select_triton", "prototype_select_backward_triton", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Decided when the kernels are defined: triton.jit picks interpreter or compiler at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_INT64_MIN = -(2**63)
_MAX_PIXELS = 2**31 - 1  # pixel indices are packed in the low 31 bits of the merge key
_KEY_NORM_EPS = 1e-12  # F.normalize's eps: keys are divided by max(||k||, eps)

# Constants the kernels read (Triton kernels may only read globals that are tl.constexpr objects;
# in the interpreter such a constant must not be the left operand of an arithmetic operator).
INT32_MIN = tl.constexpr(-(2**31))
INT32_MAX = tl.constexpr(2**31 - 1)
INT64_MIN = tl.constexpr(_INT64_MIN)
KEY_OFFSET = tl.constexpr(2**31)  # int32 key + 2^31: the key's order as a non-negative int64
KEY_NORM_EPS = tl.constexpr(_KEY_NORM_EPS)

# Test and tuning hooks: force the number of pixel splits of the select kernel, and its
# (BLOCK_P, num_warps) (None: chosen per device and precision).
_SPLITS_OVERRIDE: Optional[int] = None
_TILE_OVERRIDE: Optional[tuple[int, int]] = None


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _order_key(scores):
    """int32 keys whose signed order is the order torch.argmax uses for the fp32 ``scores``.

    Non-negative floats keep their bits, negative ones get their magnitude bits flipped; -0.0 is
    folded into +0.0 (equal scores must tie) and every NaN maps to the largest key. INT32_MIN,
    below the key of -inf (0x807FFFFF), is left for "no pixel".
    """
    scores = scores + 0.0  # -0.0 + 0.0 is +0.0 when rounding to nearest; all else is unchanged
    bits = scores.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & INT32_MAX)  # negative: flip the magnitude bits (>> is arithmetic)
    return tl.where(scores != scores, INT32_MAX, key)


@triton.jit
def _key_norm_kernel(
    keys_ptr, inverse_ptr, rows, pixels, channels,
    stride_kb, stride_kp, stride_kc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """inverse[b * HW + p] = 1 / max(||keys[b, p, :]||_2, eps) in fp32 (rounded once): the
    kernels multiply by it (the key tiles, see :func:`_normalized`, or the scores), a multiply
    instead of a division (a slow-path call each), which differs from dividing by at most an
    ulp."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    base = (row // pixels) * stride_kb + (row % pixels) * stride_kp
    sum_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (offs_c < channels)[None, :]
        v = tl.load(keys_ptr + base[:, None] + offs_c[None, :] * stride_kc, mask=ok, other=0.0)
        v = v.to(tl.float32)
        sum_sq += tl.sum(v * v, axis=1)
    norm = tl.sqrt_rn(sum_sq)
    # where, not tl.maximum: a NaN norm must stay NaN (F.normalize), fmax would return eps
    divisor = tl.where(norm < KEY_NORM_EPS, KEY_NORM_EPS, norm)
    tl.store(inverse_ptr + row, tl.div_rn(tl.zeros_like(divisor) + 1.0, divisor), mask=row_ok)


@triton.jit
def _mask_tile(
    mask_rows, stride_mp, n_ok, tile, tile_end, pixels, BLOCK_P: tl.constexpr,
    MASK_LOGITS: tl.constexpr,
):
    """The mask values [BLOCK_P pixels, BLOCK_N queries] of pixel tile ``tile`` (``mask_rows``: the
    queries' rows of the image), as loaded (see :func:`_allowed`); blocking values, without a
    memory access, where a pixel or ``tile`` is past the program's range."""
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = ((offs_p < pixels) & (tile < tile_end))[:, None] & n_ok[None, :]
    pointers = mask_rows + offs_p.to(tl.int64)[:, None] * stride_mp
    if MASK_LOGITS:
        return tl.load(pointers, mask=ok, other=-1.0)
    return tl.load(pointers, mask=ok, other=0)


@triton.jit
def _allowed(values, MASK_LOGITS: tl.constexpr):
    """Which pixels mask ``values`` allow: True in a bool mask, or a logit that is not < 0 (NaN
    included: the official code blocks ``logit < 0``). Applied where the values are used, not
    where they are loaded a tile ahead: holding the loaded values costs fewer instructions (992
    vs 1255 per tile in fp32 3xTF32 on sm_90)."""
    if MASK_LOGITS:
        return ~(values < 0)
    return values != 0


@triton.jit
def _normalized(keys, inverse):
    """The fp32 key tile [BLOCK_P, channels] times its pixels' inverse norms: what the reference
    multiplies (F.normalize's keys), up to an ulp of the rounded reciprocal.

    fp32 tensor-core products scale the keys before the product (SCALE_KEYS; a quarter of the
    multiplies of scaling the scores after it: 32 channels vs 128 queries per pixel); on sm_90
    that removed the 44-byte spill of fp32 3xTF32 with mask logits (1130 -> 1120 instructions per
    tile) and cut TF32 from 707 to 652. The others scale the scores: IEEE products' operands go
    through shared memory for the FMA layout, where scaled keys took two more barriers per tile
    and spilled 8 bytes; and bf16/fp16 keys scaled before their product would be rounded to
    their dtype, 2^-9 relative for bf16, which moved PEM-size argmaxes on an H200 by score gaps
    of 1e-3 relative (the CUDA and CPU kernels keep divided keys in fp32)."""
    return keys * inverse[:, None]


@triton.jit
def _select_kernel(
    keys_ptr, queries_ptr, mask_ptr, inverse_ptr, partials_ptr, allowed_seen_ptr,
    pixels, num_queries, head_dim, num_heads, tiles_per_split, slots,
    stride_kb, stride_kp, stride_kc,
    stride_qb, stride_qn, stride_qc,
    stride_mb, stride_mn, stride_mp,
    HAS_MASK: tl.constexpr, MASK_LOGITS: tl.constexpr, NORMALIZE: tl.constexpr,
    OFFICIAL: tl.constexpr, INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCALE_KEYS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
):
    """The allowed-first argmax of one pixel range for ``BLOCK_N`` queries of one (image, head).

    Stores the packed best (module docstring) of every query to ``partials[split, b, head, n]``
    (``slots`` = B * heads * N entries per split) and, with a mask and the official rule, whether
    any of its pixels was allowed for any of its queries to ``allowed_seen[b, head, query block,
    split]``. When the head fits one chunk (``BLOCK_DC == BLOCK_D``, PEM's 32 channels) the query
    block is loaded (and split for 3xTF32) once and every tile is one product; wider heads are
    scored ``BLOCK_DC`` channels at a time with the query chunks reloaded per tile (from L1/L2),
    so shared memory stays bounded whatever the head size.
    """
    split = tl.program_id(0)
    query_block = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    row_start = bh.to(tl.int64) * num_queries  # of a [B, heads, N] slot array

    offs_n = query_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < num_queries
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    channel = h * head_dim + offs_d

    num_tiles = tl.cdiv(pixels, BLOCK_P)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    query_base = queries_ptr + b * stride_qb + offs_n[None, :] * stride_qn
    if BLOCK_DC == BLOCK_D:
        q = tl.load(
            query_base + channel[:, None] * stride_qc, mask=d_ok[:, None] & n_ok[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        if INTERPRETED:
            q = q.to(tl.float32)
        if DOT_PRECISION == "tf32x3":
            q_big, q_small = split_tf32(q)  # once: the queries are the same for every tile

    # Per score slot (row of the tile, query): the best key so far and the tile it came from,
    # stored as ``tile`` for an allowed pixel and ``~tile`` (negative) for a blocked one. Updated
    # element-wise; the rows are reduced once after the loop. (Reducing them per tile took two
    # cross-warp reductions, with their barriers, per tile.) Start: a blocked "pixel" of key
    # INT32_MIN, which every real pixel beats.
    best_key = tl.full([BLOCK_P, BLOCK_N], INT32_MIN, dtype=tl.int32)
    best_tile = tl.full([BLOCK_P, BLOCK_N], -1, dtype=tl.int32)
    if HAS_MASK and BLOCK_DC == BLOCK_D:
        mask_rows = mask_ptr + b * stride_mb + offs_n.to(tl.int64)[None, :] * stride_mn
        next_mask = _mask_tile(
            mask_rows, stride_mp, n_ok, tile_begin, tile_end, pixels, BLOCK_P, MASK_LOGITS
        )
    for tile in range(tile_begin, tile_end):
        offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < pixels
        if HAS_MASK and BLOCK_DC == BLOCK_D:
            # The next tile's mask is loaded one tile ahead: the key tiles are pipelined by the
            # compiler (they feed the dot), these plain loads would stall every tile. (Not for
            # wide heads, whose chunked tiles are long enough and short of registers: with the
            # prefetch fp32 spilled 0.9 KB per thread on sm_90, without it 0.5.)
            m = next_mask
            next_mask = _mask_tile(
                mask_rows, stride_mp, n_ok, tile + 1, tile_end, pixels, BLOCK_P, MASK_LOGITS
            )
        key_rows = keys_ptr + b * stride_kb + offs_p.to(tl.int64)[:, None] * stride_kp
        if SCALE_KEYS:
            inverse = tl.load(inverse_ptr + b * pixels + offs_p, mask=p_ok, other=1.0)
        if BLOCK_DC == BLOCK_D:
            k = tl.load(
                key_rows + channel[None, :] * stride_kc, mask=p_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # [BLOCK_P, BLOCK_D]
            if SCALE_KEYS:
                k = _normalized(k, inverse)
            if INTERPRETED:
                k = k.to(tl.float32)
            if DOT_PRECISION == "tf32x3":
                k_big, k_small = split_tf32(k)
                scores = dot_3xtf32(k_big, k_small, q_big, q_small)  # [BLOCK_P, BLOCK_N] fp32
            else:
                scores = dot_product(k, q, k.dtype, DOT_PRECISION)
        else:
            scores = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, BLOCK_D, BLOCK_DC):
                offs_dc = d0 + tl.arange(0, BLOCK_DC)
                dc_ok = offs_dc < head_dim
                channel_c = h * head_dim + offs_dc
                k = tl.load(
                    key_rows + channel_c[None, :] * stride_kc, mask=p_ok[:, None] & dc_ok[None, :],
                    other=0.0,
                )  # [BLOCK_P, BLOCK_DC]
                q = tl.load(
                    query_base + channel_c[:, None] * stride_qc,
                    mask=dc_ok[:, None] & n_ok[None, :], other=0.0,
                )  # [BLOCK_DC, BLOCK_N]
                if SCALE_KEYS:
                    k = _normalized(k, inverse)
                if INTERPRETED:
                    k = k.to(tl.float32)
                    q = q.to(tl.float32)
                scores += dot_product(k, q, k.dtype, DOT_PRECISION)
        if NORMALIZE and not SCALE_KEYS:
            inverse = tl.load(inverse_ptr + b * pixels + offs_p, mask=p_ok, other=1.0)
            scores = scores * inverse[:, None]
        # Rows past the image never win: INT32_MIN beats nothing, not even the start.
        key = tl.where(p_ok[:, None], _order_key(scores), INT32_MIN)
        if HAS_MASK:
            if BLOCK_DC != BLOCK_D:
                mask_rows = mask_ptr + b * stride_mb + offs_n.to(tl.int64)[None, :] * stride_mn
                m = _mask_tile(
                    mask_rows, stride_mp, n_ok, tile, tile_end, pixels, BLOCK_P, MASK_LOGITS
                )
            allowed = _allowed(m, MASK_LOGITS)
            # allowed beats blocked; between two allowed or two blocked pixels the larger key
            better = tl.where(allowed == (best_tile >= 0), key > best_key, allowed)
            best_tile = tl.where(better, tl.where(allowed, tile, ~tile), best_tile)
        else:
            better = key > best_key
            best_tile = tl.where(better, tile, best_tile)
        best_key = tl.where(better, key, best_key)
    allowed_best = best_tile >= 0
    pixel = tl.where(allowed_best, best_tile, ~best_tile) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    packed = ((best_key.to(tl.int64) + KEY_OFFSET) << 31) | (pixel ^ INT32_MAX).to(tl.int64)
    if HAS_MASK:
        packed = tl.where(allowed_best, packed, packed | INT64_MIN)
    running = tl.max(packed, axis=0)  # [BLOCK_N]
    tl.store(partials_ptr + split * slots + row_start + offs_n, running, mask=n_ok)
    if HAS_MASK and OFFICIAL:
        seen = tl.max(tl.where(n_ok & (running >= 0), 1, 0), axis=0)
        splits = tl.num_programs(0)
        tl.store(allowed_seen_ptr + (bh * tl.num_programs(1) + query_block) * splits + split, seen)


@triton.jit
def _finalize_kernel(
    keys_ptr, inverse_ptr, partials_ptr, allowed_seen_ptr, indices_ptr, prototypes_ptr,
    pixels, num_queries, head_dim, num_heads, splits, slots, seen_per_head,
    stride_kb, stride_kp, stride_kc,
    HAS_MASK: tl.constexpr, OFFICIAL: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Per (b, n): the splits' merge, the empty-mask rule, indices[b, :, n] and prototypes[b, n, :].
    ``seen_per_head``: entries of ``allowed_seen`` per (image, head), query blocks x splits."""
    pid = tl.program_id(0)
    b = (pid // num_queries).to(tl.int64)
    n = pid % num_queries
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < num_heads
    slot = (b * num_heads + offs_h) * num_queries + n  # into [B, heads, N]
    best = tl.full([BLOCK_H], INT64_MIN, dtype=tl.int64)
    for s0 in range(0, splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        partial = tl.load(
            partials_ptr + offs_s.to(tl.int64)[None, :] * slots + slot[:, None],
            mask=h_ok[:, None] & (offs_s < splits)[None, :], other=INT64_MIN,
        )
        best = tl.maximum(best, tl.max(partial, axis=1))
    index = (best & INT32_MAX) ^ INT32_MAX  # = INT32_MAX - low bits
    if HAS_MASK and OFFICIAL:
        # An empty query (no allowed pixel: best < 0, the same for every head) gets pixel 0 unless
        # no query of the image has an allowed pixel; then, as under the per-query rule, the
        # unmasked argmax that ``best`` holds.
        seen = 0
        image_seen = allowed_seen_ptr + b * num_heads * seen_per_head  # head 0 of image b
        for f0 in range(0, seen_per_head, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            flags = tl.load(image_seen + offs_f, mask=offs_f < seen_per_head, other=0)
            seen = tl.maximum(seen, tl.max(flags, axis=0))
        index = tl.where((best < 0) & (seen > 0), 0, index)
    tl.store(indices_ptr + slot, index, mask=h_ok)

    offs_d = tl.arange(0, BLOCK_D)
    # (index < pixels always holds; the guard keeps a broken merge from reading out of bounds)
    ok = (h_ok & (index < pixels))[:, None] & (offs_d < head_dim)[None, :]
    channel = offs_h[:, None] * head_dim + offs_d[None, :]  # [BLOCK_H, BLOCK_D]
    key_rows = keys_ptr + b * stride_kb + index[:, None] * stride_kp
    value = tl.load(key_rows + channel * stride_kc, mask=ok, other=0.0).to(tl.float32)
    if NORMALIZE:
        inverse = tl.load(inverse_ptr + b * pixels + index, mask=h_ok & (index < pixels), other=1.0)
        value = value * inverse[:, None]
    out = prototypes_ptr + (b * num_queries + n) * (num_heads * head_dim) + channel
    tl.store(out, value.to(prototypes_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(
    grad_ptr, keys_ptr, indices_ptr, grad_keys_ptr,
    pixels, num_queries, channels, head_dim, num_heads,
    stride_gb, stride_gn, stride_gc,
    stride_kb, stride_kp, stride_kc,
    stride_ib, stride_ih, stride_in,
    NORMALIZE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (slot = head * N + query, b) writes grad_keys[b, pixel, :] if its slot is the first
    of image b (in slot order) that selected ``pixel``; the sum over slots runs in a fixed order."""
    slot = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    slots = num_heads * num_queries
    index_base = indices_ptr + b * stride_ib
    head, query = slot // num_queries, slot % num_queries
    pixel = tl.load(index_base + head * stride_ih + query * stride_in)

    first = slot
    for s0 in range(0, slots, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < slots
        other = tl.load(
            index_base + (offs_s // num_queries) * stride_ih + (offs_s % num_queries) * stride_in,
            mask=s_ok, other=-1,
        )
        first = tl.minimum(first, tl.min(tl.where(s_ok & (other == pixel), offs_s, slots), axis=0))

    if (first == slot) & (pixel >= 0) & (pixel < pixels):
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < channels
        head_of_c = offs_c // head_dim
        grad = tl.zeros([BLOCK_C], dtype=tl.float32)
        for n0 in range(0, num_queries, BLOCK_NB):
            offs_n = n0 + tl.arange(0, BLOCK_NB)
            ok = (offs_n < num_queries)[:, None] & c_ok[None, :]
            chosen = tl.load(
                index_base + head_of_c[None, :] * stride_ih + offs_n[:, None] * stride_in,
                mask=ok, other=-1,
            )  # [BLOCK_NB, BLOCK_C]: the pixel query n selected for channel c's head
            g = tl.load(
                grad_ptr + b * stride_gb + offs_n[:, None] * stride_gn
                + offs_c[None, :] * stride_gc,
                mask=ok & (chosen == pixel), other=0.0,
            )
            grad += tl.sum(g.to(tl.float32), axis=0)
        if NORMALIZE:
            # d(k / max(||k||, eps)) = (g - k (k.g) / ||k||^2) / ||k||, or g / eps if ||k|| <= eps
            key_row = keys_ptr + b * stride_kb + pixel * stride_kp
            key = tl.load(key_row + offs_c * stride_kc, mask=c_ok, other=0.0).to(tl.float32)
            norm = tl.sqrt_rn(tl.sum(key * key, axis=0))
            # clamp_min passes no gradient to the norm at norm <= eps; a NaN norm takes the full
            # formula (NaN, as autograd), hence where and <=, not tl.maximum and >
            safe_norm = tl.where(norm < KEY_NORM_EPS, KEY_NORM_EPS, norm)
            projection = tl.div_rn(tl.sum(key * grad, axis=0), safe_norm * safe_norm)
            grad = tl.where(
                norm <= KEY_NORM_EPS,
                tl.div_rn(grad, tl.zeros_like(grad) + KEY_NORM_EPS),
                tl.div_rn(grad - key * projection, safe_norm),
            )
        out = grad_keys_ptr + (b * pixels + pixel) * channels + offs_c
        tl.store(out, grad.to(grad_keys_ptr.dtype.element_ty), mask=c_ok)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _select_config(
    device: torch.device, batch_heads: int, pixels: int, queries: int, head_dim: int,
    precision: str,
):
    """(BLOCK_P, BLOCK_N, BLOCK_D, BLOCK_DC, tiles_per_split, splits, query_blocks, num_warps) of
    the select kernel for products of ``precision`` (its DOT_PRECISION). The splits are tuned
    on the H200 (below); the tiles have candidates in ``tune select_tiles``, not yet timed."""
    block_n = block_size(queries, 16, 128)  # tl.dot needs every dimension >= 16
    block_d = block_size(head_dim, 16)
    # Heads up to 128 channels in one chunk; wider ones in chunks of 32 (an fp32 [256, 128]
    # query block alone would take 128 KiB of shared memory, and the pipeline stages more; with
    # chunks of 64, fp32 at 3xTF32 spilled 1.3 KB per thread on sm_90, with 32 0.5 KB).
    block_dc = block_d if block_d <= 128 else 32
    # 64-pixel tiles with 8 warps for 128 queries: the [BLOCK_P, BLOCK_N] scores and the running
    # keys and tiles all live in registers. With PEM's 32-channel heads ptxas (sm_90, triton 3.8)
    # gives 3xTF32 254 registers and bf16 183, no spills; 128-pixel tiles or 4 warps spilled
    # (1.7 KB per thread with triton 3.6). IEEE products keep their operands in registers too
    # (FMA dot): with 64-pixel tiles they spilled 5 KB per thread, with 32 none.
    block_p = 32 if precision == "ieee" else 64
    num_warps = 8 if block_n >= 128 else 4
    if _TILE_OVERRIDE is not None:
        block_p, num_warps = _TILE_OVERRIDE
    tiles = cdiv(pixels, block_p)
    query_blocks = cdiv(queries, block_n)
    if _SPLITS_OVERRIDE is not None:
        wanted = _SPLITS_OVERRIDE
    elif device.type == "cuda" and not INTERPRET:
        # One wave of programs (one runs per SM at PEM's sizes: 254 registers per thread), each
        # looping over its tiles: `tune select_splits` on the H200 on 2026-11-27 (PEM-CA's call:
        # fp32, 32768 px, 100 queries, 8 heads, logits, normalize_keys) timed 1, 2, 4 and 8 waves
        # at 0.145, 0.149, 0.154 and 0.167 ms. Batch 1 has only heads * N pairs to spread.
        wanted = cdiv(_sm_count(device), batch_heads * query_blocks)
    else:
        wanted = 2  # the interpreter runs programs one after another: few, but still merged
    tiles_per_split = cdiv(tiles, max(1, min(wanted, tiles)))
    splits = cdiv(tiles, tiles_per_split)
    return block_p, block_n, block_d, block_dc, tiles_per_split, splits, query_blocks, num_warps


# --------------------------------------------------------------------------------------------
# Registered ops
# --------------------------------------------------------------------------------------------


def _check_inputs(keys, queries, mask, num_heads):
    name = "prototype_select_triton"
    check(keys.dim() == 3, lambda: f"{name}: keys must be [B, HW, C], got {keys.shape}")
    batch, pixels, channels = keys.shape
    check(
        queries.dim() == 3 and queries.shape[0] == batch and queries.shape[2] == channels,
        lambda: f"{name}: queries must be [B, N, C] matching keys {tuple(keys.shape)}, "
        f"got {tuple(queries.shape)}",
    )
    check(
        keys.dtype in SUPPORTED_DTYPES and queries.dtype == keys.dtype,
        lambda: f"{name}: keys and queries must share a dtype among {SUPPORTED_DTYPES}, "
        f"got {keys.dtype} and {queries.dtype}",
    )
    check(
        num_heads >= 1 and channels % num_heads == 0,
        lambda: f"{name}: num_heads must divide C = {channels}, got {num_heads}",
    )
    check(
        1 <= pixels <= _MAX_PIXELS,
        lambda: f"{name}: HW must be in [1, {_MAX_PIXELS}], got {pixels}",
    )
    check(
        batch * num_heads <= 65535,
        lambda: f"{name}: B * num_heads must be <= 65535, got {batch * num_heads}",
    )
    if mask is not None:
        check(
            (mask.dtype == torch.bool or mask.dtype in MASK_LOGIT_DTYPES)
            and tuple(mask.shape) == (batch, queries.shape[1], pixels)
            and mask.device == keys.device,
            lambda: f"{name}: mask must be bool or float (logits) [B, N, HW] on {keys.device}, "
            f"got {mask.dtype} {tuple(mask.shape)} on {mask.device}",
        )
    check(
        queries.device == keys.device,
        lambda: f"{name}: queries is on {queries.device} but keys on {keys.device}",
    )


def scales_key_tiles(normalize_keys: bool, precision: str, fp32_keys: bool) -> bool:
    """The select kernel's SCALE_KEYS: whether the key tiles are scaled by the inverse norms
    before the product, or the scores after it (see :func:`_normalized`)."""
    return normalize_keys and precision != "ieee" and fp32_keys


@pem_triton_op("pem_kernels::prototype_select_triton")
def prototype_select_triton(
    keys: torch.Tensor,
    queries: torch.Tensor,
    mask: Optional[torch.Tensor],
    num_heads: int,
    official_empty: bool,
    normalize_keys: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``prototype_select``: arguments and results of ``pem_kernels::prototype_select``."""
    _check_inputs(keys, queries, mask, num_heads)
    batch, pixels, channels = keys.shape
    num_queries = queries.shape[1]
    head_dim = channels // num_heads
    prototypes = keys.new_empty(batch, num_queries, channels)
    indices = keys.new_empty(batch, num_heads, num_queries, dtype=torch.int64)
    if batch == 0 or num_queries == 0:
        return prototypes, indices

    inverse_norms = keys.new_empty(batch * pixels if normalize_keys else 1, dtype=torch.float32)
    if normalize_keys:
        block_c = block_size(channels, 16, 128)
        block_r = max(1, 2048 // block_c)
        launcher(_key_norm_kernel, INTERPRET)[(cdiv(batch * pixels, block_r),)](
            keys, inverse_norms, batch * pixels, pixels, channels, *keys.stride(),
            BLOCK_R=block_r, BLOCK_C=block_c,
        )

    precision = dot_operands(keys.dtype, INTERPRET, keys.device)[1]
    config = _select_config(
        keys.device, batch * num_heads, pixels, num_queries, head_dim, precision
    )
    block_p, block_n, block_d, block_dc, tiles_per_split, splits, query_blocks, num_warps = config
    # The bool mask goes to the kernel as it is (a reinterpreting view would not lower under
    # torch.compile); without one, a dummy stands in (HAS_MASK=False never reads it).
    if mask is not None:
        mask_arg, mask_strides = mask, mask.stride()
    else:
        mask_arg, mask_strides = keys.new_empty(1, dtype=torch.bool), (0, 0, 0)
    slots = batch * num_heads * num_queries
    # Every entry of both is written by the select kernel (allowed_seen only where it is read).
    partials = torch.empty(splits * slots, dtype=torch.int64, device=keys.device)
    seen_per_head = query_blocks * splits
    allowed_seen = torch.empty(
        batch * num_heads * seen_per_head if mask is not None and official_empty else 1,
        dtype=torch.int32, device=keys.device,
    )
    launcher(_select_kernel, INTERPRET)[(splits, query_blocks, batch * num_heads)](
        keys, queries, mask_arg, inverse_norms, partials, allowed_seen,
        pixels, num_queries, head_dim, num_heads, tiles_per_split, slots,
        *keys.stride(), *queries.stride(), *mask_strides,
        HAS_MASK=mask is not None, MASK_LOGITS=mask is not None and mask.dtype != torch.bool,
        NORMALIZE=normalize_keys, OFFICIAL=official_empty,
        INTERPRETED=INTERPRET, DOT_PRECISION=precision,
        SCALE_KEYS=scales_key_tiles(normalize_keys, precision, keys.dtype == torch.float32),
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DC=block_dc,
        num_warps=num_warps,
    )
    launcher(_finalize_kernel, INTERPRET)[(batch * num_queries,)](
        keys, inverse_norms, partials, allowed_seen, indices, prototypes,
        pixels, num_queries, head_dim, num_heads, splits, slots, seen_per_head, *keys.stride(),
        HAS_MASK=mask is not None, OFFICIAL=official_empty, NORMALIZE=normalize_keys,
        BLOCK_H=block_size(num_heads), BLOCK_D=block_size(head_dim),
        BLOCK_S=block_size(splits, 1, 64), BLOCK_F=block_size(seen_per_head, 1, 1024),
    )
    return prototypes, indices


@pem_triton_op("pem_kernels::_prototype_select_backward_triton")
def prototype_select_backward_triton(
    grad_prototypes: torch.Tensor,
    keys: torch.Tensor,
    indices: torch.Tensor,
    normalize_keys: bool,
) -> torch.Tensor:
    """grad_keys[B, HW, C]: the gradient of ``prototype_select_triton``'s prototypes w.r.t. keys."""
    check(
        indices.dim() == 3 and indices.dtype == torch.int64 and indices.shape[0] == keys.shape[0],
        lambda: f"_prototype_select_backward_triton: indices must be int64 [B, heads, N], got "
        f"{indices.dtype} {tuple(indices.shape)}",
    )
    batch, pixels, channels = keys.shape
    num_heads, num_queries = indices.shape[1], indices.shape[2]
    check(
        num_heads >= 1 and channels % num_heads == 0,
        lambda: f"_prototype_select_backward_triton: heads {num_heads} must divide C = {channels}",
    )
    check(
        tuple(grad_prototypes.shape) == (batch, num_queries, channels),
        lambda: f"_prototype_select_backward_triton: grad_prototypes must be [B, N, C] = "
        f"{[batch, num_queries, channels]}, got {list(grad_prototypes.shape)}",
    )
    grad_keys = torch.zeros(batch, pixels, channels, dtype=keys.dtype, device=keys.device)
    if batch == 0 or num_queries == 0 or pixels == 0:
        return grad_keys
    block_c = block_size(channels)
    block_nb = block_size(num_queries, 1, max(1, 4096 // block_c))
    launcher(_backward_kernel, INTERPRET)[(num_heads * num_queries, batch)](
        grad_prototypes, keys, indices, grad_keys,
        pixels, num_queries, channels, channels // num_heads, num_heads,
        *grad_prototypes.stride(), *keys.stride(), *indices.stride(),
        NORMALIZE=normalize_keys, BLOCK_S=block_size(num_heads * num_queries, 1, 1024),
        BLOCK_NB=block_nb, BLOCK_C=block_c,
    )
    return grad_keys


# The same autograd as the C++ op, with the Triton backward.
_backward, _setup_context = autograd_functions(
    lambda *args: call_triton_op(prototype_select_backward_triton, *args)
)
prototype_select_triton.register_autograd(_backward, setup_context=_setup_context)
