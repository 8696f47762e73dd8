"""PEM's pixel decoder (official ``PEM_Pixel_Decoder``): CSM + deformable-conv top-down FPN.

Structure (facts section 3; every norm is ``nn.BatchNorm2d``, which has the same parameters and
buffers as the official ``nn.SyncBatchNorm``: convert with
``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training)::

    p2..p5 = ConvBNReLU 1x1 (C_i -> 128)(res2..res5)
    g      = ConvBNReLU 1x1 (C_res5 -> 128)(GAP(res5))      # raw backbone res5, not p5
    x32    = CSM0(p5) + g;   x32, up = DeformLayer0(x32)     # up: 1/16
    x16    = CSM1(p4) + up;  x16, up = DeformLayer1(x16)     # up: 1/8
    x8     = CSM2(p3) + up;  x8,  up = DeformLayer2(x8)      # up: 1/4
    x4     = CSM3(p2) + up
    mask_features = ConvBNReLU 1x1 (128 -> 256)(x4)

The deformable conv is :class:`pem_kernels.nn.ModulatedDeformConv2d` (DCNv2 owning its
zero-initialized offset/mask conv), so the whole decoder follows one ``backend`` switch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pem_kernels.nn import ModulatedDeformConv2d

__all__ = ["CSM", "ConvBNReLU", "DeformLayer", "PEMPixelDecoder"]


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, conv initialized with ``kaiming_normal_(a=1)``.

    Shapes: [B, in_channels, H, W] -> [B, out_channels, H', W'].
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0
    ) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        nn.init.kaiming_normal_(conv.weight, a=1)
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class CSM(nn.Module):
    """Context-based Self-Modulation: ``x + x * w`` with channel weights from the global average.

    ``w = sigmoid(sigmoid(MLP(GAP(x))))`` where MLP = Conv1x1(C -> C/2, no bias) -> BN -> ReLU ->
    Conv1x1(C/2 -> C, no bias). The official code applies the sigmoid twice (an ``nn.Sigmoid``
    inside ``self.mlp`` and ``.sigmoid()`` in forward), so ``w`` lies in (0.5, 0.731); this is
    kept on purpose.

    Args:
        channels: C.
        reduction: C / hidden width (2 in PEM).

    Shapes: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int = 128, reduction: int = 2) -> None:
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def weights(self, x: Tensor) -> Tensor:
        """The modulation weights ``[B, C, 1, 1]``, in (0.5, 0.731)."""
        return self.mlp(x.mean((2, 3), keepdim=True)).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x + x * self.weights(x)


def _bilinear_deconv_init(weight: Tensor) -> None:
    """The official (CenterNet-style) deconv init: a bilinear kernel written into ``w[c, 0]``.

    With groups=1 the weight is [C_in, C_out, k, k], so only output channel 0's slice of every
    input channel becomes bilinear; the rest keep PyTorch's default init. This looks unintended
    upstream (the init was meant for a depthwise deconv) but is what the official model starts from.
    """
    k = weight.shape[2]
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    coords = torch.arange(k, dtype=torch.float64)
    profile = 1 - (coords / f - c).abs()
    kernel = (profile[:, None] * profile[None, :]).to(weight.dtype)
    with torch.no_grad():
        weight[:, 0] = kernel


class DeformLayer(nn.Module):
    """DCNv2 3x3 -> BN -> ReLU (returned), then ConvTranspose2d(4, 2, 1) -> BN -> ReLU (x2 up).

    Args:
        channels: C (128 in PEM).
        backend: passed to :class:`pem_kernels.nn.ModulatedDeformConv2d`.

    Shapes: [B, C, H, W] -> ([B, C, H, W], [B, C, 2H, 2W]).
    """

    def __init__(self, channels: int = 128, *, backend: str = "auto") -> None:
        super().__init__()
        self.dcn = ModulatedDeformConv2d(
            channels, channels, 3, padding=1, bias=False, backend=backend
        )
        # detectron2's c2_msra_fill on the DCN weight.
        nn.init.kaiming_normal_(self.dcn.weight, mode="fan_out", nonlinearity="relu")
        self.dcn_bn = nn.BatchNorm2d(channels)
        self.up_sample = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False)
        _bilinear_deconv_init(self.up_sample.weight)
        self.up_bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.relu(self.dcn_bn(self.dcn(x)))
        up = self.relu(self.up_bn(self.up_sample(x)))
        return x, up


class PEMPixelDecoder(nn.Module):
    """PEM's pixel decoder.

    Args:
        in_channels: channels of res2..res5 (a dict with those keys or a 4-sequence).
        conv_dim: FPN width (128).
        mask_dim: mask-feature width (256).
        backend: ``"auto"`` (fused deformable conv) or ``"reference"`` (pure PyTorch).

    Forward: ``features`` = {"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]} with
    H, W divisible by 32 -> ``(mask_features [B, mask_dim, H/4, W/4], [x32 [B, conv_dim, H/32,
    W/32], x16 [.., H/16, W/16], x8 [.., H/8, W/8]])``. mask_features are non-negative (ReLU).
    """

    def __init__(
        self,
        in_channels: dict[str, int] | list[int] | tuple[int, ...],
        conv_dim: int = 128,
        mask_dim: int = 256,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(in_channels, dict):
            missing = [k for k in ("res2", "res3", "res4", "res5") if k not in in_channels]
            if missing:
                raise ValueError(f"in_channels: missing keys {missing}")
            channels = [in_channels[k] for k in ("res2", "res3", "res4", "res5")]
        else:
            channels = list(in_channels)
        if len(channels) != 4:
            raise ValueError(f"in_channels: expected 4 entries (res2..res5), got {len(channels)}")
        self.in_channels = channels
        self.in_projections = nn.ModuleList(ConvBNReLU(c, conv_dim) for c in channels)
        self.conv_avg = ConvBNReLU(channels[3], conv_dim)
        self.csm = nn.ModuleList(CSM(conv_dim) for _ in range(4))
        self.deform_layers = nn.ModuleList(DeformLayer(conv_dim, backend=backend) for _ in range(3))
        self.mask_projection = ConvBNReLU(conv_dim, mask_dim)

    def set_backend(self, backend: str) -> None:
        """Switches every deformable conv to ``backend``."""
        for layer in self.deform_layers:
            layer.dcn.backend = backend

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        feats = []
        for name, c in zip(("res2", "res3", "res4", "res5"), self.in_channels):
            if name not in features:
                raise ValueError(f"features: missing {name!r}")
            f = features[name]
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(
                    f"features[{name!r}]: expected [B, {c}, H, W], got {list(f.shape)}"
                )
            feats.append(f)
        h4, w4 = feats[0].shape[-2:]
        for i, f in enumerate(feats):
            # The x2 deconvs double sizes exactly, so every level must be exactly 2^i smaller.
            if f.shape[-2:] != (h4 >> i, w4 >> i) or (h4 % 8 or w4 % 8):
                raise ValueError(
                    "features: expected res2..res5 at strides 4/8/16/32 of an input divisible "
                    f"by 32, got sizes {[tuple(x.shape[-2:]) for x in feats]}"
                )
        p2, p3, p4, p5 = (proj(f) for proj, f in zip(self.in_projections, feats))
        context = self.conv_avg(feats[3].mean((2, 3), keepdim=True))
        x32, up = self.deform_layers[0](self.csm[0](p5) + context)
        x16, up = self.deform_layers[1](self.csm[1](p4) + up)
        x8, up = self.deform_layers[2](self.csm[2](p3) + up)
        x4 = self.csm[3](p2) + up
        return self.mask_projection(x4), [x32, x16, x8]
