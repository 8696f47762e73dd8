"""The deformable convolution modules against torchvision's module and PEM's DeformLayer recipe."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pem_kernels.nn import DeformConv2d, ModulatedDeformConv2d


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_deform_conv2d_matches_torchvision_module(bias, with_mask):
    ours = DeformConv2d(4, 6, (3, 2), stride=2, padding=1, dilation=1, groups=2, bias=bias).double()
    theirs = torchvision.ops.DeformConv2d(
        4, 6, (3, 2), stride=2, padding=1, groups=2, bias=bias
    ).double()
    theirs.load_state_dict(ours.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    out_h, out_w = 4, 5
    offset = torch.randn(2, 2 * 6, out_h, out_w, dtype=torch.float64) * 2
    mask = torch.rand(2, 6, out_h, out_w, dtype=torch.float64) if with_mask else None
    torch.testing.assert_close(ours(x, offset, mask), theirs(x, offset, mask))


def test_deform_conv2d_default_init_matches_conv2d_statistics():
    layer = DeformConv2d(16, 32, 3)
    bound = 1 / (16 * 9) ** 0.5
    assert layer.weight.abs().max() <= bound + 1e-6 and layer.bias.abs().max() <= bound + 1e-6
    assert layer.weight.std() > bound / 4  # not all zeros


def test_modulated_starts_as_half_weighted_plain_conv():
    """Zero-initialized offsets and sigmoid(0) = 0.5 modulation: 0.5 * conv2d at initialization."""
    layer = ModulatedDeformConv2d(8, 8, 3, padding=1, bias=False).double()
    x = torch.randn(2, 8, 6, 10, dtype=torch.float64)
    expected = 0.5 * torch.nn.functional.conv2d(x, layer.weight, padding=1)
    torch.testing.assert_close(layer(x), expected)


def test_modulated_offset_layout_is_pems_chunk_and_concatenate():
    layer = ModulatedDeformConv2d(4, 5, 3, padding=1, bias=True).double()
    with torch.no_grad():
        layer.offset_conv.weight.normal_(std=0.3)
        layer.offset_conv.bias.normal_()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    raw = layer.offset_conv(x)
    offset = torch.cat((raw[:, :9], raw[:, 9:18]), dim=1)
    expected = torchvision.ops.deform_conv2d(
        x, offset, layer.weight, layer.bias, padding=1, mask=raw[:, 18:].sigmoid()
    )
    torch.testing.assert_close(layer(x), expected)
    out = layer(x)
    out.sum().backward()
    assert layer.offset_conv.weight.grad.abs().sum() > 0


def test_modulated_reset_parameters_restores_the_starting_point():
    """reset_parameters re-initializes the deformable conv and zeroes the trained offset conv
    again, so the module is once more 0.5 * conv2d; the repr shows every constructor setting."""
    layer = ModulatedDeformConv2d(4, 6, 3, padding=1, offset_groups=2).double()
    with torch.no_grad():
        layer.offset_conv.weight.normal_()
        layer.offset_conv.bias.normal_()
        layer.weight.fill_(7.0)
    layer.reset_parameters()
    assert (layer.offset_conv.weight == 0).all() and (layer.offset_conv.bias == 0).all()
    assert (layer.weight != 7.0).all()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    expected = 0.5 * torch.nn.functional.conv2d(x, layer.weight, padding=1)
    torch.testing.assert_close(layer(x), expected)
    assert "offset_groups=2" in repr(layer)


def test_bad_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="groups"):
        DeformConv2d(4, 6, 3, groups=3)



@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DeformConv2d(0, 4, 3), "in_channels: expected a positive integer, got 0"),
        (lambda: DeformConv2d(8, 4, 3, groups=0), "groups: expected a positive integer, got 0"),
        (lambda: DeformConv2d(8, 4, (3, 0)), r"kernel_size: expected values >= 1, got \(3, 0\)"),
        (lambda: DeformConv2d(8, 4, 3, stride=0), "stride: expected values >= 1"),
        (lambda: DeformConv2d(8, 4, 3, padding=-1), "padding: expected values >= 0"),
        (lambda: DeformConv2d(8, 4, 3, dilation=(1, 0)), "dilation: expected values >= 1"),
        (lambda: DeformConv2d(8, 4, 3, backend="gpu"), "backend: expected one of"),
        (lambda: ModulatedDeformConv2d(8, 4, offset_groups=3),
         r"offset_groups: expected a positive divisor of in_channels \(8\), got 3"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(make, match):
    """Checked when the module is built (torchvision's module fails at the first forward, or
    divides by zero groups), not at the first call."""
    with pytest.raises(ValueError, match=match):
        make()


def test_backend_is_checked_when_assigned():
    conv = ModulatedDeformConv2d(8, 4, backend="reference")
    with pytest.raises(ValueError, match="backend: expected one of"):
        conv.backend = "gpu"
    assert conv.backend == "reference"
