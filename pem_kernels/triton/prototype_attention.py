"""Fused prototype attention (PEM-CA after the gather, paper eq. 5-7) in Triton.

Forward, one program per image b (the l2norm over queries couples all N rows of an image)::

    X  = P * q                                  [N, C]  (element-wise)
    A  = X @ W_A^T + b_A                        [N, C]
    An = A / max(||A||, eps)                    over the query axis (per column) or channels (per row)
    M  = alpha * An + P
    Y  = M @ W_out^T + b_out + residual

All of it is one launch: A is produced in column blocks (a K loop of ``tl.dot`` over the input
channels), normalized in registers, and M is staged in a per-image fp32 scratch (L2-resident,
N x C) because the second GEMM needs all of M's columns; a barrier separates the two phases.

Backward, one program per image, the same structure in reverse::

    dM  = dY @ W_out          dalpha = sum_n dM * An     dAn = alpha * dM
    dA  = (dAn - An * <An, dAn>) / ||A||   (or dAn / eps where the norm was clamped)
    dX  = dA @ W_A            dP = dM + q * dX           dq = P * dX

The element-wise chain, both normalizations and the two activation GEMMs are fused; the weight
gradients (dW_out = dY^T M, dW_A = dA^T X, summed over images) are plain GEMMs left to
cuBLAS/ATen in the autograd wrapper, with a fixed reduction order (deterministic).

Scratch and saved tensors are fp32; inputs may be fp32, fp16 or bf16 (GEMM operands in the input
dtype, fp32 accumulation; fp32 operands use IEEE fp32 products, not TF32, to match PyTorch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pem_kernels.triton import (
    call_triton_op,
    cdiv,
    interpreter_requested,
    launcher,
    next_power_of_2,
    pem_triton_op,
)

__all__ = ["prototype_attention_triton"]

INTERPRET = interpreter_requested()
# All N rows of an image live in one program: BLOCK_N = 512 is the largest tile whose fp32
# kernels fit an H100 block's shared memory (checked by the sm_90 compile test).
MAX_QUERIES = 512
# F.normalize's default eps; a constexpr (a runtime float argument may become fp64 in compiled
# graphs, and kernels may only read globals that are constexpr)
EPS = tl.constexpr(1e-12)


@triton.jit
def _gemm_block(
    lhs_ptr, rhs_ptr, rows, cols, row_ok, col_ok, K,
    lhs_stride, rhs_row_stride, rhs_col_stride,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    """acc[i, j] = sum_k lhs[rows[i], k] * rhs(k, cols[j]), rhs(k, j) at rhs_ptr + k*rhs_row_stride + j*rhs_col_stride."""
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        lhs = tl.load(lhs_ptr + rows[:, None] * lhs_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        rhs = tl.load(
            rhs_ptr + ks[:, None] * rhs_row_stride + cols[None, :] * rhs_col_stride,
            mask=k_ok[:, None] & col_ok[None, :], other=0.0,
        )
        if IEEE:
            acc += tl.dot(lhs.to(DOT_DTYPE), rhs.to(DOT_DTYPE), input_precision="ieee")
        else:
            acc += tl.dot(lhs.to(DOT_DTYPE), rhs.to(DOT_DTYPE))
    return acc


@triton.jit
def _prototype_attention_fwd_kernel(
    p_ptr, q_ptr, r_ptr, wa_ptr, ba_ptr, alpha_ptr, wo_ptr, bo_ptr,
    out_ptr, x_ptr, an_ptr, m_ptr, div_ptr,
    N, C,
    NORM_OVER_QUERIES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    image = b * N * C
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # X = P * q, staged in fp32 scratch: it is the K operand of the first GEMM (and the backward's).
    for j0 in range(0, C, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        ok = row_ok[:, None] & (cols < C)[None, :]
        offs = image + rows[:, None] * C + cols[None, :]
        x = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(q_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, x, mask=ok)
    tl.debug_barrier()
    # A = X W_A^T + b_A in column blocks; rows' squared norms accumulate for the channel norm.
    row_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j0 in range(0, C, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        a = _gemm_block(x_ptr + image, wa_ptr, rows, cols, row_ok, col_ok, C, C, 1, C,
                        BLOCK_N, BLOCK_J, BLOCK_K, DOT_DTYPE, IEEE)
        a += tl.load(ba_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        a = tl.where(ok, a, 0.0)  # padding must not enter the norms
        offs = image + rows[:, None] * C + cols[None, :]
        if NORM_OVER_QUERIES:
            div = tl.maximum(tl.sqrt_rn(tl.sum(a * a, axis=0)), EPS)
            tl.store(div_ptr + b * C + cols, div, mask=col_ok)
            tl.store(an_ptr + offs, tl.div_rn(a, div[None, :]), mask=ok)
        else:
            row_sq += tl.sum(a * a, axis=1)
            tl.store(an_ptr + offs, a, mask=ok)
    if not NORM_OVER_QUERIES:
        div_rows = tl.maximum(tl.sqrt_rn(row_sq), EPS)
        tl.store(div_ptr + b * N + rows, div_rows, mask=row_ok)
    tl.debug_barrier()
    # M = alpha * An + P (finishing the channel norm in the same pass).
    for j0 in range(0, C, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        offs = image + rows[:, None] * C + cols[None, :]
        an = tl.load(an_ptr + offs, mask=ok, other=0.0)
        if not NORM_OVER_QUERIES:
            an = tl.div_rn(an, div_rows[:, None])
            tl.store(an_ptr + offs, an, mask=ok)
        alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        m = alpha[None, :] * an + tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(m_ptr + offs, m, mask=ok)
    tl.debug_barrier()
    # Y = M W_out^T + b_out + residual.
    for j0 in range(0, C, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        y = _gemm_block(m_ptr + image, wo_ptr, rows, cols, row_ok, col_ok, C, C, 1, C,
                        BLOCK_N, BLOCK_J, BLOCK_K, DOT_DTYPE, IEEE)
        offs = image + rows[:, None] * C + cols[None, :]
        y += tl.load(bo_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y += tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _prototype_attention_bwd_kernel(
    dy_ptr, p_ptr, q_ptr, wa_ptr, alpha_ptr, wo_ptr, an_ptr, div_ptr,
    dp_ptr, dq_ptr, da_ptr, dalpha_ptr,
    N, C,
    NORM_OVER_QUERIES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    image = b * N * C
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # dM = dY W_out (stored in dP, which gets dX * q added later); dAn = alpha * dM (in dA).
    row_dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j0 in range(0, C, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        offs = image + rows[:, None] * C + cols[None, :]
        dm = _gemm_block(dy_ptr + image, wo_ptr, rows, cols, row_ok, col_ok, C, C, C, 1,
                         BLOCK_N, BLOCK_J, BLOCK_K, DOT_DTYPE, IEEE)
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
            row_dot += tl.sum(an * dan, axis=1)
            tl.store(da_ptr + offs, dan, mask=ok)
    if not NORM_OVER_QUERIES:
        tl.debug_barrier()
        div_rows = tl.load(div_ptr + b * N + rows, mask=row_ok, other=1.0)
        projection = tl.where(div_rows > EPS, row_dot, 0.0)
        for j0 in range(0, C, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            ok = row_ok[:, None] & (cols < C)[None, :]
            offs = image + rows[:, None] * C + cols[None, :]
            dan = tl.load(da_ptr + offs, mask=ok, other=0.0)
            an = tl.load(an_ptr + offs, mask=ok, other=0.0)
            tl.store(da_ptr + offs, tl.div_rn(dan - an * projection[:, None], div_rows[:, None]), mask=ok)
    tl.debug_barrier()
    # dX = dA W_A; dP = dM + q * dX; dq = P * dX.
    for j0 in range(0, C, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        offs = image + rows[:, None] * C + cols[None, :]
        dx = _gemm_block(da_ptr + image, wa_ptr, rows, cols, row_ok, col_ok, C, C, C, 1,
                         BLOCK_N, BLOCK_J, BLOCK_K, DOT_DTYPE, IEEE)
        p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dm = tl.load(dp_ptr + offs, mask=ok, other=0.0)
        tl.store(dp_ptr + offs, dm + q * dx, mask=ok)
        tl.store(dq_ptr + offs, p * dx, mask=ok)


def _launch_config(num_queries: int, dtype: torch.dtype) -> dict:
    # tl.dot needs every block dimension >= 16; all N rows of an image live in one program.
    block_n = max(16, next_power_of_2(int(num_queries)))
    # The interpreter's bf16/fp16 tl.dot is unreliable: it multiplies fp32 operands instead.
    dot_dtype = tl.float32 if (dtype == torch.float32 or INTERPRET) else (
        tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    )
    # 8 warps: with 4, ptxas (sm_90, triton 3.8) spills 1-4.5 KB per thread at N = 100 (the
    # [BLOCK_N, BLOCK_J] fp32 accumulator and operand tiles of one image); with 8, 0-0.5 KB.
    return dict(
        BLOCK_N=block_n, BLOCK_J=64 if block_n <= 128 else 32, BLOCK_K=32,
        DOT_DTYPE=dot_dtype, IEEE=dot_dtype == tl.float32, num_warps=8,
    )


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
    batch, num_queries, channels = prototypes.shape
    torch._check(
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
        launcher(_prototype_attention_fwd_kernel, INTERPRET)[(batch,)](
            p, q, r, proj_weight.contiguous(), proj_bias.contiguous(), alpha.reshape(-1).contiguous(),
            out_weight.contiguous(), out_bias.contiguous(), out, x, an, m, div,
            num_queries, channels, NORM_OVER_QUERIES=normalize_over_queries,
            **_launch_config(num_queries, p.dtype),
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
    dp, dq, da = (torch.empty(batch, num_queries, channels, **f32) for _ in range(3))
    dalpha = torch.empty(batch, channels, **f32)
    if dp.numel():
        launcher(_prototype_attention_bwd_kernel, INTERPRET)[(batch,)](
            grad_out.contiguous(), prototypes.contiguous(), queries.contiguous(),
            proj_weight.contiguous(), alpha.reshape(-1).contiguous(), out_weight.contiguous(),
            normalized, divisors, dp, dq, da, dalpha, num_queries, channels,
            NORM_OVER_QUERIES=normalize_over_queries,
            **_launch_config(num_queries, prototypes.dtype),
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
