"""PEM-CA's query projection fused for inference: the dispatch to its kernel.

``queries [B, Q, C_out] = F.normalize(Linear(LayerNorm(tgt + query_pos)))`` in one launch on the
``triton`` backend (:mod:`pem_kernels.triton.query_projection`); the other backends have no fused
kernel (on a CPU the six ops cost little). There is no backward: the caller
(:meth:`pem_kernels.nn.PEMCrossAttention.forward`) uses it only when no gradient is needed.
"""

from __future__ import annotations

import torch

__all__ = ["FUSED_QUERY_PROJECTION_BACKENDS", "fused_query_projection"]

FUSED_QUERY_PROJECTION_BACKENDS = ("triton",)


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
    if backend != "triton":
        return None
    from pem_kernels.triton import call_triton_op
    from pem_kernels.triton.query_projection import MAX_OUT_CHANNELS, query_projection_triton

    if weight.shape[0] > MAX_OUT_CHANNELS:
        return None
    return call_triton_op(
        query_projection_triton, tgt, query_pos, ln_weight, ln_bias, float(ln_eps), weight, bias
    )
