"""FLOP formulas of the pem_kernels ops for ``torch.utils.flop_counter.FlopCounterMode``.

``FlopCounterMode`` counts ATen's matmuls and convolutions but gives a custom op zero FLOPs unless
a formula is registered for it. :func:`register_flop_formulas` registers one for every
pem_kernels op, with torch's own convention: 2 FLOPs per multiply-accumulate of the op's dense
GEMM (torch's ``mm`` / ``conv`` formulas); elementwise work (bilinear sampling and modulation,
normalization, masking, the argmax, biases, gathers) is not counted, exactly as the counter does
not count it in the ATen ops of the reference implementations. With that convention a model run
on the fused ops counts the same FLOPs as the same model run on the reference ops
(``tests/test_bench_model.py`` checks that this holds exactly for the PEM model):

* ``deform_conv2d`` (C++ op and ``deform_conv2d_triton``):
  ``2 * B * C_out * (C_in / groups) * kh * kw * H_out * W_out``, torch's convolution formula
  (the reference's column GEMM); the backward ops (input-side and weight gradients, the two
  GEMMs the reference's autograd runs): twice that.
* ``prototype_select`` (C++ op and ``prototype_select_triton``): the similarity GEMM,
  ``2 * B * heads * N * HW * (C / heads) = 2 * B * N * HW * C`` (the reference's einsum). The fused
  kernels stream over pixels without materializing the similarity, but they compute every score.
  Its backward (a scatter of the prototype gradients) counts 0, as the reference's gather does.
* ``local_representation`` (C++ op and ``local_representation_triton``, PEM-CA's fused feature
  projection): ``2 * B * H * W * C * (9 + C_out)``, the depthwise conv and the Linear as torch
  counts them unfused (the BN and the pos add are elementwise).
* ``query_projection`` (C++ op and ``query_projection_triton``, PEM-CA's fused query
  projection): its Linear,
  ``2 * Q * B * C * C_out`` (the LayerNorm, the pos add and the normalization are elementwise).
* ``prototype_attention`` (C++ op and ``prototype_attention_triton``): its two [C, C]
  linear layers, ``2 * 2 * B * N * C * C``; ``_prototype_attention_backward_triton``: the two
  input-side GEMMs, ``2 * 2 * B * N * C * C`` (the weight-gradient GEMMs run as ATen matmuls
  outside the op and are counted by torch).

FlopCounterMode snapshots the registry when it is constructed, and the Triton ops exist only once
their modules are imported: call :func:`register_flop_formulas` (``include_triton=True`` imports
them) before constructing the mode, or use :func:`count_flops`, which does both. Importing this
module registers the formulas of the ops already defined (the C++ ops).
"""

from __future__ import annotations

import importlib
from collections import Counter
from math import prod
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "deform_conv2d_flops",
    "local_representation_flops",
    "prototype_attention_flops",
    "prototype_select_flops",
    "count_flops",
    "register_flop_formulas",
    "registered_ops",
]

Shape = Sequence[int]


def deform_conv2d_flops(input_shape: Shape, weight_shape: Shape, out_shape: Shape) -> int:
    """``2 * B * C_out * (C_in / groups) * kh * kw * H_out * W_out``: torch's conv formula."""
    batch = input_shape[0]
    out_channels, in_channels_per_group, *kernel = weight_shape
    return 2 * batch * out_channels * in_channels_per_group * prod(kernel) * prod(out_shape[2:])


def prototype_select_flops(keys_shape: Shape, queries_shape: Shape) -> int:
    """``2 * B * N * HW * C`` (= 2 * B * heads * N * HW * head_dim): the similarity GEMM."""
    batch, pixels, channels = keys_shape
    return 2 * batch * queries_shape[1] * pixels * channels


def prototype_attention_flops(prototypes_shape: Shape) -> int:
    """``4 * B * N * C * C``: the two [C, C] linear layers of the prototype attention."""
    batch, num_queries, channels = prototypes_shape
    return 2 * 2 * batch * num_queries * channels * channels


# Formulas in FlopCounterMode's calling convention: tensor arguments arrive as shapes, then the
# op's remaining positional arguments, then ``out_shape`` (the output's shape, or a tuple of them).
def _deform_conv2d(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return deform_conv2d_flops(input_shape, weight_shape, out_shape)


def _deform_conv2d_backward(grad_output_shape, input_shape, weight_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return 2 * deform_conv2d_flops(input_shape, weight_shape, grad_output_shape)


def local_representation_flops(memory_shape: Shape, out_weight_shape: Shape) -> int:
    """``2 * B * H * W * C * (9 + C_out)``: the depthwise 3x3 conv (torch's conv formula with
    groups = C) and the Linear, the two GEMM-like ops of the unfused chain."""
    batch, channels, height, width = memory_shape
    return 2 * batch * height * width * channels * (9 + out_weight_shape[0])


def _local_representation(memory_shape, pos_shape, bn_mean_shape, bn_var_shape,
                          bn_weight_shape, bn_bias_shape, bn_eps, dw_weight_shape, dw_bias_shape,
                          out_weight_shape, *args, out_shape=None, **kwargs) -> int:
    return local_representation_flops(memory_shape, out_weight_shape)


def _query_projection(tgt_shape, pos_shape, ln_weight_shape, ln_bias_shape, ln_eps,
                      weight_shape, *args, out_shape=None, **kwargs) -> int:
    queries, batch, channels = tgt_shape
    return 2 * queries * batch * channels * weight_shape[0]


def _prototype_select(keys_shape, queries_shape, *args, out_shape=None, **kwargs) -> int:
    return prototype_select_flops(keys_shape, queries_shape)


def _prototype_attention(prototypes_shape, *args, out_shape=None, **kwargs) -> int:
    return prototype_attention_flops(prototypes_shape)


def _prototype_attention_backward(grad_out_shape, prototypes_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return prototype_attention_flops(prototypes_shape)


# torch.ops.pem_kernels.<name> -> formula. The C++ ops exist once pem_kernels._C is loaded; the
# Triton ones once their module (_TRITON_MODULES) is imported.
FORMULAS: dict[str, Callable[..., int]] = {
    "deform_conv2d": _deform_conv2d,
    "_deform_conv2d_backward": _deform_conv2d_backward,
    "prototype_select": _prototype_select,
    "prototype_attention": _prototype_attention,
    "local_representation": _local_representation,
    "local_representation_triton": _local_representation,
    "query_projection": _query_projection,
    "query_projection_triton": _query_projection,
    "deform_conv2d_triton": _deform_conv2d,
    "_deform_conv2d_backward_triton": _deform_conv2d_backward,
    "prototype_select_triton": _prototype_select,
    "prototype_attention_triton": _prototype_attention,
    "_prototype_attention_backward_triton": _prototype_attention_backward,
}
_TRITON_MODULES = (
    "pem_kernels.triton.deform_conv2d",
    "pem_kernels.triton.prototype_select",
    "pem_kernels.triton.prototype_attention",
    "pem_kernels.triton.local_representation",
    "pem_kernels.triton.query_projection",
)


def _op_packet(name: str) -> Any | None:
    try:
        return getattr(torch.ops.pem_kernels, name)
    except (AttributeError, RuntimeError):  # not defined (yet): extension or module not loaded
        return None


def registered_ops() -> list[str]:
    """Names of the pem_kernels ops that have a formula in torch's FLOP registry now."""
    from torch.utils.flop_counter import flop_registry

    return [
        name for name in FORMULAS if (op := _op_packet(name)) is not None and op in flop_registry
    ]


def register_flop_formulas(include_triton: bool = False) -> list[str]:
    """Registers the formula of every pem_kernels op defined now that has none yet (idempotent).

    ``include_triton=True`` first imports the Triton op modules (which imports triton) so that
    their ops get formulas too; it is skipped silently when triton cannot be imported. Returns
    the names of all pem_kernels ops that have a formula afterwards.
    """
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if include_triton:
        from pem_kernels.triton import triton_unavailable_reason

        if triton_unavailable_reason() is None:
            for module in _TRITON_MODULES:
                importlib.import_module(module)
    for name, formula in FORMULAS.items():
        op = _op_packet(name)
        if op is not None and op not in flop_registry:
            register_flop_formula(op)(formula)
    return registered_ops()


def count_flops(
    fn: Callable[..., Any], *args: Any, include_triton: bool = False, **kwargs: Any
) -> tuple[Any, int, dict[str, int]]:
    """Runs ``fn(*args, **kwargs)`` once under ``FlopCounterMode`` with the pem_kernels formulas
    registered; returns ``(result, total FLOPs, FLOPs per op name)``."""
    from torch.utils.flop_counter import FlopCounterMode

    register_flop_formulas(include_triton=include_triton)
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    per_op: Counter[str] = Counter()
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        per_op[str(op)] += int(flops)
    return result, counter.get_total_flops(), dict(per_op)


register_flop_formulas()
