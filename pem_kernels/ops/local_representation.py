"""PEM-CA's feature projection fused for inference: the dispatch between its kernels.

``keys [B, H*W, C_out] = Linear(dwconv3x3(BN_eval(memory + pos)))`` in one pass over memory
(optionally L2-normalized per pixel, as PEM-CA's prototype selection wants them), on
the ``cpu`` backend (C++, ``csrc/cpu/local_representation.cpp``), the ``cuda`` backend (a CUDA
kernel for the BN + depthwise conv, then cuBLAS: ``csrc/cuda/local_representation.cu``) or the
``triton`` backend (:mod:`pem_kernels.triton.local_representation`). There is no backward: the
caller (:meth:`pem_kernels.nn.LocalRepresentation.project`) uses it only when no gradient is needed.
"""

from __future__ import annotations

import torch

from pem_kernels._backends import (
    OpBackends,
    call_op,
    compiled_kernel,
    inference_only_autograd,
    triton_kernel,
)
from pem_kernels._extension import EXTENSION_LOADED, has_kernel

__all__ = ["FUSED_LOCAL_REPRESENTATION_BACKENDS", "PROJECTION_BACKENDS",
           "fused_local_representation", "no_backward", "no_backward_setup",
           "normalizes_in_kernel"]

FUSED_LOCAL_REPRESENTATION_BACKENDS = ("cpu", "cuda", "triton")

# The backend of PEM-CA's fused projections (this op and the query projection) for a layer's
# ``backend``. "auto" takes only kernels validated on the device, as for every op: the C++
# kernels (their GPU tests passed on an H200 on 2026-11-27). backend="triton" runs the Triton
# kernels. (Not in the public op registry: the projections are internal ops of the layer.)
PROJECTION_BACKENDS = OpBackends(
    "PEM-CA projections",
    availability={
        "cpu": compiled_kernel("local_representation", "CPU", "cpu"),
        "cuda": compiled_kernel("local_representation", "CUDA", "cuda"),
        "triton": triton_kernel,
    },
    auto_order={"cpu": ("cpu",), "cuda": ("cuda",)},
)


def fused_local_representation(
    backend: str,
    memory: torch.Tensor,
    pos: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    bn_eps: float,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    normalize: bool = False,
) -> torch.Tensor | None:
    """keys [B, H*W, C_out] on ``backend``, or ``None`` when that backend has no fused kernel
    (the caller then runs the modules).

    Args:
        memory, pos: [B, C, H, W] (pos optional), one dtype.
        bn_mean, bn_var, bn_weight, bn_bias: [C] and bn_eps: the eval-mode BatchNorm (its
            running statistics and optional affine), which the kernels apply as
            ``x * scale + shift`` with ``scale = weight / sqrt(var + eps)`` and ``shift = bias -
            mean * scale`` in the accumulation dtype (fp64 for fp64 memory, fp32 otherwise).
        dw_weight: [C, 1, 3, 3], dw_bias: [C]; out_weight: [C_out, C], out_bias: [C_out].
        normalize: divide every pixel's row by ``max(||row||_2, 1e-12)`` (``F.normalize`` over
            C_out), with the norm of the unrounded accumulator; saves prototype_select its key
            norm pass and the normalization of its key tiles (``normalize_keys=False`` there).
    """
    args = (memory, pos, bn_mean, bn_var, bn_weight, bn_bias, float(bn_eps), dw_weight, dw_bias,
            out_weight, out_bias, normalize)
    if backend in ("cpu", "cuda") and has_kernel("local_representation", backend.upper()):
        return call_op(torch.ops.pem_kernels.local_representation.default, *args)
    if backend == "triton":
        from pem_kernels.triton import call_triton_op
        from pem_kernels.triton.local_representation import local_representation_triton

        return call_triton_op(local_representation_triton, *args)
    return None


def normalizes_in_kernel(backend: str, dtype: torch.dtype, out_channels: int) -> bool:
    """Whether :func:`fused_local_representation` on ``backend`` normalizes the keys inside its
    kernel (where ``normalize=True`` is free); elsewhere (``cuda``: after its cuBLAS GEMM, in
    extra passes) the selection's ``normalize_keys`` costs less than normalizing the keys after
    the kernel."""
    if backend == "triton":
        from pem_kernels.triton.local_representation import (
            normalizes_in_kernel as triton_normalizes_in_kernel,
        )

        return triton_normalizes_in_kernel(dtype, out_channels)
    return backend == "cpu"


# The fused feature projection's autograd, on every backend's op.
no_backward, no_backward_setup = inference_only_autograd(
    "local_representation: the fused feature projection has no backward (it serves "
    "inference); run LocalRepresentation's modules (its forward) when gradients are needed"
)


if EXTENSION_LOADED:
    torch.library.register_autograd(
        "pem_kernels::local_representation", no_backward, setup_context=no_backward_setup
    )

    @torch.library.register_fake("pem_kernels::local_representation")
    def _local_representation_fake(
        memory, pos, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, dw_weight, dw_bias, out_weight,
        out_bias, normalize=False,
    ):
        torch._check(memory.dim() == 4, lambda: "memory must be [B, C, H, W]")
        batch, _, height, width = memory.shape
        return memory.new_empty(batch, height * width, out_weight.shape[0])
