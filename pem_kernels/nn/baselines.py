"""Mask2Former's masked cross-attention with PEM-CA's interface: the baselines PEM-CA is measured
against (Mask2Former ``CrossAttentionLayer``, facts §11)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MaskedCrossAttention", "SDPAMaskedCrossAttention", "blocked_attention_mask"]


def blocked_attention_mask(memory_mask: torch.Tensor) -> torch.Tensor:
    """Mask2Former's boolean attention mask from mask logits, True = blocked.

    ``sigmoid(logit) < 0.5``, detached; a (batch, query) row that blocks every pixel is unblocked
    (Mask2Former's per-row fix, so softmax never sees an all -inf row).

    Args:
        memory_mask: Tensor[B, Q, H, W] mask logits.

    Returns:
        Tensor[B, Q, H*W] bool.
    """
    blocked = memory_mask.detach().flatten(2).sigmoid() < 0.5
    return blocked & ~blocked.all(dim=-1, keepdim=True)


class MaskedCrossAttention(nn.Module):
    """Mask2Former's masked cross-attention layer (``nn.MultiheadAttention`` + LayerNorm).

    ``tgt + MHA(tgt + query_pos, memory + pos, memory, mask)`` followed by LayerNorm (post-norm,
    Mask2Former's default) or preceded by it (``normalize_before=True``). Same forward signature as
    :class:`pem_kernels.nn.PEMCrossAttention`; the memory is flattened to [HW, B, C] inside.
    """

    # Mask2Former leaves need_weights at its default, True: MHA's explicit baddbmm + softmax +
    # bmm path (the weights averaged over heads). False would route the attention through
    # scaled_dot_product_attention, a different kernel with different speed (that is
    # SDPAMaskedCrossAttention's role). The benchmarks record it with their results.
    need_weights = True

    def __init__(self, d_model: int = 256, nhead: int = 8, normalize_before: bool = False) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        self.num_heads = nhead
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def _attend(self, query, key, value, blocked):
        mask = blocked.repeat_interleave(self.num_heads, dim=0)  # [B * heads, Q, HW]
        return self.multihead_attn(
            query, key, value, attn_mask=mask, need_weights=self.need_weights
        )[0]

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        pos: torch.Tensor | None,
        query_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        value = memory.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        key = value if pos is None else value + pos.flatten(2).permute(2, 0, 1)
        query = self.norm(tgt) if self.normalize_before else tgt
        if query_pos is not None:
            query = query + query_pos
        if memory_mask is None:
            blocked = torch.zeros(
                memory.shape[0], tgt.shape[0], value.shape[0], dtype=torch.bool, device=tgt.device
            )
        else:
            blocked = blocked_attention_mask(memory_mask)
        out = tgt + self._attend(query, key, value, blocked)
        return out if self.normalize_before else self.norm(out)


class SDPAMaskedCrossAttention(MaskedCrossAttention):
    """:class:`MaskedCrossAttention` computed with ``F.scaled_dot_product_attention``.

    The same parameters (a state_dict loads both ways) and results; the attention runs through
    PyTorch's fused SDPA kernels with a boolean mask broadcast over heads instead of MHA's
    per-head float mask.
    """

    def _attend(self, query, key, value, blocked):
        attn = self.multihead_attn
        channels = query.shape[-1]
        w_q, w_k, w_v = attn.in_proj_weight.split(channels)
        b_q, b_k, b_v = attn.in_proj_bias.split(channels)

        def heads(x, weight, bias):  # [L, B, C] -> [B, heads, L, D]
            projected = F.linear(x, weight, bias)
            length, batch, _ = projected.shape
            return projected.view(length, batch, self.num_heads, -1).permute(1, 2, 0, 3)

        allowed = ~blocked[:, None]  # [B, 1, Q, HW], True = may attend
        out = F.scaled_dot_product_attention(
            heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v), attn_mask=allowed
        )
        batch, _, num_queries, _ = out.shape
        out = out.permute(2, 0, 1, 3).reshape(num_queries, batch, channels)
        return attn.out_proj(out)
