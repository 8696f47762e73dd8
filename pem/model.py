"""The PEM model: backbone -> pixel decoder -> transformer decoder, with one kernel switch.

``PEM(backbone, num_classes, backend)`` takes 0-255 RGB images, normalizes them with the ImageNet
mean / std, zero-pads them (after normalization, as detectron2's ``ImageList``) at the bottom and
right to a multiple of 32, and returns the decoder's predictions on the padded canvas (see
:meth:`PEM.forward`); :mod:`pem.inference` turns them into semantic and panoptic results.

``backend="auto"`` runs PEM-CA and the deformable convs on the fused ``pem_kernels`` ops;
``backend="reference"`` runs the pure-PyTorch reference ops. Parameters are identical in both
cases, so a state_dict moves freely and :meth:`PEM.set_backend` switches in place.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pem.backbones import build_backbone
from pem.pixel_decoder import PEMPixelDecoder
from pem.transformer_decoder import PEMTransformerDecoder
from pem_kernels._backends import BACKENDS, autocast_enabled

__all__ = ["PEM", "PIXEL_MEAN", "PIXEL_STD", "SIZE_DIVISIBILITY"]

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISIBILITY = 32


class PEM(nn.Module):
    """Prototype-based Efficient MaskFormer.

    Args:
        backbone: ``"r50"``, ``"stdc1"`` or ``"stdc2"``.
        num_classes: K (19 for Cityscapes, 150 for ADE20K).
        backend: ``"auto"`` (fused kernels) or ``"reference"`` (pure PyTorch); any other
            ``pem_kernels`` backend name (``"cpu"``, ``"triton"``, ``"cuda"``) is passed through.
        num_queries: Q (100).
        backbone_weights: optional local state_dict file for the backbone (never downloaded).

    Attributes ``backbone``, ``pixel_decoder``, ``transformer_decoder`` are the three parts.
    """

    def __init__(
        self,
        backbone: str = "r50",
        num_classes: int = 19,
        backend: str = "auto",
        *,
        num_queries: int = 100,
        backbone_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        _check_backend(backend)
        self.backbone = build_backbone(backbone, backbone_weights)
        self.pixel_decoder = PEMPixelDecoder(self.backbone.out_channels, 128, 256, backend=backend)
        self.transformer_decoder = PEMTransformerDecoder(
            num_classes, 128, 256, num_queries, 8, 2048, 6, 256, backend=backend
        )
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.backend = backend
        self.register_buffer(
            "pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False
        )

    def set_backend(self, backend: str) -> PEM:
        """Runs every PEM-CA and deformable conv on ``backend`` from now on; returns ``self``."""
        _check_backend(backend)
        self.pixel_decoder.set_backend(backend)
        self.transformer_decoder.set_backend(backend)
        self.backend = backend
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """Normalizes 0-255 RGB ``images`` [B, 3, H, W] and zero-pads them to [B, 3, Hp, Wp],
        Hp = ceil(H / 32) * 32, Wp likewise (padding at the bottom and right)."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected a 0-255 RGB tensor [B, 3, H, W], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images: expected a floating-point tensor, got {images.dtype}")
        if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
            raise ValueError(f"images: expected a non-empty batch, got {list(images.shape)}")
        if not autocast_enabled(images.device.type):
            dtype = next(self.parameters()).dtype
            if images.dtype != dtype:
                raise TypeError(
                    f"images: dtype {images.dtype}, expected the model's dtype {dtype} (cast the "
                    "images or the model with .to(), or run under torch.autocast)"
                )
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        h, w = x.shape[-2:]
        pad_h = -h % SIZE_DIVISIBILITY
        pad_w = -w % SIZE_DIVISIBILITY
        return F.pad(x, (0, pad_w, 0, pad_h))

    def forward(self, images: Tensor) -> dict[str, object]:
        """Runs the model.

        Args:
            images: [B, 3, H, W] float, RGB in 0-255 (any H, W >= 1).

        Returns:
            ``{"pred_logits": [B, Q, K + 1], "pred_masks": [B, Q, Hp / 4, Wp / 4],
            "aux_outputs": [6 x {"pred_logits", "pred_masks"}], "image_size": (H, W),
            "padded_size": (Hp, Wp)}`` with Hp, Wp = H, W rounded up to a multiple of 32. The mask
            logits cover the padded canvas, as in the official code: training targets are
            zero-padded to (Hp, Wp), and inference upsamples to (Hp, Wp) before cropping to
            (H, W) (:func:`pem.inference.postprocess`), so the rows next to the crop edge are
            interpolated from real neighbours rather than clamped.
        """
        h, w = images.shape[-2:] if isinstance(images, Tensor) and images.dim() == 4 else (0, 0)
        x = self.preprocess(images)
        features = self.backbone(x)
        mask_features, multi_scale = self.pixel_decoder(features)
        out = self.transformer_decoder(multi_scale, mask_features)
        out["image_size"] = (h, w)
        out["padded_size"] = (x.shape[-2], x.shape[-1])
        return out


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
