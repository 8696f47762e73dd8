"""PEM-CA's feature projection fused into one Triton kernel (inference).

``keys[b, p, :] = W_out @ dwconv3x3(BN(memory + pos))[b, :, p] + b_out`` for every pixel p, with
BN in eval mode (a per-channel affine ``scale * x + shift`` from the running statistics, computed
in the kernel) and the
depthwise conv's zero padding applied *after* BN, exactly as ``nn.Conv2d(padding=1)`` pads its
BN-normalized input. Unfused, this chain reads and writes the [B, C, H, W] feature map four times
(add, BN, depthwise conv, the Linear over a transposed view) and is the largest memory cost of a
PEM-CA layer; fused, it reads memory and pos once and writes keys [B, HW, C_out] once.

One program computes a tile of BLOCK_P pixels of one image row x BLOCK_N output channels: it loops
over the input channels in blocks of BLOCK_K, builds the [BLOCK_P, BLOCK_K] depthwise-conv tile in
fp32 registers (9 masked, pixel-contiguous loads from NCHW memory; neighbouring taps hit L1/L2) and
feeds it straight into ``tl.dot`` with the matching [BLOCK_K, BLOCK_N] block of W_out^T.
Intermediates stay in fp32 (the unfused chain rounds BN and conv outputs to the input dtype: for
fp16/bf16 the fused result is the more precise one); fp32 inputs reach it where
``torch.get_float32_matmul_precision()`` allows TF32, as for the Linear it replaces. With
``normalize`` the program, which holds every output channel of its pixels (C_out <= 256), divides
each row by its L2 norm before the store. There is no backward: training, or any input that requires
grad, takes the composed ATen path (:class:`pem_kernels.nn.PEMCrossAttention` decides).

fp32 in PyTorch's default precision ("highest", no TF32) takes two steps instead, and the Linear
its exact SGEMM: a memory-bound kernel writes ``dwconv3x3(BN(memory + pos))`` pixel-major in fp32
(the transpose the Linear needs comes free with the store) and ``torch.addmm`` applies the Linear.
With IEEE products the fused kernel's ``tl.dot`` ran on the FMA units at a fraction of cuBLAS's
speed (on the H100 of 2026-11-26, at 32768 pixels and C = C_out = 256: 0.495 ms, cuBLAS's GEMM of
the same product 0.106 ms); the fused kernel with the other Triton kernels' 3xTF32 products is
not measured yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pem_kernels.ops.local_representation import no_backward, no_backward_setup
from pem_kernels.triton import (
    block_size,
    cdiv,
    check,
    check_operands,
    dot_operands,
    fp32_matmul_allows_tf32,
    interpreter_requested,
    launcher,
    pem_triton_op,
)
from pem_kernels.triton.products import dot_product

__all__ = ["local_representation_triton", "normalizes_in_kernel"]

INTERPRET = interpreter_requested()
NORMALIZE_EPS = tl.constexpr(1e-12)  # F.normalize's eps

# Launch configuration of the exact-fp32 path's BN + depthwise-conv kernel. 64 pixels x 16
# channels with 4 warps: ptxas (sm_90, triton 3.8, PEM's 256 x 128 x 256 fp32 with pos) gives it
# 162 registers and no spill, three blocks per SM; 64 x 32 (before 2026-11-26) took 255 registers
# and spilled 52 bytes per thread, two blocks per SM; 128 x 8 (4 warps) and 64 x 8 (2 warps) take
# 141. Not timed on a GPU yet: `python -m benchmarks tune bn_depthwise` times the candidates.
BN_DEPTHWISE_CONFIG = {"BLOCK_P": 64, "BLOCK_C": 16, "num_warps": 4}
# Exact fp32 (PyTorch's "highest" precision) takes the two-step path (module docstring); False
# sends it through the fused kernel with 3xTF32 products, which `python -m benchmarks tune
# projection_fp32` times against it (the projection alone) and `... tune layer_fp32_projection`
# (the whole PEM-CA forward, where the fused kernel also normalizes the keys in two launches fewer).
FP32_TWO_STEP = True
# Output channels per program at most (C_out = 256 in PEM: a program holds all of them).
MAX_BLOCK_N = 256


@triton.jit
def _row_tile(pid, W, BLOCK_P: tl.constexpr):
    """(h, w, w_ok) of program ``pid``'s BLOCK_P consecutive pixels of one image row: every tap's
    load is then contiguous along the pixels (coalesced from NCHW) and the row bounds scalars."""
    row_tiles = tl.cdiv(W, BLOCK_P)
    w = (pid % row_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    return pid // row_tiles, w, w < W


@triton.jit
def _bn_depthwise_tile(
    x_ptr, pos_ptr, mean_ptr, var_ptr, bn_weight_ptr, bn_bias_ptr, bn_eps, dw_weight_ptr,
    dw_bias_ptr, b, c, c_ok, h, w, p_ok, C, H, W, HAS_POS: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """[BLOCK_P, BLOCK_C] fp32 tile of dwconv3x3(BN(x + pos)) + dw_bias: pixels (h, w) of image b
    (w a run of one row), channels c. BN from its running statistics as the C++ kernels apply it:
    ``x * scale + shift``, ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale``.
    Every program recomputes this per channel block; the hardware rsqrt (about 2 ulp, like
    torch.rsqrt on CUDA) keeps that to 3-9% more instructions in the channel loop by the sm_90
    compiler's counts (IEEE sqrt and division: 12-19%)."""
    var = tl.load(var_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    scale = tl.math.rsqrt(var + bn_eps)
    scale *= tl.load(bn_weight_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.load(bn_bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32) - mean * scale
    plane = (b * C + c) * (H * W)  # start of channel c of image b, [BLOCK_C]
    conv = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for tap in tl.static_range(9):
        hh = h + (tap // 3 - 1)
        ww = w + (tap % 3 - 1)
        inside = p_ok & (ww >= 0) & (ww < W) & (hh >= 0) & (hh < H)
        offsets = plane[None, :] + (hh * W + ww)[:, None]
        ok = inside[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        if HAS_POS:
            v += tl.load(pos_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        # The conv zero-pads the BN output: padded taps contribute 0, not BN's shift.
        v = tl.where(ok, v * scale[None, :] + shift[None, :], 0.0)
        tap_weight = tl.load(dw_weight_ptr + c * 9 + tap, mask=c_ok, other=0.0).to(tl.float32)
        conv += v * tap_weight[None, :]
    return conv + tl.load(dw_bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _local_representation_kernel(
    x_ptr, pos_ptr, mean_ptr, var_ptr, bn_weight_ptr, bn_bias_ptr, bn_eps, dw_weight_ptr,
    dw_bias_ptr, weight_ptr, bias_ptr, out_ptr, C, H, W, C_OUT,
    HAS_POS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    h, w, p_ok = _row_tile(tl.program_id(0), W, BLOCK_P)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hw = H * W
    p = h * W + w
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < C_OUT
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        c_ok = c < C
        conv = _bn_depthwise_tile(
            x_ptr, pos_ptr, mean_ptr, var_ptr, bn_weight_ptr, bn_bias_ptr, bn_eps, dw_weight_ptr,
            dw_bias_ptr, b, c, c_ok, h, w, p_ok, C, H, W, HAS_POS, BLOCK_P, BLOCK_K,
        )
        # rhs[k, j] = W_out[n_j, c_k]
        rhs = tl.load(
            weight_ptr + n[None, :] * C + c[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0.0
        )
        acc += dot_product(conv, rhs, DOT_DTYPE, DOT_PRECISION)
    acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if NORMALIZE:
        # This program holds every output channel (one column block); the padding columns are 0.
        norm = tl.sqrt_rn(tl.sum(acc * acc, axis=1))
        # where, not tl.maximum: a NaN norm must stay NaN (F.normalize), fmax would drop it
        acc = tl.div_rn(acc, tl.where(norm < NORMALIZE_EPS, NORMALIZE_EPS, norm)[:, None])
    out_offsets = (b * hw + p)[:, None] * C_OUT + n[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def _bn_depthwise_conv_kernel(
    x_ptr, pos_ptr, mean_ptr, var_ptr, bn_weight_ptr, bn_bias_ptr, bn_eps, dw_weight_ptr,
    dw_bias_ptr, out_ptr, C, H, W, HAS_POS: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # The fused kernel's depthwise-conv tiles, stored [B, H*W, C]: BLOCK_P pixels of one image
    # row x BLOCK_C channels (coalesced pixel-major stores).
    h, w, p_ok = _row_tile(tl.program_id(0), W, BLOCK_P)
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    conv = _bn_depthwise_tile(
        x_ptr, pos_ptr, mean_ptr, var_ptr, bn_weight_ptr, bn_bias_ptr, bn_eps, dw_weight_ptr,
        dw_bias_ptr, b, c, c_ok, h, w, p_ok, C, H, W, HAS_POS, BLOCK_P, BLOCK_C,
    )
    out_offsets = (b * (H * W) + h * W + w)[:, None] * C + c[None, :]
    tl.store(out_ptr + out_offsets, conv, mask=p_ok[:, None] & c_ok[None, :])


def _launch_config(
    out_channels: int, dtype: torch.dtype, device: torch.device | None = None
) -> dict:
    dot_dtype, precision = dot_operands(dtype, INTERPRET, device)
    # All output channels of a pixel tile in one program (C_out = 256 in PEM), so the depthwise
    # conv is computed once per pixel; tl.dot needs block dimensions >= 16.
    block_n = block_size(out_channels, 16, MAX_BLOCK_N)
    # fp32 without software pipelining: three stages of the nine (eighteen with pos) tap tiles
    # need up to 330 KB of shared memory, more than an H100 block has (227 KiB); the taps are
    # mostly L1/L2 hits, so staging them buys little. 8 warps: with 4, ptxas (sm_90, triton 3.6)
    # spills 0.4-3.7 KB per thread for C_out <= 128; with 8, at most 64 bytes.
    return dict(
        BLOCK_P=64 if block_n <= 128 else 32, BLOCK_N=block_n, BLOCK_K=32,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, num_warps=8,
        num_stages=1 if dtype == torch.float32 else 3,
    )


def normalizes_in_kernel(dtype: torch.dtype, out_channels: int) -> bool:
    """Whether :func:`local_representation_triton` with ``normalize=True`` normalizes the keys in
    its kernel. Where it does not (exact fp32: the BN + depthwise-conv kernel and cuBLAS; or more
    than 256 output channels) it runs ``F.normalize`` after it, three more launches and another
    pass over the keys: PEM-CA then asks for raw keys and lets the selection normalize them
    (``normalize_keys``: one norm pass, a multiply per key element)."""
    if dtype == torch.float32 and FP32_TWO_STEP and not fp32_matmul_allows_tf32():
        return False
    return out_channels <= MAX_BLOCK_N  # one program holds every output channel of its pixels


@pem_triton_op("pem_kernels::local_representation_triton")
def local_representation_triton(
    memory: torch.Tensor,
    pos: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    bn_eps: float,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    normalize: bool = False,
) -> torch.Tensor:
    """keys [B, H*W, C_out] from memory [B, C, H, W] (+ pos, same shape, optional).

    Args:
        bn_mean, bn_var, bn_weight, bn_bias: [C] in memory's dtype (the affine ones optional)
            and bn_eps: the eval-mode BatchNorm, applied from its statistics in the kernel.
        dw_weight: [C, 1, 3, 3] depthwise weights; dw_bias: [C].
        weight: [C_out, C] and bias: [C_out], the Linear.
        normalize: L2-normalize every pixel's row (``F.normalize``, eps 1e-12): in the kernel
            when one program holds all C_out channels (C_out <= 256), else after it.
    """
    name = "local_representation_triton"
    check(memory.dim() == 4, lambda: f"{name}: memory must be [B, C, H, W], got shape "
          f"{list(memory.shape)}")
    batch, channels, height, width = memory.shape
    check(weight.dim() == 2, lambda: f"{name}: weight must be [C_out, C], got {list(weight.shape)}")
    out_channels = weight.shape[0]
    check_operands(name, memory, {
        "pos": (pos, tuple(memory.shape), None),
        "bn_mean": (bn_mean, (channels,), None),
        "bn_var": (bn_var, (channels,), None),
        "bn_weight": (bn_weight, (channels,), None),
        "bn_bias": (bn_bias, (channels,), None),
        "dw_weight": (dw_weight, (channels, 1, 3, 3), None),
        "dw_bias": (dw_bias, (channels,), None),
        "weight": (weight, (out_channels, channels), None),
        "bias": (bias, (out_channels,), None),
    })
    x = memory.contiguous()
    if batch * height * width * out_channels == 0:
        return x.new_empty(batch, height * width, out_channels)
    # The operands of the BN + depthwise-conv part, as both kernels take them. A BatchNorm
    # without affine (rare) gets the identity's.
    conv_operands = (
        x, pos.contiguous() if pos is not None else x, bn_mean.contiguous(), bn_var.contiguous(),
        bn_weight.contiguous() if bn_weight is not None else torch.ones_like(bn_mean),
        bn_bias.contiguous() if bn_bias is not None else torch.zeros_like(bn_mean), float(bn_eps),
        dw_weight.reshape(channels, 9).contiguous(), dw_bias.contiguous(),
    )
    if x.dtype == torch.float32 and FP32_TWO_STEP and not fp32_matmul_allows_tf32():
        return _conv_then_addmm(conv_operands, pos is not None, weight, bias, normalize)
    out = torch.empty(batch, height * width, out_channels, device=x.device, dtype=x.dtype)
    config = _launch_config(out_channels, x.dtype, x.device)
    in_kernel = normalize and config["BLOCK_N"] >= out_channels  # (not the two-step path here)
    grid = (
        height * cdiv(width, config["BLOCK_P"]),
        cdiv(out_channels, config["BLOCK_N"]),
        batch,
    )
    launcher(_local_representation_kernel, INTERPRET)[grid](
        *conv_operands, weight.contiguous(), bias.contiguous(), out, channels, height, width,
        out_channels,
        HAS_POS=pos is not None, NORMALIZE=in_kernel, **config,
    )
    if normalize and not in_kernel:
        out = torch.nn.functional.normalize(out, dim=-1)
    return out


def _conv_then_addmm(
    conv_operands: tuple, has_pos: bool, weight: torch.Tensor, bias: torch.Tensor,
    normalize: bool,
) -> torch.Tensor:
    """The exact-fp32 path (module docstring): [B, H*W, C] conv features, then the Linear."""
    batch, channels, height, width = conv_operands[0].shape
    conv = conv_operands[0].new_empty(batch, height * width, channels)
    config = BN_DEPTHWISE_CONFIG
    grid = (height * cdiv(width, config["BLOCK_P"]), cdiv(channels, config["BLOCK_C"]), batch)
    launcher(_bn_depthwise_conv_kernel, INTERPRET)[grid](
        *conv_operands, conv, channels, height, width, HAS_POS=has_pos, **config,
    )
    out = torch.addmm(bias, conv.view(-1, channels), weight.t()).view(batch, height * width, -1)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


local_representation_triton.register_autograd(no_backward, setup_context=no_backward_setup)
