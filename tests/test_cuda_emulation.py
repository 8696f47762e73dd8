"""The CUDA sources run on the CPU through tests/cuda_emulation: without a GPU, these are the only
tests that execute csrc/cuda/*.cu (host code, launch geometry and kernels, with the threads of
each block running concurrently), against torchvision and the CPU kernels. tests/test_deform_conv.py
and tests/test_prototype_select.py run the real kernels wherever a GPU exists."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pem_kernels

from test_deform_conv import (
    CONFIGS,
    TENSOR_NAMES,
    TOLERANCES,
    Conv,
    gradients,
    make_inputs,
    with_non_finite_mask,
)
from test_prototype_attention_cuda import make_inputs as make_attention_inputs
from test_prototype_select import make_inputs as make_select_inputs

pytestmark = pytest.mark.skipif(
    not pem_kernels.EXTENSION_LOADED, reason="pem_kernels._C is not built"
)
torchvision_ops = pytest.importorskip("torchvision.ops")

# Fixture name -> the csrc/cuda source its emulation is built from.
EMULATED_SOURCES = {
    "deform": "deform_conv2d", "local_representation": "local_representation",
    "query_projection": "query_projection", "attention": "prototype_attention",
    "select": "prototype_select",
}


@pytest.fixture(scope="module")
def emulations(request):
    """The emulations that the session's selected tests use, built together at first use (in
    parallel: about half a minute each on this project's 2-core CI machine, one after another
    before)."""
    from cuda_emulation import build_all

    wanted = {
        EMULATED_SOURCES[name] for item in request.session.items if item.path == request.path
        for name in getattr(item, "fixturenames", ()) if name in EMULATED_SOURCES
    }
    return build_all(sorted(wanted))


@pytest.fixture(scope="module")
def deform(emulations):
    return emulations["deform_conv2d"]


@pytest.fixture(scope="module")
def local_representation(emulations):
    return emulations["local_representation"]


@pytest.fixture(scope="module")
def query_projection(emulations):
    return emulations["query_projection"]


@pytest.fixture(scope="module")
def attention(emulations):
    return emulations["prototype_attention"]


@pytest.fixture(scope="module")
def select(emulations):
    return emulations["prototype_select"]


def conv_arguments(conv: Conv) -> tuple[int, ...]:
    (stride_h, stride_w), (pad_h, pad_w) = conv.stride, conv.padding
    dilation_h, dilation_w = conv.dilation
    return (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, conv.groups,
            conv.offset_groups)


def emulated_forward(deform, tensors: dict, conv: Conv) -> torch.Tensor:
    return deform.deform_conv2d_cuda(
        tensors["input"], tensors["weight"], tensors["offset"], tensors["mask"],
        tensors["bias"], *conv_arguments(conv),
    )


def emulated_gradients(deform, tensors: dict, conv: Conv, grad_output: torch.Tensor) -> dict:
    grads = deform.deform_conv2d_backward_cuda(
        grad_output, tensors["input"], tensors["weight"], tensors["offset"], tensors["mask"],
        *conv_arguments(conv),
    )
    return {
        name: grad for name, grad in zip(TENSOR_NAMES, grads) if tensors[name] is not None
    }


def torchvision_gradients(tensors: dict, conv: Conv, grad_output: torch.Tensor) -> dict:
    return gradients(
        lambda t: torchvision_ops.deform_conv2d(**t, **conv.kwargs()), tensors, grad_output
    )


def assert_gradients_close(actual: dict, expected: dict, dtype: torch.dtype) -> None:
    """Gradients sum over many pixels in another order than torchvision's: the rounding grows
    with their magnitude."""
    assert set(actual) == set(expected)
    for key in actual:
        scale = max(1.0, expected[key].abs().max().item())
        torch.testing.assert_close(
            actual[key], expected[key], rtol=TOLERANCES[dtype]["rtol"],
            atol=TOLERANCES[dtype]["atol"] * scale, msg=lambda m, key=key: f"{key}: {m}",
        )


# Each of the CUDA forward's gather paths (per element, shared sample tables, vector loads on
# channels_last) and the backward's cases.
DEFORM_CASES = {
    "per_element_odd_kernel": (CONFIGS["kernel_3x2_odd_sizes"], "nchw"),
    "shared_samples": (Conv(in_channels=32, out_channels=8, offset_groups=2, offset_scale=3.0),
                       "nchw"),
    "vector_loads_channels_last": (
        Conv(in_channels=32, out_channels=8, offset_groups=2, offset_scale=3.0), "channels_last"
    ),
    "groups_stride_padding_dilation": (
        Conv(in_channels=32, out_channels=16, height=9, width=8, groups=2, offset_groups=2,
             stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
        "nchw",
    ),
    "no_mask_no_bias_out_of_image": (
        Conv(with_mask=False, with_bias=False, offset_scale=5.0, integer_offsets=True), "nchw"
    ),
    "many_pixels": (CONFIGS["many_pixels"], "nchw"),
    # 40 channels per offset group: the backward fills its columns in chunks of 16, 16 and 8.
    "wide_offset_group": (Conv(in_channels=40, out_channels=8, offset_scale=2.0), "nchw"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(DEFORM_CASES))
def test_deform_conv2d_matches_torchvision(deform, name, dtype):
    conv, layout = DEFORM_CASES[name]
    tensors = make_inputs(conv, dtype)
    if layout == "channels_last":
        tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    expected = torchvision_ops.deform_conv2d(**tensors, **conv.kwargs())
    torch.testing.assert_close(emulated_forward(deform, tensors, conv), expected,
                               **TOLERANCES[dtype])
    grad_output = torch.randn(conv.output_shape(), dtype=dtype)
    actual = emulated_gradients(deform, tensors, conv, grad_output)
    expected_grads = torchvision_gradients(tensors, conv, grad_output)
    assert_gradients_close(actual, expected_grads, dtype)
    # fp32 gradients of inputs with channels per offset group a multiple of 4 accumulate in NHWC
    # (float4 atomics): they come back in the input's layout all the same.
    if layout == "channels_last":
        assert actual["input"].is_contiguous(memory_format=torch.channels_last)
    else:
        assert actual["input"].is_contiguous()


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_unaligned"])
@pytest.mark.parametrize("channels,groups,offset_groups", [(32, 2, 1), (48, 1, 3), (20, 1, 1)],
                         ids=str)
def test_deform_conv2d_forward_gather_paths(deform, layout, channels, groups, offset_groups):
    """Shared sample tables (channels per group and per offset group multiples of 16), vector
    loads (channels_last with an aligned start) and per-element samples (20 channels), each on
    every layout."""
    conv = Conv(in_channels=channels, height=9, width=11, out_channels=8 * groups, groups=groups,
                offset_groups=offset_groups, offset_scale=3.0)
    tensors = make_inputs(conv, torch.float32)
    input = tensors["input"]
    strides = input.contiguous(memory_format=torch.channels_last).stride()
    if layout == "channels_last":
        tensors["input"] = input.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_unaligned":
        flat = torch.zeros(input.numel() + 1)
        tensors["input"] = flat[1:].as_strided(input.shape, strides).copy_(input)
    expected = torchvision_ops.deform_conv2d(**tensors, **conv.kwargs())
    torch.testing.assert_close(emulated_forward(deform, tensors, conv), expected,
                               **TOLERANCES[torch.float32])


# The tensor-core forward (fp32, 32-channel K-stages): every layout, groups and offset groups,
# more than one block along pixels and along output channels (130 > 128), strides and padding.
TENSOR_CORE_CASES = {
    "one_block": Conv(batch=1, in_channels=32, out_channels=8, height=4, width=4),
    "one_group": Conv(in_channels=32, out_channels=8, height=9, width=11, offset_scale=3.0),
    "groups_and_offset_groups": Conv(in_channels=128, out_channels=12, height=6, width=5,
                                     groups=2, offset_groups=2, offset_scale=3.0),
    "two_channel_blocks_stride_padding": Conv(
        batch=1, in_channels=32, out_channels=130, height=9, width=8, stride=(2, 1),
        padding=(2, 0), dilation=(1, 2), offset_scale=3.0),
    "no_mask_no_bias_out_of_image": Conv(in_channels=32, out_channels=8, with_mask=False,
                                         with_bias=False, offset_scale=5.0, integer_offsets=True),
}


def with_layout(tensors: dict, layout: str) -> dict:
    """The input in NCHW, channels_last, or channels_last starting one element past alignment
    (no vector loads)."""
    input = tensors["input"]
    strides = input.contiguous(memory_format=torch.channels_last).stride()
    if layout == "channels_last":
        tensors["input"] = input.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_unaligned":
        flat = torch.zeros(input.numel() + 1, dtype=input.dtype)
        tensors["input"] = flat[1:].as_strided(input.shape, strides).copy_(input)
    return tensors


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_unaligned"])
@pytest.mark.parametrize("name", list(TENSOR_CORE_CASES))
def test_deform_conv2d_tensor_core_forward_3xtf32(deform, name, layout):
    """3xTF32 (the default at PyTorch's "highest" fp32 precision) keeps fp32's tolerance against
    torchvision; its output differs from the IEEE kernel's (PEM_KERNELS_FP32_DOT=ieee), so the
    tensor-core kernel did run."""
    conv = TENSOR_CORE_CASES[name]
    tensors = with_layout(make_inputs(conv, torch.float32), layout)
    expected = torchvision_ops.deform_conv2d(**tensors, **conv.kwargs())
    out = emulated_forward(deform, tensors, conv)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEM_KERNELS_FP32_DOT", "ieee")
        ieee = emulated_forward(deform, tensors, conv)
    torch.testing.assert_close(ieee, expected, **TOLERANCES[torch.float32])
    assert not torch.equal(out, ieee)


@pytest.mark.parametrize("name", ["one_block", "groups_and_offset_groups",
                                  "two_channel_blocks_stride_padding"])
def test_deform_conv2d_tensor_core_forward_split_over_k(deform, monkeypatch, name):
    """fp32 maps of fewer tiles than SMs split their K-stages over several blocks, which add
    their partial sums (the bias once) with atomics: as close to torchvision as one block per
    tile, in another order of addition (the emulated H100's 132 SMs split these cases; one SM
    splits nothing). Deterministic mode splits nothing: bit for bit one block per tile."""
    conv = TENSOR_CORE_CASES[name]
    tensors = make_inputs(conv, torch.float32)
    expected = torchvision_ops.deform_conv2d(**tensors, **conv.kwargs())
    split = emulated_forward(deform, tensors, conv)
    monkeypatch.setenv("PEM_EMULATION_SM_COUNT", "1")
    whole = emulated_forward(deform, tensors, conv)
    monkeypatch.delenv("PEM_EMULATION_SM_COUNT")
    torch.testing.assert_close(split, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(whole, expected, **TOLERANCES[torch.float32])
    assert not torch.equal(split, whole)  # the split kernel ran
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = emulated_forward(deform, tensors, conv)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(deterministic, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deform_conv2d_without_tensor_core_code_takes_the_fma_kernel(deform, monkeypatch, dtype):
    """A build that reaches the GPU only through older PTX (PEM_EMULATION_PTX_VERSION=75 on
    compute capability 9.0) has the tensor-core kernel as a trap: the host takes the FMA kernel,
    whose results PEM_KERNELS_FP32_DOT=ieee gives on a normal build, bit for bit."""
    conv = TENSOR_CORE_CASES["one_group"]
    tensors = make_inputs(conv, dtype)
    tensor_cores = emulated_forward(deform, tensors, conv)
    monkeypatch.setenv("PEM_KERNELS_FP32_DOT", "ieee")
    ieee = emulated_forward(deform, tensors, conv) if dtype == torch.float32 else None
    monkeypatch.delenv("PEM_KERNELS_FP32_DOT")
    monkeypatch.setenv("PEM_EMULATION_PTX_VERSION", "75")
    fallback = emulated_forward(deform, tensors, conv)
    assert not torch.equal(fallback, tensor_cores)
    if ieee is not None:
        assert torch.equal(fallback, ieee)
    expected = torchvision_ops.deform_conv2d(
        **{k: None if v is None else v.double() for k, v in tensors.items()}, **conv.kwargs())
    tolerance = TOLERANCES[dtype] if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(fallback.double(), expected, **tolerance)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_unaligned"])
@pytest.mark.parametrize("name", ["one_block", "groups_and_offset_groups",
                                  "two_channel_blocks_stride_padding"])
def test_deform_conv2d_tensor_core_forward_bf16(deform, name, layout):
    """bf16 on bf16 tensor cores, each sample split into a bf16 part and a bf16 remainder (16
    significant bits instead of fp32's 24): within one bf16 rounding of the exact result (the CPU
    kernel in fp32 on the same values) plus 2^-15 of the sum of the products' magnitudes. One
    bf16 product per sample (8 bits) fails that bound."""
    conv = TENSOR_CORE_CASES[name]
    tensors = with_layout(make_inputs(conv, torch.bfloat16), layout)
    out = emulated_forward(deform, tensors, conv)
    assert out.dtype == torch.bfloat16
    fp32 = {k: None if v is None else v.float() for k, v in tensors.items()}
    names = ("input", "weight", "offset", "mask", "bias")
    exact = torch.ops.pem_kernels.deform_conv2d(*(fp32[k] for k in names), *conv_arguments(conv))
    # The samples are positive (positive inputs and mask): |weight| gives the sum of |products|.
    magnitude = torch.ops.pem_kernels.deform_conv2d(
        fp32["input"], fp32["weight"].abs(), fp32["offset"], fp32["mask"], None,
        *conv_arguments(conv))
    bound = exact.abs() * 2.0**-8 + magnitude * 2.0**-15
    assert ((out.float() - exact).abs() <= bound).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deform_conv2d_tensor_core_forward_tf32_where_torch_allows_it(deform, layout):
    """With TF32 allowed (precision "high") one TF32 product per pair: within TF32's rounding of
    torchvision in fp64, and further from it than 3xTF32."""
    conv = TENSOR_CORE_CASES["groups_and_offset_groups"]
    tensors = with_layout(make_inputs(conv, torch.float32), layout)
    expected = torchvision_ops.deform_conv2d(
        **{k: None if v is None else v.double() for k, v in tensors.items()}, **conv.kwargs())
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        tf32 = emulated_forward(deform, tensors, conv)
    finally:
        torch.set_float32_matmul_precision(previous)
    exact = emulated_forward(deform, tensors, conv)
    scale = expected.abs().max().item()
    torch.testing.assert_close(tf32.double(), expected, rtol=0, atol=4e-3 * scale)
    tf32_error = (tf32.double() - expected).abs().max().item()
    exact_error = (exact.double() - expected).abs().max().item()
    assert exact_error * 10 < tf32_error, (exact_error, tf32_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deform_conv2d_tensor_core_non_finite_mask_as_torchvision(deform, layout, dtype):
    """An inf modulation at an integer position gives inf (the remainder of inf is NaN and must
    not reach the output), a NaN one outside the image gives NaN (bf16 against torchvision on
    the same values in fp32)."""
    conv = Conv(in_channels=64, out_channels=8, offset_groups=2, with_bias=False)
    tensors = with_layout(with_non_finite_mask(make_inputs(conv, dtype)), layout)
    expected = torchvision_ops.deform_conv2d(
        **{k: None if v is None else v.float() for k, v in tensors.items()}, **conv.kwargs())
    assert expected.isnan().any() and expected.isinf().any()
    tolerance = TOLERANCES[torch.float32] if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(emulated_forward(deform, tensors, conv).float(), expected,
                               equal_nan=True, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deform_conv2d_tensor_core_inf_weight_as_torchvision(deform, dtype):
    """An inf weight (1x1, 32 channels: the tensor-core path) on samples that are not exact in
    bf16: the output is inf, as in torchvision, not inf + -inf = NaN from the cross term (bf16
    splits only the samples, so the weight's remainder is no NaN that would drop it)."""
    image = torch.zeros(1, 32, 2, 2, dtype=dtype)
    image[0, 0] = torch.tensor([[1.0, 1.0078125], [1.0, 1.0078125]])
    weight = torch.zeros(1, 32, 1, 1, dtype=dtype)
    weight[0, 0] = float("inf")
    offset = torch.zeros(1, 2, 2, 2, dtype=dtype)
    offset[0, 1] = 0.25  # x + 0.25: samples 1.00195 and 0.7559, not bf16 values
    mask = torch.ones(1, 1, 2, 2, dtype=dtype)
    expected = torchvision_ops.deform_conv2d(image.float(), offset.float(), weight.float(),
                                             mask=mask.float())
    assert (expected == float("inf")).all()
    out = deform.deform_conv2d_cuda(image, weight, offset, mask, None, 1, 1, 0, 0, 1, 1, 1, 1)
    assert (out.float() == float("inf")).all(), out


@pytest.mark.parametrize("name", ["groups_stride_padding_dilation", "shared_samples"])
def test_deform_conv2d_backward_3xtf32_gemms(deform, name):
    """The backward's GEMMs in 3xTF32 (cuBLAS TF32 GEMMs on split operands; the emulated cuBLAS
    rounds its operands to TF32 as the tensor cores do, so unsplit operands would fail here):
    fp32's tolerance against torchvision, and not the IEEE GEMMs' bits
    (PEM_KERNELS_FP32_DOT=ieee)."""
    conv, _ = DEFORM_CASES[name]
    tensors = make_inputs(conv, torch.float32)
    grad_output = torch.randn(conv.output_shape())
    expected = torchvision_gradients(tensors, conv, grad_output)
    split = emulated_gradients(deform, tensors, conv, grad_output)
    assert_gradients_close(split, expected, torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEM_KERNELS_FP32_DOT", "ieee")
        ieee = emulated_gradients(deform, tensors, conv, grad_output)
    assert_gradients_close(ieee, expected, torch.float32)
    assert not torch.equal(split["weight"], ieee["weight"])
    assert not torch.equal(split["input"], ieee["input"])
    # A build without tensor-core code for the device (only sm_75 PTX), whose split kernels would
    # not round to TF32: the IEEE GEMMs, bit for bit (the input gradient's atomics add in a
    # varying order: to rounding).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEM_EMULATION_PTX_VERSION", "75")
        fallback = emulated_gradients(deform, tensors, conv, grad_output)
    for key in ieee:
        if key == "input":
            torch.testing.assert_close(fallback[key], ieee[key], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(fallback[key], ieee[key]), key


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deform_conv2d_input_gradient_float4_and_scalar_atomics(deform, monkeypatch, layout,
                                                                dtype):
    """With fp32 accumulation and channels per offset group a multiple of 4, compute capability
    9.0 scatters the input gradient with float4 atomics into an NHWC accumulator, 8.0 with scalar
    atomics in the input's layout: the same gradient up to the order of additions, returned in
    the input's layout either way (and in fp32 as torchvision's)."""
    conv = Conv(in_channels=8, out_channels=6, offset_groups=2, offset_scale=3.0)
    tensors = with_layout(make_inputs(conv, dtype), layout)
    grad_output = torch.randn(conv.output_shape(), dtype=dtype)
    vector = emulated_gradients(deform, tensors, conv, grad_output)
    monkeypatch.setenv("PEM_EMULATION_CC_MAJOR", "8")
    scalar = emulated_gradients(deform, tensors, conv, grad_output)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for grads in (vector, scalar):
        assert grads["input"].is_contiguous(memory_format=memory_format)
    if dtype == torch.float32:
        expected = torchvision_gradients(tensors, conv, grad_output)
        assert_gradients_close(vector, expected, dtype)
        assert_gradients_close(scalar, expected, dtype)
    else:  # both round the same fp32 sums, added in other orders, to bf16 once
        assert set(vector) == set(scalar)
        for key in vector:
            torch.testing.assert_close(vector[key], scalar[key], rtol=1e-2, atol=1e-2)


def test_deform_conv2d_rejects_an_unknown_fp32_product_choice(deform, monkeypatch):
    conv = TENSOR_CORE_CASES["one_group"]
    tensors = make_inputs(conv, torch.float32)
    monkeypatch.setenv("PEM_KERNELS_FP32_DOT", "fast")
    with pytest.raises(RuntimeError, match=r"PEM_KERNELS_FP32_DOT: expected one of \('tf32x3', "
                                           r"'ieee'\), got 'fast'"):
        emulated_forward(deform, tensors, conv)


def test_deform_conv2d_gradients_over_several_backward_blocks(deform):
    """One image's backward in several pixel blocks (column tiles of at most 24 MiB: at most 640
    pixels of 512 fp64 channels, the image's 1023 split evenly into 512 and 511). The two column
    tiles are the backward's largest allocations: 2 x 18 MiB with the even split, where blocks of
    640 and 383 pixels would take 2 x 22.5 MiB (a peak of about 49.5 MiB, 40.5 with the even
    split)."""
    from benchmarks.harness import MIB, measure_peak_memory

    conv = Conv(batch=1, in_channels=512, height=31, width=33, out_channels=4, offset_groups=2,
                groups=2, offset_scale=3.0)
    tensors = make_inputs(conv, torch.float64)
    grad_output = torch.randn(conv.output_shape(), dtype=torch.float64)
    actual = emulated_gradients(deform, tensors, conv, grad_output)
    assert_gradients_close(actual, torchvision_gradients(tensors, conv, grad_output),
                           torch.float64)
    peak = measure_peak_memory(
        lambda: emulated_gradients(deform, tensors, conv, grad_output), device="cpu"
    )
    assert peak < 48 * MIB, f"backward peak {peak / MIB:.1f} MiB"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_deform_conv2d_low_precision_matches_the_cpu_kernel(deform, dtype):
    """fp32 accumulation and fp32 gradient buffers, rounded once: what the CPU kernel does."""
    conv, _ = DEFORM_CASES["shared_samples"]
    tensors = make_inputs(conv, dtype)
    grad_output = torch.randn(conv.output_shape()).to(dtype)
    cpu_out = torch.ops.pem_kernels.deform_conv2d(
        tensors["input"], tensors["weight"], tensors["offset"], tensors["mask"],
        tensors["bias"], *conv_arguments(conv),
    )
    out = emulated_forward(deform, tensors, conv)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), cpu_out.float(), rtol=1e-2, atol=1e-2)
    cpu_grads = torch.ops.pem_kernels._deform_conv2d_backward(
        grad_output, tensors["input"], tensors["weight"], tensors["offset"], tensors["mask"],
        *conv_arguments(conv),
    )
    actual = emulated_gradients(deform, tensors, conv, grad_output)
    for key, expected in zip(TENSOR_NAMES, cpu_grads):
        assert actual[key].dtype == dtype
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(actual[key].float(), expected.float(), rtol=2e-2,
                                   atol=2e-2 * scale, msg=lambda m, key=key: f"{key}: {m}")


def test_deform_conv2d_deterministic_backward_is_bitwise_repeatable(deform):
    """Deterministic mode: the input gradient through the sorted entry lists, bit-identical from
    run to run; the atomics path agrees with it to rounding."""
    conv = CONFIGS["many_pixels"]
    tensors = make_inputs(conv, torch.float32)
    grad_output = torch.randn(conv.output_shape())
    default = emulated_gradients(deform, tensors, conv, grad_output)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = emulated_gradients(deform, tensors, conv, grad_output)
        second = emulated_gradients(deform, tensors, conv, grad_output)
    finally:
        torch.use_deterministic_algorithms(previous)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert_gradients_close(first, torchvision_gradients(tensors, conv, grad_output),
                           torch.float32)
    assert_gradients_close(default, first, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_deform_conv2d_non_finite_mask_as_torchvision(deform, dtype):
    """The shared-sample forward multiplies the blended sample by the mask: NaN outside the image
    stays NaN, inf at an integer position stays inf."""
    conv = Conv(in_channels=32, out_channels=8, offset_groups=2, with_bias=False)
    tensors = with_non_finite_mask(make_inputs(conv, dtype))
    expected = torchvision_ops.deform_conv2d(**tensors, **conv.kwargs())
    assert expected.isnan().any() and expected.isinf().any()
    torch.testing.assert_close(emulated_forward(deform, tensors, conv), expected, equal_nan=True,
                               **TOLERANCES[dtype])
    grad_output = torch.randn(conv.output_shape(), dtype=dtype)
    actual = emulated_gradients(deform, tensors, conv, grad_output)["weight"]
    reference = torchvision_gradients(tensors, conv, grad_output)["weight"]
    torch.testing.assert_close(actual, reference, equal_nan=True, **TOLERANCES[dtype])


def test_deform_conv2d_batch_zero_launches_nothing(deform):
    conv = dataclasses.replace(CONFIGS["fractional_offsets"], batch=0)
    tensors = make_inputs(conv, torch.float32)
    assert emulated_forward(deform, tensors, conv).shape == conv.output_shape()
    grads = emulated_gradients(deform, tensors, conv, torch.zeros(conv.output_shape()))
    assert grads["input"].shape == tensors["input"].shape
    assert (grads["weight"] == 0).all() and (grads["bias"] == 0).all()


def test_deform_conv2d_checks_its_arguments(deform):
    conv = CONFIGS["fractional_offsets"]
    tensors = make_inputs(conv, torch.float32)
    tensors["offset"] = tensors["offset"][:, :-2]
    with pytest.raises(RuntimeError, match=r"offset must have shape .* = \[2, 18, 7, 6\], got "
                                           r"\[2, 16, 7, 6\]"):
        emulated_forward(deform, tensors, conv)


def select_both(select, keys, queries, mask, heads, official, normalize_keys):
    emulated = select.prototype_select_cuda(keys, queries, mask, heads, official, normalize_keys)
    cpu = torch.ops.pem_kernels.prototype_select(keys, queries, mask, heads, official,
                                                 normalize_keys)
    return emulated, cpu


def test_prototype_select_heads_without_channels(select):
    """C = 0 (every score 0, several pixel tiles): as the CPU kernel, on the FMA kernel, whose
    empty chunk loop touches no shared memory."""
    keys, queries = torch.zeros(1, 150, 0), torch.zeros(1, 5, 0)
    mask = torch.rand(1, 5, 150) < 0.3
    (prototypes, indices), (cpu_prototypes, cpu_indices) = select_both(
        select, keys, queries, mask, 1, False, False)
    assert torch.equal(indices, cpu_indices) and prototypes.shape == (1, 5, 0)


@pytest.mark.parametrize("official", [False, True], ids=["per_query", "official"])
@pytest.mark.parametrize("normalize_keys", [False, True])
def test_prototype_select_matches_the_cpu_kernel(select, official, normalize_keys):
    """Several pixel splits (700 pixels: 11 tiles of 64), an empty query, an image whose queries
    are all empty, a NaN key in a later tile; then the backward scatter."""
    keys, queries, mask = make_select_inputs(2, 700, 32, 5)
    mask[0, 1] = False
    mask[1] = False
    keys[1, 650, :8] = float("nan")
    (prototypes, indices), (cpu_prototypes, cpu_indices) = select_both(
        select, keys, queries, mask, 4, official, normalize_keys
    )
    assert torch.equal(indices, cpu_indices)
    torch.testing.assert_close(prototypes, cpu_prototypes, equal_nan=True)
    grad = torch.randn_like(prototypes)
    grad_keys = select.prototype_select_backward_cuda(grad, keys, indices, normalize_keys)
    cpu_grad_keys = torch.ops.pem_kernels._prototype_select_backward(grad, keys, indices,
                                                                     normalize_keys)
    torch.testing.assert_close(grad_keys, cpu_grad_keys, equal_nan=True)


@pytest.mark.parametrize("official", [False, True], ids=["per_query", "official"])
def test_prototype_select_more_heads_than_one_merge_pass(select, official):
    """20 heads of 2 channels: the merge and gather kernel merges 16 heads per pass, so query
    blocks take two passes; two images, one with an empty query, one all empty."""
    keys, queries, mask = make_select_inputs(2, 300, 40, 3)
    mask[0, 2] = False
    mask[1] = False
    (prototypes, indices), (cpu_prototypes, cpu_indices) = select_both(
        select, keys, queries, mask, 20, official, True
    )
    assert torch.equal(indices, cpu_indices)
    torch.testing.assert_close(prototypes, cpu_prototypes)


@pytest.mark.parametrize("normalize_keys", [False, True])
@pytest.mark.parametrize("queries", [37, 4100], ids=["flags", "more_slots_than_flags"])
def test_prototype_select_backward_with_repeated_pixels(select, normalize_keys, queries):
    """Every pixel chosen by many (head, query) slots (indices drawn from 20 pixels): its
    gradient is the sum over all of them, written by the block of the first. The backward's
    blocks flag the slots that chose their pixel in shared memory, up to 4096 slots; with more
    (4100 queries of one head, 8200 slots of an image) they read the indices again."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 20, 4, generator=generator)
    indices = torch.randint(0, 20, (1, 2, queries), generator=generator)
    grad = torch.randn(1, queries, 4, generator=generator)
    actual = select.prototype_select_backward_cuda(grad, keys, indices, normalize_keys)
    expected = torch.ops.pem_kernels._prototype_select_backward(grad, keys, indices,
                                                                normalize_keys)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_prototype_select_dtypes_and_query_blocks(select, dtype):
    """70 queries: two query blocks of 64; fp32 accumulation for fp16/bf16."""
    keys, queries, mask = make_select_inputs(1, 200, 16, 70, dtype=dtype)
    (prototypes, indices), (cpu_prototypes, cpu_indices) = select_both(
        select, keys, queries, mask, 2, False, False
    )
    assert torch.equal(indices, cpu_indices)
    assert torch.equal(prototypes, cpu_prototypes)


@pytest.mark.parametrize("normalize_keys", [False, True])
def test_prototype_select_wide_heads_and_unaligned_mask_rows(select, normalize_keys):
    """head_dim 80: three channel chunks of 32 (the last partial), the queries staged per chunk
    instead of once; 203 pixels: mask rows not 4-byte aligned (byte loads instead of words), the
    last tile partial; 70 queries: two query blocks; an empty query."""
    keys, queries, mask = make_select_inputs(2, 203, 80, 70)
    mask[1, 5] = False
    (prototypes, indices), (cpu_prototypes, cpu_indices) = select_both(
        select, keys, queries, mask, 1, False, normalize_keys
    )
    assert torch.equal(indices, cpu_indices)
    torch.testing.assert_close(prototypes, cpu_prototypes)


# Every dtype on the vector reads (a vector per dtype), fp32 on the two scalar paths (one template
# for every dtype): five cases of about 10 s each, where all nine took 100 s of CI's time.
@pytest.mark.parametrize(
    ("layout", "dtype"),
    [("204_pixels", torch.float32), ("204_pixels", torch.float16), ("204_pixels", torch.bfloat16),
     ("203_pixels", torch.float32), ("204_pixels_unaligned", torch.float32)],
    ids=str,
)
def test_prototype_select_reads_mask_logits(select, dtype, layout):
    """Mask logits (allowed where not < 0: NaN and -0.0 allow) select as their bool mask
    ``~(logits < 0)`` does on the CPU kernel: 70 queries (two query blocks), an empty query in
    image 1 and image 0's query 3 allowed one pixel of a later tile only. A thread reads its 4
    logits of a row as one vector load where the rows allow it (204 pixels, aligned data), else
    one by one: 203 pixels (rows not aligned, the last tile partial), or 204 pixels whose data
    starts one element past an aligned address."""
    pixels = 203 if layout == "203_pixels" else 204
    keys, queries, _ = make_select_inputs(2, pixels, 32, 70)
    logits = torch.randn(2, 70, pixels)
    logits[0, 0, :50] = float("nan")
    logits[0, 1] = -0.0
    logits[0, 3] = -1.0
    logits[0, 3, 150] = 0.0
    logits[1, 2] = -1.0
    logits = logits.to(dtype)
    if layout == "204_pixels_unaligned":
        storage = torch.empty(logits.numel() + 1, dtype=dtype)
        storage[1:] = logits.flatten()
        logits = storage[1:].view(logits.shape)
        assert logits.data_ptr() % (4 * logits.element_size()) != 0
    allowed = ~(logits < 0)
    for official in (False, True):
        prototypes, indices = select.prototype_select_cuda(keys, queries, logits, 4, official,
                                                           False)
        cpu_prototypes, cpu_indices = torch.ops.pem_kernels.prototype_select(
            keys, queries, allowed, 4, official, False)
        assert torch.equal(indices, cpu_indices)
        assert torch.equal(prototypes, cpu_prototypes)
        assert (indices[0, :, 3] == 150).all()
    with pytest.raises(RuntimeError, match=r"mask must be bool or mask logits "
                                           r"\(Float/Half/BFloat16\), got dtype Double"):
        select.prototype_select_cuda(keys, queries, logits.double(), 4, False, False)


def test_prototype_select_splits_of_several_tiles(select, monkeypatch):
    """700 pixels, 8 heads, 70 queries on an emulated GPU of 8 SMs: 11 tiles over 2 splits, so
    the splits run 5 and 6 tiles and the next tile's keys are loaded during the current one's
    products (PEM at 32768 pixels on an H100 runs 15-16 tiles per split); a NaN key in the third
    tile of split 1."""
    monkeypatch.setenv("PEM_EMULATION_SM_COUNT", "8")
    keys, queries, mask = make_select_inputs(1, 700, 64, 70)
    keys[0, 7 * 64 + 10, 8:16] = float("nan")  # tile 7 (split 1: tiles 5-10)
    (prototypes, indices), (cpu_prototypes, cpu_indices) = select_both(
        select, keys, queries, mask, 8, True, False
    )
    assert torch.equal(indices, cpu_indices)
    torch.testing.assert_close(prototypes, cpu_prototypes, equal_nan=True)


def test_prototype_select_products_follow_the_fp32_rules(select, monkeypatch,
                                                         matmul_precision):
    """Pixel 20's key is 1 + 2^-14 where pixel 10's is 1 (all channels; the query is all ones):
    exact products score 8 + 2^-11 against 8, and pixel 20 wins. 3xTF32 (the default) and IEEE
    FMAs (PEM_KERNELS_FP32_DOT=ieee) see that; one TF32 product (where torch allows TF32) rounds
    1 + 2^-14 to 1, and the tie goes to pixel 10: the tensor-core path ran. fp16 keys hold no
    such difference: their single TF32 product is exact."""
    keys = torch.full((1, 70, 8), -1.0)
    keys[0, 10] = 1.0
    keys[0, 20] = 1.0 + 2.0**-14
    queries = torch.ones(1, 1, 8)
    def selected() -> int:
        return select.prototype_select_cuda(keys, queries, None, 1, False, False)[1].item()

    assert selected() == 20
    matmul_precision("high")
    assert selected() == 10
    # A build without tensor-core code for the device (only sm_75 PTX): FMAs even where torch
    # allows TF32, instead of the tensor-core kernel's trap.
    monkeypatch.setenv("PEM_EMULATION_PTX_VERSION", "75")
    assert selected() == 20
    monkeypatch.delenv("PEM_EMULATION_PTX_VERSION")
    matmul_precision("highest")
    monkeypatch.setenv("PEM_KERNELS_FP32_DOT", "ieee")
    assert selected() == 20


@pytest.mark.parametrize("pixels", [67, 68], ids=["scalar_reads", "vector_reads"])
def test_prototype_select_bool_mask_bytes_other_than_one_allow(select, pixels):
    """A bool mask viewed from 0/255 bytes: any nonzero byte allows, on the vector and on the
    scalar read path (a shifted 255 once set the bits of seven other pixels), as on the CPU."""
    keys, queries, _ = make_select_inputs(1, pixels, 16, 4)
    raw = torch.zeros(1, 4, pixels, dtype=torch.uint8)
    raw[..., 10] = raw[..., 40] = 255
    mask = raw.view(torch.bool)
    (_, indices), (_, cpu_indices) = select_both(select, keys, queries, mask, 2, False, False)
    assert torch.equal(indices, cpu_indices)
    assert ((indices == 10) | (indices == 40)).all()


def test_prototype_select_ties_and_no_mask(select):
    keys, queries, _ = make_select_inputs(1, 300, 16, 4)
    keys[0, 100:200] = keys[0, :100]
    keys[0, 200:] = keys[0, :100]
    (_, indices), (_, cpu_indices) = select_both(select, keys, queries, None, 2, False, False)
    assert torch.equal(indices, cpu_indices) and (indices < 100).all()


def test_prototype_select_all_scores_negative(select):
    """test_prototype_select.check_all_scores_negative in emulation: the least negative score
    wins (negative floats order backwards as integers unless their magnitude bits are flipped)."""
    keys, queries, mask = make_select_inputs(2, 300, 16, 5)
    keys, queries = -keys.abs() - 0.01, queries.abs() + 0.01
    mask[0, 1] = False  # an empty query: the unmasked argmax among negative scores
    for normalize_keys in (False, True):
        for allowed in (None, mask):
            (_, indices), (_, cpu_indices) = select_both(
                select, keys, queries, allowed, 2, False, normalize_keys
            )
            assert torch.equal(indices, cpu_indices)


def test_prototype_select_backward_stops_on_out_of_range_indices(select):
    keys, grad = torch.randn(1, 10, 8), torch.randn(1, 2, 8)
    with pytest.raises(RuntimeError, match="device-side assert"):
        select.prototype_select_backward_cuda(grad, keys, torch.tensor([[[3, 10]]]), False)


def test_prototype_select_rejects_more_pixels_than_int32_indices(select):
    """HW = 2^31 with C = 0 (no memory): a clear error, not wrapped int32 pixel indices."""
    keys, queries = torch.empty(1, 2**31, 0), torch.empty(1, 1, 0)
    with pytest.raises(RuntimeError, match=r"HW must be < 2\^31 .*got 2147483648"):
        select.prototype_select_cuda(keys, queries, None, 1, False, False)


def test_prototype_select_batch_zero_and_no_queries(select):
    for batch, queries in [(0, 4), (2, 0)]:
        keys, query, mask = make_select_inputs(batch, 50, 16, queries)
        prototypes, indices = select.prototype_select_cuda(keys, query, mask, 4, False, False)
        assert prototypes.shape == (batch, queries, 16) and indices.shape == (batch, 4, queries)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_prototype_select_nan_and_inf_rules(select, dtype):
    """NaN beats every number (first NaN wins), a blocked NaN is ignored, a query whose allowed
    pixels all score -inf takes its first allowed pixel (in fp32 on tensor cores: the NaN
    remainder of -inf must not turn the score into NaN), and a query with a single allowed pixel
    takes it."""
    keys, queries, mask = make_select_inputs(1, 200, 8, 5, dtype=dtype)
    mask[:] = False
    mask[0, 0, [10, 50, 90]] = True
    keys[0, 50, :4] = float("nan")
    mask[0, 1, :] = True
    keys[0, 120, :4] = float("nan")
    mask[0, 1, 120] = False
    mask[0, 2, [30, 31]] = True
    keys[0, 30] = float("-inf")
    keys[0, 31] = float("-inf")
    queries[0, 2] = 1.0
    mask[0, 3, 5] = True
    mask[0, 4, [40, 41]] = True  # -inf at pixel 41 loses to the finite score at pixel 40
    keys[0, 41] = float("-inf")
    queries[0, 4] = 1.0
    (_, indices), (_, cpu_indices) = select_both(select, keys, queries, mask, 2, False, False)
    assert torch.equal(indices, cpu_indices)
    assert indices[0, 0, 0] == 50 and indices[0, 0, 1] != 120
    assert (indices[0, :, 2] == 30).all() and (indices[0, :, 3] == 5).all()
    assert (indices[0, :, 4] == 40).all()


def local_representation_operands(channels: int, out_channels: int, dtype: torch.dtype) -> dict:
    """The fused projection's parameters (an eval BatchNorm with non-trivial statistics, the
    depthwise conv, the Linear, in ``dtype``), and the modules that compute the same thing (the
    expected keys: ``modules(memory + pos)``)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(channels).eval()
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
    linear = torch.nn.Linear(channels, out_channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    def modules(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = conv.to(x.dtype)(bn.to(x.dtype)(x))
            return linear.to(x.dtype)(features.flatten(2).transpose(1, 2))

    bn_params = [t.detach().to(dtype) for t in (bn.running_mean, bn.running_var, bn.weight,
                                                bn.bias)]
    params = bn_params + [bn.eps] + [t.detach().to(dtype) for t in
                                     (conv.weight, conv.bias, linear.weight, linear.bias)]
    return {"params": params, "modules": modules}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(2, 40, 5, 37),  # two row tiles, the second partial; two channel tiles, the second of 8
     (1, 64, 3, 32),  # full tiles
     (1, 16, 1, 1),  # every 3x3 tap but the centre in the padding
     (3, 8, 9, 4),
     (1, 40, 21, 40)],  # with one SM: rows in groups of 8, 8 and 5
    ids=str,
)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
@pytest.mark.parametrize("sms", ["132", "1"], ids=["sms132", "sms1"])
def test_local_representation_matches_the_modules(local_representation, monkeypatch, dtype, shape,
                                                  with_pos, sms):
    """The CUDA source's kernel (BN + depthwise conv, pixel-major features) and its addmm against
    BatchNorm -> depthwise conv -> Linear, and against the CPU kernel it mirrors. On the emulated
    H100 (132 SMs) these small maps take one image row per block; with one SM a block runs up to
    8 rows through its ring of source lines."""
    monkeypatch.setenv("PEM_EMULATION_SM_COUNT", sms)
    ops = local_representation_operands(shape[1], 24, dtype)
    memory = torch.randn(shape, dtype=dtype)
    pos = torch.randn(shape, dtype=dtype) if with_pos else None
    keys = local_representation.local_representation_cuda(memory, pos, *ops["params"], False)
    expected = ops["modules"](memory + pos if with_pos else memory)
    assert keys.shape == (shape[0], shape[2] * shape[3], 24) and keys.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(keys, expected, rtol=tolerance, atol=tolerance)
    cpu = torch.ops.pem_kernels.local_representation(memory, pos, *ops["params"], False)
    torch.testing.assert_close(keys, cpu, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_local_representation_half_precision(local_representation, dtype):
    """fp16/bf16: the features computed in fp32 and rounded once, the GEMM in the input dtype;
    close to the fp32 modules, as the CPU kernel is."""
    shape = (2, 40, 6, 35)
    ops32 = local_representation_operands(shape[1], 16, torch.float32)
    ops = local_representation_operands(shape[1], 16, dtype)
    memory, pos = torch.randn(shape), torch.randn(shape)
    keys = local_representation.local_representation_cuda(
        memory.to(dtype), pos.to(dtype), *ops["params"], False)
    assert keys.dtype == dtype
    expected = ops32["modules"](memory + pos)
    torch.testing.assert_close(keys.float(), expected, rtol=2e-2, atol=5e-2)
    cpu = torch.ops.pem_kernels.local_representation(
        memory.to(dtype), pos.to(dtype), *ops["params"], False)
    torch.testing.assert_close(keys.float(), cpu.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_local_representation_normalize(local_representation, dtype):
    """normalize=True: every row divided by max(||row||, 1e-12) in fp32 before one rounding, as
    F.normalize: a NaN in a pixel's window makes its row NaN, an all-zero row stays zero."""
    channels = 16
    ops = local_representation_operands(channels, 12, torch.float32)
    mean, var, bn_weight, bn_bias, eps, dw_weight, dw_bias, weight, bias = ops["params"]
    with torch.no_grad():
        weight[:, 8:] = 0.0  # rows depend on channels 0-7 only
        bias.zero_()
        dw_bias.zero_()
        mean.zero_()  # BN maps 0 to 0
        bn_bias.zero_()
    memory = torch.randn(1, channels, 4, 5)
    memory[0, :8, 1:4, 1:4] = 0.0  # pixels (2, 2) and (3, 2) see zeros in their 3x3 windows
    memory[0, 3, 0, 0] = float("nan")  # reaches pixels (0, 0), (0, 1), (1, 0), (1, 1)
    bn = torch.nn.functional.batch_norm(memory, mean, var, bn_weight, bn_bias, False, 0.0, eps)
    conv = torch.nn.functional.conv2d(bn, dw_weight, dw_bias, padding=1, groups=channels)
    raw = torch.nn.functional.linear(conv.flatten(2).transpose(1, 2), weight, bias)
    expected = torch.nn.functional.normalize(raw, dim=-1)
    params = [t.to(dtype) for t in (mean, var, bn_weight, bn_bias)] + [eps] + [
        t.to(dtype) for t in (dw_weight, dw_bias, weight, bias)]
    keys = local_representation.local_representation_cuda(memory.to(dtype), None, *params, True)
    assert keys.dtype == dtype
    nan_rows = [0, 1, 5, 6]
    assert keys[0, nan_rows].isnan().all() and expected[0, nan_rows].isnan().all()
    zero_rows = [12, 17]
    assert (keys[0, zero_rows] == 0).all() and (expected[0, zero_rows] == 0).all()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(keys.float(), expected, rtol=tolerance, atol=tolerance,
                               equal_nan=True)
    finite = [row for row in range(20) if row not in nan_rows + zero_rows]
    torch.testing.assert_close(keys[0, finite].float().norm(dim=-1), torch.ones(len(finite)),
                               rtol=tolerance, atol=tolerance)


def test_local_representation_empty_and_channel_free_maps(local_representation):
    """No pixels: an empty result without a launch (an empty grid is an error on a GPU, and in
    the emulation). No input channels: nothing to convolve, every key is the Linear's bias."""
    ops = local_representation_operands(8, 5, torch.float32)
    for shape in [(0, 8, 3, 3), (2, 8, 0, 4)]:
        keys = local_representation.local_representation_cuda(
            torch.randn(shape), None, *ops["params"], False)
        assert keys.shape == (shape[0], shape[2] * shape[3], 5)
    bias = torch.randn(5)
    keys = local_representation.local_representation_cuda(
        torch.randn(2, 0, 3, 4), None, torch.zeros(0), torch.ones(0), None, None, 1e-5,
        torch.randn(0, 1, 3, 3), torch.randn(0), torch.randn(5, 0), bias, False)
    torch.testing.assert_close(keys, bias.expand(2, 12, 5))


def test_local_representation_batchnorm_without_affine_and_large_eps(local_representation):
    """bn_weight and bn_bias None (a BatchNorm without affine) and an eps that matters: the
    kernel's per-block BN prologue against the modules and the CPU kernel."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(40, affine=False, eps=0.3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    conv = torch.nn.Conv2d(40, 40, 3, padding=1, groups=40)
    linear = torch.nn.Linear(40, 12)
    memory = torch.randn(2, 40, 5, 37)
    params = [bn.running_mean, bn.running_var, None, None, bn.eps] + [
        t.detach() for t in (conv.weight, conv.bias, linear.weight, linear.bias)]
    keys = local_representation.local_representation_cuda(memory, None, *params, False)
    with torch.no_grad():
        expected = linear(conv(bn(memory)).flatten(2).transpose(1, 2))
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-5)
    cpu = torch.ops.pem_kernels.local_representation(memory, None, *params, False)
    torch.testing.assert_close(keys, cpu, rtol=1e-5, atol=1e-5)


def test_local_representation_checks_its_arguments(local_representation):
    """The CPU kernel's checks (a shared header): the same message for the same mistake."""
    ops = local_representation_operands(8, 5, torch.float32)
    params = list(ops["params"])
    params[5] = torch.randn(8, 1, 5, 5)
    with pytest.raises(RuntimeError, match=r"dw_weight must be \[C, 1, 3, 3\] = \[8, 1, 3, 3\], "
                                           r"got shape \[8, 1, 5, 5\]"):
        local_representation.local_representation_cuda(torch.randn(1, 8, 4, 4), None, *params,
                                                        False)
    with pytest.raises(RuntimeError, match=r"pos must have memory's shape"):
        local_representation.local_representation_cuda(
            torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 5), *ops["params"], False)


def query_projection_modules(channels: int, out_channels: int, dtype: torch.dtype):
    """LayerNorm (non-trivial affine) and Linear in ``dtype``, and a function giving what the
    layer computes unfused: F.normalize(Linear(LayerNorm(tgt + query_pos))) as [B, Q, C_out]."""
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(channels), torch.nn.Linear(channels, out_channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    norm, linear = norm.to(dtype), linear.to(dtype)

    def modules(tgt: torch.Tensor, query_pos: torch.Tensor | None) -> torch.Tensor:
        x = tgt + query_pos if query_pos is not None else tgt
        with torch.no_grad():
            return torch.nn.functional.normalize(linear(norm(x.transpose(0, 1))), dim=-1)

    params = [t.detach() for t in (norm.weight, norm.bias)] + [norm.eps] + [
        t.detach() for t in (linear.weight, linear.bias)]
    return params, modules


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(7, 2, 80, 64),  # fewer channels than threads
     (6, 1, 256, 256),  # PEM's channels (its 100 queries take 100 blocks of the same code)
     (5, 3, 600, 20),  # each thread takes three input channels; outputs not a multiple of 8 warps
     (2, 1, 16, 1024)],  # each warp takes 128 outputs
    ids=str,
)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
def test_query_projection_matches_the_modules(query_projection, dtype, shape, with_pos):
    """The CUDA source's kernel (a block per row: LayerNorm, the Linear by warps, the L2 norm)
    against LayerNorm -> Linear -> F.normalize, and against the CPU kernel it mirrors."""
    queries, batch, channels, out_channels = shape
    params, modules = query_projection_modules(channels, out_channels, dtype)
    tgt = torch.randn(queries, batch, channels, dtype=dtype) * 3 + 1
    query_pos = torch.randn(queries, batch, channels, dtype=dtype) if with_pos else None
    out = query_projection.query_projection_cuda(tgt, query_pos, *params)
    assert out.shape == (batch, queries, out_channels) and out.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, modules(tgt, query_pos), rtol=tolerance, atol=tolerance)
    cpu = torch.ops.pem_kernels.query_projection(tgt, query_pos, *params)
    torch.testing.assert_close(out, cpu, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_query_projection_half_precision(query_projection, dtype):
    """fp16/bf16 rows in fp32 throughout, rounded once: close to the fp32 modules."""
    params32, modules32 = query_projection_modules(64, 48, torch.float32)
    params, _ = query_projection_modules(64, 48, dtype)
    tgt, query_pos = torch.randn(20, 2, 64), torch.randn(20, 2, 64)
    out = query_projection.query_projection_cuda(tgt.to(dtype), query_pos.to(dtype), *params)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), modules32(tgt, query_pos), rtol=2e-2, atol=2e-2)


def test_query_projection_nan_and_zero_rows(query_projection):
    """A NaN in a row makes that row NaN and no other; a row whose projection is zero stays
    zero (divided by eps), as F.normalize."""
    params, modules = query_projection_modules(32, 24, torch.float32)
    ln_weight, ln_bias, eps, weight, bias = params
    tgt = torch.randn(6, 2, 32)
    tgt[4, 1, 7] = float("nan")  # row (query 4, image 1)
    out = query_projection.query_projection_cuda(tgt, None, *params)
    assert out[1, 4].isnan().all() and not out[0].isnan().any() and not out[1, :4].isnan().any()
    torch.testing.assert_close(out, modules(tgt, None), rtol=1e-5, atol=1e-5, equal_nan=True)
    zero = query_projection.query_projection_cuda(
        tgt, None, ln_weight, ln_bias, eps, torch.zeros_like(weight), torch.zeros_like(bias))
    assert (zero[0] == 0).all()


def test_query_projection_empty(query_projection):
    params, _ = query_projection_modules(16, 24, torch.float32)
    for queries, batch in [(0, 2), (3, 0)]:
        out = query_projection.query_projection_cuda(torch.randn(queries, batch, 16), None,
                                                     *params)
        assert out.shape == (batch, queries, 24)


def test_query_projection_checks_its_arguments(query_projection):
    """The CPU kernel's checks (a shared header): the same message for the same mistake."""
    params, _ = query_projection_modules(16, 24, torch.float32)
    with pytest.raises(RuntimeError, match=r"query_pos must have tgt's shape \[3, 2, 16\], "
                                           r"got \[3, 1, 16\]"):
        query_projection.query_projection_cuda(torch.randn(3, 2, 16), torch.randn(3, 1, 16),
                                               *params)
    wide = [*params[:3], torch.randn(1025, 16), torch.randn(1025)]
    with pytest.raises(RuntimeError, match="at most 1024 channels in and out, got C = 16 and "
                                           "C_out = 1025"):
        query_projection.query_projection_cuda(torch.randn(3, 2, 16), None, *wide)


def attention_inputs(batch: int, rows: int, channels: int, dtype: torch.dtype) -> list:
    return make_attention_inputs(batch, rows, channels, dtype, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 40), (1, 5, 300), (3, 1, 16)], ids=str)
@pytest.mark.parametrize("normalize", ["queries", "channels"])
def test_prototype_attention_matches_the_reference(attention, dtype, shape, normalize):
    """The CUDA source's two kernels (hidden rows; norms, mix and output Linear) against the
    ATen composition, for both normalization axes; a residual laid out as the layer's (a
    transposed [N, B, C] tensor) gives an output of the same layout, as the fake kernel says."""
    from pem_kernels.reference.prototype_attention import prototype_attention_ref

    inputs = attention_inputs(*shape, dtype)
    over_queries = normalize == "queries"
    out = attention.prototype_attention_cuda(*inputs, over_queries)
    expected = prototype_attention_ref(*inputs, normalize=normalize)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    batch, rows, channels = shape
    inputs[2] = torch.randn(rows, batch, channels, dtype=dtype).transpose(0, 1)
    out = attention.prototype_attention_cuda(*inputs, over_queries)
    assert out.stride() == inputs[2].stride()
    torch.testing.assert_close(out, prototype_attention_ref(*inputs, normalize=normalize),
                               rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_prototype_attention_half_precision(attention, dtype):
    """fp32 throughout, rounded once: close to the fp32 reference."""
    from pem_kernels.reference.prototype_attention import prototype_attention_ref

    inputs = attention_inputs(2, 9, 64, torch.float32)
    out = attention.prototype_attention_cuda(*[t.to(dtype) for t in inputs], True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), prototype_attention_ref(*inputs), rtol=2e-2,
                               atol=3e-2)


def test_prototype_attention_zero_and_nan_columns(attention):
    """A column of the hidden rows that is zero over every query stays zero (divided by eps); a
    NaN in one row spreads as in the ATen composition (over queries: its image's columns)."""
    from pem_kernels.reference.prototype_attention import prototype_attention_ref

    inputs = attention_inputs(2, 4, 8, torch.float32)
    inputs[3][2] = 0.0  # W_A row 2 and bias 2: hidden channel 2 is zero everywhere
    inputs[4][2] = 0.0
    inputs[0][1, 3, 5] = float("nan")  # image 1, query 3
    for normalize in ("queries", "channels"):
        out = attention.prototype_attention_cuda(*inputs, normalize == "queries")
        expected = prototype_attention_ref(*inputs, normalize=normalize)
        assert not out[0].isnan().any() and out[1].isnan().any()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_prototype_attention_empty_and_errors(attention):
    inputs = attention_inputs(2, 0, 8, torch.float32)
    assert attention.prototype_attention_cuda(*inputs, True).shape == (2, 0, 8)
    inputs = attention_inputs(1, 3, 8, torch.float32)
    bad = list(inputs)
    bad[6] = torch.randn(8, 7)
    with pytest.raises(RuntimeError, match=r"out_weight must be \[C, C\] = \[8, 8\], got shape "
                                           r"\[8, 7\]"):
        attention.prototype_attention_cuda(*bad, True)
    bad = list(inputs)
    bad[5] = torch.randn(9)
    with pytest.raises(RuntimeError, match="alpha must have C = 8 elements"):
        attention.prototype_attention_cuda(*bad, True)
    wide = attention_inputs(1, 2, 1025, torch.float32)
    with pytest.raises(RuntimeError, match="at most 1024 channels, got 1025"):
        attention.prototype_attention_cuda(*wide, True)
