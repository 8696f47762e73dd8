"""Deformable convolution modules on :func:`pem_kernels.deform_conv2d`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from pem_kernels._backends import backend_property
from pem_kernels.ops.deform_conv import deform_conv2d

__all__ = ["DeformConv2d", "ModulatedDeformConv2d"]

IntPair = int | tuple[int, int]


class DeformConv2d(nn.Module):
    """A drop-in for ``torchvision.ops.DeformConv2d``: the same constructor, parameters (``weight``
    [C_out, C_in / groups, kh, kw], ``bias`` [C_out]), initialization and forward
    ``(input [B, C_in, H, W], offset [B, 2*og*kh*kw, H_out, W_out], mask=None) -> [B, C_out,
    H_out, W_out]``, running on :func:`pem_kernels.deform_conv2d` with ``backend``.
    """

    backend = backend_property()

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups)):
            if value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups: expected a divisor of in_channels ({in_channels}) and out_channels "
                f"({out_channels}), got {groups}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        for name, pair, least in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                                  ("padding", self.padding, 0), ("dilation", self.dilation, 1)):
            if min(pair) < least:
                raise ValueError(f"{name}: expected values >= {least}, got {pair}")
        self.groups = groups
        self.backend = backend
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's (and torchvision's) default initialization.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, backend={self.backend!r}"
        )


class ModulatedDeformConv2d(DeformConv2d):
    """DCNv2 that predicts its own offsets and modulation, as PEM's ``DeformLayer``.

    ``offset_conv`` (a 3x3 conv, padding 1, zero-initialized so training starts from a plain
    convolution with modulation sigmoid(0) = 0.5) maps the input to 3 * og * kh * kw channels,
    chunked into three equal parts ``(a, b, m)``: ``offset = cat(a, b)`` in torchvision's
    interleaved (dy, dx)-per-tap layout and ``mask = sigmoid(m)``, exactly as PEM/YOSO do.

    Shapes: Tensor[B, C_in, H, W] -> Tensor[B, C_out, H_out, W_out].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair = 3,
        stride: IntPair = 1,
        padding: IntPair = 1,
        dilation: IntPair = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            backend=backend,
        )
        if offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(
                f"offset_groups: expected a positive divisor of in_channels ({in_channels}), "
                f"got {offset_groups}"
            )
        taps = self.kernel_size[0] * self.kernel_size[1]
        # The offset conv must produce one value per output pixel, so it shares stride, padding
        # and dilation with the deformable conv's kernel footprint.
        self.offset_conv = nn.Conv2d(
            in_channels, 3 * offset_groups * taps, self.kernel_size, self.stride, self.padding,
            self.dilation,
        )
        self.offset_groups = offset_groups
        self._zero_offset_conv()

    def reset_parameters(self) -> None:
        """The deformable conv's default initialization, and the offset conv back to zero."""
        super().reset_parameters()
        # DeformConv2d's constructor calls this before the offset conv exists.
        if "offset_conv" in self._modules:
            self._zero_offset_conv()

    def _zero_offset_conv(self) -> None:
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        first, second, modulation = self.offset_conv(input).chunk(3, dim=1)
        offset = torch.cat((first, second), dim=1)
        return super().forward(input, offset, modulation.sigmoid())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset_groups={self.offset_groups}"
