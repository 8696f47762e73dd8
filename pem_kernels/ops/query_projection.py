"""PEM-CA's query projection fused for inference: the dispatch between its kernels.

``queries [B, Q, C_out] = F.normalize(Linear(LayerNorm(tgt + query_pos)))`` as one op instead of
six (the add, LayerNorm, the Linear, and F.normalize's norm, clamp and division): one launch on the
``cuda`` backend (``csrc/cuda/query_projection.cu``) and the ``triton`` backend
(:mod:`pem_kernels.triton.query_projection`), one C++ op on ``cpu``
(``csrc/cpu/query_projection.cpp``: the LayerNorm rows, one BLAS GEMM, the normalized rows).
There is no backward: the caller (:meth:`pem_kernels.nn.PEMCrossAttention.forward`) uses it only
when no gradient is needed.
"""

from __future__ import annotations

import torch

from pem_kernels._backends import call_op, inference_only_autograd
from pem_kernels._extension import EXTENSION_LOADED, has_kernel

__all__ = ["FUSED_QUERY_PROJECTION_BACKENDS", "MAX_CHANNELS", "fused_query_projection",
           "no_backward", "no_backward_setup"]

FUSED_QUERY_PROJECTION_BACKENDS = ("cpu", "cuda", "triton")
# Channels in and out that the C++ kernels take (csrc/include/pem_kernels/
# query_projection_checks.h): the CUDA kernel holds a row in shared memory.
MAX_CHANNELS = 1024


def fused_query_projection(
    backend: str,
    tgt: torch.Tensor,
    query_pos: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor | None:
    """L2-normalized queries [B, Q, C_out] on ``backend``, or ``None`` when that backend has no
    fused kernel for them (the caller then runs the modules).

    Args:
        tgt, query_pos: [Q, B, C] (query_pos optional), one dtype.
        ln_weight, ln_bias: [C] and ln_eps: the LayerNorm; weight [C_out, C], bias [C_out]: the
            Linear.
    """
    if backend in ("cpu", "cuda"):
        if not has_kernel("query_projection", backend.upper()) or max(weight.shape) > MAX_CHANNELS:
            return None
        return call_op(torch.ops.pem_kernels.query_projection.default, tgt, query_pos, ln_weight,
                       ln_bias, float(ln_eps), weight, bias)
    if backend != "triton":
        return None
    from pem_kernels.triton import call_triton_op
    from pem_kernels.triton.query_projection import MAX_OUT_CHANNELS, query_projection_triton

    if weight.shape[0] > MAX_OUT_CHANNELS:
        return None
    return call_triton_op(
        query_projection_triton, tgt, query_pos, ln_weight, ln_bias, float(ln_eps), weight, bias
    )


# The fused query projection's autograd, on every backend's op.
no_backward, no_backward_setup = inference_only_autograd(
    "query_projection: the fused query projection has no backward (it serves inference); "
    "run PEMCrossAttention's query_proj modules when gradients are needed"
)


if EXTENSION_LOADED:
    torch.library.register_autograd(
        "pem_kernels::query_projection", no_backward, setup_context=no_backward_setup
    )

    @torch.library.register_fake("pem_kernels::query_projection")
    def _query_projection_fake(tgt, query_pos, ln_weight, ln_bias, ln_eps, weight, bias):
        torch._check(tgt.dim() == 3, lambda: "query_projection: tgt must be [Q, B, C]")
        torch._check(weight.dim() == 2, lambda: "query_projection: weight must be [C_out, C]")
        queries, batch, _ = tgt.shape
        return tgt.new_empty(batch, queries, weight.shape[0])
