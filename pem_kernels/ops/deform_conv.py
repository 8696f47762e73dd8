"""``deform_conv2d``: modulated deformable convolution (DCNv2) with torchvision's semantics.

Only the ``reference`` backend exists so far; the CPU, Triton and CUDA implicit-GEMM kernels come
with the deformable-convolution work. The schema ``pem_kernels::deform_conv2d`` is registered
already (with a fake kernel) so the op's interface is fixed.
"""

from __future__ import annotations

import torch

from pem_kernels._backends import OpBackends, register_op_backends
from pem_kernels._extension import EXTENSION_LOADED
from pem_kernels.reference.deform_conv import check_deform_conv2d_args, deform_conv2d_ref

__all__ = ["deform_conv2d"]

_BACKENDS = register_op_backends(OpBackends("deform_conv2d", availability={}, auto_order={}))

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

    Args:
        input: Tensor[B, C_in, H, W].
        offset: Tensor[B, 2 * offset_groups * kh * kw, H_out, W_out], (dy, dx) pairs per tap.
        weight: Tensor[C_out, C_in / groups, kh, kw].
        bias: Tensor[C_out] or None.
        stride, padding, dilation: int or (h, w).
        mask: Tensor[B, offset_groups * kh * kw, H_out, W_out] modulation, or None.
        backend: ``"auto"`` or ``"reference"`` for now.

    Returns:
        Tensor[B, C_out, H_out, W_out].
    """
    stride, padding, dilation = check_deform_conv2d_args(
        input, offset, weight, bias, stride, padding, dilation, mask
    )
    _BACKENDS.resolve(backend, input.device, input.dtype)
    return deform_conv2d_ref(input, offset, weight, bias, stride, padding, dilation, mask)


if EXTENSION_LOADED:

    @torch.library.register_fake("pem_kernels::deform_conv2d")
    def _deform_conv2d_fake(
        input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, groups, offset_groups,
    ):
        batch = input.shape[0]
        out_h, out_w = offset.shape[2], offset.shape[3]
        return input.new_empty(batch, weight.shape[0], out_h, out_w)
