"""Fused prototype attention (PEM-CA after the gather, paper eq. 5-7) in Triton.

Forward::

    X  = P * q                                  [N, C]  (element-wise)
    A  = X @ W_A^T + b_A                        [N, C]
    An = A / max(||A||, eps)                    over queries (per column) or channels (per row)
    M  = alpha * An + P
    Y  = M @ W_out^T + b_out + residual

Two launches, each with one program per (block of BLOCK_J output channels, image): all N rows of
an image live in every program (the query-axis norm couples them), and the channels are spread
over programs, so that a single image (PEM's batch 1) still occupies C / BLOCK_J SMs.

1. A's column block, from X computed on the fly from P and q inside the K loop (each program also
   stores its block of X, which the backward needs). With the query-axis norm the block is
   complete: its norms, An and M are written here. With the channel norm A is written raw, with
   each row's partial sum of squares over the block.
2. Y's column block = M @ W_out^T over all of M's columns. With the channel norm, the row norms are
   the partial sums added in block order, and M is computed from the raw A inside the K loop (the
   programs of the first block also store An and M for the backward).

Why two launches and not one: a launch cannot wait for its other programs, and Y's column block
needs every column of M, so a one-launch forward would have each program recompute all of A (and
with the channel norm A twice, for the row norms first): 9 K loops of C / BLOCK_K steps per
program instead of 1 + 1 over the two launches, on the same C / BLOCK_J programs. These tiny GEMMs
are latency-bound (the two kernels took 0.047 and 0.041 ms for their 8 steps each on the H200 on
2026-11-26), so that would cost an estimated several times their device time to save one launch
of host time (an estimated 0.01-0.02 ms); one program per image instead would put batch 1 on one SM.

Backward, the same two-launch structure in reverse::

    dM  = dY @ W_out          dalpha = sum_n dM * An     dAn = alpha * dM
    dA  = (dAn - An * <An, dAn>) / ||A||   (or dAn / eps where the norm was clamped)
    dX  = dA @ W_A            dP = dM + q * dX           dq = P * dX

1. dM's column block, dalpha, dAn; with the query-axis norm dA too (its projection is per column);
   with the channel norm the row dot <An, dAn> as partial sums over the block.
2. dX's column block over all of dA's columns (with the channel norm dA is computed in the K loop
   from dAn, An and the summed row dots), then dP and dq of the block.

The weight gradients (dW_out = dY^T M, dW_A = dA^T X, summed over images) are plain GEMMs left to
cuBLAS/ATen in the autograd wrapper, with a fixed reduction order; every partial sum above is also
added in a fixed order, so the results are deterministic.

Scratch and saved tensors are fp32; inputs may be fp32, fp16 or bf16 (GEMM operands in the input
dtype, fp32 accumulation; fp32 operands as :func:`pem_kernels.triton.fp32_dot_precision` says:
3xTF32 for fp32 accuracy, TF32 where ``torch.get_float32_matmul_precision()`` allows it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pem_kernels.triton import (
    block_size,
    call_triton_op,
    called_directly,
    cdiv,
    check,
    check_operands,
    dot_operands,
    interpreter_requested,
    launcher,
    pem_triton_op,
)
from pem_kernels.triton.products import dot_product

__all__ = ["prototype_attention_triton"]

INTERPRET = interpreter_requested()
# All N rows of an image live in every program: BLOCK_N = 512 is the largest tile whose fp32
# kernels fit an H100 block's shared memory (checked by the sm_90 compile test).
MAX_QUERIES = 512
# F.normalize's default eps; a constexpr (a runtime float argument may become fp64 in compiled
# graphs, and kernels may only read globals that are constexpr)
EPS = tl.constexpr(1e-12)


@triton.jit
def _norm_divisor(norm):
    """F.normalize's divisor max(norm, eps), keeping a NaN norm NaN (tl.maximum, an fmax on the
    GPU, would return eps and leave the other entries of a NaN vector finite)."""
    return tl.where(norm < EPS, EPS, norm)


@triton.jit
def _gemm_block(
    lhs_ptr, rhs_ptr, rows, cols, row_ok, col_ok, K,
    lhs_stride, rhs_row_stride, rhs_col_stride,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc[i, j] = sum_k lhs[rows[i], k] * rhs(k, cols[j]), with rhs(k, j) at
    rhs_ptr + k * rhs_row_stride + j * rhs_col_stride."""
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        lhs = tl.load(
            lhs_ptr + rows[:, None] * lhs_stride + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        )
        rhs = tl.load(
            rhs_ptr + ks[:, None] * rhs_row_stride + cols[None, :] * rhs_col_stride,
            mask=k_ok[:, None] & col_ok[None, :], other=0.0,
        )
        acc += dot_product(lhs, rhs, DOT_DTYPE, DOT_PRECISION)
    return acc


@triton.jit
def _program_block(N, C, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """This program's (column block, image): its index, the image's offset, its rows (all N) and
    columns, their masks and the [BLOCK_N, BLOCK_J] element offsets."""
    pid_j = tl.program_id(0)
    b = tl.program_id(1)
    image = b * N * C
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    offs = image + rows[:, None] * C + cols[None, :]
    return pid_j, b, image, rows, row_ok, cols, col_ok, ok, offs


@triton.jit
def _k_tile(k0, image, rows, row_ok, C, BLOCK_K: tl.constexpr):
    """The K step at k0 of a GEMM over channels: its channels, their mask, and the element offsets
    and mask of the [BLOCK_N, BLOCK_K] tile of the image's rows."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < C
    tile = image + rows[:, None] * C + ks[None, :]
    tile_ok = row_ok[:, None] & k_ok[None, :]
    return ks, k_ok, tile, tile_ok


@triton.jit
def _fwd_a_kernel(
    p_ptr, q_ptr, wa_ptr, ba_ptr, alpha_ptr, x_ptr, a_ptr, an_ptr, m_ptr, div_ptr, partial_ptr,
    N, C,
    NORM_OVER_QUERIES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Launch 1 of the forward: A's column block (see the module docstring)."""
    pid_j, b, image, rows, row_ok, cols, col_ok, ok, offs = _program_block(N, C, BLOCK_N, BLOCK_J)
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, p * tl.load(q_ptr + offs, mask=ok, other=0.0).to(tl.float32), mask=ok)
    # A[:, cols] = X W_A[cols, :]^T + b_A, X's K tiles made from P and q as they are loaded.
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks, k_ok, tile, tile_ok = _k_tile(k0, image, rows, row_ok, C, BLOCK_K)
        x = tl.load(p_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32) * tl.load(
            q_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        w_ok = k_ok[:, None] & col_ok[None, :]
        w = tl.load(wa_ptr + cols[None, :] * C + ks[:, None], mask=w_ok, other=0.0)
        acc += dot_product(x, w, DOT_DTYPE, DOT_PRECISION)
    a = acc + tl.load(ba_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    a = tl.where(ok, a, 0.0)  # padding must not enter the norms
    if NORM_OVER_QUERIES:
        div = _norm_divisor(tl.sqrt_rn(tl.sum(a * a, axis=0)))
        tl.store(div_ptr + b * C + cols, div, mask=col_ok)
        an = tl.div_rn(a, div[None, :])
        tl.store(an_ptr + offs, an, mask=ok)
        alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(m_ptr + offs, alpha[None, :] * an + p, mask=ok)
    else:
        tl.store(a_ptr + offs, a, mask=ok)
        blocks = tl.num_programs(0)
        row_sq = tl.sum(a * a, axis=1)
        tl.store(partial_ptr + (b * blocks + pid_j) * N + rows, row_sq, mask=row_ok)


@triton.jit
def _fwd_y_kernel(
    p_ptr, r_ptr, wo_ptr, bo_ptr, alpha_ptr, a_ptr, an_ptr, m_ptr, div_ptr, partial_ptr, out_ptr,
    N, C,
    NORM_OVER_QUERIES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Launch 2 of the forward: Y's column block (see the module docstring)."""
    pid_j, b, image, rows, row_ok, cols, col_ok, ok, offs = _program_block(N, C, BLOCK_N, BLOCK_J)
    if NORM_OVER_QUERIES:
        y = _gemm_block(m_ptr + image, wo_ptr, rows, cols, row_ok, col_ok, C, C, 1, C,
                        BLOCK_N, BLOCK_J, BLOCK_K, DOT_DTYPE, DOT_PRECISION)
    else:
        # Row norms: the blocks' partial sums of squares, added in block order.
        blocks = tl.num_programs(0)
        row_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for block in range(0, blocks):
            row_sq += tl.load(partial_ptr + (b * blocks + block) * N + rows, mask=row_ok, other=0.0)
        div_rows = _norm_divisor(tl.sqrt_rn(row_sq))
        if pid_j == 0:
            tl.store(div_ptr + b * N + rows, div_rows, mask=row_ok)
        y = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks, k_ok, tile, tile_ok = _k_tile(k0, image, rows, row_ok, C, BLOCK_K)
            an = tl.div_rn(tl.load(a_ptr + tile, mask=tile_ok, other=0.0), div_rows[:, None])
            alpha = tl.load(alpha_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            m = alpha[None, :] * an + tl.load(p_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
            if pid_j == 0:  # An and M are saved for the backward
                tl.store(an_ptr + tile, an, mask=tile_ok)
                tl.store(m_ptr + tile, m, mask=tile_ok)
            w_ok = k_ok[:, None] & col_ok[None, :]
            w = tl.load(wo_ptr + cols[None, :] * C + ks[:, None], mask=w_ok, other=0.0)
            y += dot_product(m, w, DOT_DTYPE, DOT_PRECISION)
    y += tl.load(bo_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y += tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_dm_kernel(
    dy_ptr, wo_ptr, alpha_ptr, an_ptr, div_ptr, dp_ptr, da_ptr, dan_ptr, dalpha_ptr, partial_ptr,
    N, C,
    NORM_OVER_QUERIES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Launch 1 of the backward: dM, dalpha and dAn (dA with the query-axis norm) of a column
    block."""
    pid_j, b, image, rows, row_ok, cols, col_ok, ok, offs = _program_block(N, C, BLOCK_N, BLOCK_J)
    # dM[:, cols] = dY W_out[:, cols], stored in dP (launch 2 adds q * dX).
    dm = _gemm_block(dy_ptr + image, wo_ptr, rows, cols, row_ok, col_ok, C, C, C, 1,
                     BLOCK_N, BLOCK_J, BLOCK_K, DOT_DTYPE, DOT_PRECISION)
    dm = tl.where(ok, dm, 0.0)
    tl.store(dp_ptr + offs, dm, mask=ok)
    an = tl.load(an_ptr + offs, mask=ok, other=0.0)
    tl.store(dalpha_ptr + b * C + cols, tl.sum(dm * an, axis=0), mask=col_ok)
    alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dan = alpha[None, :] * dm
    if NORM_OVER_QUERIES:
        div = tl.load(div_ptr + b * C + cols, mask=col_ok, other=1.0)
        # Where the norm was clamped to eps the divisor is a constant: no projection term.
        projection = tl.where(div > EPS, tl.sum(an * dan, axis=0), 0.0)
        tl.store(da_ptr + offs, tl.div_rn(dan - an * projection[None, :], div[None, :]), mask=ok)
    else:
        tl.store(dan_ptr + offs, dan, mask=ok)
        blocks = tl.num_programs(0)
        row_dot = tl.sum(an * dan, axis=1)
        tl.store(partial_ptr + (b * blocks + pid_j) * N + rows, row_dot, mask=row_ok)


@triton.jit
def _bwd_dx_kernel(
    p_ptr, q_ptr, wa_ptr, an_ptr, div_ptr, dan_ptr, partial_ptr, da_ptr, dp_ptr, dq_ptr,
    N, C,
    NORM_OVER_QUERIES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Launch 2 of the backward: dX, dP and dq of a column block."""
    pid_j, b, image, rows, row_ok, cols, col_ok, ok, offs = _program_block(N, C, BLOCK_N, BLOCK_J)
    # dX[:, cols] = dA W_A[:, cols]
    if NORM_OVER_QUERIES:
        dx = _gemm_block(da_ptr + image, wa_ptr, rows, cols, row_ok, col_ok, C, C, C, 1,
                         BLOCK_N, BLOCK_J, BLOCK_K, DOT_DTYPE, DOT_PRECISION)
    else:
        blocks = tl.num_programs(0)
        row_dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for block in range(0, blocks):
            partial = partial_ptr + (b * blocks + block) * N + rows
            row_dot += tl.load(partial, mask=row_ok, other=0.0)
        div_rows = tl.load(div_ptr + b * N + rows, mask=row_ok, other=1.0)
        projection = tl.where(div_rows > EPS, row_dot, 0.0)
        dx = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks, k_ok, tile, tile_ok = _k_tile(k0, image, rows, row_ok, C, BLOCK_K)
            dan = tl.load(dan_ptr + tile, mask=tile_ok, other=0.0)
            an = tl.load(an_ptr + tile, mask=tile_ok, other=0.0)
            da = tl.div_rn(dan - an * projection[:, None], div_rows[:, None])
            if pid_j == 0:  # dA is returned for the weight gradient
                tl.store(da_ptr + tile, da, mask=tile_ok)
            w_ok = k_ok[:, None] & col_ok[None, :]
            w = tl.load(wa_ptr + ks[:, None] * C + cols[None, :], mask=w_ok, other=0.0)
            dx += dot_product(da, w, DOT_DTYPE, DOT_PRECISION)
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dm = tl.load(dp_ptr + offs, mask=ok, other=0.0)
    tl.store(dp_ptr + offs, dm + q * dx, mask=ok)
    tl.store(dq_ptr + offs, p * dx, mask=ok)


# Output channels per program. A PEM-sized call (batch 1) is a few tiny GEMMs on C / BLOCK_J
# programs, latency-bound: `python -m benchmarks tune attention_columns` on the H200 on
# 2026-11-27 (fp32, 100 queries, C = 256) timed the forward at 0.0244 ms with 16 (16 programs)
# against 0.0272 with 32 (8 programs).
ATTENTION_COLUMNS = 16


def _launch_config(
    num_queries: int, dtype: torch.dtype, device: torch.device | None = None
) -> dict:
    # tl.dot needs every block dimension >= 16; all N rows of an image live in every program.
    block_n = block_size(num_queries, 16)
    dot_dtype, precision = dot_operands(dtype, INTERPRET, device)
    # BLOCK_J output channels per program (ATTENTION_COLUMNS): PEM's C = 256 gives 16 programs
    # per image at 16. Fewer pipeline
    # stages for more queries: each stage holds a [BLOCK_N, BLOCK_K] operand tile (fp32 at
    # BLOCK_N = 512 with 3 stages: 328 KiB of shared memory, over an H100 block's 227 KiB).
    # Warps (ptxas for sm_90, triton 3.6): at BLOCK_N = 128, 4 warps spill up to 280 bytes per
    # thread in fp32 and 148 in bf16, 8 warps none; at 256 and 512, 8 warps spill up to 1 KB,
    # 16 warps about half of that.
    return dict(
        BLOCK_N=block_n, BLOCK_J=ATTENTION_COLUMNS, BLOCK_K=32, DOT_DTYPE=dot_dtype,
        DOT_PRECISION=precision, num_warps=8 if block_n <= 128 else 16,
        num_stages=3 if block_n <= 128 else 2 if block_n <= 256 else 1,
    )


def _plan(prototypes: torch.Tensor, normalize_over_queries: bool) -> tuple:
    """(launch config, column blocks, full, partial) of a forward or backward call. ``full``
    [B, N, C] and ``partial`` [B, blocks, N] are the channel norm's fp32 scratch (raw A and the
    row sums of squares forward, dAn and the row dots backward); the query-axis norm never touches
    them and gets one-element stand-ins, so that no argument aliases a written one."""
    batch, num_queries, channels = prototypes.shape
    config = _launch_config(num_queries, prototypes.dtype, prototypes.device)
    blocks = cdiv(channels, config["BLOCK_J"])
    f32 = dict(device=prototypes.device, dtype=torch.float32)
    if normalize_over_queries:
        full = partial = torch.empty(1, **f32)
    else:
        full = torch.empty(batch, num_queries, channels, **f32)
        partial = torch.empty(batch, blocks, num_queries, **f32)
    return config, blocks, full, partial


def _check_forward_operands(
    name, prototypes, queries, residual, proj_weight, proj_bias, alpha, out_weight, out_bias
) -> None:
    channels = prototypes.shape[2]
    check_operands(name, prototypes, {
        "queries": (queries, prototypes.shape, None),
        "residual": (residual, prototypes.shape, None),
        "proj_weight": (proj_weight, (channels, channels), None),
        "proj_bias": (proj_bias, (channels,), None),
        "alpha": (alpha.reshape(-1), (channels,), None),
        "out_weight": (out_weight, (channels, channels), None),
        "out_bias": (out_bias, (channels,), None),
    })


@pem_triton_op("pem_kernels::prototype_attention_triton")
def prototype_attention_triton(
    prototypes: torch.Tensor,
    queries: torch.Tensor,
    residual: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    alpha: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    normalize_over_queries: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [B, N, C], X, An, M [B, N, C] fp32, divisors [B, C] or [B, N] fp32); the last
    four are saved for the backward."""
    name = "prototype_attention_triton"
    check(prototypes.dim() == 3,
          lambda: f"{name}: prototypes must be [B, N, C], got shape {list(prototypes.shape)}")
    batch, num_queries, channels = prototypes.shape
    # The kernels index every operand by these shapes: a wrong one would be read out of bounds.
    # A direct call from the public op or the layer has been checked already (the check took
    # about 8 us per call on the CPU, on a path that is host-bound on a GPU).
    if not called_directly():
        _check_forward_operands(name, prototypes, queries, residual, proj_weight, proj_bias,
                                alpha, out_weight, out_bias)
    check(
        num_queries <= MAX_QUERIES,
        lambda: f"prototype_attention_triton: at most {MAX_QUERIES} queries per image (all N rows "
        f"of an image live in one program), got N = {num_queries}",
    )
    p, q, r = prototypes.contiguous(), queries.contiguous(), residual.contiguous()
    out = torch.empty_like(p)
    f32 = dict(device=p.device, dtype=torch.float32)
    x, an, m = (torch.empty(batch, num_queries, channels, **f32) for _ in range(3))
    div = torch.empty(batch, channels if normalize_over_queries else num_queries, **f32)
    if out.numel():
        config, blocks, a, partial = _plan(prototypes, normalize_over_queries)  # a: raw A
        wa, wo = proj_weight.contiguous(), out_weight.contiguous()
        alpha_flat = alpha.reshape(-1).contiguous()
        launcher(_fwd_a_kernel, INTERPRET)[(blocks, batch)](
            p, q, wa, proj_bias.contiguous(), alpha_flat, x, a, an, m, div, partial,
            num_queries, channels, NORM_OVER_QUERIES=normalize_over_queries, **config,
        )
        launcher(_fwd_y_kernel, INTERPRET)[(blocks, batch)](
            p, r, wo, out_bias.contiguous(), alpha_flat, a, an, m, div, partial, out,
            num_queries, channels, NORM_OVER_QUERIES=normalize_over_queries, **config,
        )
    return out, x, an, m, div


@pem_triton_op("pem_kernels::_prototype_attention_backward_triton")
def prototype_attention_backward_triton(
    grad_out: torch.Tensor,
    prototypes: torch.Tensor,
    queries: torch.Tensor,
    proj_weight: torch.Tensor,
    alpha: torch.Tensor,
    out_weight: torch.Tensor,
    normalized: torch.Tensor,
    divisors: torch.Tensor,
    normalize_over_queries: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dP, dq, dA [B, N, C] fp32, dalpha per image [B, C] fp32)."""
    batch, num_queries, channels = prototypes.shape
    f32 = dict(device=prototypes.device, dtype=torch.float32)
    check_operands("_prototype_attention_backward_triton", prototypes, {
        "grad_out": (grad_out, prototypes.shape, None),
        "queries": (queries, prototypes.shape, None),
        "proj_weight": (proj_weight, (channels, channels), None),
        "alpha": (alpha.reshape(-1), (channels,), None),
        "out_weight": (out_weight, (channels, channels), None),
        "normalized": (normalized, prototypes.shape, torch.float32),
        "divisors": (divisors, (batch, channels if normalize_over_queries else num_queries),
                     torch.float32),
    })
    dp, dq, da = (torch.empty(batch, num_queries, channels, **f32) for _ in range(3))
    # Zeros: with no queries (N = 0) no kernel runs, and alpha's gradient is 0, not whatever
    # the allocation held.
    dalpha = torch.zeros(batch, channels, **f32)
    if dp.numel():
        config, blocks, dan, partial = _plan(prototypes, normalize_over_queries)
        p, q = prototypes.contiguous(), queries.contiguous()
        alpha_flat = alpha.reshape(-1).contiguous()
        launcher(_bwd_dm_kernel, INTERPRET)[(blocks, batch)](
            grad_out.contiguous(), out_weight.contiguous(), alpha_flat, normalized, divisors, dp,
            da, dan, dalpha, partial, num_queries, channels,
            NORM_OVER_QUERIES=normalize_over_queries, **config,
        )
        launcher(_bwd_dx_kernel, INTERPRET)[(blocks, batch)](
            p, q, proj_weight.contiguous(), normalized, divisors, dan, partial, da, dp, dq,
            num_queries, channels, NORM_OVER_QUERIES=normalize_over_queries, **config,
        )
    return dp, dq, da, dalpha


def _setup_context(ctx, inputs, output) -> None:
    prototypes, queries, _residual, proj_weight, _pb, alpha, out_weight, _ob, by_queries = inputs
    _out, x, an, m, div = output
    ctx.save_for_backward(prototypes, queries, proj_weight, alpha, out_weight, x, an, m, div)
    ctx.normalize_over_queries = by_queries
    ctx.alpha_shape = alpha.shape
    ctx.mark_non_differentiable(x, an, m, div)


def _backward(ctx, grad_out, _gx, _gan, _gm, _gdiv):
    prototypes, queries, proj_weight, alpha, out_weight, x, an, m, div = ctx.saved_tensors
    dp, dq, da, dalpha = call_triton_op(
        prototype_attention_backward_triton, grad_out, prototypes, queries, proj_weight, alpha,
        out_weight, an, div, ctx.normalize_over_queries,
    )
    dy = grad_out.float()
    # Weight gradients: GEMMs over all images' rows, in one fixed order.
    grad_out_weight = dy.flatten(0, 1).t() @ m.flatten(0, 1)
    grad_proj_weight = da.flatten(0, 1).t() @ x.flatten(0, 1)
    dtype = prototypes.dtype
    return (
        dp.to(dtype), dq.to(dtype), grad_out.clone(),
        grad_proj_weight.to(proj_weight.dtype), da.sum((0, 1)).to(proj_weight.dtype),
        dalpha.sum(0).reshape(ctx.alpha_shape).to(alpha.dtype),
        grad_out_weight.to(out_weight.dtype), dy.sum((0, 1)).to(out_weight.dtype), None,
    )


prototype_attention_triton.register_autograd(_backward, setup_context=_setup_context)
