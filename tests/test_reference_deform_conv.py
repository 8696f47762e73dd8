"""Tests of the pure-PyTorch DCNv2 reference against torchvision.ops.deform_conv2d.

The reference is the specification every other backend is tested against, so
here it is itself pinned to torchvision (forward and all five gradients), to a
few hand-computed values (offset layout, boundary rules) and to autograd's
gradcheck.
"""

from __future__ import annotations

import pytest
import torch

from pem_kernels.reference.deform_conv import check_deform_conv2d_args, deform_conv2d_ref

# The convolution description and its random inputs are those of the kernels' tests.
from test_deform_conv import Conv
from test_deform_conv import make_inputs

torchvision_ops = pytest.importorskip("torchvision.ops")
torchvision_deform_conv2d = torchvision_ops.deform_conv2d

TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


FORWARD_CONFIGS = {
    "fractional_offsets": Conv(),
    "no_mask_no_bias": Conv(with_mask=False, with_bias=False),
    "mask_only": Conv(with_bias=False),
    "bias_only": Conv(with_mask=False),
    "stride_padding_dilation": Conv(
        height=9, width=8, stride=(2, 1), padding=(2, 0), dilation=(1, 2)
    ),
    "stride2_no_padding": Conv(height=9, width=9, stride=(2, 2), padding=(0, 0)),
    "groups2": Conv(groups=2),
    "offset_groups2": Conv(offset_groups=2),
    "groups2_offset_groups2": Conv(groups=2, offset_groups=2, dilation=(2, 1)),
    "groups2_offset_groups4": Conv(groups=2, offset_groups=4, out_channels=4),
    "kernel_3x2_odd_sizes": Conv(
        height=7, width=5, kernel=(3, 2), padding=(1, 0), out_channels=5, in_channels=3
    ),
    "kernel_1x1": Conv(kernel=(1, 1), padding=(0, 0)),
    "out_of_image_offsets": Conv(offset_scale=4.0),
    "large_offsets": Conv(offset_scale=14.0, groups=2, offset_groups=2),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config_name", list(FORWARD_CONFIGS))
def test_forward_matches_torchvision(config_name: str, dtype: torch.dtype) -> None:
    config = FORWARD_CONFIGS[config_name]
    tensors = make_inputs(config, dtype)
    expected = torchvision_deform_conv2d(**tensors, **config.kwargs())
    actual = deform_conv2d_ref(**tensors, **config.kwargs())
    assert actual.dtype == dtype
    assert actual.shape == (config.batch, config.out_channels, *config.output_size())
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def test_large_offset_configs_really_leave_the_image() -> None:
    """Guard the forward cases above: they must exercise out-of-image samples."""
    config = FORWARD_CONFIGS["large_offsets"]
    tensors = make_inputs(config, torch.float64)
    kh, kw = config.kernel
    out_h, out_w = config.output_size()
    offset = tensors["offset"].reshape(config.batch, config.offset_groups, kh * kw, 2, out_h, out_w)
    tap_rows = torch.arange(kh).repeat_interleave(kw).reshape(1, 1, -1, 1, 1)
    out_rows = torch.arange(out_h).reshape(1, 1, 1, -1, 1)
    sample_y = out_rows * config.stride[0] - config.padding[0] + tap_rows + offset[:, :, :, 0]
    outside = (sample_y <= -1) | (sample_y >= config.height)
    assert 0.3 < outside.double().mean().item() < 0.95
    assert offset.abs().max().item() > config.height  # up to about 2*H


def test_offset_layout_dy_then_dx_by_hand() -> None:
    """Integer offsets with a 1x1 kernel are pure shifts: check which channel is dy."""
    image = torch.arange(1.0, 1.0 + 5 * 6, dtype=torch.float64).reshape(1, 1, 5, 6)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    offset[:, 0] = 1.0  # dy
    offset[:, 1] = -2.0  # dx
    out = deform_conv2d_ref(image, offset, weight)
    # out[y, x] = image[y + 1, x - 2], zero where that lies outside.
    expected = torch.zeros_like(image)
    expected[0, 0, :4, 2:] = image[0, 0, 1:, :4]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, torchvision_deform_conv2d(image, offset, weight))


def test_tap_order_is_row_major_by_hand() -> None:
    """Tap k = i*kw + j: only tap (0, 1) of a 2x2 kernel gets a dx = 0.5 offset."""
    image = torch.rand(1, 1, 4, 4, dtype=torch.float64) + 0.5
    weight = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    weight[0, 0, 0, 1] = 1.0  # only tap (i=0, j=1) contributes
    offset = torch.zeros(1, 8, 3, 3, dtype=torch.float64)
    tap = 0 * 2 + 1
    offset[:, 2 * tap + 1] = 0.5
    out = deform_conv2d_ref(image, offset, weight)
    # tap (0, 1) at output (oy, ox) samples (oy, ox + 1.5): the mean of columns ox + 1
    # and ox + 2, where column 4 lies outside the image and contributes zero.
    padded = torch.nn.functional.pad(image, (0, 1))  # one zero column on the right
    expected = 0.5 * (padded[..., :3, 1:4] + padded[..., :3, 2:5])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "sample_y, expected_fraction_of_row0_or_last",
    [
        (-1.0, 0.0),  # y <= -1: zero
        (-1.5, 0.0),
        (-0.25, 0.75),  # only the lower corner (row 0) is inside, weight 1 - 0.25
        (3.25, 0.75),  # H = 4: only the upper corner (row 3) is inside, weight 0.75
        (4.0, 0.0),  # y >= H: zero
        (4.5, 0.0),
    ],
)
def test_boundary_rules_by_hand(sample_y: float, expected_fraction_of_row0_or_last: float) -> None:
    image = torch.rand(1, 1, 4, 4, dtype=torch.float64) + 0.5
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    # Output pixel (1, 2) samples (sample_y, 2).
    offset[0, 0, 1, 2] = sample_y - 1
    reference_row = 0 if sample_y < 1 else 3
    expected = expected_fraction_of_row0_or_last * image[0, 0, reference_row, 2]
    actual = deform_conv2d_ref(image, offset, weight)[0, 0, 1, 2]
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual, torchvision_deform_conv2d(image, offset, weight)[0, 0, 1, 2])


def test_offset_gradient_at_exact_image_border_by_hand() -> None:
    """The gradient is the right-hand derivative: non-zero at y == -1, zero at y == H.

    At y == -1 the sample is zero, yet moving up towards row 0 increases it at slope
    image[0, x]; torchvision reports that slope, so the reference must too.
    """
    image = torch.rand(1, 1, 4, 4, dtype=torch.float64) + 0.5
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    offset[0, 0, 1, 2] = -2.0  # output (1, 2) samples (y, x) = (-1, 2)
    offset[0, 0, 2, 1] = 2.0  # output (2, 1) samples (y, x) = (4, 1) = (H, 1)
    offset.requires_grad_(True)
    out = deform_conv2d_ref(image, offset, weight)
    assert out[0, 0, 1, 2].item() == 0.0 and out[0, 0, 2, 1].item() == 0.0
    (out[0, 0, 1, 2] + out[0, 0, 2, 1]).backward()
    torch.testing.assert_close(offset.grad[0, 0, 1, 2], image[0, 0, 0, 2])  # d/dy at y == -1
    assert offset.grad[0, 0, 2, 1].item() == 0.0  # d/dy at y == H
    assert offset.grad[0, 1, 1, 2].item() == 0.0  # d/dx of a zero-weight row is zero


def test_channels_last_input_matches_contiguous_and_torchvision() -> None:
    config = Conv(groups=2, offset_groups=2, offset_scale=2.5)
    tensors = make_inputs(config, torch.float32)
    expected = torchvision_deform_conv2d(**tensors, **config.kwargs())
    channels_last = dict(tensors)
    channels_last["input"] = tensors["input"].to(memory_format=torch.channels_last)
    channels_last["offset"] = tensors["offset"].to(memory_format=torch.channels_last)
    assert not channels_last["input"].is_contiguous()
    actual = deform_conv2d_ref(**channels_last, **config.kwargs())
    torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(
        actual, deform_conv2d_ref(**tensors, **config.kwargs()), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("with_mask", [False, True])
def test_batch_zero_returns_empty_output(with_mask: bool) -> None:
    config = Conv(batch=0, groups=2, offset_groups=2, with_mask=with_mask)
    tensors = make_inputs(config, torch.float32)
    out = deform_conv2d_ref(**tensors, **config.kwargs())
    assert out.shape == (0, config.out_channels, *config.output_size())
    assert out.shape == torchvision_deform_conv2d(**tensors, **config.kwargs()).shape


def test_meta_device_gives_output_shape() -> None:
    """Device-agnostic: the reference runs on the meta device (shape-only)."""
    config = Conv(stride=(2, 1), groups=2)
    tensors = {
        name: (value.to("meta") if value is not None else None)
        for name, value in make_inputs(config, torch.float32).items()
    }
    out = deform_conv2d_ref(**tensors, **config.kwargs())
    assert out.device.type == "meta"
    assert out.shape == (config.batch, config.out_channels, *config.output_size())


GRADIENT_CONFIGS = {
    "basic": Conv(batch=1, height=5, width=6, out_channels=3, in_channels=2),
    "groups_offset_groups_stride_dilation": Conv(
        height=8, width=7, kernel=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
        groups=2, offset_groups=2, out_channels=4,
    ),
    "out_of_image_offsets": Conv(
        batch=1, height=6, width=5, offset_scale=8.0, groups=2, offset_groups=2, out_channels=4
    ),
    "no_mask": Conv(batch=1, height=5, width=5, with_mask=False, offset_scale=3.0),
}


def _gradients(function, tensors: dict, grad_output: torch.Tensor, kwargs: dict) -> dict:
    leaves = {
        name: value.detach().clone().requires_grad_(True)
        for name, value in tensors.items()
        if value is not None
    }
    out = function(**{**tensors, **leaves}, **kwargs)
    out.backward(grad_output)
    return {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config_name", list(GRADIENT_CONFIGS))
def test_gradients_match_torchvision(config_name: str, dtype: torch.dtype) -> None:
    config = GRADIENT_CONFIGS[config_name]
    tensors = make_inputs(config, dtype, seed=1)
    out_h, out_w = config.output_size()
    grad_output = torch.randn(
        config.batch, config.out_channels, out_h, out_w,
        generator=torch.Generator().manual_seed(2), dtype=torch.float64,
    ).to(dtype)
    expected = _gradients(torchvision_deform_conv2d, tensors, grad_output, config.kwargs())
    actual = _gradients(deform_conv2d_ref, tensors, grad_output, config.kwargs())
    assert set(actual) == {"input", "offset", "weight"} | (
        {"bias"} if config.with_bias else set()
    ) | ({"mask"} if config.with_mask else set())
    for name in actual:
        assert actual[name] is not None, name
        assert actual[name].abs().sum() > 0, f"{name}: gradient is identically zero"
        torch.testing.assert_close(actual[name], expected[name], **TOLERANCES[dtype], msg=name)


def test_gradients_at_integer_and_boundary_coordinates_match_torchvision() -> None:
    """Integer offsets put samples exactly on pixels and exactly on y == -1 / y == H.

    Bilinear interpolation is not differentiable there; torchvision takes the
    derivative towards floor(y) + 1 and zero outside (-1, H). The reference must agree.
    """
    config = Conv(batch=1, height=5, width=5, in_channels=2, out_channels=2)
    tensors = make_inputs(config, torch.float64, seed=3)
    tensors["offset"] = torch.randint(
        -3, 4, tensors["offset"].shape, generator=torch.Generator().manual_seed(4)
    ).to(torch.float64)
    grad_output = torch.randn(1, 2, *config.output_size(), dtype=torch.float64)
    expected = _gradients(torchvision_deform_conv2d, tensors, grad_output, config.kwargs())
    actual = _gradients(deform_conv2d_ref, tensors, grad_output, config.kwargs())
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def test_gradcheck_fp64_tiny() -> None:
    config = Conv(
        batch=1, in_channels=2, height=4, width=4, out_channels=2, kernel=(2, 2),
        padding=(1, 0), groups=2, offset_groups=2, offset_scale=1.5,
    )
    tensors = make_inputs(config, torch.float64, seed=5)
    names = ["input", "offset", "weight", "bias", "mask"]
    leaves = tuple(tensors[name].clone().requires_grad_(True) for name in names)

    def function(input, offset, weight, bias, mask):
        return deform_conv2d_ref(
            input, offset, weight, bias, mask=mask, **config.kwargs()
        )

    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_close_to_fp64(dtype: torch.dtype) -> None:
    """fp16/bf16 are computed in fp32 and rounded once, so the result is within one ulp.

    Computing natively in half precision would be off by far more (tens of percent on
    outputs that nearly cancel), which this tolerance is chosen to detect.
    """
    config = Conv(groups=2, offset_groups=2, offset_scale=3.0)
    tensors = make_inputs(config, dtype)
    out = deform_conv2d_ref(**tensors, **config.kwargs())
    assert out.dtype == dtype
    # Same (already rounded) inputs in fp64: only compute and output rounding differ.
    tensors_fp64 = {
        name: (value.double() if value is not None else None) for name, value in tensors.items()
    }
    expected = deform_conv2d_ref(**tensors_fp64, **config.kwargs())
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        out.double(), expected, rtol=torch.finfo(dtype).eps, atol=1e-5 * scale
    )


def test_half_precision_backward_returns_gradients_in_input_dtype() -> None:
    config = Conv(batch=1, height=5, width=5)
    tensors = make_inputs(config, torch.bfloat16)
    grads = _gradients(
        deform_conv2d_ref, tensors, torch.ones(1, config.out_channels, 5, 5, dtype=torch.bfloat16),
        config.kwargs(),
    )
    for name, grad in grads.items():
        assert grad.dtype == torch.bfloat16, name
        assert torch.isfinite(grad).all(), name


# --------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------

def valid_args() -> dict:
    """input [2, 4, 5, 5], groups=2, offset_groups=1, 3x3 kernel, padding 1 -> out 5x5."""
    generator = torch.Generator().manual_seed(0)
    return dict(
        input=torch.rand(2, 4, 5, 5, generator=generator) + 0.5,
        offset=torch.rand(2, 18, 5, 5, generator=generator) - 0.5,
        weight=torch.rand(6, 2, 3, 3, generator=generator) - 0.5,
        bias=torch.rand(6, generator=generator),
        stride=1,
        padding=1,
        dilation=1,
        mask=torch.rand(2, 9, 5, 5, generator=generator),
    )


def test_check_returns_normalized_pairs() -> None:
    args = valid_args()
    args.update(stride=(1, 1), padding=[1, 1], dilation=1)
    assert check_deform_conv2d_args(**args) == ((1, 1), (1, 1), (1, 1))
    args.update(
        input=torch.rand(2, 4, 9, 8), stride=(2, 1), padding=2, dilation=[1, 2],
        offset=torch.rand(2, 18, 6, 8), mask=None, bias=None,  # out 6 x 8
    )
    assert check_deform_conv2d_args(**args) == ((2, 1), (2, 2), (1, 2))


ERROR_CASES = {
    # name: (changes to valid_args(), exception type, regex that must match)
    "offset_spatial_shape": (
        dict(offset=torch.rand(2, 18, 4, 5)), ValueError,
        r"offset: expected shape \[B, 2\*offset_groups\*kh\*kw, out_h, out_w\] = "
        r"\[2, 18, 5, 5\], got \[2, 18, 4, 5\]",
    ),
    "offset_batch": (dict(offset=torch.rand(3, 18, 5, 5)), ValueError, r"offset:.*\[3, 18, 5, 5\]"),
    "offset_channels_not_multiple": (
        dict(offset=torch.rand(2, 17, 5, 5)), ValueError,
        r"offset:.*multiple of 2\*kh\*kw = 18.*17",
    ),
    "offset_groups_do_not_divide_input": (
        dict(offset=torch.rand(2, 54, 5, 5), mask=None), ValueError,
        r"offset:.*\(4\).*divisible by offset_groups.*3",
    ),
    "weight_in_channels_times_groups": (
        dict(weight=torch.rand(6, 3, 3, 3)), ValueError,
        r"weight:.*4 channels.*weight.shape\[1\] = 3",
    ),
    "out_channels_not_divisible_by_groups": (
        dict(weight=torch.rand(5, 2, 3, 3), bias=None), ValueError,
        r"weight:.*out-channels.*5.*groups = 2",
    ),
    "weight_empty_dim": (
        dict(weight=torch.rand(6, 2, 0, 3)), ValueError, r"weight:.*\[6, 2, 0, 3\]",
    ),
    "mask_channels": (
        dict(mask=torch.rand(2, 8, 5, 5)), ValueError,
        r"mask: expected shape .*\[2, 9, 5, 5\], got \[2, 8, 5, 5\]",
    ),
    "mask_spatial": (dict(mask=torch.rand(2, 9, 5, 4)), ValueError, r"mask:.*got \[2, 9, 5, 4\]"),
    "bias_shape": (
        dict(bias=torch.rand(5)), ValueError, r"bias: expected shape \[Cout\] = \[6\], got \[5\]",
    ),
    "stride_zero": (dict(stride=0), ValueError, r"stride: expected values >= 1, got \(0, 0\)"),
    "stride_negative_w": (dict(stride=(1, -1)), ValueError, r"stride:.*\(1, -1\)"),
    "dilation_zero": (dict(dilation=(0, 1)), ValueError, r"dilation: expected values >= 1"),
    "padding_negative": (dict(padding=-1), ValueError, r"padding: expected values >= 0"),
    "stride_wrong_length": (dict(stride=(1, 1, 1)), ValueError, r"stride:.*length 3"),
    "stride_float": (dict(stride=1.5), TypeError, r"stride:.*1\.5"),
    "padding_bool": (dict(padding=True), TypeError, r"padding:"),
    "non_positive_output": (
        dict(input=torch.rand(2, 4, 2, 2), padding=0), ValueError, r"input:.*non-positive",
    ),
    "empty_input_spatial": (
        dict(input=torch.rand(2, 4, 0, 5)), ValueError, r"input:.*\[2, 4, 0, 5\]",
    ),
    "input_ndim": (
        dict(input=torch.rand(4, 5, 5)), ValueError, r"input: expected a 4-D tensor.*3-D",
    ),
    "offset_ndim": (dict(offset=torch.rand(2, 18, 25)), ValueError, r"offset: expected a 4-D"),
    "weight_ndim": (dict(weight=torch.rand(6, 2, 9)), ValueError, r"weight: expected a 4-D"),
    "bias_ndim": (dict(bias=torch.rand(6, 1)), ValueError, r"bias: expected a 1-D"),
    "mask_ndim": (dict(mask=torch.rand(2, 9, 25)), ValueError, r"mask: expected a 4-D"),
    "input_not_tensor": (dict(input=[[1.0]]), TypeError, r"input: expected a torch.Tensor"),
    "mask_not_tensor": (dict(mask=1.0), TypeError, r"mask: expected a torch.Tensor"),
    "input_integer_dtype": (
        dict(input=torch.ones(2, 4, 5, 5, dtype=torch.int32)), TypeError,
        r"input: expected a floating-point dtype, got torch.int32",
    ),
    "offset_integer_dtype": (
        dict(offset=torch.ones(2, 18, 5, 5, dtype=torch.int64)), TypeError,
        r"offset:.*floating-point",
    ),
    "offset_dtype_mismatch": (
        dict(offset=torch.rand(2, 18, 5, 5, dtype=torch.float64)), TypeError,
        r"offset: expected dtype torch.float32.*got torch.float64",
    ),
    "weight_dtype_mismatch": (
        dict(weight=torch.rand(6, 2, 3, 3).half()), TypeError,
        r"weight: expected dtype torch.float32",
    ),
    "bias_dtype_mismatch": (dict(bias=torch.rand(6).double()), TypeError, r"bias: expected dtype"),
    "mask_dtype_mismatch": (
        dict(mask=torch.rand(2, 9, 5, 5).bfloat16()), TypeError, r"mask: expected dtype",
    ),
    "offset_device_mismatch": (
        dict(offset=torch.empty(2, 18, 5, 5, device="meta")), ValueError,
        r"offset: expected device cpu.*got meta",
    ),
    "weight_device_mismatch": (
        dict(weight=torch.empty(6, 2, 3, 3, device="meta")), ValueError, r"weight: expected device",
    ),
    "mask_device_mismatch": (
        dict(mask=torch.empty(2, 9, 5, 5, device="meta")), ValueError, r"mask: expected device",
    ),
}


@pytest.mark.parametrize("case_name", list(ERROR_CASES))
def test_check_rejects_bad_arguments(case_name: str) -> None:
    changes, exception_type, pattern = ERROR_CASES[case_name]
    args = {**valid_args(), **changes}
    with pytest.raises(exception_type, match=pattern):
        check_deform_conv2d_args(**args)


@pytest.mark.parametrize(
    "case_name", ["offset_spatial_shape", "stride_zero", "bias_dtype_mismatch"]
)
def test_reference_validates_its_arguments(case_name: str) -> None:
    changes, exception_type, pattern = ERROR_CASES[case_name]
    args = {**valid_args(), **changes}
    with pytest.raises(exception_type, match=pattern):
        deform_conv2d_ref(**args)
