"""``deform_conv2d`` (modulated deformable convolution, DCNv2) in Triton: implicit GEMM, no im2col.

Semantics are those of :func:`pem_kernels.reference.deform_conv2d_ref` (torchvision's): offsets
are (dy, dx) pairs per tap ``k = i * kw + j`` per offset group, bilinear sampling where each of the
four corners outside the image contributes zero, the mask multiplies the sample, weight groups and
offset groups, stride/padding/dilation, optional mask and bias. Notation: ``M = B * out_h * out_w``
output pixels, ``L = out_h * out_w``, ``G`` weight groups of ``Cin_g`` input and ``Cout_g`` output
channels, ``OG`` offset groups of ``Cog`` input channels, ``T = kh * kw`` taps.

Forward (``_forward_kernel``), grid ``(cdiv(M, BLOCK_M), G * cdiv(Cout_g, BLOCK_N))``. A program
owns ``BLOCK_M`` output pixels x ``BLOCK_N`` output channels of one weight group and accumulates
``[BLOCK_M, BLOCK_N]`` in fp32 registers. It loops over the taps, and for each tap over the offset
groups that overlap its weight group (one, in the usual case): it loads the (dy, dx) offsets and the
mask of its pixels once, computes the four corner positions, validity and bilinear weights, then
loops over the input channels of (weight group ∩ offset group) in ``BLOCK_K`` blocks: gathers the
four corners ``[BLOCK_M, BLOCK_K]``, blends and modulates them straight into the ``tl.dot`` A
operand and multiplies by the weight tile ``[BLOCK_K, BLOCK_N]`` (the weight is re-laid out once
per call as ``[G, T, Cin_g, Cout_g]``, a few KB). The epilogue adds the bias and stores the tile
in the output's memory format. For an NCHW input (and output) the program computes the transposed
tile ``[BLOCK_N, BLOCK_M] = W^T col^T`` instead (``PIXEL_MAJOR``): Triton spreads
a tile's last axis over a warp's lanes, and along pixels the lanes of a gather or of the store
stay within one channel plane (coalesced), where along channels each lane would touch a
different plane. The offset/mask-gradient and weight-gradient kernels below take the same two
orientations (the deterministic input-gradient gather keeps the channel-major one).

Backward, five pieces. Every output element of the weight, offset, mask and bias gradients is
written by exactly one program with a fixed order of additions; the input gradient is scattered
with fp32 atomics (as torchvision's CUDA kernel) unless ``torch.use_deterministic_algorithms(True)``
is on, where it is gathered in a fixed order instead:

* ``grad_offset`` / ``grad_mask`` (``_offset_mask_grad_kernel``), grid ``(cdiv(M, BLOCK_M), OG)``:
  per tap the program recomputes the column gradient ``dcol[m, c] = sum_o grad_out[m, o] *
  W[o, c, k]`` for ``[BLOCK_M, BLOCK_K]`` channel blocks of its offset group (``tl.dot``), gathers
  the same four corners and reduces over the channels ``dcol * sample`` (mask gradient) and
  ``dcol * mask * d sample / d(y, x)`` (offset gradient; the derivative of the bilinear weights with
  ``floor`` held constant, i.e. the right-hand derivative at integer positions, as the reference).
  Outside deterministic mode the same program also adds ``dcol * mask`` times each corner's
  bilinear weight onto ``grad_input`` with ``tl.atomic_add`` (fp32: into ``grad_input`` itself,
  or an fp32 buffer for fp16/bf16), so the input gradient costs no extra pass.
* ``grad_weight`` (``_weight_grad_kernel``), grid ``(G * T * cdiv(Cin_g, BLOCK_K) *
  cdiv(Cout_g, BLOCK_N), splits)``: ``grad_out^T x columns`` with the columns regenerated per
  ``[BLOCK_M, BLOCK_K]`` tile, the pixel axis cut into ``splits`` contiguous ranges; each split
  writes its own fp32 partial ``[splits, G, T, Cin_g, Cout_g]`` and the partials are summed by
  ``torch.sum`` (fixed order). ``splits`` depends only on the shapes.
* ``grad_input`` in deterministic mode (``_corner_kernel`` + ``_input_grad_kernel``): the scatter of
  the column gradient through the bilinear weights is turned into a gather. ``_corner_kernel``
  lists, for every (b, offset group, tap, output pixel, corner), the corner's flat input pixel as a
  sort key ``((b * OG + g) * T + k) * H * W + pixel`` (invalid corners get a sentinel that sorts
  last) and its weight (bilinear * mask). A stable ``torch.sort`` groups the entries by (image,
  offset group, tap, input pixel); ``torch.searchsorted`` gives the entry range of every block of
  ``BLOCK_T`` input pixels. ``_input_grad_kernel``, grid ``(cdiv(H * W, BLOCK_T), OG * cdiv(Cog,
  BLOCK_K), B)``, owns ``BLOCK_T`` input pixels x ``BLOCK_K`` channels: per tap it walks its entry
  range in chunks of ``BLOCK_E`` entries, recomputes their column gradient ``[BLOCK_E, BLOCK_K]``
  with ``tl.dot`` (grad_out rows of the entries' output pixels x the tap's weight), scales it by the
  entries' corner weights and adds it to its pixels with a one-hot ``[BLOCK_T, BLOCK_E]`` fp32
  ``tl.dot`` (exact 0/1 products, IEEE fp32, fixed order). The list costs about 30 bytes per entry
  (keys, sorted keys, permutation, weights; plus the sort's scratch) and ``4 * B * OG * T * L``
  entries (independent of the channel count).
* ``grad_bias``: ``grad_output.sum((0, 2, 3))`` in fp32.

So in deterministic mode the results are bit-identical from run to run; outside it only
``grad_input``'s last bits vary (the order of the atomic additions). Non-finite values: in
deterministic mode a NaN or inf in ``grad_output`` (or the mask) reaches ``grad_input`` through
the one-hot dot (``0 * inf = NaN``), so every pixel of that program's ``BLOCK_T``-pixel block
becomes NaN, where the reference makes only the pixels the value touches non-finite; the atomic
scatter and the other gradients follow the reference. (Under a GradScaler such a step is skipped
anyway.) The cost of the deterministic ``grad_input`` is a sort of the entry list and 4x
recomputation of the column gradient (one per corner).

Dtypes: fp32, fp16, bf16 inputs with fp32 accumulation (fp64 is not supported). fp16/bf16 dot
operands are in the input dtype (the blended sample is rounded to it before the tensor-core dot);
fp32 operands use 3xTF32 products (fp32 accuracy on tensor cores), or TF32 where
``torch.get_float32_matmul_precision()`` allows it ("high"/"medium"), as PyTorch's own matmuls
(:func:`pem_kernels.triton.fp32_dot_precision`, :mod:`pem_kernels.triton.products`). Under the
interpreter (``TRITON_INTERPRET=1``, CPU tensors) half-precision dot operands are cast to fp32
(the interpreter's half-precision ``tl.dot`` is wrong); fp32 products are the tensor cores'.

Memory format: the kernels read every tensor through its strides (NCHW, channels_last, or any
other). The output and ``grad_input`` are channels_last when ``input`` is channels_last (and not
also contiguous), contiguous NCHW otherwise; ``grad_offset``/``grad_mask`` are contiguous.

Non-finite offsets: an infinite or NaN position samples zero (every corner is outside), and its
offset/mask gradients are zero. (The reference gives the same forward for inf, but autograd turns
``0 * (inf - inf)`` into a NaN offset gradient, and it cannot index a NaN position at all.)

Limits: the within-image element offsets (``Cin * H * W`` and ``Cout * out_h * out_w``) must fit in
int32 (batch offsets are 64-bit); no double backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from pem_kernels.ops.deform_conv import autograd_functions
from pem_kernels.reference.deform_conv import check_deform_conv2d_args
from pem_kernels.triton import (
    block_size,
    call_triton_op,
    cdiv,
    check,
    dot_operands,
    interpreter_requested,
    launcher,
    pem_triton_op,
)
from pem_kernels.triton.products import dot_product

__all__ = ["deform_conv2d", "deform_conv2d_backward_triton", "deform_conv2d_triton"]

# Decided when the kernels are defined: triton.jit picks interpreter or compiler at decoration time.
INTERPRET = interpreter_requested()
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _tap_at(
    b64, oy, ox, og, k, so_b, so_c, so_h, so_w, sm_b, sm_c, sm_h, sm_w, TAPS,
):
    """Element offsets, for output pixels (b, oy, ox), of tap ``k`` of offset group ``og``: of its
    dy in ``offset`` (dx follows ``so_c`` further on) and of its modulation in ``mask``.

    The kernels load the three values themselves and hand them to :func:`_sample_point`: when
    torch.compile decides which tensors a ``wrap_triton`` kernel writes, it follows each store's
    address back through the TTIR, and a helper call on the way counts every pointer passed to
    it. Were the loads inside a helper, the input-gradient scatter (its addresses come from the
    offsets) would mark ``offset`` and ``mask`` as written, and the compiled backward copy them.
    """
    at = b64 * so_b + 2 * (og * TAPS + k) * so_c + oy * so_h + ox * so_w
    mod_at = b64 * sm_b + (og * TAPS + k) * sm_c + oy * sm_h + ox * sm_w
    return at, mod_at


@triton.jit
def _sample_point(
    dy, dx, mod, oy, ox, valid, k,
    H, W, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK: tl.constexpr,
):
    """Where tap ``k`` samples for output pixels (oy, ox), given its offsets (dy, dx) and, with
    HAS_MASK, its modulation ``mod`` (ignored without; all three loaded as 0 where not ``valid``).

    Returns the top-left corner (row, col) (int32, clamped to 0 where both rows/cols are outside),
    the fractional parts (fy, fx), the modulation (0 for invalid lanes), and the validity of the
    top/bottom rows and left/right columns. Non-finite positions are invalid everywhere.
    """
    i = k // KW
    j = k - i * KW
    y = (oy * stride_h - pad_h + i * dil_h).to(tl.float32) + dy.to(tl.float32)
    x = (ox * stride_w - pad_w + j * dil_w).to(tl.float32) + dx.to(tl.float32)
    if HAS_MASK:
        mod = mod.to(tl.float32)  # loaded as 0 on invalid lanes
    else:
        mod = tl.where(valid, 1.0, 0.0)
    y_lo = tl.floor(y)
    x_lo = tl.floor(x)
    fy = y - y_lo
    fx = x - x_lo
    top_ok = valid & (y_lo >= 0.0) & (y_lo <= H - 1)
    bottom_ok = valid & (y_lo >= -1.0) & (y_lo <= H - 2)
    left_ok = valid & (x_lo >= 0.0) & (x_lo <= W - 1)
    right_ok = valid & (x_lo >= -1.0) & (x_lo <= W - 2)
    # The float -> int cast only ever sees values in [-1, H - 1] (no overflow, no NaN). Where no
    # row (column) is inside, every corner reads zero and the fraction is set to 0, so that an
    # infinite position (fraction inf - inf = NaN) still gives a zero sample and zero gradients,
    # as the reference's torch.where does.
    row_in = top_ok | bottom_ok
    col_in = left_ok | right_ok
    row = tl.where(row_in, y_lo, 0.0).to(tl.int32)
    col = tl.where(col_in, x_lo, 0.0).to(tl.int32)
    fy = tl.where(row_in, fy, 0.0)
    fx = tl.where(col_in, fx, 0.0)
    return row, col, fy, fx, mod, top_ok, bottom_ok, left_ok, right_ok


@triton.jit
def _per_pixel(v, PIXEL_MAJOR: tl.constexpr):
    """A per-pixel vector [BLOCK_M] broadcast over a tile of pixels x channels in the kernel's
    orientation: [1, BLOCK_M] when pixels run along the tile's last axis (PIXEL_MAJOR, the axis
    Triton spreads over a warp's lanes), else [BLOCK_M, 1]."""
    if PIXEL_MAJOR:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _per_channel(v, PIXEL_MAJOR: tl.constexpr):
    """A per-channel vector broadcast the other way round from :func:`_per_pixel`."""
    if PIXEL_MAJOR:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _sum_over_channels(x, PIXEL_MAJOR: tl.constexpr):
    if PIXEL_MAJOR:
        return tl.sum(x, axis=0)
    else:
        return tl.sum(x, axis=1)


@triton.jit
def _gather_corners(
    x_ptr, image_base, channel_offset, channel_ok, row, col,
    top_ok, bottom_ok, left_ok, right_ok, sx_h, sx_w, PIXEL_MAJOR: tl.constexpr,
):
    """The four corners of a pixels x channels tile (fp32, zero outside the image or for masked
    lanes): [BLOCK_M, BLOCK_K], or [BLOCK_K, BLOCK_M] with PIXEL_MAJOR. In an NCHW input a
    channel is a plane, so with pixels along the lanes neighbouring output pixels (which sample
    neighbouring positions) make coalesced accesses, where lanes along channels would each touch
    their own plane; in a channels_last input it is the other way round."""
    pixel = _per_pixel(image_base + row * sx_h + col * sx_w, PIXEL_MAJOR)
    ptr = x_ptr + pixel + _per_channel(channel_offset, PIXEL_MAJOR)
    c_ok = _per_channel(channel_ok, PIXEL_MAJOR)
    m00 = _per_pixel(top_ok & left_ok, PIXEL_MAJOR) & c_ok
    m01 = _per_pixel(top_ok & right_ok, PIXEL_MAJOR) & c_ok
    m10 = _per_pixel(bottom_ok & left_ok, PIXEL_MAJOR) & c_ok
    m11 = _per_pixel(bottom_ok & right_ok, PIXEL_MAJOR) & c_ok
    v00 = tl.load(ptr, mask=m00, other=0.0).to(tl.float32)
    v01 = tl.load(ptr + sx_w, mask=m01, other=0.0).to(tl.float32)
    v10 = tl.load(ptr + sx_h, mask=m10, other=0.0).to(tl.float32)
    v11 = tl.load(ptr + sx_h + sx_w, mask=m11, other=0.0).to(tl.float32)
    return v00, v01, v10, v11


@triton.jit
def _pixels(ms, L, OW):
    b = ms // L
    pix = ms - b * L
    oy = pix // OW
    ox = pix - oy * OW
    return b.to(tl.int64), oy, ox


@triton.jit
def _column_grad(
    gout_ptr, w_ptr, gout_rows, row_ok, chans, chan_ok, c_lo, c_last, k, TAPS, CIN_G, COUT_G, sg_c,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, PIXEL_MAJOR: tl.constexpr,
):
    """dcol[r, c] = sum_o grad_out[row r, o] * W[o, c, k] over the weight group of each channel,
    as [BLOCK_R, BLOCK_K], or transposed [BLOCK_K, BLOCK_R] with PIXEL_MAJOR (grad_output then
    read along its rows: coalesced for NCHW).

    ``gout_rows`` [BLOCK_R] are the rows' grad_output addresses (without the channel term),
    ``chans`` [BLOCK_K] absolute input channels, the valid ones within [c_lo, c_last]; a block may
    straddle weight groups.
    """
    if PIXEL_MAJOR:
        dcol = tl.zeros([BLOCK_K, BLOCK_R], dtype=tl.float32)
    else:
        dcol = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for grp in range(c_lo // CIN_G, c_last // CIN_G + 1):
        local = chans - grp * CIN_G
        in_grp = chan_ok & (local >= 0) & (local < CIN_G)
        w_rows = ((grp * TAPS + k) * CIN_G + local) * COUT_G
        for o0 in range(0, COUT_G, BLOCK_N):
            outs = o0 + tl.arange(0, BLOCK_N)
            o_ok = outs < COUT_G
            out_channels = (grp * COUT_G + outs) * sg_c
            if PIXEL_MAJOR:
                g = tl.load(
                    gout_ptr + gout_rows[None, :] + out_channels[:, None],
                    mask=o_ok[:, None] & row_ok[None, :], other=0.0,
                )  # [BLOCK_N, BLOCK_R]
                wt = tl.load(
                    w_ptr + w_rows[:, None] + outs[None, :],
                    mask=in_grp[:, None] & o_ok[None, :], other=0.0,
                )  # [BLOCK_K, BLOCK_N]
                dcol += dot_product(wt, g, DOT_DTYPE, DOT_PRECISION)
            else:
                g = tl.load(
                    gout_ptr + gout_rows[:, None] + out_channels[None, :],
                    mask=row_ok[:, None] & o_ok[None, :], other=0.0,
                )  # [BLOCK_R, BLOCK_N]
                wt = tl.load(
                    w_ptr + w_rows[None, :] + outs[:, None],
                    mask=o_ok[:, None] & in_grp[None, :], other=0.0,
                )  # [BLOCK_N, BLOCK_K]
                dcol += dot_product(g, wt, DOT_DTYPE, DOT_PRECISION)
    return dcol


# --------------------------------------------------------------------------------------------
# forward


@triton.jit
def _forward_kernel(
    x_ptr, offset_ptr, mask_ptr, w_ptr, bias_ptr, out_ptr,
    M, L, OW, H, W, KW, TAPS, CIN_G, COUT_G, COG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h, so_w,
    sm_b, sm_c, sm_h, sm_w, sy_b, sy_c, sy_h, sy_w,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, PIXEL_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[m, n] = bias[n] + sum over (tap, channel) of col[m, (tap, c)] * W[n, c, tap], or its
    transpose out^T = W^T col^T with PIXEL_MAJOR (NCHW input and output: the gathers and the
    store then run along pixels, see :func:`_gather_corners`)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_blocks = tl.cdiv(COUT_G, BLOCK_N)
    grp = pid_n // n_blocks
    outs = (pid_n - grp * n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = outs < COUT_G
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    b64, oy, ox = _pixels(ms, L, OW)
    image_base = b64 * sx_b
    c_first = grp * CIN_G
    c_end = c_first + CIN_G
    if PIXEL_MAJOR:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, TAPS):
        for og in range(c_first // COG, (c_end - 1) // COG + 1):
            at, mod_at = _tap_at(
                b64, oy, ox, og, k, so_b, so_c, so_h, so_w, sm_b, sm_c, sm_h, sm_w, TAPS
            )
            dy = tl.load(offset_ptr + at, mask=m_ok, other=0.0)
            dx = tl.load(offset_ptr + at + so_c, mask=m_ok, other=0.0)
            mod = tl.load(mask_ptr + mod_at, mask=m_ok & HAS_MASK, other=0.0)
            row, col, fy, fx, mod, t_ok, b_ok, l_ok, r_ok = _sample_point(
                dy, dx, mod, oy, ox, m_ok, k,
                H, W, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK,
            )
            w00 = _per_pixel((1.0 - fy) * (1.0 - fx), PIXEL_MAJOR)
            w01 = _per_pixel((1.0 - fy) * fx, PIXEL_MAJOR)
            w10 = _per_pixel(fy * (1.0 - fx), PIXEL_MAJOR)
            w11 = _per_pixel(fy * fx, PIXEL_MAJOR)
            # The modulation multiplies the blended sample (as torchvision): folded into the
            # corner weights, an inf mask times a zero weight would make a NaN.
            modulation = _per_pixel(mod, PIXEL_MAJOR)
            lo = tl.maximum(c_first, og * COG)
            hi = tl.minimum(c_end, og * COG + COG)
            for c0 in range(lo, hi, BLOCK_K):
                chans = c0 + tl.arange(0, BLOCK_K)
                c_ok = chans < hi
                v00, v01, v10, v11 = _gather_corners(
                    x_ptr, image_base, chans * sx_c, c_ok, row, col, t_ok, b_ok, l_ok, r_ok,
                    sx_h, sx_w, PIXEL_MAJOR,
                )
                blend = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
                # Zero, not 0 * inf, in the block's lanes past the last channel.
                a = tl.where(_per_channel(c_ok, PIXEL_MAJOR), blend * modulation, 0.0)
                a = a.to(DOT_DTYPE)
                w_rows = ((grp * TAPS + k) * CIN_G + chans - c_first) * COUT_G
                if PIXEL_MAJOR:  # acc [BLOCK_N, BLOCK_M] += W^T [BLOCK_N, BLOCK_K] @ a
                    wt = tl.load(
                        w_ptr + w_rows[None, :] + outs[:, None],
                        mask=o_ok[:, None] & c_ok[None, :], other=0.0,
                    )
                    acc += dot_product(wt, a, DOT_DTYPE, DOT_PRECISION)
                else:  # acc [BLOCK_M, BLOCK_N] += a @ W [BLOCK_K, BLOCK_N]
                    wt = tl.load(
                        w_ptr + w_rows[:, None] + outs[None, :],
                        mask=c_ok[:, None] & o_ok[None, :], other=0.0,
                    )
                    acc += dot_product(a, wt, DOT_DTYPE, DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + grp * COUT_G + outs, mask=o_ok, other=0.0).to(tl.float32)
        acc += _per_channel(bias, PIXEL_MAJOR)
    out_rows = _per_pixel(b64 * sy_b + oy * sy_h + ox * sy_w, PIXEL_MAJOR)
    out_channels = _per_channel((grp * COUT_G + outs) * sy_c, PIXEL_MAJOR)
    tl.store(
        out_ptr + out_rows + out_channels, acc.to(out_ptr.dtype.element_ty),
        mask=_per_pixel(m_ok, PIXEL_MAJOR) & _per_channel(o_ok, PIXEL_MAJOR),
    )


# --------------------------------------------------------------------------------------------
# backward


@triton.jit
def _offset_mask_grad_kernel(
    gout_ptr, x_ptr, offset_ptr, mask_ptr, w_ptr, goffset_ptr, gmask_ptr, ginput_ptr,
    M, L, OW, H, W, KW, TAPS, CIN_G, COUT_G, COG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sg_b, sg_c, sg_h, sg_w, sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h, so_w,
    sm_b, sm_c, sm_h, sm_w, si_b, si_c, si_h, si_w,
    HAS_MASK: tl.constexpr, SCATTER_INPUT_GRAD: tl.constexpr, PIXEL_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    og = tl.program_id(1)
    OG = tl.num_programs(1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    b64, oy, ox = _pixels(ms, L, OW)
    image_base = b64 * sx_b
    gout_rows = b64 * sg_b + oy * sg_h + ox * sg_w
    pix = ms - (ms // L) * L
    c_first = og * COG
    for k in range(0, TAPS):
        at, mod_at = _tap_at(
            b64, oy, ox, og, k, so_b, so_c, so_h, so_w, sm_b, sm_c, sm_h, sm_w, TAPS
        )
        dy = tl.load(offset_ptr + at, mask=m_ok, other=0.0)
        dx = tl.load(offset_ptr + at + so_c, mask=m_ok, other=0.0)
        mod = tl.load(mask_ptr + mod_at, mask=m_ok & HAS_MASK, other=0.0)
        row, col, fy, fx, mod, t_ok, b_ok, l_ok, r_ok = _sample_point(
            dy, dx, mod, oy, ox, m_ok, k,
            H, W, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK,
        )
        gy0 = _per_pixel(1.0 - fy, PIXEL_MAJOR)
        gy1 = _per_pixel(fy, PIXEL_MAJOR)
        gx0 = _per_pixel(1.0 - fx, PIXEL_MAJOR)
        gx1 = _per_pixel(fx, PIXEL_MAJOR)
        grad_y = tl.zeros([BLOCK_M], dtype=tl.float32)
        grad_x = tl.zeros([BLOCK_M], dtype=tl.float32)
        grad_m = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(c_first, c_first + COG, BLOCK_K):
            chans = c0 + tl.arange(0, BLOCK_K)
            c_ok = chans < c_first + COG
            c_last = tl.minimum(c0 + BLOCK_K, c_first + COG) - 1
            dcol = _column_grad(
                gout_ptr, w_ptr, gout_rows, m_ok, chans, c_ok, c0, c_last, k, TAPS, CIN_G,
                COUT_G, sg_c,
                BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, DOT_PRECISION, PIXEL_MAJOR,
            )
            v00, v01, v10, v11 = _gather_corners(
                x_ptr, image_base, chans * sx_c, c_ok, row, col, t_ok, b_ok, l_ok, r_ok,
                sx_h, sx_w, PIXEL_MAJOR,
            )
            grad_y += _sum_over_channels(
                dcol * (gx0 * (v10 - v00) + gx1 * (v11 - v01)), PIXEL_MAJOR
            )
            grad_x += _sum_over_channels(
                dcol * (gy0 * (v01 - v00) + gy1 * (v11 - v10)), PIXEL_MAJOR
            )
            if HAS_MASK:
                sample = gy0 * (gx0 * v00 + gx1 * v01) + gy1 * (gx0 * v10 + gx1 * v11)
                grad_m += _sum_over_channels(dcol * sample, PIXEL_MAJOR)
            if SCATTER_INPUT_GRAD:
                # grad_input += dcol * mod * (each corner's bilinear weight), with fp32 atomics;
                # relaxed: nothing in this launch reads grad_input (the default acq_rel orders
                # memory for nothing).
                modulated = dcol * _per_pixel(mod, PIXEL_MAJOR)
                corner = ginput_ptr + _per_pixel(b64 * si_b + row * si_h + col * si_w, PIXEL_MAJOR)
                corner += _per_channel(chans * si_c, PIXEL_MAJOR)
                c_in = _per_channel(c_ok, PIXEL_MAJOR)
                tl.atomic_add(
                    corner, modulated * (gy0 * gx0),
                    mask=_per_pixel(t_ok & l_ok, PIXEL_MAJOR) & c_in, sem="relaxed",
                )
                tl.atomic_add(
                    corner + si_w, modulated * (gy0 * gx1),
                    mask=_per_pixel(t_ok & r_ok, PIXEL_MAJOR) & c_in, sem="relaxed",
                )
                tl.atomic_add(
                    corner + si_h, modulated * (gy1 * gx0),
                    mask=_per_pixel(b_ok & l_ok, PIXEL_MAJOR) & c_in, sem="relaxed",
                )
                tl.atomic_add(
                    corner + si_h + si_w, modulated * (gy1 * gx1),
                    mask=_per_pixel(b_ok & r_ok, PIXEL_MAJOR) & c_in, sem="relaxed",
                )
        # grad_offset / grad_mask are contiguous [B, 2*OG*T, L] / [B, OG*T, L].
        channel = og * TAPS + k
        dst = b64 * (2 * OG * TAPS * L) + 2 * channel * L + pix
        tl.store(goffset_ptr + dst, (grad_y * mod).to(goffset_ptr.dtype.element_ty), mask=m_ok)
        tl.store(goffset_ptr + dst + L, (grad_x * mod).to(goffset_ptr.dtype.element_ty), mask=m_ok)
        if HAS_MASK:
            tl.store(
                gmask_ptr + b64 * (OG * TAPS * L) + channel * L + pix,
                grad_m.to(gmask_ptr.dtype.element_ty), mask=m_ok,
            )


@triton.jit
def _weight_grad_kernel(
    gout_ptr, x_ptr, offset_ptr, mask_ptr, partial_ptr,
    M, L, OW, H, W, KW, TAPS, CIN_G, COUT_G, COG, M_BLOCKS_PER_SPLIT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sg_b, sg_c, sg_h, sg_w, sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h, so_w,
    sm_b, sm_c, sm_h, sm_w,
    HAS_MASK: tl.constexpr, PIXEL_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_ob = tl.cdiv(COUT_G, BLOCK_N)
    n_cb = tl.cdiv(CIN_G, BLOCK_K)
    ob = pid % n_ob
    rest = pid // n_ob
    cb = rest % n_cb
    rest = rest // n_cb
    k = rest % TAPS
    grp = rest // TAPS
    G = tl.num_programs(0) // (n_ob * n_cb * TAPS)
    outs = ob * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = outs < COUT_G
    local = cb * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = local < CIN_G
    chans = grp * CIN_G + local
    c_lo = grp * CIN_G + cb * BLOCK_K
    c_hi = tl.minimum(c_lo + BLOCK_K, grp * CIN_G + CIN_G)  # exclusive
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    mb_first = split * M_BLOCKS_PER_SPLIT
    mb_end = tl.minimum(mb_first + M_BLOCKS_PER_SPLIT, tl.cdiv(M, BLOCK_M))
    for mb in range(mb_first, mb_end):
        ms = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = ms < M
        b64, oy, ox = _pixels(ms, L, OW)
        image_base = b64 * sx_b
        if PIXEL_MAJOR:
            a = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
        else:
            a = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for og in range(c_lo // COG, (c_hi - 1) // COG + 1):
            at, mod_at = _tap_at(
                b64, oy, ox, og, k, so_b, so_c, so_h, so_w, sm_b, sm_c, sm_h, sm_w, TAPS
            )
            dy = tl.load(offset_ptr + at, mask=m_ok, other=0.0)
            dx = tl.load(offset_ptr + at + so_c, mask=m_ok, other=0.0)
            mod = tl.load(mask_ptr + mod_at, mask=m_ok & HAS_MASK, other=0.0)
            row, col, fy, fx, mod, t_ok, b_ok, l_ok, r_ok = _sample_point(
                dy, dx, mod, oy, ox, m_ok, k,
                H, W, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK,
            )
            in_og = c_ok & (chans >= og * COG) & (chans < og * COG + COG)
            v00, v01, v10, v11 = _gather_corners(
                x_ptr, image_base, chans * sx_c, in_og, row, col, t_ok, b_ok, l_ok, r_ok,
                sx_h, sx_w, PIXEL_MAJOR,
            )
            blend = (
                _per_pixel((1.0 - fy) * (1.0 - fx), PIXEL_MAJOR) * v00
                + _per_pixel((1.0 - fy) * fx, PIXEL_MAJOR) * v01
                + _per_pixel(fy * (1.0 - fx), PIXEL_MAJOR) * v10
                + _per_pixel(fy * fx, PIXEL_MAJOR) * v11
            )
            # Only this offset group's channels take its modulation: a NaN mask must not reach
            # the columns of the other groups' channels (as 0 * NaN).
            a += tl.where(
                _per_channel(in_og, PIXEL_MAJOR), blend * _per_pixel(mod, PIXEL_MAJOR), 0.0
            )
        # grad_output [pixels, outs] read in the same orientation as the input (along its
        # planes for NCHW), then acc [BLOCK_K, BLOCK_N] += col^T @ grad_output.
        g = tl.load(
            gout_ptr + _per_pixel(b64 * sg_b + oy * sg_h + ox * sg_w, PIXEL_MAJOR)
            + _per_channel((grp * COUT_G + outs) * sg_c, PIXEL_MAJOR),
            mask=_per_pixel(m_ok, PIXEL_MAJOR) & _per_channel(o_ok, PIXEL_MAJOR), other=0.0,
        ).to(DOT_DTYPE)
        a = a.to(DOT_DTYPE)
        if PIXEL_MAJOR:
            acc += dot_product(a, tl.trans(g), DOT_DTYPE, DOT_PRECISION)
        else:
            acc += dot_product(tl.trans(a), g, DOT_DTYPE, DOT_PRECISION)
    # partial is contiguous [splits, G, T, Cin_g, Cout_g].
    base = ((split * G + grp) * TAPS + k).to(tl.int64) * (CIN_G * COUT_G)
    tl.store(
        partial_ptr + base + (local * COUT_G)[:, None] + outs[None, :], acc,
        mask=c_ok[:, None] & o_ok[None, :],
    )


@triton.jit
def _corner_kernel(
    offset_ptr, mask_ptr, key_ptr, weight_ptr,
    N, SENTINEL, L, OW, H, W, KW, TAPS, OG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    so_b, so_c, so_h, so_w, sm_b, sm_c, sm_h, sm_w,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Entry (((b * OG + og) * T + k) * L + m) * 4 + corner: its input pixel key and weight."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N
    m = (idx % L).to(tl.int32)
    bgk = idx // L
    k = (bgk % TAPS).to(tl.int32)
    og = ((bgk // TAPS) % OG).to(tl.int32)
    b64 = bgk // (TAPS * OG)
    oy = m // OW
    ox = m - oy * OW
    at, mod_at = _tap_at(
        b64, oy, ox, og, k, so_b, so_c, so_h, so_w, sm_b, sm_c, sm_h, sm_w, TAPS
    )
    dy = tl.load(offset_ptr + at, mask=ok, other=0.0)
    dx = tl.load(offset_ptr + at + so_c, mask=ok, other=0.0)
    mod = tl.load(mask_ptr + mod_at, mask=ok & HAS_MASK, other=0.0)
    row, col, fy, fx, mod, t_ok, b_ok, l_ok, r_ok = _sample_point(
        dy, dx, mod, oy, ox, ok, k,
        H, W, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK,
    )
    pixel_base = bgk * (H * W) + row * W + col
    dst = idx * 4
    tl.store(key_ptr + dst, tl.where(t_ok & l_ok, pixel_base, SENTINEL), mask=ok)
    tl.store(key_ptr + dst + 1, tl.where(t_ok & r_ok, pixel_base + 1, SENTINEL), mask=ok)
    tl.store(key_ptr + dst + 2, tl.where(b_ok & l_ok, pixel_base + W, SENTINEL), mask=ok)
    tl.store(key_ptr + dst + 3, tl.where(b_ok & r_ok, pixel_base + W + 1, SENTINEL), mask=ok)
    tl.store(weight_ptr + dst, (1.0 - fy) * (1.0 - fx) * mod, mask=ok)
    tl.store(weight_ptr + dst + 1, (1.0 - fy) * fx * mod, mask=ok)
    tl.store(weight_ptr + dst + 2, fy * (1.0 - fx) * mod, mask=ok)
    tl.store(weight_ptr + dst + 3, fy * fx * mod, mask=ok)


@triton.jit
def _input_grad_kernel(
    gout_ptr, w_ptr, key_ptr, perm_ptr, weight_ptr, bounds_ptr, gin_ptr,
    L, OW, H, W, TAPS, CIN_G, COUT_G, COG, OG,
    sg_b, sg_c, sg_h, sg_w, si_b, si_c, si_h, si_w,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tb = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    n_cb = tl.cdiv(COG, BLOCK_K)
    og = pid_c // n_cb
    c_lo = og * COG + (pid_c - og * n_cb) * BLOCK_K
    c_last = tl.minimum(c_lo + BLOCK_K, og * COG + COG) - 1
    chans = c_lo + tl.arange(0, BLOCK_K)
    c_ok = chans <= c_last
    n_tb = tl.cdiv(H * W, BLOCK_T)
    targets = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = targets < H * W
    b64 = b.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for k in range(0, TAPS):
        bgk = (b64 * OG + og) * TAPS + k
        bound = bounds_ptr + bgk * (n_tb + 1) + tb
        lo = tl.load(bound)
        hi = tl.load(bound + 1)
        key_base = bgk * (H * W)
        for e0 in range(lo, hi, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            e_ok = es < hi
            entry = tl.load(perm_ptr + es, mask=e_ok, other=0)
            local_target = (tl.load(key_ptr + es, mask=e_ok, other=0) - key_base).to(tl.int32)
            corner_weight = tl.load(weight_ptr + entry, mask=e_ok, other=0.0)
            m = ((entry // 4) % L).to(tl.int32)
            oy = m // OW
            ox = m - oy * OW
            dcol = _column_grad(
                gout_ptr, w_ptr, b64 * sg_b + oy * sg_h + ox * sg_w, e_ok, chans, c_ok, c_lo,
                c_last, k,
                TAPS, CIN_G, COUT_G, sg_c, BLOCK_E, BLOCK_N, BLOCK_K, DOT_DTYPE, DOT_PRECISION,
                False,
            )
            one_hot = tl.where(
                (local_target[None, :] == targets[:, None]) & e_ok[None, :], 1.0, 0.0
            )
            acc += tl.dot(one_hot, dcol * corner_weight[:, None], input_precision="ieee")
    y = targets // W
    x = targets - y * W
    tl.store(
        gin_ptr + (b64 * si_b + y * si_h + x * si_w)[:, None] + (chans * si_c)[None, :],
        acc.to(gin_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :],
    )


# --------------------------------------------------------------------------------------------
# host side


def _dot_config(tensor: torch.Tensor) -> dict:
    operand, precision = dot_operands(tensor.dtype, INTERPRET, tensor.device)
    return dict(DOT_DTYPE=operand, DOT_PRECISION=precision)


def _num_warps(dtype: torch.dtype) -> int:
    """8 warps for fp32, 4 for fp16/bf16: ptxas (sm_90, triton 3.6) spills 28-300 bytes per
    thread in the fp32 kernels with 4 warps and none with 8; the half-precision ones spill in
    neither."""
    return 8 if dtype == torch.float32 else 4


def _pixel_major(input: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the kernels' tiles run along pixels: when neither the input's channels nor those
    of the output (forward) or grad_output (backward) are contiguous (NCHW), so that a warp's
    lanes read and write along the channel planes."""
    return input.stride(1) != 1 and out.stride(1) != 1


def _channels_last_wanted(input: torch.Tensor) -> bool:
    """channels_last input (and not also plain contiguous) -> channels_last output / grad_input."""
    return not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)


def _sizes(input, weight, offset, groups, offset_groups):
    batch, in_channels, in_h, in_w = input.shape
    out_channels, cin_g, kh, kw = weight.shape
    out_h, out_w = offset.shape[2], offset.shape[3]
    return dict(
        B=batch, Cin=in_channels, H=in_h, W=in_w, Cout=out_channels, CIN_G=cin_g,
        COUT_G=out_channels // groups, KH=kh, KW=kw, TAPS=kh * kw, OH=out_h, OW=out_w,
        L=out_h * out_w, COG=in_channels // offset_groups,
    )


def _check_op_args(name, input, weight, offset, mask, bias, groups, offset_groups, conv):
    """Cheap consistency checks of the op's own arguments (the public path validates fully)."""
    check(
        input.dim() == 4 and weight.dim() == 4 and offset.dim() == 4,
        lambda: f"{name}: input, weight and offset must be 4-D",
    )
    check(
        input.dtype in (torch.float32, torch.float16, torch.bfloat16),
        lambda: f"{name}: supports float32, float16 and bfloat16, not {input.dtype}",
    )
    for other in (weight, offset, mask, bias):
        if other is not None:
            check(
                other.dtype == input.dtype and other.device == input.device,
                lambda: f"{name}: every tensor must have input's dtype {input.dtype} and device "
                f"{input.device}",
            )
    check(
        groups >= 1 and offset_groups >= 1
        and input.shape[1] == weight.shape[1] * groups
        and weight.shape[0] % groups == 0 and input.shape[1] % offset_groups == 0
        and offset.shape[1] == 2 * offset_groups * weight.shape[2] * weight.shape[3]
        and input.shape[1] >= 1 and weight.shape[0] >= 1,
        lambda: f"{name}: inconsistent shapes (or no channels) input {list(input.shape)}, weight "
        f"{list(weight.shape)}, offset {list(offset.shape)} for groups={groups}, "
        f"offset_groups={offset_groups}",
    )
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w = conv
    check(
        min(stride_h, stride_w, dil_h, dil_w) >= 1 and min(pad_h, pad_w) >= 0,
        lambda: f"{name}: stride and dilation must be >= 1 and padding >= 0",
    )
    batch, _, in_h, in_w = input.shape
    kh, kw = weight.shape[2], weight.shape[3]
    out_shape = [
        batch,
        (in_h + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1,
        (in_w + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1,
    ]
    check(
        [offset.shape[0], offset.shape[2], offset.shape[3]] == out_shape,
        lambda: f"{name}: offset must be [B, 2*offset_groups*kh*kw, out_h, out_w] with "
        f"[B, out_h, out_w] = {out_shape}, got {list(offset.shape)}",
    )
    if mask is not None:
        check(
            list(mask.shape) == [batch, offset_groups * kh * kw, out_shape[1], out_shape[2]],
            lambda: f"{name}: mask must be [B, offset_groups*kh*kw, out_h, out_w], got "
            f"{list(mask.shape)}",
        )
    if bias is not None:
        check(
            list(bias.shape) == [weight.shape[0]],
            lambda: f"{name}: bias must be [Cout], got {list(bias.shape)}",
        )
    # The kernels index within one image (and across B * out_h * out_w output pixels) in int32;
    # strides count, so a view into a larger tensor is judged by the span it addresses.
    per_image = [input, offset] + ([mask] if mask is not None else [])
    check(
        all(_image_span(t) <= _INT32_MAX for t in per_image)
        and weight.shape[0] * offset.shape[2] * offset.shape[3] <= _INT32_MAX
        and batch * offset.shape[2] * offset.shape[3] <= _INT32_MAX,
        lambda: f"{name}: one image's elements (input, offset, mask; strides included), "
        f"Cout * out_h * out_w and B * out_h * out_w must each fit in int32 offsets",
    )


def _image_span(t: torch.Tensor) -> int:
    """Largest element offset within one image of a 4-D tensor: sum of (size - 1) * stride."""
    return sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


def _offset_mask_args(offset, mask):
    mask_arg = mask if mask is not None else offset  # never read when HAS_MASK is False
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    return mask_arg, (*offset.stride(), *mask_strides)


def _weight_by_tap(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[Cout, Cin_g, kh, kw] -> contiguous [G, T, Cin_g, Cout_g] (the GEMM's B operand layout)."""
    out_channels, cin_g, kh, kw = weight.shape
    return (
        weight.reshape(groups, out_channels // groups, cin_g, kh * kw)
        .permute(0, 3, 2, 1)
        .contiguous()
    )


@pem_triton_op("pem_kernels::deform_conv2d_triton")
def deform_conv2d_triton(
    input: torch.Tensor,
    weight: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    groups: int,
    offset_groups: int,
) -> torch.Tensor:
    """Triton DCNv2 forward: arguments and result of ``pem_kernels::deform_conv2d``.

    Returns ``[B, Cout, out_h, out_w]`` in ``input.dtype``, channels_last when ``input`` is.
    """
    conv = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    _check_op_args(
        "deform_conv2d_triton", input, weight, offset, mask, bias, groups, offset_groups, conv
    )
    s = _sizes(input, weight, offset, groups, offset_groups)
    memory_format = torch.channels_last if _channels_last_wanted(input) else torch.contiguous_format
    out = torch.empty(
        (s["B"], s["Cout"], s["OH"], s["OW"]), dtype=input.dtype, device=input.device,
        memory_format=memory_format,
    )
    M = s["B"] * s["L"]
    if M == 0:
        return out
    pixel_major = _pixel_major(input, out)
    block_n = block_size(s["COUT_G"], 16, 64 if INTERPRET else 128)
    block_k = block_size(min(s["CIN_G"], s["COG"]), 16, 32)
    block_m, num_warps = (128 if INTERPRET else 64), _num_warps(input.dtype)
    if pixel_major and not INTERPRET:
        # The transposed tiles need more registers: with the channel-major sizes (64 x 128 x 32)
        # ptxas (sm_90, triton 3.6) spills up to 7 KB per thread in fp32; with these, none (3.6
        # and 3.8, fp32 and bf16).
        block_m = 32 if input.dtype == torch.float32 else 64
        block_k, num_warps = 16, 8
    mask_arg, om_strides = _offset_mask_args(offset, mask)
    grid = (cdiv(M, block_m), groups * cdiv(s["COUT_G"], block_n))
    launcher(_forward_kernel, INTERPRET)[grid](
        input, offset, mask_arg, _weight_by_tap(weight, groups),
        bias.contiguous() if bias is not None else weight, out,
        M, s["L"], s["OW"], s["H"], s["W"], s["KW"], s["TAPS"], s["CIN_G"], s["COUT_G"], s["COG"],
        *conv, *input.stride(), *om_strides, *out.stride(),
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        PIXEL_MAJOR=pixel_major,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        **_dot_config(input),
    )
    return out


def _weight_grad_splits(tiles: int, m_blocks: int) -> int:
    """Pixel-axis splits of the weight gradient: a function of the shapes only (deterministic)."""
    if INTERPRET:
        return min(2, m_blocks)
    return max(1, min(m_blocks // 4 or 1, cdiv(4 * 132, tiles)))


@pem_triton_op("pem_kernels::_deform_conv2d_backward_triton")
def deform_conv2d_backward_triton(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    groups: int,
    offset_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``deform_conv2d_triton``: (grad_input, grad_weight, grad_offset, grad_mask,
    grad_bias), as ``pem_kernels::_deform_conv2d_backward`` (grad_mask is empty(0) without a mask).
    Bit-identical from run to run except grad_input outside torch's deterministic mode (atomics).
    """
    conv = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    name = "_deform_conv2d_backward_triton"
    _check_op_args(name, input, weight, offset, mask, None, groups, offset_groups, conv)
    s = _sizes(input, weight, offset, groups, offset_groups)
    check(
        list(grad_output.shape) == [s["B"], s["Cout"], s["OH"], s["OW"]],
        lambda: f"{name}: grad_output must have shape {[s['B'], s['Cout'], s['OH'], s['OW']]}, "
        f"got {list(grad_output.shape)}",
    )
    device, dtype = input.device, input.dtype
    grad_output = grad_output.to(dtype)
    memory_format = torch.channels_last if _channels_last_wanted(input) else torch.contiguous_format
    grad_input = torch.empty(input.shape, dtype=dtype, device=device, memory_format=memory_format)
    grad_offset = torch.empty(offset.shape, dtype=offset.dtype, device=device)
    grad_mask = (
        torch.empty(mask.shape, dtype=mask.dtype, device=device)
        if mask is not None else input.new_empty(0)
    )
    grad_bias = grad_output.sum((0, 2, 3), dtype=torch.float32).to(dtype)
    M = s["B"] * s["L"]
    if M == 0:
        return grad_input.zero_(), torch.zeros_like(weight), grad_offset, grad_mask, grad_bias

    dots = _dot_config(input)
    w_by_tap = _weight_by_tap(weight, groups)
    mask_arg, om_strides = _offset_mask_args(offset, mask)
    geometry = (s["H"], s["W"], s["KW"], s["TAPS"], s["CIN_G"], s["COUT_G"], s["COG"])
    block_n = block_size(s["COUT_G"], 16, 64)
    block_k = block_size(min(s["CIN_G"], s["COG"]), 16, 32)
    # Tiles along pixels for NCHW input and grad_output, as in the forward (see _gather_corners).
    pixel_major = _pixel_major(input, grad_output)
    om_block_k, om_warps, w_warps = block_k, _num_warps(dtype), _num_warps(dtype)
    if pixel_major and not INTERPRET:
        # ptxas (sm_90): with the channel-major sizes and warps the transposed tiles spill up to
        # 2.3 KB per thread (bf16, triton 3.6); with these at most 80 bytes (3.6 and 3.8).
        om_block_k, om_warps, w_warps = 16, 8, 8

    # grad_input: outside deterministic mode scattered with fp32 atomics by the offset/mask
    # kernel (into grad_input itself for fp32, else into an fp32 buffer of the same layout); in
    # deterministic mode gathered over a sorted corner list further down.
    scatter = not torch.are_deterministic_algorithms_enabled()
    if scatter:
        grad_input_acc = (
            grad_input.zero_() if dtype == torch.float32
            else torch.zeros_like(input, dtype=torch.float32, memory_format=memory_format)
        )
    else:
        grad_input_acc = grad_output.new_empty(1, dtype=torch.float32)  # never touched

    # grad_offset, grad_mask: one program per (pixel block, offset group).
    block_m = 128 if INTERPRET else 64
    launcher(_offset_mask_grad_kernel, INTERPRET)[(cdiv(M, block_m), offset_groups)](
        grad_output, input, offset, mask_arg, w_by_tap, grad_offset, grad_mask, grad_input_acc,
        M, s["L"], s["OW"], *geometry, *conv,
        *grad_output.stride(), *input.stride(), *om_strides,
        *(grad_input_acc.stride() if scatter else (0, 0, 0, 0)),
        HAS_MASK=mask is not None, SCATTER_INPUT_GRAD=scatter, PIXEL_MAJOR=pixel_major,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=om_block_k, num_warps=om_warps, **dots,
    )
    if scatter and grad_input_acc is not grad_input:
        grad_input.copy_(grad_input_acc)

    # grad_weight: split-pixel partial GEMMs, summed in a fixed order.
    block_m_w = 64
    tiles = (
        groups * s["TAPS"] * cdiv(s["CIN_G"], block_k) * cdiv(s["COUT_G"], block_n)
    )
    m_blocks = cdiv(M, block_m_w)
    splits = _weight_grad_splits(tiles, m_blocks)
    per_split = cdiv(m_blocks, splits)
    splits = cdiv(m_blocks, per_split)
    partial = torch.empty(
        (splits, groups, s["TAPS"], s["CIN_G"], s["COUT_G"]), dtype=torch.float32, device=device
    )
    launcher(_weight_grad_kernel, INTERPRET)[(tiles, splits)](
        grad_output, input, offset, mask_arg, partial,
        M, s["L"], s["OW"], *geometry, per_split, *conv,
        *grad_output.stride(), *input.stride(), *om_strides,
        HAS_MASK=mask is not None, PIXEL_MAJOR=pixel_major, BLOCK_M=block_m_w, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=w_warps, **dots,
    )
    grad_weight = partial.sum(0).permute(0, 3, 2, 1).reshape(weight.shape).to(weight.dtype)
    if scatter:
        return grad_input, grad_weight, grad_offset, grad_mask, grad_bias

    # grad_input (deterministic mode): corner list sorted by input pixel, then a gather per
    # input-pixel block.
    entries = s["B"] * offset_groups * s["TAPS"] * s["L"]
    keys = torch.empty(4 * entries, dtype=torch.int64, device=device)
    corner_weights = torch.empty(4 * entries, dtype=torch.float32, device=device)
    sentinel = entries // s["L"] * s["H"] * s["W"]  # B * OG * T * H * W: sorts after every key
    block = 128 if INTERPRET else 256
    launcher(_corner_kernel, INTERPRET)[(cdiv(entries, block),)](
        offset, mask_arg, keys, corner_weights, entries, sentinel,
        s["L"], s["OW"], s["H"], s["W"], s["KW"], s["TAPS"], offset_groups, *conv, *om_strides,
        HAS_MASK=mask is not None, BLOCK=block,
    )
    sorted_keys, perm = torch.sort(keys, stable=True)
    block_t = 32
    pixels = s["H"] * s["W"]
    n_tb = cdiv(pixels, block_t)
    starts = torch.clamp(torch.arange(n_tb + 1, device=device) * block_t, max=pixels)
    queries = (
        torch.arange(s["B"] * offset_groups * s["TAPS"], device=device)[:, None] * pixels
        + starts[None, :]
    )
    bounds = torch.searchsorted(sorted_keys, queries.reshape(-1))
    block_k_in = block_size(s["COG"], 16, 32)
    grid = (n_tb, offset_groups * cdiv(s["COG"], block_k_in), s["B"])
    launcher(_input_grad_kernel, INTERPRET)[grid](
        grad_output, w_by_tap, sorted_keys, perm, corner_weights, bounds, grad_input,
        s["L"], s["OW"], s["H"], s["W"], s["TAPS"], s["CIN_G"], s["COUT_G"], s["COG"],
        offset_groups, *grad_output.stride(), *grad_input.stride(),
        BLOCK_T=block_t, BLOCK_E=128 if INTERPRET else 64, BLOCK_N=block_n, BLOCK_K=block_k_in,
        num_warps=_num_warps(dtype), **dots,
    )
    return grad_input, grad_weight, grad_offset, grad_mask, grad_bias


# The same autograd as the C++ op, with the Triton backward.
_backward, _setup_context = autograd_functions(
    lambda *args: call_triton_op(deform_conv2d_backward_triton, *args)
)
deform_conv2d_triton.register_autograd(_backward, setup_context=_setup_context)

IntOrPair = Union[int, Sequence[int]]


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """torchvision's signature over the Triton op, with full argument validation
    (:func:`pem_kernels.reference.deform_conv.check_deform_conv2d_args`)."""
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = check_deform_conv2d_args(
        input, offset, weight, bias, stride, padding, dilation, mask
    )
    groups = input.shape[1] // weight.shape[1]
    offset_groups = offset.shape[1] // (2 * weight.shape[2] * weight.shape[3])
    return call_triton_op(
        deform_conv2d_triton, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
        dil_h, dil_w, groups, offset_groups,
    )
