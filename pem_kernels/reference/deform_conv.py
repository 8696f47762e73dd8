"""Pure-PyTorch reference of modulated deformable convolution (DCNv2).

This module is the executable specification that the CPU, Triton and CUDA
kernels of ``pem_kernels`` are tested against. It is written for clarity and
exactness, not speed: the bilinear samples are gathered into a full column
tensor (``[B, Cin * kh * kw, out_h * out_w]``) followed by a grouped matmul, and
gradients come from plain autograd.

The argument conventions and numerics mirror ``torchvision.ops.deform_conv2d``
(the test-suite checks forward and backward against it).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

__all__ = ["check_deform_conv2d_args", "deform_conv2d_ref"]

IntOrPair = Union[int, Sequence[int]]

# Half-precision inputs are computed in fp32 and the result is cast back, so the
# reference is not itself a source of rounding error worth talking about.
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def _describe_shape(tensor: Tensor) -> str:
    return str(list(tensor.shape))


def _normalize_pair(name: str, value: IntOrPair) -> tuple[int, int]:
    """Accept an int or a 2-sequence of ints and return an ``(h, w)`` pair."""

    def as_int(item: object) -> int:
        # bool is an int subclass, but `stride=True` is certainly a mistake.
        if isinstance(item, bool):
            raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
        try:
            return operator.index(item)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"{name}: expected an int or a pair of ints, got {value!r}"
            ) from None

    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 2:
            raise ValueError(
                f"{name}: expected an int or a pair of ints (h, w), "
                f"got a sequence of length {len(value)}: {value!r}"
            )
        return as_int(value[0]), as_int(value[1])
    single = as_int(value)
    return single, single


def _check_is_tensor(name: str, value: object) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def _check_ndim(name: str, tensor: Tensor, expected_ndim: int, layout: str) -> None:
    if tensor.dim() != expected_ndim:
        raise ValueError(
            f"{name}: expected a {expected_ndim}-D tensor {layout}, "
            f"got {tensor.dim()}-D with shape {_describe_shape(tensor)}"
        )


def check_deform_conv2d_args(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: IntOrPair,
    padding: IntOrPair,
    dilation: IntOrPair,
    mask: Tensor | None,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate the arguments of a deformable convolution.

    Shapes (torchvision conventions)::

        input  [B, Cin, H, W]
        offset [B, 2 * offset_groups * kh * kw, out_h, out_w]
        weight [Cout, Cin / groups, kh, kw]
        bias   [Cout] or None
        mask   [B, offset_groups * kh * kw, out_h, out_w] or None

    ``groups = Cin / weight.shape[1]`` and
    ``offset_groups = offset.shape[1] / (2 * kh * kw)`` are inferred, and
    ``out_h = (H + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1``
    (likewise for ``out_w``).

    Raises:
        TypeError: a tensor argument is not a tensor, a tensor is not floating
            point, tensor dtypes differ from ``input.dtype``, or
            stride/padding/dilation are not ints.
        ValueError: wrong ndim, inconsistent shapes, non-divisible channel
            counts, ``stride < 1``, ``dilation < 1``, ``padding < 0``, empty
            spatial input or output, or tensors on different devices.

    Returns:
        The normalized ``(stride, padding, dilation)`` as ``(h, w)`` pairs.
    """
    # --- types, ranks, dtypes, devices -----------------------------------
    named_tensors: list[tuple[str, Tensor]] = []
    for name, value in (("input", input), ("offset", offset), ("weight", weight)):
        _check_is_tensor(name, value)
        named_tensors.append((name, value))
    for name, value in (("bias", bias), ("mask", mask)):
        if value is not None:
            _check_is_tensor(name, value)
            named_tensors.append((name, value))

    _check_ndim("input", input, 4, "[B, Cin, H, W]")
    _check_ndim("offset", offset, 4, "[B, 2*offset_groups*kh*kw, out_h, out_w]")
    _check_ndim("weight", weight, 4, "[Cout, Cin/groups, kh, kw]")
    if bias is not None:
        _check_ndim("bias", bias, 1, "[Cout]")
    if mask is not None:
        _check_ndim("mask", mask, 4, "[B, offset_groups*kh*kw, out_h, out_w]")

    for name, tensor in named_tensors:
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point dtype, got {tensor.dtype}")
    for name, tensor in named_tensors[1:]:
        if tensor.dtype != input.dtype:
            raise TypeError(
                f"{name}: expected dtype {input.dtype} (the dtype of input), got {tensor.dtype}"
            )
        if tensor.device != input.device:
            raise ValueError(
                f"{name}: expected device {input.device} (the device of input), "
                f"got {tensor.device}"
            )

    # --- hyper-parameters --------------------------------------------------
    stride_hw = _normalize_pair("stride", stride)
    padding_hw = _normalize_pair("padding", padding)
    dilation_hw = _normalize_pair("dilation", dilation)
    if min(stride_hw) < 1:
        raise ValueError(f"stride: expected values >= 1, got {stride_hw}")
    if min(padding_hw) < 0:
        raise ValueError(f"padding: expected values >= 0, got {padding_hw}")
    if min(dilation_hw) < 1:
        raise ValueError(f"dilation: expected values >= 1, got {dilation_hw}")

    # --- weight / groups -----------------------------------------------------
    batch, in_channels, in_h, in_w = input.shape
    out_channels, in_channels_per_group, kernel_h, kernel_w = weight.shape
    if in_h < 1 or in_w < 1:
        raise ValueError(
            f"input: expected positive spatial size H, W, got shape {_describe_shape(input)}"
        )
    if out_channels < 1 or in_channels_per_group < 1 or kernel_h < 1 or kernel_w < 1:
        raise ValueError(
            f"weight: expected all dimensions of [Cout, Cin/groups, kh, kw] to be >= 1, "
            f"got shape {_describe_shape(weight)}"
        )
    if in_channels < 1 or in_channels % in_channels_per_group != 0:
        raise ValueError(
            f"weight: expected weight.shape[1] * groups == input channels for an integer "
            f"groups >= 1, but input has {in_channels} channels (shape "
            f"{_describe_shape(input)}) and weight.shape[1] = {in_channels_per_group} "
            f"(weight shape {_describe_shape(weight)})"
        )
    groups = in_channels // in_channels_per_group
    if out_channels % groups != 0:
        raise ValueError(
            f"weight: expected out-channels (weight.shape[0] = {out_channels}) to be divisible "
            f"by groups = {groups} (= input channels {in_channels} / weight.shape[1] "
            f"{in_channels_per_group})"
        )

    # --- output size -----------------------------------------------------------
    out_h = (in_h + 2 * padding_hw[0] - dilation_hw[0] * (kernel_h - 1) - 1) // stride_hw[0] + 1
    out_w = (in_w + 2 * padding_hw[1] - dilation_hw[1] * (kernel_w - 1) - 1) // stride_hw[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"input: output size would be non-positive ({out_h} x {out_w}) for input spatial "
            f"size {in_h} x {in_w}, kernel {kernel_h} x {kernel_w}, stride {stride_hw}, "
            f"padding {padding_hw}, dilation {dilation_hw}"
        )

    # --- offset / offset_groups ----------------------------------------------
    taps = kernel_h * kernel_w
    offset_channels = offset.shape[1]
    if offset_channels < 1 or offset_channels % (2 * taps) != 0:
        raise ValueError(
            f"offset: expected offset.shape[1] to be a positive multiple of 2*kh*kw = "
            f"{2 * taps} (kernel {kernel_h} x {kernel_w}), got offset shape "
            f"{_describe_shape(offset)}"
        )
    offset_groups = offset_channels // (2 * taps)
    if in_channels % offset_groups != 0:
        raise ValueError(
            f"offset: input channels ({in_channels}) must be divisible by offset_groups = "
            f"offset.shape[1] / (2*kh*kw) = {offset_groups}, got offset shape "
            f"{_describe_shape(offset)}"
        )
    expected_offset_shape = [batch, 2 * offset_groups * taps, out_h, out_w]
    if list(offset.shape) != expected_offset_shape:
        raise ValueError(
            f"offset: expected shape [B, 2*offset_groups*kh*kw, out_h, out_w] = "
            f"{expected_offset_shape}, got {_describe_shape(offset)}"
        )

    # --- mask / bias -----------------------------------------------------------
    if mask is not None:
        expected_mask_shape = [batch, offset_groups * taps, out_h, out_w]
        if list(mask.shape) != expected_mask_shape:
            raise ValueError(
                f"mask: expected shape [B, offset_groups*kh*kw, out_h, out_w] = "
                f"{expected_mask_shape}, got {_describe_shape(mask)}"
            )
    if bias is not None and list(bias.shape) != [out_channels]:
        raise ValueError(
            f"bias: expected shape [Cout] = [{out_channels}], got {_describe_shape(bias)}"
        )

    return stride_hw, padding_hw, dilation_hw


def deform_conv2d_ref(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Modulated deformable convolution (DCNv2), same results as torchvision's.

    Shapes::

        input  [B, Cin, H, W]
        offset [B, 2 * offset_groups * kh * kw, out_h, out_w]
        weight [Cout, Cin / groups, kh, kw]
        bias   [Cout] or None
        mask   [B, offset_groups * kh * kw, out_h, out_w] or None
        output [B, Cout, out_h, out_w]

    with ``out_h = (H + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1``
    (likewise ``out_w``), ``groups = Cin / weight.shape[1]`` and
    ``offset_groups = offset.shape[1] / (2 * kh * kw)``. Input channel ``c``
    belongs to offset group ``c // (Cin / offset_groups)`` and to convolution
    group ``c // (Cin / groups)``.

    Sampling semantics. For output pixel ``(oy, ox)``, offset group ``g`` and
    kernel tap ``k = i * kw + j`` (``0 <= i < kh``, ``0 <= j < kw``)::

        dy = offset[b, 2 * (g * kh * kw + k),     oy, ox]
        dx = offset[b, 2 * (g * kh * kw + k) + 1, oy, ox]
        y  = oy * stride_h - pad_h + i * dil_h + dy
        x  = ox * stride_w - pad_w + j * dil_w + dx

    The sample ``v(c, y, x)`` is bilinear interpolation of ``input[b, c]``
    between the corners ``(floor(y) + {0, 1}, floor(x) + {0, 1})`` with the
    usual weights ``(1 - |y - yc|) * (1 - |x - xc|)``. A corner outside the
    image contributes zero (zero padding); consequently the whole sample is
    zero when ``y <= -1 or y >= H or x <= -1 or x >= W`` (every corner is then
    outside, or inside with weight 0 at exactly ``y == -1``). The mask, if
    given, multiplies the sample::

        m = mask[b, g * kh * kw + k, oy, ox]   (1 when mask is None)
        out[b, o, oy, ox] = bias[o] + sum_{c in group(o), i, j}
                                weight[o, c mod (Cin/groups), i, j] * m * v(c, y, x)

    Gradients for ``input``, ``offset``, ``mask``, ``weight`` and ``bias``
    come from autograd. The derivative of the bilinear weights with respect to
    ``y`` and ``x`` is taken with ``floor`` held constant, i.e. it is the
    right-hand derivative at exactly integer coordinates, matching torchvision
    there too. In particular at exactly ``y == -1`` the sample is zero but its
    offset gradient is not (it is the slope towards row 0), whereas at
    ``y == H`` it is zero; the same holds for ``x``.

    Precision: fp64 and fp32 are computed in their own dtype; fp16 and bf16
    are computed in fp32 internally and the result is cast back to the input
    dtype. Any device and memory format is accepted (channels_last included);
    the output is always contiguous NCHW, as torchvision's is.
    """
    stride_hw, padding_hw, dilation_hw = check_deform_conv2d_args(
        input, offset, weight, bias, stride, padding, dilation, mask
    )
    stride_h, stride_w = stride_hw
    pad_h, pad_w = padding_hw
    dil_h, dil_w = dilation_hw

    batch, in_channels, in_h, in_w = input.shape
    out_channels, in_channels_per_group, kernel_h, kernel_w = weight.shape
    out_h, out_w = offset.shape[-2:]
    taps = kernel_h * kernel_w
    out_pixels = out_h * out_w
    groups = in_channels // in_channels_per_group
    offset_groups = offset.shape[1] // (2 * taps)
    channels_per_offset_group = in_channels // offset_groups

    result_dtype = input.dtype
    compute_dtype = torch.float32 if result_dtype in _UPCAST_DTYPES else result_dtype
    device = input.device

    def to_compute(tensor: Tensor) -> Tensor:
        return tensor.to(compute_dtype)

    # Undeformed sampling position of every (tap, output pixel): [taps, out_h, out_w].
    tap_row = torch.arange(kernel_h, device=device).repeat_interleave(kernel_w)
    tap_col = torch.arange(kernel_w, device=device).repeat(kernel_h)
    out_row = torch.arange(out_h, device=device)
    out_col = torch.arange(out_w, device=device)
    base_y = (out_row * stride_h - pad_h)[None, :, None] + (tap_row * dil_h)[:, None, None]
    base_x = (out_col * stride_w - pad_w)[None, None, :] + (tap_col * dil_w)[:, None, None]

    # offset channels are (group, tap, {dy, dx}) from slowest to fastest.
    offset_yx = to_compute(offset).reshape(batch, offset_groups, taps, 2, out_h, out_w)
    sample_y = base_y.to(compute_dtype) + offset_yx[:, :, :, 0]  # [B, G, taps, out_h, out_w]
    sample_x = base_x.to(compute_dtype) + offset_yx[:, :, :, 1]
    sample_y = sample_y.reshape(batch, offset_groups, 1, taps * out_pixels)
    sample_x = sample_x.reshape(batch, offset_groups, 1, taps * out_pixels)

    # floor is piecewise constant, so autograd sees d(frac)/d(pos) = 1: the
    # derivative towards the upper corner, which is what torchvision computes.
    y_low = torch.floor(sample_y)
    x_low = torch.floor(sample_x)
    frac_y = sample_y - y_low
    frac_x = sample_x - x_low

    # Image pixels grouped by offset group so one gather serves a whole group:
    # [B, G, C/G, H*W]. reshape copies when the input is channels_last.
    image = to_compute(input).reshape(batch, offset_groups, channels_per_offset_group, in_h * in_w)
    gather_shape = (batch, offset_groups, channels_per_offset_group, taps * out_pixels)

    sampled = image.new_zeros(gather_shape)
    for corner_dy, corner_dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        corner_y = y_low + corner_dy
        corner_x = x_low + corner_dx
        weight_y = frac_y if corner_dy else 1 - frac_y
        weight_x = frac_x if corner_dx else 1 - frac_x
        # Only the per-corner rule: an extra "whole sample outside (-1, H)" test
        # would not change the forward value but would zero the offset gradient
        # at exactly y == -1, where torchvision's is non-zero.
        corner_inside = (
            (corner_y >= 0)
            & (corner_y <= in_h - 1)
            & (corner_x >= 0)
            & (corner_x <= in_w - 1)
        )
        # torch.where, not multiplication by the mask, so that neither a non-finite weight
        # (a NaN offset) nor a non-finite pixel (read at index 0 for an outside corner) leaks
        # NaN into the result or the gradients. The position goes through torch.where before
        # the integer cast, as a huge or NaN position has no int64 value.
        corner_weight = torch.where(corner_inside, weight_y * weight_x, 0.0)
        row = torch.where(corner_inside, corner_y, 0.0).long()
        col = torch.where(corner_inside, corner_x, 0.0).long()
        corner_values = torch.gather(image, 3, (row * in_w + col).expand(gather_shape))
        corner_values = torch.where(corner_inside, corner_values, 0.0)
        sampled = sampled + corner_weight * corner_values

    if mask is not None:
        modulation = to_compute(mask).reshape(batch, offset_groups, 1, taps * out_pixels)
        sampled = sampled * modulation

    # Column tensor [B, Cin, taps, L]: channel order is g * (C/G) + c, i.e. the input order.
    columns = sampled.reshape(batch, groups, in_channels_per_group * taps, out_pixels)
    # weight [Cout, Cin/groups, kh, kw] flattens to (c, i, j) = (c, k), matching the columns.
    grouped_weight = to_compute(weight).reshape(
        groups, out_channels // groups, in_channels_per_group * taps
    )
    output = torch.matmul(grouped_weight.unsqueeze(0), columns)  # [B, groups, Cout/groups, L]
    output = output.reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        output = output + to_compute(bias).reshape(1, out_channels, 1, 1)
    return output.to(result_dtype).contiguous()
