"""The Triton deform_conv2d (DCNv2 implicit GEMM) against the reference and torchvision.

Without a GPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), which
costs milliseconds per program step: shapes are tiny, and every configuration runs forward and
backward once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pem_kernels.reference.deform_conv import deform_conv2d_ref

from conftest import HAS_CUDA, assert_compiles_for_sm90

triton_dcn = pytest.importorskip("pem_kernels.triton.deform_conv2d")
DEVICE = "cuda" if HAS_CUDA else "cpu"
FP32 = dict(rtol=1e-5, atol=1e-5)
GRAD_NAMES = ("input", "offset", "weight", "bias", "mask")


@dataclasses.dataclass(frozen=True)
class Conv:
    batch: int = 2
    in_channels: int = 4
    height: int = 5
    width: int = 7
    out_channels: int = 6
    kernel: tuple[int, int] = (3, 3)
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    offset_groups: int = 1
    offset_scale: float = 2.5  # uniform in [-scale, scale]: fractional, many samples off-image
    integer_offsets: bool = False  # rounded: samples land exactly on rows/cols -1, 0, H-1, H
    huge_offsets: bool = False  # some offsets at +-1e6 (every corner outside)
    with_mask: bool = True
    with_bias: bool = True
    channels_last: bool = False

    def output_size(self) -> tuple[int, int]:
        return tuple(
            (size + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1
            for size, k in zip((self.height, self.width), self.kernel)
        )


def make_inputs(conv: Conv, dtype=torch.float32, seed=0, requires_grad=False) -> dict:
    """Fresh random (never zero) tensors in ``dtype`` (the references upcast these exact values)."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = conv.kernel
    out_h, out_w = conv.output_size()
    taps = kh * kw

    def rand(*shape, low=-1.0, high=1.0):
        return torch.rand(*shape, generator=gen) * (high - low) + low

    offset = rand(conv.batch, 2 * conv.offset_groups * taps, out_h, out_w) * conv.offset_scale
    if conv.integer_offsets:
        offset = offset.round()
    if conv.huge_offsets:
        pick = torch.rand(offset.shape, generator=gen) < 0.2
        offset = torch.where(pick, torch.sign(offset) * 1e6, offset)
    tensors = dict(
        input=rand(conv.batch, conv.in_channels, conv.height, conv.width, low=0.5, high=1.5),
        offset=offset,
        weight=rand(conv.out_channels, conv.in_channels // conv.groups, kh, kw),
        bias=rand(conv.out_channels) if conv.with_bias else None,
        mask=rand(conv.batch, conv.offset_groups * taps, out_h, out_w, low=0.1, high=1.0)
        if conv.with_mask else None,
    )
    for name, tensor in tensors.items():
        if tensor is not None:
            tensor = tensor.to(device=DEVICE, dtype=dtype)
            if name == "input" and conv.channels_last:
                tensor = tensor.to(memory_format=torch.channels_last)
            tensors[name] = tensor.requires_grad_(requires_grad)
    return tensors


def run(fn, conv: Conv, tensors: dict) -> torch.Tensor:
    return fn(
        tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
        conv.stride, conv.padding, conv.dilation, tensors["mask"],
    )


def forward_and_grads(fn, conv: Conv, tensors: dict, grad_output: torch.Tensor):
    names = [name for name in GRAD_NAMES if tensors[name] is not None]
    out = run(fn, conv, tensors)
    grads = torch.autograd.grad(out, [tensors[name] for name in names], grad_output)
    return out, dict(zip(names, grads))


CONFIGS = {
    "base": Conv(),
    "no_mask_no_bias": Conv(with_mask=False, with_bias=False, padding=0),
    "stride2_pad2_dil2": Conv(stride=2, padding=2, dilation=2, height=7, width=8),
    "groups2_offset_groups2_k3x2": Conv(groups=2, offset_groups=2, kernel=(3, 2)),
    # weight groups of 3 channels, offset groups of 2: blocks straddle both kinds of group
    "straddling_groups": Conv(in_channels=6, out_channels=4, groups=2, offset_groups=3),
    "integer_and_huge_offsets": Conv(integer_offsets=True, huge_offsets=True, offset_scale=3.0),
    "channels_last": Conv(channels_last=True, with_bias=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_all_gradients_match_reference_fp32(name):
    conv = CONFIGS[name]
    tensors = make_inputs(conv, requires_grad=True)
    grad_output = torch.randn(conv.batch, conv.out_channels, *conv.output_size(), device=DEVICE)
    expected, expected_grads = forward_and_grads(deform_conv2d_ref, conv, tensors, grad_output)
    out, grads = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **FP32)
    assert set(grads) == set(expected_grads)
    for grad_name, grad in grads.items():
        assert grad.shape == expected_grads[grad_name].shape, grad_name
        torch.testing.assert_close(grad, expected_grads[grad_name], **FP32, msg=grad_name)
    if conv.channels_last:  # read in place; output and grad_input keep the input's format
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        assert grads["input"].is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


def test_non_contiguous_tensors_including_bias():
    conv = CONFIGS["base"]
    tensors = make_inputs(conv)
    for name, tensor in tensors.items():
        tensors[name] = torch.stack([tensor, -tensor], dim=-1)[..., 0]  # the values, stride 2
        assert not tensors[name].is_contiguous(), name
    torch.testing.assert_close(
        run(triton_dcn.deform_conv2d, conv, tensors), run(deform_conv2d_ref, conv, tensors), **FP32
    )


def test_int32_index_limits_are_checked_with_strides(monkeypatch):
    """The kernels index within an image in int32; the check counts strides, so a view into a
    larger tensor is judged by the span it addresses (the limit is lowered to test it)."""
    conv = CONFIGS["base"]
    tensors = make_inputs(conv)
    out_pixels = conv.output_size()[0] * conv.output_size()[1]
    spans = {name: triton_dcn._image_span(tensors[name]) for name in ("input", "offset", "mask")}
    limit = max(*spans.values(), conv.out_channels * out_pixels, conv.batch * out_pixels)
    assert spans["offset"] == limit  # the largest: 2 * 9 taps * 35 pixels - 1
    monkeypatch.setattr(triton_dcn, "_INT32_MAX", limit)
    run(triton_dcn.deform_conv2d, conv, tensors)  # contiguous tensors just fit
    tensors["offset"] = torch.cat([tensors["offset"], tensors["offset"]], dim=-1)[..., ::2]
    with pytest.raises(RuntimeError, match="fit in int32"):
        run(triton_dcn.deform_conv2d, conv, tensors)


def triton_and_fp64_reference(conv, tensors: dict, reference: dict) -> tuple[dict, dict]:
    """(Triton, fp64 reference) results of test_deform_conv.py's ``conv``: for each, the output
    and the gradient of every given tensor for one random fp64 ``grad_output``."""
    grad_output = torch.randn(conv.output_shape(), dtype=torch.float64, device=DEVICE)
    results = []
    for inputs, fn in [(tensors, triton_dcn.deform_conv2d), (reference, deform_conv2d_ref)]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items() if v is not None}
        out = fn(**{**inputs, **leaves}, **conv.kwargs())
        grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(out.dtype))
        results.append({"output": out, **dict(zip(leaves, grads))})
    assert results[0].keys() == results[1].keys()
    return results[0], results[1]


@pytest.mark.parametrize("seed", range(24))
def test_random_configurations_match_the_fp64_reference(seed):
    """test_deform_conv.py's random configurations (any kernel, stride, padding, dilation, groups
    and offset groups; channels_last for odd seeds), fp32 against the fp64 reference: forward
    and every gradient."""
    from test_deform_conv import make_inputs as make_fp64_inputs
    from test_deform_conv import random_conv

    conv = random_conv(seed)
    reference = make_fp64_inputs(conv, torch.float64, DEVICE, seed=seed)
    tensors = {k: None if v is None else v.float() for k, v in reference.items()}
    if seed % 2:
        tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    actual, expected = triton_and_fp64_reference(conv, tensors, reference)
    for key, value in expected.items():
        torch.testing.assert_close(
            actual[key].double(), value, rtol=1e-4, atol=1e-4,
            msg=lambda message, key=key: f"{conv} {key}: {message}",
        )


@pytest.mark.skipif(not HAS_CUDA, reason="too slow for the interpreter: GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["1x128x64x64", "4x128x16x16"])
def test_pem_decoder_sizes_match_the_fp64_reference(dtype, layout, name):
    """PEM's pixel-decoder DeformLayer (128 -> 128, 3x3) at scale, forward and every gradient,
    against the fp64 reference on the same values; bf16 within a relative error of 1e-2 of the
    whole tensor."""
    from test_deform_conv import PEM_DECODER_CONVS
    from test_deform_conv import make_inputs as make_fp64_inputs

    conv = PEM_DECODER_CONVS[name]
    tensors = make_fp64_inputs(conv, dtype, DEVICE)
    # The reference gets the same (rounded) values: only the kernel's arithmetic is judged.
    reference = {k: None if v is None else v.double() for k, v in tensors.items()}
    if layout == "channels_last":
        tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    actual, expected = triton_and_fp64_reference(conv, tensors, reference)
    for key, value in expected.items():
        got = actual[key].double()
        if dtype == torch.float32:
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-3, msg=key)
        else:
            error = (got - value).norm() / value.norm()
            assert error < 1e-2, f"{key}: relative error {error:.2e}"


def test_matches_torchvision():
    torchvision_ops = pytest.importorskip("torchvision.ops")
    conv = Conv(groups=2, offset_groups=2, stride=2, padding=2, dilation=2, height=6, width=7)
    tensors = make_inputs(conv, seed=3, requires_grad=True)
    grad_output = torch.randn(conv.batch, conv.out_channels, *conv.output_size(), device=DEVICE)
    expected, expected_grads = forward_and_grads(
        torchvision_ops.deform_conv2d, conv, tensors, grad_output
    )
    out, grads = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
    torch.testing.assert_close(out, expected, **FP32)
    for grad_name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[grad_name], **FP32, msg=grad_name)


def test_offset_gradient_is_the_right_hand_derivative_at_the_border():
    """Samples exactly on row -1 (zero value, non-zero offset gradient) and on row H (zero both)."""
    conv = Conv(batch=1, in_channels=2, height=4, width=4, out_channels=3, kernel=(1, 1),
                padding=0, with_mask=False, with_bias=False)
    tensors = make_inputs(conv, requires_grad=True)
    with torch.no_grad():
        tensors["offset"].zero_()
        tensors["offset"][0, 0, 0, :] = -1.0  # output row 0 samples input row -1 (dy)
        tensors["offset"][0, 0, 3, :] = 1.0  # output row 3 samples input row H = 4
        tensors["offset"][0, 1, 1, :] = 0.25  # a fractional dx elsewhere
    grad_output = torch.randn(1, 3, 4, 4, device=DEVICE)
    out, grads = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
    expected, expected_grads = forward_and_grads(deform_conv2d_ref, conv, tensors, grad_output)
    torch.testing.assert_close(out, expected, **FP32)
    for grad_name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[grad_name], **FP32, msg=grad_name)
    assert torch.all(out[0, :, 0] == 0) and torch.all(out[0, :, 3] == 0)
    assert torch.all(grads["offset"][0, 0, 0] != 0)  # slope towards row 0
    assert torch.all(grads["offset"][0, 0, 3] == 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inf - inf
def test_non_finite_offsets_sample_zero():
    conv = Conv(batch=1, in_channels=2, height=3, width=4, out_channels=3, kernel=(1, 1),
                padding=0, with_bias=False)
    tensors = make_inputs(conv, requires_grad=True)
    with torch.no_grad():
        tensors["offset"][0, 0, 1, 1] = float("inf")
        tensors["offset"][0, 1, 2, 3] = -float("inf")
        tensors["offset"][0, 1, 0, 0] = float("nan")
    grad_output = torch.randn(1, 3, 3, 4, device=DEVICE)
    out, grads = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
    assert torch.all(out[0, :, 1, 1] == 0) and torch.all(out[0, :, 2, 3] == 0)
    assert torch.all(out[0, :, 0, 0] == 0)
    assert torch.all(out[0, :, 0, 1] != 0)  # the finite positions still sample
    for grad_name, grad in grads.items():
        assert torch.all(torch.isfinite(grad)), grad_name
    for y, x in ((1, 1), (2, 3), (0, 0)):
        assert torch.all(grads["offset"][0, :, y, x] == 0) and grads["mask"][0, 0, y, x] == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy 0 * inf
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_non_finite_mask_values_reach_the_output_as_in_the_reference(channels_last):
    """The mask multiplies the blended sample: a NaN mask at a sample outside the image gives NaN,
    an inf mask at an integer position gives inf (not 0 * inf from a zero corner weight), and in
    the weight gradient a NaN mask reaches only its own offset group's channels."""
    conv = Conv(batch=2, in_channels=4, out_channels=3, offset_groups=2, with_bias=False,
                channels_last=channels_last)
    tensors = make_inputs(conv)
    with torch.no_grad():
        tensors["offset"][0, 0:2, 0, 0] = -50.0  # offset group 0, tap 0: every corner outside
        tensors["mask"][0, 0, 0, 0] = float("nan")
        tensors["offset"][1, 26:28, 2, 3] = 1.0  # offset group 1, tap 4: an integer position
        tensors["mask"][1, 13, 2, 3] = float("inf")
        tensors["weight"].abs_()  # positive, so that the inf sample gives +inf, not inf - inf
    tensors = {name: t.requires_grad_(True) if t is not None else None
               for name, t in tensors.items()}
    grad_output = torch.randn(2, 3, *conv.output_size(), device=DEVICE)
    out, grads = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
    expected, expected_grads = forward_and_grads(deform_conv2d_ref, conv, tensors, grad_output)
    assert expected[0, :, 0, 0].isnan().all() and (expected[1, :, 2, 3] == float("inf")).all()
    torch.testing.assert_close(out, expected, equal_nan=True, **FP32)
    assert expected_grads["weight"][:, 2:].isfinite().any()
    torch.testing.assert_close(grads["weight"], expected_grads["weight"], equal_nan=True, **FP32)


UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_forward_within_rounding_bound(dtype):
    """|ours - exact| <= u * (sum |W| |column| + |out|): the error of rounding the blended columns
    (the dot operands) and the output once each, with the exact result computed in fp64 from the
    same low-precision inputs."""
    conv = Conv(batch=1, in_channels=8, out_channels=8, height=6, width=5)
    tensors = make_inputs(conv, dtype=dtype, seed=1)
    ours = run(triton_dcn.deform_conv2d, conv, tensors)
    assert ours.dtype == dtype
    exact64 = {k: v.double() if v is not None else None for k, v in tensors.items()}
    exact = run(deform_conv2d_ref, conv, exact64)
    magnitude = deform_conv2d_ref(
        exact64["input"].abs(), exact64["offset"], exact64["weight"].abs(), None,
        conv.stride, conv.padding, conv.dilation, exact64["mask"].abs(),
    )
    error = (ours.double() - exact).abs()
    bound = 1.5 * UNIT_ROUNDOFF[dtype] * (magnitude + exact.abs()) + 1e-6
    assert torch.all(error <= bound), (error - bound).max()
    assert torch.all(torch.isfinite(ours))


def test_bf16_gradients_close_to_fp32_reference():
    conv = Conv(batch=1, in_channels=4, out_channels=4, height=5, width=5)
    tensors = make_inputs(conv, dtype=torch.bfloat16, seed=2, requires_grad=True)
    grad_output = torch.randn(1, 4, *conv.output_size(), device=DEVICE).to(torch.bfloat16)
    _, grads = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
    upcast = {
        k: v.detach().float().requires_grad_() if v is not None else None
        for k, v in tensors.items()
    }
    _, expected = forward_and_grads(deform_conv2d_ref, conv, upcast, grad_output.float())
    for grad_name, grad in grads.items():
        assert grad.dtype == torch.bfloat16, grad_name
        scale = expected[grad_name].abs().max().item()
        torch.testing.assert_close(
            grad.float(), expected[grad_name], rtol=2e-2, atol=2e-2 * scale, msg=grad_name
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_deterministic(dtype):
    """Under torch's deterministic mode (sorted gather of the input gradient) repeated backward
    passes give bit-identical gradients; outside it the input gradient is scattered with atomics
    (the same sums in another order) and every other gradient is the same."""
    conv = Conv(batch=2, in_channels=4, out_channels=4, height=5, width=6, offset_scale=1.0)
    tensors = make_inputs(conv, dtype, seed=4, requires_grad=True)
    grad_output = torch.randn(2, 4, *conv.output_size(), device=DEVICE).to(dtype)
    _, default = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, first = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
        _, second = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert set(first) == set(GRAD_NAMES)
    for grad_name in first:
        assert torch.equal(first[grad_name], second[grad_name]), grad_name
        if grad_name == "input":
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(default[grad_name], first[grad_name], rtol=tol, atol=tol)
        else:
            assert torch.equal(default[grad_name], first[grad_name]), grad_name


def test_empty_batch():
    conv = Conv(batch=0)
    tensors = make_inputs(conv, requires_grad=True)
    grad_output = torch.randn(0, conv.out_channels, *conv.output_size(), device=DEVICE)
    out, grads = forward_and_grads(triton_dcn.deform_conv2d, conv, tensors, grad_output)
    assert out.shape == (0, conv.out_channels, *conv.output_size())
    assert grads["input"].shape == tensors["input"].shape
    assert torch.equal(grads["weight"], torch.zeros_like(tensors["weight"]))
    assert torch.equal(grads["bias"], torch.zeros_like(tensors["bias"]))


def test_public_wrapper_validates_arguments():
    conv = Conv()
    tensors = make_inputs(conv)
    with pytest.raises(ValueError, match="offset"):
        triton_dcn.deform_conv2d(
            tensors["input"], tensors["offset"][:, :-2], tensors["weight"], padding=1
        )
    with pytest.raises(TypeError, match="dtype"):
        triton_dcn.deform_conv2d(
            tensors["input"], tensors["offset"].double(), tensors["weight"], padding=1
        )
    with pytest.raises(RuntimeError, match="mask must be"):  # the op checks its own arguments
        triton_dcn.deform_conv2d_triton(
            tensors["input"], tensors["weight"], tensors["offset"], tensors["mask"][:, 1:], None,
            1, 1, 1, 1, 1, 1, 1, 1,
        )
    doubles = {k: v.double() if v is not None else None for k, v in tensors.items()}
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        run(triton_dcn.deform_conv2d, conv, doubles)


def _op_args(requires_grad: bool, with_mask: bool):
    conv = Conv(batch=1, in_channels=2, out_channels=3, height=3, width=4, kernel=(2, 2),
                with_mask=with_mask, with_bias=with_mask)
    t = make_inputs(conv, requires_grad=requires_grad)
    # stride, padding, dilation as (h, w) pairs; groups, offset_groups
    conv_params = (1, 1, 1, 1, 1, 1, 1, 1)
    return conv, (t["input"], t["weight"], t["offset"], t["mask"], t["bias"], *conv_params)


# Under the interpreter the triton_op body runs on FakeTensors in opcheck's fake-tensor and AOT
# checks and fails, so without a GPU only the schema and autograd-registration checks run.
OPCHECK_KWARGS = {} if HAS_CUDA else {"test_utils": ("test_schema", "test_autograd_registration")}


@pytest.mark.parametrize("with_mask", [True, False])
def test_opcheck(with_mask):
    conv, args = _op_args(requires_grad=True, with_mask=with_mask)
    torch.library.opcheck(
        torch.ops.pem_kernels.deform_conv2d_triton.default, args, **OPCHECK_KWARGS
    )
    grad_output = torch.randn(1, 3, *conv.output_size(), device=DEVICE)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    input, weight, offset, mask, _bias, *params = detached
    torch.library.opcheck(
        torch.ops.pem_kernels._deform_conv2d_backward_triton.default,
        (grad_output, input, weight, offset, mask, *params),
        **OPCHECK_KWARGS,
    )


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile over a triton_op needs a GPU")
def test_torch_compile_fullgraph():
    conv = Conv(batch=2, in_channels=16, out_channels=16, height=12, width=10)
    tensors = make_inputs(conv, requires_grad=True)

    def step(input, offset, weight, bias, mask):
        out = triton_dcn.deform_conv2d(input, offset, weight, bias, 1, 1, 1, mask)
        return (out * out).sum()

    args = [tensors[name] for name in ("input", "offset", "weight", "bias", "mask")]
    compiled = torch.compile(step, fullgraph=True)
    loss, expected = compiled(*args), step(*args)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(loss, args)
    expected_grads = torch.autograd.grad(expected, args)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


_SM90_COMPILE = """
import torch
from pem_kernels.triton import deform_conv2d as K

assert not K.INTERPRET

def pointers(dtype, **extra):
    names = ("x_ptr", "offset_ptr", "mask_ptr", "w_ptr", "bias_ptr", "out_ptr", "gout_ptr",
             "goffset_ptr", "gmask_ptr", "gin_ptr")
    table = {**{name: "*" + dtype for name in names}, **extra}
    return lambda name: table.get(name, "i32")

bf16 = dict(DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32")
fp32 = dict(DOT_DTYPE=tl.float32, DOT_PRECISION="tf32x3")  # the default (fp32_dot_precision)
# The GPU's forward tiles (BLOCK_N=128 for PEM's 128 channels, and a narrower one): along
# channels (channels_last input) and, transposed, along pixels (NCHW), as the op chooses them.
for block_n in (64, 128):
    flags = dict(HAS_MASK=True, HAS_BIAS=True, PIXEL_MAJOR=False)
    tiles = dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=32)
    compile_sm90(K._forward_kernel, pointers("bf16"), dict(**flags, **tiles, **bf16))
    compile_sm90(K._forward_kernel, pointers("fp32"), dict(**flags, **tiles, **fp32),
                 num_warps=K._num_warps(torch.float32))
    flags["PIXEL_MAJOR"] = True
    compile_sm90(K._forward_kernel, pointers("bf16"),
                 dict(**flags, BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=16, **bf16), num_warps=8)
    compile_sm90(K._forward_kernel, pointers("fp32"),
                 dict(**flags, BLOCK_M=32, BLOCK_N=block_n, BLOCK_K=16, **fp32), num_warps=8)
# The forward with IEEE fp32 products (PEM_KERNELS_FP32_DOT=ieee).
compile_sm90(K._forward_kernel, pointers("fp32"),
             dict(HAS_MASK=True, HAS_BIAS=True, PIXEL_MAJOR=False, BLOCK_M=64, BLOCK_N=128,
                  BLOCK_K=32, DOT_DTYPE=tl.float32, DOT_PRECISION="ieee"),
             num_warps=K._num_warps(torch.float32))
tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
# The offset/mask gradient kernel with the fused atomic input-gradient scatter (the default
# outside deterministic mode) and without it, in both dtypes; channel-major tiles
# (channels_last) and, with the op's sizes for them, pixel-major ones (NCHW).
for scatter in (True, False):
    compile_sm90(K._offset_mask_grad_kernel, pointers("bf16", ginput_ptr="*fp32"),
                 dict(HAS_MASK=True, SCATTER_INPUT_GRAD=scatter, PIXEL_MAJOR=False, **tiles,
                      **bf16))
    compile_sm90(K._offset_mask_grad_kernel, pointers("fp32", ginput_ptr="*fp32"),
                 dict(HAS_MASK=True, SCATTER_INPUT_GRAD=scatter, PIXEL_MAJOR=False, **tiles,
                      **fp32), num_warps=K._num_warps(torch.float32))
    for dtype, dots in (("bf16", bf16), ("fp32", fp32)):
        compile_sm90(K._offset_mask_grad_kernel, pointers(dtype, ginput_ptr="*fp32"),
                     dict(HAS_MASK=True, SCATTER_INPUT_GRAD=scatter, PIXEL_MAJOR=True,
                          BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, **dots), num_warps=8)
for pixel_major in (False, True):
    compile_sm90(K._weight_grad_kernel, pointers("bf16", partial_ptr="*fp32"),
                 dict(HAS_MASK=True, PIXEL_MAJOR=pixel_major, **tiles, **bf16),
                 num_warps=8 if pixel_major else 4)
    compile_sm90(K._weight_grad_kernel, pointers("fp32", partial_ptr="*fp32"),
                 dict(HAS_MASK=True, PIXEL_MAJOR=pixel_major, **tiles, **fp32), num_warps=8)
compile_sm90(K._corner_kernel, pointers("bf16", key_ptr="*i64", weight_ptr="*fp32", N="i64",
                                        SENTINEL="i64"), dict(HAS_MASK=True, BLOCK=256))
compile_sm90(K._input_grad_kernel, pointers("bf16", key_ptr="*i64", perm_ptr="*i64",
                                            weight_ptr="*fp32", bounds_ptr="*i64"),
             dict(BLOCK_T=32, BLOCK_E=64, BLOCK_N=64, BLOCK_K=32, **bf16))
print("compiled for sm_90")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU every kernel is compiled and run by the tests")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects: compile every kernel for an H100
    (sm_90, through Triton's bundled ptxas) in a process without TRITON_INTERPRET."""
    assert_compiles_for_sm90(_SM90_COMPILE)
