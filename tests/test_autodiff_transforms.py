"""Differentiation the kernels do not implement is an error or runs the reference, never a silently
wrong gradient: double backward (``create_graph=True``) and torch.func's grad transforms."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import pem_kernels
from pem_kernels.nn import ModulatedDeformConv2d, PEMCrossAttention

requires_extension = pytest.mark.skipif(
    not pem_kernels.EXTENSION_LOADED, reason="pem_kernels._C is not built"
)


def select_keys_penalty(keys, backend):
    """|d(sum of weighted prototypes)/d keys|^2 with create_graph: a gradient penalty."""
    queries = torch.randn(1, 3, 8, dtype=keys.dtype, generator=torch.Generator().manual_seed(1))
    prototypes, _ = pem_kernels.prototype_select(
        keys, queries, None, 2, normalize_keys=True, backend=backend
    )
    weights = torch.linspace(-1, 1, prototypes.numel(), dtype=keys.dtype).view_as(prototypes)
    (grad_keys,) = torch.autograd.grad((prototypes * weights).sum(), keys, create_graph=True)
    return grad_keys.square().sum()


def deform_weight_penalty(weight, backend):
    """|d(output)/d input|^2 with create_graph, differentiated towards the weight (R1-style)."""
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(1, 4, 5, 5, dtype=weight.dtype, generator=generator).requires_grad_()
    offset = torch.randn(1, 18, 5, 5, dtype=weight.dtype, generator=generator)
    out = pem_kernels.deform_conv2d(image, offset, weight, padding=1, backend=backend)
    (grad_image,) = torch.autograd.grad(out.square().sum(), image, create_graph=True)
    return grad_image.square().sum()


@requires_extension
@pytest.mark.parametrize("op", ["prototype_select", "deform_conv2d"])
def test_double_backward_of_the_cpu_kernels_is_a_clear_error(op):
    """Without a registered derivative of the backward ops torch treated the first gradient as a
    constant: second derivatives came out zero (deform) or partial (select) with only a warning.
    The reference differentiates twice, and the kernels refuse."""
    if op == "prototype_select":
        leaf = torch.randn(1, 20, 8, dtype=torch.float64, requires_grad=True)
        penalty = select_keys_penalty
    else:
        leaf = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
        penalty = deform_weight_penalty
    (second,) = torch.autograd.grad(penalty(leaf, "reference"), leaf)
    assert second.abs().sum() > 0
    with pytest.raises(RuntimeError, match=rf"{op}: double backward .* use backend='reference'"):
        penalty(leaf, "cpu").backward()


def layer_and_inputs():
    torch.manual_seed(0)
    layer = PEMCrossAttention(8, 2).eval()
    inputs = (torch.randn(3, 2, 8), torch.randn(2, 8, 3, 3), torch.randn(2, 3, 3, 3),
              torch.randn(2, 8, 3, 3), torch.randn(3, 2, 8))
    return layer, inputs


def layer_gradients(layer, inputs):
    """torch.func.grad of a loss on the layer towards its parameters and memory."""
    tgt, memory, mask, pos, query_pos = inputs
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(params, memory):
        return functional_call(layer, params, (tgt, memory, mask, pos, query_pos)).square().sum()

    return grad(loss, argnums=(0, 1))(params, memory)


def test_torch_func_grad_runs_the_reference_under_auto():
    """Custom ops have no functorch autograd rule: under torch.func.grad "auto" runs the
    reference, and gives the reference's gradients (the layer and both ops)."""
    layer, inputs = layer_and_inputs()
    expected = layer_gradients(layer, inputs)
    layer.backend = "auto"
    torch.testing.assert_close(layer_gradients(layer, inputs), expected)
    conv = ModulatedDeformConv2d(4, 4).double()
    image = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    expected = grad(lambda x: conv(x).square().sum())(image)
    conv.backend = "reference"
    torch.testing.assert_close(grad(lambda x: conv(x).square().sum())(image), expected)


@requires_extension
def test_torch_func_grad_on_a_kernel_backend_is_a_clear_error():
    layer, inputs = layer_and_inputs()
    layer.backend = "cpu"
    with pytest.raises(pem_kernels.BackendUnavailableError,
                       match="torch.func's grad and jvp transforms cannot differentiate"):
        layer_gradients(layer, inputs)
    keys, queries = torch.randn(2, 9, 8), torch.randn(2, 3, 8)
    with pytest.raises(pem_kernels.BackendUnavailableError, match="prototype_select: backend"):
        grad(lambda k: pem_kernels.prototype_select(k, queries, None, 2, backend="cpu")[0].sum())(
            keys
        )


@requires_extension
def test_vmap_still_runs_the_kernels():
    """vmap alone needs no derivative: the cpu kernels run under it, batched as a loop."""
    layer, (tgt, memory, mask, pos, query_pos) = layer_and_inputs()
    layer.backend = "cpu"
    stacked = torch.stack((memory, memory.flip(0)))
    out = vmap(lambda m: layer(tgt, m, mask, pos, query_pos))(stacked)
    with torch.no_grad():
        torch.testing.assert_close(out[1], layer(tgt, memory.flip(0), mask, pos, query_pos))
