"""PEM-CA's query projection fused into one Triton kernel (inference).

``queries[b, q, :] = l2norm(W @ LayerNorm(tgt[q, b, :] + query_pos[q, b, :]) + bias)``: the
official layer's ``F.normalize(query_proj(tgt + query_pos))`` with ``query_proj = LayerNorm ->
Linear``. Unfused that is six kernel launches on a few hundred rows (add, LayerNorm, Linear, and
F.normalize's norm, clamp and division), each costing the host more than the GPU; fused it is one.

One program owns ``BLOCK_R`` rows (a row is a (query, image) pair of ``tgt`` [Q, B, C]) and every
output channel (C_out <= 256): it takes the row means, then the variances (two passes over the
rows' C channels, as precise as LayerNorm's own reduction), then streams the rows again, normalizes
and scales them into the ``tl.dot`` operand block by block against W^T, adds the bias, divides each
row by its L2 norm (``max(norm, 1e-12)``, a NaN norm kept NaN) and writes ``[B, Q, C_out]``. All
intermediates are fp32 (the unfused chain rounds the LayerNorm and Linear outputs to the input
dtype); fp32 products as :func:`pem_kernels.triton.fp32_dot_precision` says (3xTF32, or TF32
where ``torch.get_float32_matmul_precision()`` allows it). There
is no backward: training takes the modules (:class:`pem_kernels.nn.PEMCrossAttention` decides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pem_kernels.ops.query_projection import no_backward, no_backward_setup
from pem_kernels.triton import (
    block_size,
    cdiv,
    check,
    check_operands,
    dot_operands,
    interpreter_requested,
    launcher,
    pem_triton_op,
)
from pem_kernels.triton.products import dot_product

__all__ = ["MAX_OUT_CHANNELS", "query_projection_triton"]

INTERPRET = interpreter_requested()
NORMALIZE_EPS = tl.constexpr(1e-12)  # F.normalize's eps
# Every output channel of a row lives in one program (the L2 norm needs them all).
MAX_OUT_CHANNELS = 256


@triton.jit
def _load_rows(x_ptr, pos_ptr, rows, row_ok, ks, C, HAS_POS: tl.constexpr):
    """x (+ pos) [BLOCK_R, BLOCK_K] in fp32, zero outside the rows and channels."""
    ok = row_ok[:, None] & (ks < C)[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + ks[None, :]
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if HAS_POS:
        x += tl.load(pos_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    return x, ok


@triton.jit
def _query_projection_kernel(
    x_ptr, pos_ptr, ln_weight_ptr, ln_bias_ptr, weight_ptr, bias_ptr, out_ptr,
    R, B, Q, C, C_OUT,
    HAS_POS: tl.constexpr, LN_EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row r = q * B + b of tgt
    row_ok = rows < R
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        x, _ = _load_rows(x_ptr, pos_ptr, rows, row_ok, k0 + tl.arange(0, BLOCK_K), C, HAS_POS)
        total += tl.sum(x, axis=1)
    # div_rn: a plain '/' compiles to div.full.f32 (about 2 ulp) on the GPU
    mean = tl.div_rn(total, tl.zeros_like(total) + C)
    squares = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        x, ok = _load_rows(x_ptr, pos_ptr, rows, row_ok, k0 + tl.arange(0, BLOCK_K), C, HAS_POS)
        centered = tl.where(ok, x - mean[:, None], 0.0)
        squares += tl.sum(centered * centered, axis=1)
    variance = tl.div_rn(squares, tl.zeros_like(squares) + C)
    rstd = tl.div_rn(tl.zeros_like(variance) + 1.0, tl.sqrt_rn(variance + LN_EPS))

    outs = tl.arange(0, BLOCK_N)
    out_ok = outs < C_OUT
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        x, ok = _load_rows(x_ptr, pos_ptr, rows, row_ok, ks, C, HAS_POS)
        gamma = tl.load(ln_weight_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(ln_bias_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        normed = (x - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        normed = tl.where(ok, normed, 0.0)
        # rhs[k, j] = W[j, k]
        rhs = tl.load(
            weight_ptr + outs[None, :] * C + ks[:, None], mask=k_ok[:, None] & out_ok[None, :],
            other=0.0,
        )
        acc += dot_product(normed, rhs, DOT_DTYPE, DOT_PRECISION)
    acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    # The padding columns are 0 (masked weights and bias), so they do not enter the norms.
    norm = tl.sqrt_rn(tl.sum(acc * acc, axis=1))
    # where, not tl.maximum: a NaN norm must stay NaN (F.normalize), fmax would drop it
    acc = tl.div_rn(acc, tl.where(norm < NORMALIZE_EPS, NORMALIZE_EPS, norm)[:, None])
    q = rows // B
    out_rows = (rows - q * B) * Q + q  # row (q, b) of tgt -> row (b, q) of the output
    tl.store(
        out_ptr + out_rows.to(tl.int64)[:, None] * C_OUT + outs[None, :],
        acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :],
    )


def _launch_config(
    out_channels: int, dtype: torch.dtype, device: torch.device | None = None
) -> dict:
    dot_dtype, precision = dot_operands(dtype, INTERPRET, device)
    # 8 warps: with 4, ptxas (sm_90, triton 3.6 and 3.8) spills about 500 bytes per thread at
    # C_out = 256 in fp32; with 8 at most 40 (none in bf16).
    return dict(
        BLOCK_R=16, BLOCK_N=block_size(out_channels, 16), BLOCK_K=32, DOT_DTYPE=dot_dtype,
        DOT_PRECISION=precision, num_warps=8,
    )


@pem_triton_op("pem_kernels::query_projection_triton")
def query_projection_triton(
    tgt: torch.Tensor,
    query_pos: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """L2-normalized queries [B, Q, C_out] from tgt [Q, B, C] (+ query_pos, same shape).

    Args:
        ln_weight, ln_bias: [C], the LayerNorm's affine; ln_eps its eps.
        weight: [C_out, C] and bias: [C_out], the Linear; C_out <= 256.
    """
    name = "query_projection_triton"
    check(tgt.dim() == 3, lambda: f"{name}: tgt must be [Q, B, C], got shape {list(tgt.shape)}")
    queries, batch, channels = tgt.shape
    check(weight.dim() == 2, lambda: f"{name}: weight must be [C_out, C], got {list(weight.shape)}")
    out_channels = weight.shape[0]
    check_operands(name, tgt, {
        "query_pos": (query_pos, (queries, batch, channels), None),
        "ln_weight": (ln_weight, (channels,), None),
        "ln_bias": (ln_bias, (channels,), None),
        "weight": (weight, (out_channels, channels), None),
        "bias": (bias, (out_channels,), None),
    })
    check(
        out_channels <= MAX_OUT_CHANNELS,
        lambda: f"query_projection_triton: at most {MAX_OUT_CHANNELS} output channels (a row's "
        f"L2 norm needs them all in one program), got {out_channels}",
    )
    out = torch.empty(batch, queries, out_channels, device=tgt.device, dtype=tgt.dtype)
    rows = queries * batch
    if out.numel() == 0:
        return out
    x = tgt.contiguous()
    config = _launch_config(out_channels, x.dtype, x.device)
    launcher(_query_projection_kernel, INTERPRET)[(cdiv(rows, config["BLOCK_R"]),)](
        x, query_pos.contiguous() if query_pos is not None else x, ln_weight.contiguous(),
        ln_bias.contiguous(), weight.contiguous(), bias.contiguous(), out,
        rows, batch, queries, channels, out_channels,
        HAS_POS=query_pos is not None, LN_EPS=float(ln_eps), **config,
    )
    return out


query_projection_triton.register_autograd(no_backward, setup_context=no_backward_setup)
