"""``prototype_attention``: PEM-CA after the gather (eq. 5-7), ``residual + W_out(alpha *
l2norm(W_A(P * q)) + P) + b_out``.

Backends: ``reference``; ``cpu``, the same composition of ATen's kernels (two GEMMs dominate;
there is nothing a hand-written C++ kernel would fuse away on a CPU); ``cuda``, for calls that
record no gradient a CUDA kernel pair (``csrc/cuda/prototype_attention.cu``: two launches where
the ATen composition takes eight, which on a GPU cost the host more than the device; at most 1024
channels) and the ATen composition otherwise; ``triton``
(:mod:`pem_kernels.triton.prototype_attention`: two launches forward and two backward, spread
over channel blocks, on CUDA tensors or on CPU tensors under ``TRITON_INTERPRET=1``;
fp32/fp16/bf16; it passed the GPU tests of the H200 run of 2026-11-26, but it has not been
timed alone against the reference, and its fp32 products became 3xTF32 since, so ``"auto"`` does
not pick it).
The C++ op ``pem_kernels::prototype_attention`` has the CUDA kernel, a fake kernel and no
backward (a clear error); the Triton backend registers its own ops,
``pem_kernels::prototype_attention_triton`` and its backward.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from pem_kernels._backends import (
    OpBackends,
    autocast_inputs,
    call_op,
    has_forward_ad_tangent,
    inference_only_autograd,
    reference_context,
    refuse_forward_ad,
    register_op_backends,
    triton_kernel,
)
from pem_kernels._extension import EXTENSION_LOADED, has_kernel
from pem_kernels.reference.prototype_attention import (
    ATTENTION_NORM_AXES,
    AttentionNormAxis,
    prototype_attention_ref,
)

__all__ = ["prototype_attention"]

# Channels the CUDA kernel takes (csrc/cuda/prototype_attention.cu: a row in shared memory).
CUDA_KERNEL_MAX_CHANNELS = 1024


def _aten_on(device_type: str) -> Callable[[torch.device, torch.dtype], str | None]:
    """Availability of the ``cpu`` / ``cuda`` backend: the reference's ATen ops (GEMMs and
    element-wise ops, nothing a C++ kernel would fuse better) on that device's tensors."""

    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        return None if device.type == device_type else f"it runs on {device_type} tensors"

    return unavailable_reason


_BACKENDS = register_op_backends(
    OpBackends(
        "prototype_attention",
        availability={"cpu": _aten_on("cpu"), "cuda": _aten_on("cuda"), "triton": triton_kernel},
        auto_order={"cpu": ("cpu",), "cuda": ("cuda",)},
    )
)


def _check_args(
    prototypes, queries, residual, proj_weight, proj_bias, alpha, out_weight, out_bias, normalize
):
    if not isinstance(prototypes, torch.Tensor) or prototypes.dim() != 3:
        raise ValueError(
            "prototypes: expected a Tensor[B, N, C], "
            f"got {getattr(prototypes, 'shape', prototypes)!r}"
        )
    channels = prototypes.shape[2]
    expected = {
        "queries": (queries, list(prototypes.shape)),
        "residual": (residual, list(prototypes.shape)),
        "proj_weight": (proj_weight, [channels, channels]),
        "proj_bias": (proj_bias, [channels]),
        "out_weight": (out_weight, [channels, channels]),
        "out_bias": (out_bias, [channels]),
    }
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, torch.Tensor) or list(tensor.shape) != shape:
            got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name}: expected shape {shape}, got {got}")
    if not isinstance(alpha, torch.Tensor) or alpha.numel() != channels:
        got = list(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise ValueError(
            f"alpha: expected {channels} elements (e.g. shape [1, 1, {channels}]), got {got}"
        )
    for name, tensor in [("queries", queries), ("residual", residual), ("alpha", alpha)] + [
        (name, tensor) for name, (tensor, _) in expected.items()
        if "weight" in name or "bias" in name
    ]:
        if tensor.device != prototypes.device:
            raise ValueError(
                f"{name}: on {tensor.device}, expected prototypes' device {prototypes.device}"
            )
        if tensor.dtype != prototypes.dtype:  # (under autocast all were cast to one dtype)
            raise TypeError(
                f"{name}: dtype {tensor.dtype}, expected prototypes' dtype {prototypes.dtype}"
            )
    if not prototypes.dtype.is_floating_point:
        raise TypeError(f"prototypes: expected a floating dtype, got {prototypes.dtype}")
    if normalize not in ATTENTION_NORM_AXES:
        raise ValueError(
            f"normalize: expected one of {ATTENTION_NORM_AXES}, got {normalize!r}"
        )


def prototype_attention(
    prototypes: torch.Tensor,
    queries: torch.Tensor,
    residual: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    alpha: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    *,
    normalize: AttentionNormAxis = "queries",
    backend: str = "auto",
) -> torch.Tensor:
    """Prototype attention of PEM-CA; semantics of
    :func:`pem_kernels.reference.prototype_attention_ref`.

    Args:
        prototypes, queries, residual: Tensor[B, N, C].
        proj_weight, out_weight: Tensor[C, C]; proj_bias, out_bias: Tensor[C]; alpha: C elements.
        normalize: ``"queries"`` (official code) or ``"channels"`` (paper).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        Tensor[B, N, C]. Under ``torch.autocast`` every tensor argument is cast to the autocast
        dtype first, so the result has that dtype.
    """
    if isinstance(prototypes, torch.Tensor):
        (prototypes, queries, residual, proj_weight, proj_bias, alpha, out_weight,
         out_bias) = autocast_inputs(
            prototypes.device, prototypes, queries, residual, proj_weight, proj_bias, alpha,
            out_weight, out_bias,
        )
    _check_args(prototypes, queries, residual, proj_weight, proj_bias, alpha, out_weight, out_bias,
                normalize)
    chosen = _BACKENDS.resolve(backend, prototypes.device, prototypes.dtype)
    return run_prototype_attention(
        chosen, prototypes, queries, residual, proj_weight, proj_bias, alpha, out_weight,
        out_bias, normalize,
    )


def run_prototype_attention(
    chosen: str,
    prototypes: torch.Tensor,
    queries: torch.Tensor,
    residual: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    alpha: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    normalize: AttentionNormAxis,
) -> torch.Tensor:
    """:func:`prototype_attention` on the backend ``chosen`` (a name ``resolve`` returned), for
    callers that checked the arguments themselves and cast them under autocast
    (:class:`pem_kernels.nn.PEMCrossAttention`, whose own tensors they are)."""
    if chosen == "triton":
        tensors = (prototypes, queries, residual, proj_weight, proj_bias, alpha, out_weight,
                   out_bias)
        refuse_forward_ad("prototype_attention", tensors)
        call_triton_op, prototype_attention_triton = _triton_op()
        return call_triton_op(
            prototype_attention_triton, prototypes, queries, residual, proj_weight, proj_bias,
            alpha, out_weight, out_bias, normalize == "queries",
        )[0]
    if chosen == "cuda":
        tensors = (prototypes, queries, residual, proj_weight, proj_bias, alpha, out_weight,
                   out_bias)
        if _cuda_kernel_applies(tensors):
            return call_op(torch.ops.pem_kernels.prototype_attention.default, *tensors,
                           normalize == "queries")
    with reference_context(prototypes.device):
        return prototype_attention_ref(
            prototypes, queries, residual, proj_weight, proj_bias, alpha, out_weight, out_bias,
            normalize=normalize,
        )


def _cuda_kernel_applies(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether the CUDA kernel may serve this call: it is built, the rows fit it, one dtype, and
    no gradient or forward-AD tangent is recorded (it has no backward; the ATen composition
    differentiates)."""
    if not has_kernel("prototype_attention", "CUDA"):
        return False
    if tensors[0].shape[-1] > CUDA_KERNEL_MAX_CHANNELS:
        return False
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not has_forward_ad_tangent(tensors)


@functools.cache
def _triton_op():
    """(call_triton_op, the Triton op), imported on first use so that ``import pem_kernels``
    never imports triton (and once: an import statement costs a microsecond per call)."""
    from pem_kernels.triton import call_triton_op
    from pem_kernels.triton.prototype_attention import prototype_attention_triton

    return call_triton_op, prototype_attention_triton


if EXTENSION_LOADED:

    @torch.library.register_fake("pem_kernels::prototype_attention")
    def _prototype_attention_fake(
        prototypes, queries, residual, proj_weight, proj_bias, alpha, out_weight, out_bias,
        normalize_over_queries,
    ):
        return torch.empty_like(residual)

    # run_prototype_attention never calls the C++ op where a gradient is recorded.
    _no_backward, _no_backward_setup = inference_only_autograd(
        "pem_kernels::prototype_attention: the CUDA inference kernel has no backward; call "
        "pem_kernels.prototype_attention, which differentiates through ATen ops"
    )
    torch.library.register_autograd(
        "pem_kernels::prototype_attention", _no_backward, setup_context=_no_backward_setup
    )
