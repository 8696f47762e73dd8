"""Reference prototype selection: the executable specification of ``prototype_select``."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

__all__ = ["prototype_select_ref", "EmptyMaskRule", "EMPTY_MASK_RULES"]

EmptyMaskRule = Literal["per_query", "official"]
EMPTY_MASK_RULES: tuple[str, ...] = get_args(EmptyMaskRule)  # what argument checks accept


def prototype_select_ref(
    keys: torch.Tensor,
    queries: torch.Tensor,
    mask: torch.Tensor | None,
    num_heads: int,
    *,
    empty: EmptyMaskRule = "per_query",
    normalize_keys: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selects, per head and query, the allowed pixel most similar to the query (PEM-CA, eq. 3-4).

    Heads are contiguous channel chunks of ``D = C // num_heads``. For image ``b``, head ``h`` and
    query ``n`` the score of pixel ``p`` is ``<k[b, p, hD:(h+1)D], queries[b, n, hD:(h+1)D]>``, with
    ``k = F.normalize(keys, dim=-1)`` when ``normalize_keys`` else ``keys``. The index is the argmax
    of the score over the pixels the mask allows, computed in the input dtype:

    - ties go to the lowest pixel index and NaN counts as larger than every number
      (``torch.argmax``);
    - if every allowed pixel scores -inf, the first allowed pixel is taken;
    - a query with no allowed pixel: ``empty="per_query"`` (Mask2Former's convention) selects over
      all pixels; ``empty="official"`` (the official PEM code) unmasks the image only when all its
      queries are empty and otherwise gives the empty query pixel 0.

    The prototype's chunk ``h`` is ``k[b, index, hD:(h+1)D]``. This reference materializes the
    [B, heads, HW, N] similarity; the fused backends never do. Gradients reach ``keys`` only
    (through the gather), never ``queries`` or ``mask``.

    Args:
        keys: Tensor[B, HW, C], the pixel features.
        queries: Tensor[B, N, C], same dtype as ``keys``.
        mask: Tensor[B, N, HW] bool, True where a pixel may be selected; ``None`` allows all.
        num_heads: number of heads; must divide C.

    Returns:
        prototypes: Tensor[B, N, C] in ``keys.dtype``.
        indices: Tensor[B, num_heads, N] int64, the selected pixel per head and query.
    """
    batch, pixels, channels = keys.shape
    num_queries = queries.shape[1]
    head_dim = channels // num_heads
    selected_from = F.normalize(keys, dim=-1) if normalize_keys else keys
    keys_by_head = selected_from.view(batch, pixels, num_heads, head_dim).transpose(1, 2)
    queries_by_head = queries.view(batch, num_queries, num_heads, head_dim).transpose(1, 2)
    scores = torch.einsum("bhpd,bhnd->bhpn", keys_by_head, queries_by_head)  # [B, h, HW, N]

    if mask is None:
        allowed = torch.ones(batch, 1, pixels, num_queries, dtype=torch.bool, device=keys.device)
    else:
        query_empty = ~mask.any(dim=-1)  # [B, N]
        if empty == "per_query":
            unmask = query_empty[:, None, None, :]
        else:
            unmask = query_empty.all(dim=-1)[:, None, None, None]
        allowed = mask.transpose(1, 2)[:, None] | unmask  # [B, 1, HW, N]
    scores = scores.masked_fill(~allowed, float("-inf"))
    indices = scores.argmax(dim=2)  # [B, h, N]
    # A row whose best allowed score is -inf (all allowed pixels -inf, or an official empty query)
    # takes its first allowed pixel; argmax over an all-False row gives 0, as the official code.
    best = scores.gather(2, indices[:, :, None]).squeeze(2)
    first_allowed = allowed.to(torch.uint8).argmax(dim=2).expand_as(indices)
    indices = torch.where(best == float("-inf"), first_allowed, indices)

    gather_index = indices[..., None].expand(batch, num_heads, num_queries, head_dim)
    prototypes = keys_by_head.gather(2, gather_index)  # [B, h, N, D]
    prototypes = prototypes.transpose(1, 2).reshape(batch, num_queries, channels)
    return prototypes, indices
