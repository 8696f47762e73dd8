"""Reference prototype attention: the post-gather part of PEM-CA (paper eq. 5-7)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

__all__ = ["prototype_attention_ref", "AttentionNormAxis", "ATTENTION_NORM_AXES"]

AttentionNormAxis = Literal["queries", "channels"]
ATTENTION_NORM_AXES: tuple[str, ...] = get_args(AttentionNormAxis)  # what argument checks accept


def prototype_attention_ref(
    prototypes: torch.Tensor,
    queries: torch.Tensor,
    residual: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    alpha: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    *,
    normalize: AttentionNormAxis = "queries",
) -> torch.Tensor:
    """``residual + W_out(alpha * l2norm(W_A(P * q)) + P) + b_out``.

    ``l2norm`` is ``F.normalize`` (eps 1e-12) over the query axis (``normalize="queries"``, what the
    official PEM code does: each (image, channel) column over the N queries is unit-norm) or over
    the channel axis (``"channels"``, what the paper writes).

    Args:
        prototypes: Tensor[B, N, C], the selected prototypes P.
        queries: Tensor[B, N, C], the normalized projected queries q.
        residual: Tensor[B, N, C], added to the output (the layer's input queries).
        proj_weight, proj_bias: W_A as Tensor[C, C] and Tensor[C] (``nn.Linear`` layout).
        alpha: Tensor with C elements (the official parameter is [1, 1, C]).
        out_weight, out_bias: W_out as Tensor[C, C] and Tensor[C].

    Returns:
        Tensor[B, N, C].
    """
    attended = F.linear(prototypes * queries, proj_weight, proj_bias)
    attended = F.normalize(attended, dim=1 if normalize == "queries" else -1)
    mixed = attended * alpha.reshape(-1) + prototypes
    return F.linear(mixed, out_weight, out_bias) + residual
