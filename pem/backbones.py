"""Backbones of PEM: ResNet-50 (torchvision) and STDC1 / STDC2 (STDCNet813 / STDCNet1446).

Every backbone maps an image batch ``[B, 3, H, W]`` (H, W divisible by 32) to a dict of four
feature maps ``{"res2", "res3", "res4", "res5"}`` at strides 4, 8, 16, 32, and exposes their
channel counts as ``out_channels`` (a dict with the same keys):

========  ======  =====  =====
backbone  res2    res3   res4 / res5
========  ======  =====  =====
r50       256     512    1024 / 2048
stdc1/2   64      256    512 / 1024
========  ======  =====  =====

The official code builds ResNet-50 through detectron2 (torchvision-style stride in the 3x3 conv,
SyncBN on Cityscapes, FrozenBN on ADE20K); here it is torchvision's module with plain
``nn.BatchNorm2d`` (the same parameter count, 23.51M without ``fc``). STDC follows the STDC paper
(Fan et al., CVPR 2021): base width 64, blocks of 4 convolutions whose outputs are concatenated
(``CatBottleneck``), plain BatchNorm, no final 1x1 conv (``use_conv_last=False``), no classifier.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "CatBottleneck",
    "ConvX",
    "ResNet50Backbone",
    "STDCBackbone",
    "build_backbone",
]

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


def _check_image(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a tensor [B, 3, H, W], got {shape}")


class ResNet50Backbone(nn.Module):
    """torchvision's ResNet-50 without the classifier, returning res2..res5.

    Args:
        weights_path: optional local file holding a torchvision ``resnet50`` state_dict (``fc.*``
            keys are ignored). Nothing is ever downloaded.

    Shapes: images [B, 3, H, W] -> {"res2": [B, 256, H/4, W/4], "res3": [B, 512, H/8, W/8],
    "res4": [B, 1024, H/16, W/16], "res5": [B, 2048, H/32, W/32]}.
    """

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"weights_path: no such file {str(path)!r}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            # fc is unused, so only its keys may be missing; anything else is a wrong file.
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"weights_path: not a torchvision resnet50 state_dict (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]})"
                )
        # Keep the modules (and thus torchvision's state_dict key names) but drop avgpool / fc,
        # which PEM never uses and which would add 2.05M parameters to the count.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.out_channels = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        _check_image(images)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        res2 = self.layer1(x)
        res3 = self.layer2(res2)
        res4 = self.layer3(res3)
        res5 = self.layer4(res4)
        return {"res2": res2, "res3": res3, "res4": res4, "res5": res5}


class ConvX(nn.Sequential):
    """STDC's basic unit: Conv2d(k x k, padding k // 2, no bias) -> BatchNorm2d -> ReLU.

    Shapes: [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride].
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class CatBottleneck(nn.Module):
    """STDC module: a chain of ``num_blocks`` ConvX whose outputs are concatenated.

    Block 1 is a 1x1 ConvX to out/2 channels; block 2 a 3x3 ConvX to out/4; each next block halves
    the width again, except the last, which keeps it (for 4 blocks: out/2 + out/4 + out/8 + out/8
    = out). With stride 2, block 1's output is downsampled by a depthwise 3x3 stride-2 conv + BN
    before block 2 and by a 3x3 average pool (stride 2) on its concatenation path, so every
    branch ends at the same resolution.

    Shapes: [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride].
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int = 4, stride: int = 1
    ) -> None:
        super().__init__()
        if num_blocks < 2:
            raise ValueError(f"num_blocks: expected >= 2, got {num_blocks}")
        if stride not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride}")
        if out_channels % (2 ** (num_blocks - 1)):
            raise ValueError(
                f"out_channels: expected a multiple of {2 ** (num_blocks - 1)}, got {out_channels}"
            )
        self.stride = stride
        half = out_channels // 2
        convs = [ConvX(in_channels, half, kernel_size=1)]
        if num_blocks == 2:
            convs.append(ConvX(half, half))
        else:
            width = half
            for idx in range(1, num_blocks):
                out = width // 2 if idx < num_blocks - 1 else width
                convs.append(ConvX(width, out))
                width = out
        self.conv_list = nn.ModuleList(convs)
        if stride == 2:
            self.avd_layer = nn.Sequential(
                nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False), nn.BatchNorm2d(half)
            )
            self.skip = nn.AvgPool2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        first = self.conv_list[0](x)
        out = self.avd_layer(first) if self.stride == 2 else first
        outputs = []
        for conv in self.conv_list[1:]:
            out = conv(out)
            outputs.append(out)
        if self.stride == 2:
            first = self.skip(first)
        return torch.cat([first, *outputs], dim=1)


class STDCBackbone(nn.Module):
    """STDCNet (STDC1 = layers [2, 2, 2], STDC2 = [4, 5, 3]) returning res2..res5.

    Stem: ConvX(3, 32, s2) -> ConvX(32, 64, s2) = res2. Stages 3-5 each start with a stride-2
    CatBottleneck (64 -> 256, 256 -> 512, 512 -> 1024) followed by stride-1 ones.

    Args:
        layers: CatBottleneck modules per stage (3 entries).
        base: width of res2 (64 in PEM).
        num_blocks: ConvX per CatBottleneck (4 in PEM).
        weights_path: optional local state_dict file (keys of this module; unexpected classifier
            keys ``fc.``, ``bn.``, ``linear.`` are dropped, as PEM's converter does).

    Shapes: images [B, 3, H, W] -> {"res2": [B, 64, H/4, W/4], "res3": [B, 256, H/8, W/8],
    "res4": [B, 512, H/16, W/16], "res5": [B, 1024, H/32, W/32]}.
    """

    def __init__(
        self,
        layers: tuple[int, int, int] | list[int] = (2, 2, 2),
        base: int = 64,
        num_blocks: int = 4,
        weights_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != 3 or any(n < 1 for n in layers):
            raise ValueError(f"layers: expected 3 positive stage depths, got {list(layers)}")
        self.stem = nn.Sequential(ConvX(3, base // 2, 3, 2), ConvX(base // 2, base, 3, 2))
        stages = []
        in_ch = base
        for i, depth in enumerate(layers):
            out_ch = base * 2 ** (i + 2)
            blocks = [CatBottleneck(in_ch, out_ch, num_blocks, 2)]
            blocks += [CatBottleneck(out_ch, out_ch, num_blocks, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stage3, self.stage4, self.stage5 = stages
        self.out_channels = {"res2": base, "res3": base * 4, "res4": base * 8, "res5": base * 16}
        self._init_weights()
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"weights_path: no such file {str(path)!r}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith(("fc.", "bn.", "linear."))}
            self.load_state_dict(state)

    def _init_weights(self) -> None:
        # STDC initializes convs with kaiming_normal (fan_out) and BN with weight 1, bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        _check_image(images)
        res2 = self.stem(images)
        res3 = self.stage3(res2)
        res4 = self.stage4(res3)
        res5 = self.stage5(res4)
        return {"res2": res2, "res3": res3, "res4": res4, "res5": res5}


BACKBONES = ("r50", "stdc1", "stdc2")


def build_backbone(name: str, weights_path: str | Path | None = None) -> nn.Module:
    """Builds ``"r50"``, ``"stdc1"`` (layers [2, 2, 2]) or ``"stdc2"`` (layers [4, 5, 3])."""
    if name == "r50":
        return ResNet50Backbone(weights_path)
    if name == "stdc1":
        return STDCBackbone((2, 2, 2), weights_path=weights_path)
    if name == "stdc2":
        return STDCBackbone((4, 5, 3), weights_path=weights_path)
    raise ValueError(f"backbone: expected one of {BACKBONES}, got {name!r}")
