"""``deform_conv2d``: modulated deformable convolution (DCNv2) with torchvision's semantics.

Backends: ``reference`` (pure PyTorch, builds the full column tensor); ``cpu`` (C++, blocked
implicit GEMM: bounded per-thread column tiles, never the full im2col matrix; deterministic
backward); ``triton`` (:mod:`pem_kernels.triton.deform_conv2d`: implicit GEMM with the bilinear
gather fused into the ``tl.dot`` operand, the input gradient scattered with atomics as in the
``cuda`` backend (gathered in deterministic mode); CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``; fp32/fp16/bf16; slower than torchvision and the reference in the
H200 run, so ``"auto"`` does not pick it); ``cuda`` (C++/CUDA: a tiled implicit-GEMM forward
that shares each tile's sample positions across channels and reads channels_last input in place
with vector loads; a backward with the CPU backend's structure, pixel block by pixel block with
cuBLAS GEMMs, whose input gradient is scattered with atomics as torchvision's, or, under
``torch.use_deterministic_algorithms(True)``, gathered over a sorted corner list; ``"auto"``
picks it for CUDA tensors: it passed the GPU tests and was faster than the reference at every
shape of PEM's pixel decoder, forward and forward+backward, in both runs of 2026-11-26: 1.17-12.3x
on the H100 in fp32 and bf16, 1.31-10.8x on the H200 in fp32, though not yet faster than
torchvision's fp32 kernel). The registered op is
``torch.ops.pem_kernels.deform_conv2d``; its backward is the registered op
``torch.ops.pem_kernels._deform_conv2d_backward``.
"""

from __future__ import annotations

import torch

from pem_kernels._backends import (
    OpBackends,
    autocast_inputs,
    call_op,
    compiled_kernel,
    inference_only_autograd,
    reference_context,
    refuse_forward_ad,
    register_op_backends,
    triton_kernel,
)
from pem_kernels._extension import EXTENSION_LOADED
from pem_kernels.reference.deform_conv import check_deform_conv2d_args, deform_conv2d_ref

__all__ = ["deform_conv2d"]


_BACKENDS = register_op_backends(
    OpBackends(
        "deform_conv2d",
        availability={
            "cpu": compiled_kernel("deform_conv2d", "CPU", "cpu"),
            "cuda": compiled_kernel("deform_conv2d", "CUDA", "cuda"),
            "triton": triton_kernel,
        },
        auto_order={"cpu": ("cpu",), "cuda": ("cuda",)},
    )
)

IntPair = int | tuple[int, int]


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable convolution v2, a drop-in for ``torchvision.ops.deform_conv2d``.

    Semantics are those of :func:`pem_kernels.reference.deform_conv2d_ref` (torchvision's offset
    layout and boundary rules). ``groups = C_in / weight.shape[1]`` and
    ``offset_groups = offset.shape[1] / (2 * kh * kw)`` are inferred from the shapes. A sample
    reads only the bilinear corners inside the image, so a non-finite value elsewhere never
    leaks into it; a non-finite offset gives a zero sample. Backward gives all five gradients
    (first order only: double backward is an error on the kernels), bit-identical from run to
    run on the ``cpu`` backend at a given number of threads (across thread counts the last bits
    may differ, as MKL's GEMMs do); the ``cuda`` and ``triton`` backends' input gradients use
    atomics, as torchvision's, and are bit-identical only under
    ``torch.use_deterministic_algorithms(True)`` (where the ``cuda`` backend's GEMMs need
    ``CUBLAS_WORKSPACE_CONFIG``, as every cuBLAS call in PyTorch does). So is the ``cuda``
    backend's fp32 tensor-core forward on maps of fewer output tiles (64 pixels x 128 channels)
    than the GPU has SMs: it splits each tile's sum over K among several blocks, which add their
    parts with atomics in a varying order (last-bit differences between runs; whole tiles,
    bit-identical, in deterministic mode).

    fp32 products: IEEE on the ``cpu`` and ``reference`` backends; on the ``cuda`` backend (its
    forward where the channels per group and per offset group are multiples of 32, and its
    backward's GEMMs) and the ``triton`` backend tensor cores, 3xTF32 (fp32 accuracy, not IEEE's
    bits) unless PyTorch allows TF32 (then TF32) or ``PEM_KERNELS_FP32_DOT=ieee`` (IEEE); the
    ``cuda`` bf16 forward at those channel counts splits each sample into two bf16 parts (16
    significant bits). See the README's "fp32 precision".

    Args:
        input: Tensor[B, C_in, H, W] float64/float32/float16/bfloat16, NCHW or channels_last
            (the ``cpu`` and ``cuda`` backends read channels_last in place and return its gradient
            channels_last; the ``triton`` backend reads any strides; other layouts are made
            contiguous).
        offset: Tensor[B, 2 * offset_groups * kh * kw, H_out, W_out], (dy, dx) pairs per tap.
        weight: Tensor[C_out, C_in / groups, kh, kw].
        bias: Tensor[C_out] or None.
        stride, padding, dilation: int or (h, w).
        mask: Tensor[B, offset_groups * kh * kw, H_out, W_out] modulation, or None (all ones).
        backend: ``"auto"`` (``cpu`` for CPU tensors when the extension is built, else the
            reference), ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        Tensor[B, C_out, H_out, W_out] in ``input.dtype``, contiguous NCHW (the ``triton``
        backend returns channels_last for channels_last input). fp16/bf16 inputs are accumulated
        in fp32 and rounded once. Under ``torch.autocast`` every tensor argument is cast to the
        autocast dtype first (as PEM's official DCN casts its weight to the input dtype).

    Example::

        >>> x, w = torch.randn(1, 8, 16, 16), torch.randn(4, 8, 3, 3)
        >>> offset, mask = torch.randn(1, 18, 16, 16), torch.rand(1, 9, 16, 16)
        >>> deform_conv2d(x, offset, w, padding=1, mask=mask).shape
        torch.Size([1, 4, 16, 16])
    """
    if isinstance(input, torch.Tensor):
        input, offset, weight, bias, mask = autocast_inputs(
            input.device, input, offset, weight, bias, mask
        )
    stride, padding, dilation = check_deform_conv2d_args(
        input, offset, weight, bias, stride, padding, dilation, mask
    )
    chosen = _BACKENDS.resolve(backend, input.device, input.dtype)
    if chosen == "reference":
        with reference_context(input.device):
            return deform_conv2d_ref(input, offset, weight, bias, stride, padding, dilation, mask)
    refuse_forward_ad("deform_conv2d", (input, offset, weight, bias, mask))
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    groups = input.shape[1] // weight.shape[1]
    offset_groups = offset.shape[1] // (2 * kernel_h * kernel_w)
    if chosen == "triton":
        # Imported here so that `import pem_kernels` never imports triton.
        from pem_kernels.triton import call_triton_op
        from pem_kernels.triton.deform_conv2d import deform_conv2d_triton

        return call_triton_op(
            deform_conv2d_triton, input, weight, offset, mask, bias, stride[0], stride[1],
            padding[0], padding[1], dilation[0], dilation[1], groups, offset_groups,
        )
    return call_op(
        torch.ops.pem_kernels.deform_conv2d.default, input, weight, offset, mask, bias, stride[0],
        stride[1], padding[0], padding[1], dilation[0], dilation[1], groups, offset_groups,
    )


def _reads_channels_last(input: torch.Tensor) -> bool:
    """The C++ kernels' rule: a channels_last input is read, and its gradient written, in place."""
    return not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)


# Positions of the tensor arguments in the op's schema.
_INPUT, _WEIGHT, _OFFSET, _MASK, _BIAS = range(5)


def autograd_functions(backward_op):
    """(backward, setup_context) for ``register_autograd`` of a deform_conv2d op whose gradients
    come from ``backward_op(grad_output, input, weight, offset, mask, *conv_params)`` as (input,
    weight, offset, mask, bias) gradients; shared by the C++ and Triton ops."""

    def setup_context(ctx, inputs, output) -> None:
        input, weight, offset, mask, bias, *conv_params = inputs
        ctx.save_for_backward(input, weight, offset, mask)
        ctx.conv_params = conv_params
        ctx.has_mask = mask is not None
        ctx.has_bias = bias is not None

    def backward(ctx, grad_output):
        input, weight, offset, mask = ctx.saved_tensors
        grad_input, grad_weight, grad_offset, grad_mask, grad_bias = backward_op(
            grad_output, input, weight, offset, mask, *ctx.conv_params
        )
        needs = ctx.needs_input_grad
        return (
            grad_input if needs[_INPUT] else None,
            grad_weight if needs[_WEIGHT] else None,
            grad_offset if needs[_OFFSET] else None,
            grad_mask if ctx.has_mask and needs[_MASK] else None,
            grad_bias if ctx.has_bias and needs[_BIAS] else None,
        ) + (None,) * len(ctx.conv_params)

    return backward, setup_context


if EXTENSION_LOADED:

    @torch.library.register_fake("pem_kernels::deform_conv2d")
    def _deform_conv2d_fake(
        input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, groups, offset_groups,
    ):
        torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "input/weight must be 4-D")
        batch = input.shape[0]
        out_h, out_w = offset.shape[2], offset.shape[3]
        return input.new_empty(batch, weight.shape[0], out_h, out_w)

    @torch.library.register_fake("pem_kernels::_deform_conv2d_backward")
    def _deform_conv2d_backward_fake(
        grad_output, input, weight, offset, mask, stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, groups, offset_groups,
    ):
        memory_format = (
            torch.channels_last if _reads_channels_last(input) else torch.contiguous_format
        )
        grad_input = torch.empty(
            input.shape, dtype=input.dtype, device=input.device, memory_format=memory_format
        )
        grad_mask = mask.new_empty(mask.shape) if mask is not None else input.new_empty(0)
        return (
            grad_input,
            weight.new_empty(weight.shape),
            offset.new_empty(offset.shape),
            grad_mask,
            input.new_empty(weight.shape[0]),
        )

    _backward, _setup_context = autograd_functions(
        lambda *args: call_op(torch.ops.pem_kernels._deform_conv2d_backward.default, *args)
    )
    torch.library.register_autograd(
        "pem_kernels::deform_conv2d", _backward, setup_context=_setup_context
    )
    # Without a registration torch would differentiate the backward as a constant (zero second
    # derivatives with only a warning); the kernels give first-order gradients only.
    _no_double_backward, _no_double_backward_setup = inference_only_autograd(
        "pem_kernels.deform_conv2d: double backward (differentiating its gradients, as "
        "create_graph=True does) is not supported by the fused kernels; use "
        "backend='reference'"
    )
    torch.library.register_autograd(
        "pem_kernels::_deform_conv2d_backward", _no_double_backward,
        setup_context=_no_double_backward_setup,
    )
