"""deform_conv2d: the compiled backends against the pure-PyTorch reference and torchvision."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pem_kernels
from pem_kernels.reference import deform_conv2d_ref

from conftest import DEVICES

pytestmark = pytest.mark.skipif(
    not pem_kernels.EXTENSION_LOADED, reason="pem_kernels._C is not built"
)

torchvision_ops = pytest.importorskip("torchvision.ops")

LOW_PRECISION = (torch.float16, torch.bfloat16)
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}
TENSOR_NAMES = ("input", "weight", "offset", "mask", "bias")


def backend_for(device: str) -> str:
    """The compiled backend that runs on ``device``; skips the test where none exists yet."""
    backend = "cuda" if device == "cuda" else "cpu"
    if backend not in pem_kernels.available_backends("deform_conv2d", device):
        pytest.skip(f"no {backend!r} deform_conv2d backend yet")
    return backend


@dataclasses.dataclass(frozen=True)
class Conv:
    batch: int = 2
    in_channels: int = 4
    height: int = 7
    width: int = 6
    out_channels: int = 6
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    offset_scale: float = 1.0  # offsets uniform in [-offset_scale, offset_scale]
    integer_offsets: bool = False  # rounded, so samples land exactly on -1, H, W, ...
    with_mask: bool = True
    with_bias: bool = True

    def output_size(self) -> tuple[int, int]:
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(
                (self.height, self.width), self.kernel, self.stride, self.padding, self.dilation
            )
        )

    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, self.out_channels, *self.output_size())

    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)


def make_inputs(conv: Conv, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict:
    """Fresh random tensors (never zeros) for one call, generated in fp64 on the CPU."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low

    kh, kw = conv.kernel
    out_h, out_w = conv.output_size()
    taps = kh * kw
    offset_shape = (conv.batch, 2 * conv.offset_groups * taps, out_h, out_w)
    offset = uniform(offset_shape, -conv.offset_scale, conv.offset_scale)
    if conv.integer_offsets:
        offset = offset.round()
    mask_shape = (conv.batch, conv.offset_groups * taps, out_h, out_w)
    tensors = dict(
        # Inputs in [0.5, 1.5], so a dropped or misplaced sample always changes the result.
        input=uniform((conv.batch, conv.in_channels, conv.height, conv.width), 0.5, 1.5),
        offset=offset,
        weight=uniform((conv.out_channels, conv.in_channels // conv.groups, kh, kw), -1.0, 1.0),
        bias=uniform((conv.out_channels,), -1.0, 1.0) if conv.with_bias else None,
        mask=uniform(mask_shape, 0.1, 1.0) if conv.with_mask else None,
    )
    return {k: cast(v, dtype, device) for k, v in tensors.items()}


def cast(tensor: torch.Tensor | None, dtype: torch.dtype, device: str | None = None):
    return None if tensor is None else tensor.to(device=device or tensor.device, dtype=dtype)


CONFIGS = {
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
    "groups2_offset_groups4": Conv(groups=2, offset_groups=4, out_channels=4),
    # One offset group spans two convolution groups.
    "groups4_offset_groups2": Conv(in_channels=8, out_channels=8, groups=4, offset_groups=2),
    "kernel_3x2_odd_sizes": Conv(
        height=7, width=5, kernel=(3, 2), padding=(1, 0), out_channels=5, in_channels=3
    ),
    "kernel_1x1": Conv(kernel=(1, 1), padding=(0, 0)),
    "out_of_image_offsets": Conv(offset_scale=4.0),
    "large_offsets": Conv(offset_scale=14.0, groups=2, offset_groups=2),
    "integer_offsets_on_the_border": Conv(offset_scale=5.0, integer_offsets=True),
    # More output pixels than one CPU backward block (2048), several forward blocks per image.
    "many_pixels": Conv(in_channels=8, height=45, width=50, out_channels=4, offset_scale=2.0),
}


def call(backend: str, tensors: dict, conv: Conv) -> torch.Tensor:
    return pem_kernels.deform_conv2d(**tensors, **conv.kwargs(), backend=backend)


def call_torchvision(tensors: dict, conv: Conv) -> torch.Tensor:
    return torchvision_ops.deform_conv2d(**tensors, **conv.kwargs())


def call_reference(tensors: dict, conv: Conv) -> torch.Tensor:
    return deform_conv2d_ref(**tensors, **conv.kwargs())


def gradients(fn, tensors: dict, grad_output: torch.Tensor) -> dict:
    """Gradients of <fn(tensors), grad_output> w.r.t. every tensor argument that is given."""
    leaves = {
        name: value.detach().clone().requires_grad_(True)
        for name, value in tensors.items()
        if value is not None
    }
    output = fn({**tensors, **leaves})
    grads = torch.autograd.grad(output, list(leaves.values()), grad_output)
    return dict(zip(leaves, grads))


def assert_gradients_close(actual: dict, expected: dict, **tolerance) -> None:
    assert set(actual) == set(expected)
    for name in actual:
        assert actual[name].dtype == expected[name].dtype
        torch.testing.assert_close(
            actual[name], expected[name], **tolerance, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_reference_and_torchvision(device, dtype, name):
    conv = CONFIGS[name]
    tensors = make_inputs(conv, dtype, device)
    actual = call(backend_for(device), tensors, conv)
    assert actual.dtype == dtype and actual.is_contiguous()
    assert actual.shape == conv.output_shape()
    torch.testing.assert_close(actual, call_reference(tensors, conv), **TOLERANCES[dtype])
    torch.testing.assert_close(actual, call_torchvision(tensors, conv), **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [name for name in CONFIGS if name != "many_pixels"])
def test_all_gradients_match_torchvision_fp64(device, name):
    conv = CONFIGS[name]
    tensors = make_inputs(conv, torch.float64, device)
    grad_output = torch.randn(conv.output_shape(), dtype=torch.float64, device=device)
    backend = backend_for(device)
    actual = gradients(lambda t: call(backend, t, conv), tensors, grad_output)
    expected = gradients(lambda t: call_torchvision(t, conv), tensors, grad_output)
    assert_gradients_close(actual, expected, **TOLERANCES[torch.float64])


# PEM's pixel-decoder DeformLayer (128 -> 128 channels, 3x3, padding 1) at one image's 1/8 level
# of 512x512 and a batch at 1/32 of 512x512.
PEM_DECODER_CONVS = {
    "1x128x64x64": Conv(batch=1, in_channels=128, height=64, width=64, out_channels=128,
                        offset_scale=3.0),
    "4x128x16x16": Conv(batch=4, in_channels=128, height=16, width=16, out_channels=128,
                        offset_scale=3.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(PEM_DECODER_CONVS))
def test_pem_decoder_sizes_match_torchvision(device, layout, name):
    """fp32 forward and every gradient at PEM's real channel counts (so the CUDA forward's
    shared-sample and vector paths and the backward's multi-block accumulation run at scale)
    against torchvision in fp64."""
    conv = PEM_DECODER_CONVS[name]
    tensors = make_inputs(conv, torch.float32, device)
    if layout == "channels_last":
        tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    tensors64 = {k: cast(v, torch.float64) for k, v in tensors.items()}
    grad_output = torch.randn(conv.output_shape(), dtype=torch.float64, device=device)
    backend = backend_for(device)
    out = call(backend, tensors, conv)
    torch.testing.assert_close(
        out.double(), call_torchvision(tensors64, conv), rtol=1e-4, atol=1e-3
    )
    actual = gradients(lambda t: call(backend, t, conv), tensors, grad_output.float())
    expected = gradients(lambda t: call_torchvision(t, conv), tensors64, grad_output)
    for grad_name, grad in actual.items():
        torch.testing.assert_close(
            grad.double(), expected[grad_name], rtol=1e-4, atol=1e-3,
            msg=lambda message, grad_name=grad_name: f"{grad_name}: {message}",
        )


def random_conv(seed: int) -> Conv:
    """A random valid convolution: any kernel, stride, padding, dilation, groups and offset
    groups (channel counts sometimes multiples of 16, for the CUDA forward's shared-sample
    paths), maps down to 1 x 1, offsets from sub-pixel to far outside the image."""
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    def between(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    groups, offset_groups = pick([1, 1, 2, 4]), pick([1, 1, 2, 3])
    lcm = groups * offset_groups // math.gcd(groups, offset_groups)
    in_channels = lcm * pick([1, 2, 3, 16 // math.gcd(16, lcm) * pick([1, 2])])
    kernel = (between(1, 4), between(1, 4))
    dilation = (between(1, 3), between(1, 3))
    padding = (between(0, 3), between(0, 3))
    # Large enough for at least one output pixel along each axis.
    height, width = (
        max(between(1, 14), d * (k - 1) + 1 - 2 * p)
        for k, d, p in zip(kernel, dilation, padding)
    )
    return Conv(
        batch=between(1, 3), in_channels=in_channels, height=height, width=width,
        out_channels=groups * between(1, 3), kernel=kernel, stride=(between(1, 3), between(1, 3)),
        padding=padding, dilation=dilation, groups=groups, offset_groups=offset_groups,
        offset_scale=pick([0.5, 2.0, 6.0]), integer_offsets=pick([False, False, True]),
        with_mask=pick([True, False]), with_bias=pick([True, False]),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(24))
def test_random_configurations_match_torchvision(device, seed):
    """Forward and every gradient of random configurations against torchvision in fp64, in NCHW
    or channels_last."""
    conv = random_conv(seed)
    tensors = make_inputs(conv, torch.float64, device, seed=seed)
    if seed % 2:
        tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    backend = backend_for(device)
    torch.testing.assert_close(
        call(backend, tensors, conv), call_torchvision(tensors, conv), **TOLERANCES[torch.float64],
        msg=lambda message: f"{conv}: {message}",
    )
    grad_output = torch.randn(conv.output_shape(), dtype=torch.float64, device=device)
    actual = gradients(lambda t: call(backend, t, conv), tensors, grad_output)
    expected = gradients(lambda t: call_torchvision(t, conv), tensors, grad_output)
    assert_gradients_close(actual, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "layout", ["nchw", "channels_last", "channels_last_unaligned"]
)
@pytest.mark.parametrize(
    "channels,groups,offset_groups",
    [(32, 2, 1), (32, 1, 2), (64, 4, 4), (48, 1, 3), (20, 1, 1), (32, 2, 4)],
    ids=lambda value: str(value),
)
def test_forward_gather_paths(device, dtype, layout, channels, groups, offset_groups):
    """The CUDA forward gathers per element, with shared sample tables (channels per weight and
    per offset group multiples of 16), or 4 channels per vector load (also channels_last with an
    aligned start); every path and the fallbacks around them against torchvision."""
    conv = Conv(
        in_channels=channels, height=9, width=11, out_channels=8 * groups, groups=groups,
        offset_groups=offset_groups, offset_scale=3.0,
    )
    tensors = make_inputs(conv, dtype, device)
    input = tensors["input"]
    strides = input.contiguous(memory_format=torch.channels_last).stride()
    if layout == "channels_last":
        tensors["input"] = input.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_unaligned":
        # channels_last strides, but starting one element into the storage: no aligned vectors.
        flat = torch.zeros(input.numel() + 1, dtype=dtype, device=device)
        tensors["input"] = flat[1:].as_strided(input.shape, strides).copy_(input)
        assert tensors["input"].data_ptr() % (4 * input.element_size()) != 0
    if layout != "nchw":
        assert tensors["input"].stride() == strides
    expected = call_torchvision(tensors, conv)
    torch.testing.assert_close(call(backend_for(device), tensors, conv), expected,
                               **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradients_over_several_backward_blocks(device, layout):
    """C_in * taps large enough that one image's backward runs in several pixel blocks on every
    backend (CUDA: column tiles of at most 24 MiB, here 36 KiB per fp64 pixel, so at most 640
    pixels, the image's 1927 split evenly into 3 x 512 and 391; CPU: 2 MiB), the last one
    partial; grad_weight accumulates over the blocks and grad_input over the blocks' entry
    lists."""
    conv = Conv(
        batch=2, in_channels=512, height=41, width=47, out_channels=4, offset_groups=2,
        groups=2, offset_scale=3.0,
    )
    tensors = make_inputs(conv, torch.float64, device)
    if layout == "channels_last":
        tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    grad_output = torch.randn(conv.output_shape(), dtype=torch.float64, device=device)
    backend = backend_for(device)
    actual = gradients(lambda t: call(backend, t, conv), tensors, grad_output)
    expected = gradients(lambda t: call_torchvision(t, conv), tensors, grad_output)
    assert_gradients_close(actual, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name", ["fractional_offsets", "groups4_offset_groups2", "large_offsets", "many_pixels"]
)
def test_fp32_gradients_match_fp64_reference(device, name):
    conv = CONFIGS[name]
    tensors = make_inputs(conv, torch.float32, device)
    grad_output = torch.randn(conv.output_shape(), device=device)
    actual = gradients(lambda t: call(backend_for(device), t, conv), tensors, grad_output)
    tensors64 = {k: cast(v, torch.float64) for k, v in tensors.items()}
    expected = gradients(lambda t: call_reference(t, conv), tensors64, grad_output.double())
    for grad_name, grad in actual.items():
        assert grad.dtype == torch.float32
        scale = expected[grad_name].abs().max().item()
        torch.testing.assert_close(
            grad.double(), expected[grad_name], rtol=1e-5, atol=1e-5 * scale,
            msg=lambda m, grad_name=grad_name: f"{grad_name}: {m}",
        )


def test_offset_gradient_at_exactly_minus_one_is_the_right_hand_slope():
    """y == -1 exactly: the sample is 0 but its offset gradient is the slope towards row 0 (as in
    torchvision); at y == H everything is 0."""
    image = torch.arange(1.0, 1.0 + 4 * 5, dtype=torch.float64).reshape(1, 1, 4, 5)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 4, 5, dtype=torch.float64)
    offset[0, 0, 0, :] = -1.0  # row 0 samples y = -1
    offset[0, 0, 3, :] = 1.0  # row 3 samples y = 4 = H
    offset.requires_grad_(True)
    out = pem_kernels.deform_conv2d(image, offset, weight, backend="cpu")
    assert (out[0, 0, 0] == 0).all() and (out[0, 0, 3] == 0).all()
    (grad,) = torch.autograd.grad(out.sum(), offset)
    torch.testing.assert_close(grad[0, 0, 0], image[0, 0, 0])  # d/dy of (y + 1) * image[0, x]
    assert (grad[0, 0, 3] == 0).all()
    expected_out = torchvision_ops.deform_conv2d(image, offset, weight)
    (expected,) = torch.autograd.grad(expected_out.sum(), offset)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_samples_outside_the_image_never_read_it(backend, value):
    """Corners outside the image are skipped, not multiplied by 0: a NaN or inf pixel (here the
    one next to every outside sample) cannot leak into the output or the gradients."""
    image = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    image[:, :, 0, 0] = value
    weight = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64)
    # every sample far outside, above and left of pixel (0, 0)
    offset = torch.full((1, 2, 5, 5), -7.5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    out = pem_kernels.deform_conv2d(image, offset, weight, bias, mask=mask, backend=backend)
    torch.testing.assert_close(out, bias.view(1, 3, 1, 1).expand_as(out))
    grads = torch.autograd.grad(out.sum(), (weight, offset, mask))
    for name, grad in zip(("weight", "offset", "mask"), grads):
        assert (grad == 0).all(), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "reference"])
def test_non_finite_and_huge_offsets_give_zero_samples(device, kernel):
    conv = CONFIGS["fractional_offsets"]
    tensors = make_inputs(conv, torch.float64, device)
    far = tensors["offset"].clone()
    far[0, 0, 0, 0] = far[1, 5, 2, 3] = far[0, 9, 4, 1] = 1e6  # samples far outside the image
    odd = tensors["offset"].clone()
    odd[0, 0, 0, 0], odd[1, 5, 2, 3], odd[0, 9, 4, 1] = float("nan"), float("inf"), 1e30
    backend = backend_for(device) if kernel else "reference"
    expected = call(backend, {**tensors, "offset": far}, conv)
    torch.testing.assert_close(call(backend, {**tensors, "offset": odd}, conv), expected)
    torch.testing.assert_close(expected, call_torchvision({**tensors, "offset": far}, conv))


def with_non_finite_mask(tensors: dict) -> dict:
    """A NaN mask at a sample outside the image and at one inside, an inf mask at a sample on
    integer coordinates (corner weights exactly 0 and 1), each in its own offset group."""
    offset, mask = tensors["offset"].clone(), tensors["mask"].clone()
    offset[0, 0:2, 0, 0] = -50.0  # offset group 0, tap 0: every corner outside
    mask[0, 0, 0, 0] = float("nan")
    mask[0, 5, 3, 2] = float("nan")
    offset[1, 2 * (9 + 4):2 * (9 + 4) + 2, 2, 3] = 1.0  # offset group 1, tap 4: integer position
    mask[1, 9 + 4, 2, 3] = float("inf")
    # Positive weights (the inputs are positive), so that the inf sample makes +inf, not inf - inf.
    return {**tensors, "offset": offset, "mask": mask, "weight": tensors["weight"].abs()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels", [32, 64])
def test_non_finite_mask_values_reach_the_output_as_in_torchvision(device, dtype, channels):
    """The mask multiplies the blended sample (torchvision's rule): NaN * (a zero sample outside the
    image) is NaN, inf * (an integer-position sample) is inf, never 0 or NaN from a zero corner
    weight. Two offset groups of 16 channels (the CUDA FMA kernel's shared sample tables) or 32
    (its fp32 tensor-core kernel, whose 3xTF32 must drop the NaN remainder of inf)."""
    conv = Conv(in_channels=channels, out_channels=8, offset_groups=2, with_bias=False)
    tensors = with_non_finite_mask(make_inputs(conv, dtype, device))
    backend = backend_for(device)
    out = call(backend, tensors, conv)
    expected = call_torchvision(tensors, conv)
    assert expected[0, :, 0, 0].isnan().all() and expected[0, :, 3, 2].isnan().all()
    assert (expected[1, :, 2, 3] == float("inf")).all()
    torch.testing.assert_close(out, expected, equal_nan=True, **TOLERANCES[dtype])
    # The weight gradient: a NaN mask reaches only its own offset group's input channels.
    grad_output = torch.randn_like(out)
    actual = gradients(lambda t: call(backend, t, conv), tensors, grad_output)["weight"]
    reference = gradients(lambda t: call_torchvision(t, conv), tensors, grad_output)["weight"]
    assert reference[:, channels // 2:].isfinite().any()
    torch.testing.assert_close(actual, reference, equal_nan=True, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name",
    ["fractional_offsets", "groups4_offset_groups2", "large_offsets", "kernel_3x2_odd_sizes"],
)
def test_channels_last_input(device, name):
    conv = CONFIGS[name]
    tensors = make_inputs(conv, torch.float64, device)
    tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    assert not tensors["input"].is_contiguous()
    backend = backend_for(device)
    out = call(backend, tensors, conv)
    assert out.is_contiguous()  # the output is NCHW whatever the input's layout
    torch.testing.assert_close(out, call_torchvision(tensors, conv), **TOLERANCES[torch.float64])
    grad_output = torch.randn_like(out)
    actual = gradients(lambda t: call(backend, t, conv), tensors, grad_output)
    expected = gradients(lambda t: call_torchvision(t, conv), tensors, grad_output)
    # grad_input keeps the input's layout (the kernel scatters into it in place).
    assert actual["input"].is_contiguous(memory_format=torch.channels_last)
    assert_gradients_close(actual, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    conv = CONFIGS["offset_groups2"]
    tensors = make_inputs(conv, torch.float64, device)
    for name in ("input", "offset", "weight", "mask", "bias"):
        tensors[name] = torch.cat([tensors[name], tensors[name]], dim=-1)[..., ::2]
        assert not tensors[name].is_contiguous()
    torch.testing.assert_close(
        call(backend_for(device), tensors, conv), call_torchvision(tensors, conv),
        **TOLERANCES[torch.float64],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("products", ["tf32x3", "ieee", "tf32"])
def test_fp32_product_modes_at_pem_channels(device, products, monkeypatch):
    """The fp32 products of the CUDA kernels (tensor cores at 128 channels): 3xTF32 by default
    and IEEE with PEM_KERNELS_FP32_DOT=ieee, both within fp32's tolerance of torchvision in fp64
    (forward and every gradient); TF32 where torch allows it, within TF32's. The CPU kernel
    ignores the setting."""
    conv = PEM_DECODER_CONVS["4x128x16x16"]
    tensors = make_inputs(conv, torch.float32, device)
    tensors64 = {k: cast(v, torch.float64) for k, v in tensors.items()}
    grad_output = torch.randn(conv.output_shape(), dtype=torch.float64, device=device)
    if products == "ieee":
        monkeypatch.setenv("PEM_KERNELS_FP32_DOT", "ieee")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if products == "tf32" else "highest")
    try:
        backend = backend_for(device)
        out = call(backend, tensors, conv)
        actual = gradients(lambda t: call(backend, t, conv), tensors, grad_output.float())
    finally:
        torch.set_float32_matmul_precision(previous)
    expected_out = call_torchvision(tensors64, conv)
    expected = gradients(lambda t: call_torchvision(t, conv), tensors64, grad_output)
    # TF32 keeps 11 significant bits of each product: about 5e-4 of the sums' magnitudes.
    rtol = 5e-3 if products == "tf32" and device == "cuda" else 1e-4
    for name, value, reference in [("output", out, expected_out)] + [
        (key, actual[key], expected[key]) for key in actual
    ]:
        scale = reference.abs().max().item()
        torch.testing.assert_close(value.double(), reference, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "name", ["fractional_offsets", "groups2_offset_groups4", "many_pixels", "4x128x16x16"]
)
def test_low_precision_forward_within_rounding_of_fp32(device, dtype, channels_last, name):
    """At 128 channels the CUDA bf16 forward runs on tensor cores (split samples)."""
    conv = {**CONFIGS, **PEM_DECODER_CONVS}[name]
    tensors = make_inputs(conv, dtype, device)
    if channels_last:
        tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    out = call(backend_for(device), tensors, conv)
    assert out.dtype == dtype
    # The kernel accumulates in fp32 and rounds once, so it should be about as close to the fp32
    # result (on the same rounded inputs) as that result rounded to `dtype` itself is.
    expected = call_reference({k: cast(v, torch.float32) for k, v in tensors.items()}, conv)
    rounding_error = (expected.to(dtype).float() - expected).abs().max().item()
    error = (out.float() - expected).abs().max().item()
    assert error <= 1.5 * rounding_error + 1e-3 * expected.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_gradients(device, dtype):
    conv = CONFIGS["offset_groups2"]
    tensors = make_inputs(conv, dtype, device)
    grad_output = torch.randn(conv.output_shape(), device=device).to(dtype)
    actual = gradients(lambda t: call(backend_for(device), t, conv), tensors, grad_output)
    tensors32 = {k: cast(v, torch.float32) for k, v in tensors.items()}
    expected = gradients(lambda t: call_reference(t, conv), tensors32, grad_output.float())
    eps = torch.finfo(dtype).eps
    for grad_name, grad in actual.items():
        assert grad.dtype == dtype
        scale = expected[grad_name].abs().max().item()
        torch.testing.assert_close(
            grad.float(), expected[grad_name], rtol=2 * eps, atol=2 * eps * scale,
            msg=lambda m, grad_name=grad_name: f"{grad_name}: {m}",
        )


@pytest.mark.parametrize("device", DEVICES)
def test_batch_zero(device):
    conv = dataclasses.replace(CONFIGS["fractional_offsets"], batch=0)
    tensors = make_inputs(conv, torch.float32, device)
    for value in tensors.values():
        value.requires_grad_(True)
    out = call(backend_for(device), tensors, conv)
    assert out.shape == conv.output_shape()
    out.sum().backward()
    assert tensors["input"].grad.shape == tensors["input"].shape
    assert (tensors["weight"].grad == 0).all() and (tensors["bias"].grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_mask", [True, False])
def test_gradcheck(device, with_mask):
    conv = Conv(
        batch=2, in_channels=4, height=5, width=4, out_channels=2, kernel=(2, 3), stride=(1, 2),
        padding=(1, 1), groups=2, offset_groups=2, offset_scale=2.0, with_mask=with_mask,
    )
    tensors = make_inputs(conv, torch.float64, device)
    names = [name for name, value in tensors.items() if value is not None]
    leaves = tuple(tensors[name].requires_grad_(True) for name in names)
    backend = backend_for(device)

    def conv_fn(*values):
        return call(backend, dict(zip(names, values)), conv)

    # The CUDA backward sums with atomics (outside deterministic mode): repeated backwards may
    # differ in the last bits of a float64 sum, which is all nondet_tol allows.
    nondet_tol = 1e-10 if device == "cuda" else 0.0
    assert torch.autograd.gradcheck(conv_fn, leaves, eps=1e-6, atol=1e-6, nondet_tol=nondet_tol)


def conv_params(tensors: dict, conv: Conv) -> tuple[int, ...]:
    """The op's integer arguments: stride, padding, dilation (h, w each), groups, offset_groups."""
    kh, kw = conv.kernel
    groups = conv.in_channels // tensors["weight"].shape[1]
    offset_groups = tensors["offset"].shape[1] // (2 * kh * kw)
    return (*conv.stride, *conv.padding, *conv.dilation, groups, offset_groups)


def opcheck_samples(device):
    samples = []
    for name, requires_grad, channels_last in [
        ("fractional_offsets", True, False),
        ("no_mask_no_bias", True, False),
        ("groups4_offset_groups2", False, True),
        ("stride_padding_dilation", True, True),
    ]:
        conv = CONFIGS[name]
        tensors = make_inputs(conv, torch.float32, device)
        if channels_last:
            tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
        for value in tensors.values():
            if value is not None:
                value.requires_grad_(requires_grad)
        samples.append((conv, tensors))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward(device):
    backend_for(device)
    for conv, t in opcheck_samples(device):
        torch.library.opcheck(
            torch.ops.pem_kernels.deform_conv2d.default,
            (t["input"], t["weight"], t["offset"], t["mask"], t["bias"], *conv_params(t, conv)),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device):
    backend_for(device)
    for conv, t in opcheck_samples(device):
        grad_output = torch.randn(conv.output_shape(), device=device)
        t = {k: v.detach() if v is not None else None for k, v in t.items()}
        torch.library.opcheck(
            torch.ops.pem_kernels._deform_conv2d_backward.default,
            (grad_output, t["input"], t["weight"], t["offset"], t["mask"], *conv_params(t, conv)),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_forward_and_backward(device):
    conv = CONFIGS["groups2"]
    tensors = make_inputs(conv, torch.float32, device)
    args = [tensors[name].requires_grad_(True) for name in ("input", "offset", "weight", "bias")]
    args.append(tensors["mask"].requires_grad_(True))
    backend = backend_for(device)

    def step(input, offset, weight, bias, mask):
        out = pem_kernels.deform_conv2d(
            input, offset, weight, bias, stride=1, padding=1, mask=mask, backend=backend
        )
        return (out * out).sum()

    compiled = torch.compile(
        step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor"
    )
    loss = compiled(*args)
    expected_loss = step(*args)
    torch.testing.assert_close(loss, expected_loss)
    grads = torch.autograd.grad(loss, args)
    expected_grads = torch.autograd.grad(expected_loss, args)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device, monkeypatch):
    """Under torch's deterministic mode every gradient is bit-identical from run to run. Outside
    it only the CUDA input gradient may differ in its last bits (atomics, as torchvision's);
    every other gradient, and every CPU one, is the same as in deterministic mode. (CUDA's GEMMs
    need the cuBLAS setting torch asks for in deterministic mode.)"""
    conv = CONFIGS["many_pixels"]
    tensors = make_inputs(conv, torch.float32, device)
    grad_output = torch.randn(conv.output_shape(), device=device)
    backend = backend_for(device)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    default = gradients(lambda t: call(backend, t, conv), tensors, grad_output)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = gradients(lambda t: call(backend, t, conv), tensors, grad_output)
        second = gradients(lambda t: call(backend, t, conv), tensors, grad_output)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert set(first) == set(TENSOR_NAMES)
    for name in first:
        assert torch.equal(first[name], second[name]), name
        if device == "cuda" and name == "input":
            torch.testing.assert_close(default[name], first[name], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(default[name], first[name]), name


def test_cpu_backward_is_repeatable_at_each_thread_count():
    """Bit-identical run to run at 1 and at 2 threads; across the two the GEMMs' last bits may
    differ (MKL splits a long reduction by the thread count)."""
    conv = CONFIGS["many_pixels"]
    tensors = make_inputs(conv, torch.float32)
    grad_output = torch.randn(conv.output_shape())
    threads = torch.get_num_threads()
    runs = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs[count] = [
                gradients(lambda t: call("cpu", t, conv), tensors, grad_output) for _ in range(2)
            ]
    finally:
        torch.set_num_threads(threads)
    for count, (first, second) in runs.items():
        for name in first:
            assert torch.equal(first[name], second[name]), (count, name)
    for name, single in runs[1][0].items():
        torch.testing.assert_close(single, runs[2][0][name], rtol=1e-5, atol=1e-5)


def test_meta_device_dry_run_gives_the_output_shape():
    """On the meta device (shapes only) "auto" runs the reference, module included, as
    torchvision's op runs there; it once failed on autocast's device check."""
    conv = CONFIGS["groups2"]
    tensors = {k: v.to("meta") if v is not None else None
               for k, v in make_inputs(conv, torch.float32).items()}
    out = call("auto", tensors, conv)
    assert out.device.type == "meta" and out.shape == conv.output_shape()
    module = pem_kernels.nn.ModulatedDeformConv2d(8, 6).to("meta")
    assert module(torch.empty(2, 8, 5, 7, device="meta")).shape == (2, 6, 5, 7)


def test_auto_backend_picks_cpu_and_matches_reference(monkeypatch):
    assert "cpu" in pem_kernels.available_backends("deform_conv2d", "cpu")
    conv = CONFIGS["groups2"]
    tensors = make_inputs(conv, torch.float64)
    monkeypatch.setenv("PEM_KERNELS_BACKEND", "reference")
    reference = call("auto", tensors, conv)
    monkeypatch.delenv("PEM_KERNELS_BACKEND")
    torch.testing.assert_close(call("auto", tensors, conv), reference, **TOLERANCES[torch.float64])


def test_auto_picks_the_cuda_kernel_for_cuda_tensors():
    from pem_kernels._extension import has_kernel
    from pem_kernels.ops.deform_conv import _BACKENDS

    expected = "cuda" if has_kernel("deform_conv2d", "CUDA") else "reference"
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert _BACKENDS.resolve("auto", torch.device("cuda"), dtype) == expected


def valid_op_args() -> list:
    conv = CONFIGS["offset_groups2"]  # groups 1, offset_groups 2, 3x3, padding 1
    t = make_inputs(conv, torch.float32)
    return [t["input"], t["weight"], t["offset"], t["mask"], t["bias"], 1, 1, 1, 1, 1, 1, 1, 2]


def with_arg(index: int, value) -> list:
    args = valid_op_args()
    args[index] = value(args[index]) if callable(value) else value
    return args


BAD_FORWARD_ARGS = [
    (with_arg(0, lambda x: x[0]), "input"),
    (with_arg(0, lambda x: x.int()), "input"),
    (with_arg(1, lambda w: w.double()), "weight"),
    (with_arg(1, lambda w: w[0]), "weight"),
    (with_arg(1, lambda w: w[:, :, :, :2]), "offset"),  # a 3x2 kernel no longer fits offset
    (with_arg(2, lambda o: o[:, :-1]), "offset"),
    (with_arg(2, lambda o: o[..., :-1]), "offset"),
    (with_arg(3, lambda m: m[:, :-1]), "mask"),
    (with_arg(3, lambda m: m.double()), "mask"),
    (with_arg(4, lambda b: b[:-1]), "bias"),
    (with_arg(5, 0), "stride_h"),
    (with_arg(7, -1), "pad_h"),
    (with_arg(10, 0), "dilation_w"),
    (with_arg(11, 3), "groups"),
    (with_arg(11, 0), "groups"),
    (with_arg(12, 3), "offset_groups"),
    (with_arg(12, 1), "offset"),
]


@pytest.mark.parametrize(
    "args, match", BAD_FORWARD_ARGS, ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD_FORWARD_ARGS)]
)
def test_registered_op_checks_its_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pem_kernels.deform_conv2d(*args)


def test_registered_backward_op_checks_its_arguments():
    args = valid_op_args()
    grad_output = torch.randn(2, 6, 7, 6)
    backward_args = [grad_output, *args[:4], *args[5:]]
    grads = torch.ops.pem_kernels._deform_conv2d_backward(*backward_args)
    assert [g.shape for g in grads] == [a.shape for a in args[:5]]
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.pem_kernels._deform_conv2d_backward(grad_output[:, :-1], *backward_args[1:])
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.pem_kernels._deform_conv2d_backward(grad_output.double(), *backward_args[1:])
    with pytest.raises(RuntimeError, match="offset_groups"):
        torch.ops.pem_kernels._deform_conv2d_backward(*backward_args[:-1], 5)


def test_python_api_rejects_bad_arguments_by_name():
    t = make_inputs(CONFIGS["fractional_offsets"], torch.float32)
    with pytest.raises(ValueError, match="offset"):
        pem_kernels.deform_conv2d(
            t["input"], t["offset"][:, :-1], t["weight"], padding=1, backend="cpu"
        )
    with pytest.raises(ValueError, match="backend"):
        pem_kernels.deform_conv2d(t["input"], t["offset"], t["weight"], padding=1, backend="fast")
    with pytest.raises(pem_kernels.BackendUnavailableError, match="triton"):
        pem_kernels.deform_conv2d(  # the Triton kernels take no fp64
            t["input"].double(), t["offset"].double(), t["weight"].double(), padding=1,
            backend="triton",
        )


def test_benchmark_script_runs_and_compares_with_torchvision(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "deform-conv", "--device", "cpu",
         "--sizes", "64x64/8,32x48/8",
         "--channels", "8", "--batch", "2", "--repeats", "2", "--mode", "forward+backward",
         "--backends", "reference,torchvision,cpu",
         "--out-dir", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PEM_BENCH_PROGRESS="0"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "deform_conv_forward_backward.json").read_text())["rows"]
    assert [(r["size"], r["backend"]) for r in rows] == [
        (size, backend)
        for size in ("64x64/8", "32x48/8")
        for backend in ("reference", "torchvision", "cpu")
    ]
    for row in rows:
        assert "error" not in row and row["median_ms"] > 0 and row["repeats"] == 2
        assert row["vs_tv"] > 0 and row["peak_bytes"] > 0 and row["max_err"] < 1e-4
    assert rows[-1]["shape"] == "(2,8,4,6)"
