"""PEM's transformer decoder (official ``MultiScaleMaskedTransformerDecoder``, facts section 2).

6 layers cycling the pixel decoder's levels 1/32, 1/16, 1/8 (twice). Each layer is
PEM-CA (:class:`pem_kernels.nn.PEMCrossAttention`) -> pre-norm self-attention -> pre-norm FFN
(256 -> 2048 -> 256). Prediction heads run on the initial queries and after every layer: 7
predictions, the last one is the output and the first six the ``aux_outputs``. Each prediction's
mask logits, bilinearly resized to the next layer's level, are the next layer's attention mask
(raw logits; PEM-CA blocks ``logit < 0``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pem_kernels.nn import PEMCrossAttention

__all__ = [
    "FFNLayer",
    "MLP",
    "PEMTransformerDecoder",
    "PositionEmbeddingSine",
    "SelfAttentionLayer",
]


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine positional encoding (no padding mask).

    For pixel (y, x) of an H x W map (1-based cumulative coordinates), with ``normalize`` the
    coordinates become ``y / (H + eps) * scale`` and ``x / (W + eps) * scale`` (eps = 1e-6); each
    is divided by ``temperature ** (2 * (i // 2) / num_pos_feats)`` for i < num_pos_feats, and
    sin / cos are interleaved over even / odd i. Output channels: [y features, x features].

    Shapes: x [B, C, H, W] (only its shape, device and dtype are used) ->
    [B, 2 * num_pos_feats, H, W] (an expanded view of one [1, 2 * num_pos_feats, H, W] encoding).

    The encoding depends on (H, W, dtype, device) and the settings only, and a forward asks for
    the same three (one per decoder level): eager calls keep up to :attr:`CACHE_SIZE` of them
    (keyed by all of those; on a GPU each costs about 17 small launches per level and forward,
    and the model's forward is host-bound) and return the same values, which no caller writes to.
    ``.to()`` and friends empty the cache; so does a torch.compile trace, which folds the
    computation into its graph instead.
    """

    CACHE_SIZE = 8

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale: only meaningful with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict[tuple, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if torch.compiler.is_compiling():
            return self._encoding(h, w, x.dtype, x.device).expand(b, -1, -1, -1)
        # Tensors made under inference mode may not enter autograd later: their own entries. The
        # settings too, should someone change one after a forward.
        key = (h, w, x.dtype, x.device, torch.is_inference_mode_enabled(), self.num_pos_feats,
               self.temperature, self.normalize, self.scale)
        encoding = self._cache.get(key)
        if encoding is None:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            encoding = self._cache[key] = self._encoding(h, w, x.dtype, x.device)
        return encoding.expand(b, -1, -1, -1)

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # a device or dtype change: drop the old device's tensors
        return super()._apply(fn, recurse)

    def _encoding(self, h: int, w: int, out_dtype: torch.dtype, device: torch.device) -> Tensor:
        """The encoding [1, 2 * num_pos_feats, H, W] in ``out_dtype``."""
        # Compute in at least fp32 so that low-precision inputs get accurate encodings.
        dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        y_embed = torch.arange(1, h + 1, device=device, dtype=dtype)[:, None].expand(h, w)
        x_embed = torch.arange(1, w + 1, device=device, dtype=dtype)[None, :].expand(h, w)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (h + eps) * self.scale
            x_embed = x_embed / (w + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, device=device, dtype=dtype)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        # Channel-first [C, H, W] as it is built (the official code builds [H, W, C] and permutes):
        # the same values, but a contiguous result that the fused PEM-CA kernels read without a
        # copy per layer call.
        dim_t = dim_t[:, None, None]
        pos_x = x_embed / dim_t
        pos_y = y_embed / dim_t
        pos_x = torch.stack((pos_x[0::2].sin(), pos_x[1::2].cos()), dim=1).flatten(0, 1)
        pos_y = torch.stack((pos_y[0::2].sin(), pos_y[1::2].cos()), dim=1).flatten(0, 1)
        return torch.cat((pos_y, pos_x), dim=0).to(out_dtype).unsqueeze(0)


class SelfAttentionLayer(nn.Module):
    """Pre-norm self-attention: ``tgt + MHA(q = k = LN(tgt) + query_pos, v = LN(tgt))``.

    Shapes: tgt [Q, B, C], query_pos [Q, B, C] -> [Q, B, C].
    """

    def __init__(self, d_model: int = 256, nhead: int = 8) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)
        _xavier_matrices(self)

    def forward(self, tgt: Tensor, query_pos: Tensor | None) -> Tensor:
        x = self.norm(tgt)
        q = x if query_pos is None else x + query_pos
        return tgt + self.self_attn(q, q, value=x, need_weights=False)[0]


class FFNLayer(nn.Module):
    """Pre-norm FFN: ``tgt + Linear(ReLU(Linear(LN(tgt))))`` (256 -> 2048 -> 256, no dropout).

    Shapes: [Q, B, C] -> [Q, B, C].
    """

    def __init__(self, d_model: int = 256, dim_feedforward: int = 2048) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        _xavier_matrices(self)

    def forward(self, tgt: Tensor) -> Tensor:
        return tgt + self.linear2(F.relu(self.linear1(self.norm(tgt))))


def _xavier_matrices(module: nn.Module) -> None:
    # The official SelfAttentionLayer / FFNLayer re-init every >1-D parameter (not biases, not LN).
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (not after the last).

    Shapes: [..., input_dim] -> [..., output_dim].
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class PEMTransformerDecoder(nn.Module):
    """PEM's masked transformer decoder with prototype cross-attention.

    Args:
        num_classes: K (the class head has K + 1 outputs, the last is "no object").
        in_channels: channels of the pixel decoder's multi-scale features (128).
        hidden_dim: C (256).
        num_queries: Q (100).
        nheads: heads of PEM-CA and self-attention (8).
        dim_feedforward: FFN width (2048).
        dec_layers: decoder layers (6; the official config says 7 and subtracts 1).
        mask_dim: channels of mask_features (256).
        backend: ``"auto"`` or ``"reference"``, passed to every PEM-CA.

    Forward: ``features`` = [x32, x16, x8], each [B, in_channels, H_l, W_l], and
    ``mask_features`` [B, mask_dim, H4, W4] -> {"pred_logits": [B, Q, K + 1], "pred_masks":
    [B, Q, H4, W4] (logits), "aux_outputs": 6 dicts with the same two keys, one per earlier
    prediction (initial queries, then layers 1..5)}.
    """

    num_feature_levels = 3

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 128,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 6,
        mask_dim: int = 256,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if dec_layers < 1:
            raise ValueError(f"dec_layers: expected >= 1, got {dec_layers}")
        if not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries: expected a positive int, got {num_queries!r}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.in_channels = in_channels
        self.mask_dim = mask_dim
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.cross_attention_layers = nn.ModuleList(
            PEMCrossAttention(hidden_dim, nheads, backend=backend) for _ in range(dec_layers)
        )
        self.self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers)
        )
        self.ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            proj = nn.Conv2d(in_channels, hidden_dim, 1)
            # detectron2's c2_xavier_fill: kaiming_uniform(a=1), zero bias.
            nn.init.kaiming_uniform_(proj.weight, a=1)
            nn.init.zeros_(proj.bias)
            self.input_proj.append(proj)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def set_backend(self, backend: str) -> None:
        """Switches every PEM-CA layer to ``backend``."""
        for layer in self.cross_attention_layers:
            layer.backend = backend

    def forward_prediction_heads(
        self, output: Tensor, mask_features: Tensor, attn_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Heads on queries ``output`` [Q, B, C].

        Returns class logits [B, Q, K + 1], mask logits [B, Q, H4, W4], and the attention mask
        for the next layer [B, Q, *attn_size] (bilinear, align_corners=False, raw logits).
        """
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(
            outputs_mask, size=attn_size, mode="bilinear", align_corners=False
        )
        return outputs_class, outputs_mask, attn_mask

    def forward(self, features: list[Tensor], mask_features: Tensor) -> dict[str, object]:
        if len(features) != self.num_feature_levels:
            raise ValueError(
                f"features: expected {self.num_feature_levels} levels [x32, x16, x8], "
                f"got {len(features)}"
            )
        if mask_features.dim() != 4 or mask_features.shape[1] != self.mask_dim:
            raise ValueError(
                f"mask_features: expected [B, {self.mask_dim}, H, W], "
                f"got {list(mask_features.shape)}"
            )
        batch = mask_features.shape[0]
        srcs, pos, sizes = [], [], []
        for i, f in enumerate(features):
            if f.dim() != 4 or f.shape[0] != batch or f.shape[1] != self.in_channels:
                raise ValueError(
                    f"features[{i}]: expected [{batch}, {self.in_channels}, H, W], "
                    f"got {list(f.shape)}"
                )
            sizes.append((f.shape[2], f.shape[3]))
            pos.append(self.pe_layer(f))
            # PEM-CA takes 4-D memory, so the level embedding is broadcast over H, W.
            srcs.append(self.input_proj[i](f) + self.level_embed.weight[i][None, :, None, None])

        query_embed = self.query_embed.weight.unsqueeze(1).expand(-1, batch, -1)
        output = self.query_feat.weight.unsqueeze(1).expand(-1, batch, -1)

        predictions_class, predictions_mask = [], []
        cls, masks, attn_mask = self.forward_prediction_heads(output, mask_features, sizes[0])
        predictions_class.append(cls)
        predictions_mask.append(masks)
        num_layers = len(self.cross_attention_layers)
        for i in range(num_layers):
            level = i % self.num_feature_levels
            output = self.cross_attention_layers[i](
                output, srcs[level], attn_mask, pos[level], query_embed
            )
            output = self.self_attention_layers[i](output, query_embed)
            output = self.ffn_layers[i](output)
            next_size = sizes[(i + 1) % self.num_feature_levels]
            cls, masks, attn_mask = self.forward_prediction_heads(output, mask_features, next_size)
            predictions_class.append(cls)
            predictions_mask.append(masks)

        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_masks": m}
                for c, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ],
        }
