"""The ops and layers under torch.autocast: fp32 weights meet low-precision activations."""

from __future__ import annotations

import importlib

import pytest
import torch

from pem_kernels import deform_conv2d, prototype_attention, prototype_select
from pem_kernels.nn import ModulatedDeformConv2d, PEMCrossAttention

from conftest import DEVICES

AUTOCAST_DTYPE = torch.bfloat16


def _backend(device: str) -> str:
    return "cpu" if device == "cpu" else "cuda"


@pytest.mark.parametrize("device", DEVICES)
def test_deform_conv2d_casts_every_argument_to_the_autocast_dtype(device):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 10, 12, device=device).to(AUTOCAST_DTYPE)  # e.g. a conv's output
    weight, bias = torch.randn(4, 8, 3, 3, device=device), torch.randn(4, device=device)
    offset = torch.randn(1, 18, 10, 12, device=device)
    mask = torch.rand(1, 9, 10, 12, device=device)
    with pytest.raises(TypeError, match="expected dtype"):  # outside autocast: an error
        deform_conv2d(x, offset, weight, bias, padding=1, mask=mask, backend=_backend(device))
    with torch.autocast(device, dtype=AUTOCAST_DTYPE):
        out = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask, backend=_backend(device))
    low = [t.to(AUTOCAST_DTYPE) for t in (offset, weight, bias, mask)]
    expected = deform_conv2d(x, low[0], low[1], low[2], padding=1, mask=low[3],
                             backend=_backend(device))
    assert out.dtype == AUTOCAST_DTYPE
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_prototype_ops_cast_to_the_autocast_dtype(device):
    torch.manual_seed(0)
    keys = torch.randn(1, 40, 16, device=device).to(AUTOCAST_DTYPE)
    queries = torch.randn(1, 5, 16, device=device)  # fp32, like F.normalize under autocast
    mask = torch.rand(1, 5, 40, device=device) > 0.5
    with torch.autocast(device, dtype=AUTOCAST_DTYPE):
        prototypes, indices = prototype_select(keys, queries, mask, 4, backend=_backend(device))
    ref_p, ref_i = prototype_select(keys, queries.to(AUTOCAST_DTYPE), mask, 4,
                                    backend=_backend(device))
    assert prototypes.dtype == AUTOCAST_DTYPE
    assert torch.equal(indices, ref_i) and torch.equal(prototypes, ref_p)

    weights = [torch.randn(16, 16, device=device), torch.randn(16, device=device),
               torch.ones(16, device=device), torch.randn(16, 16, device=device),
               torch.randn(16, device=device)]
    residual = torch.randn(1, 5, 16, device=device)
    with torch.autocast(device, dtype=AUTOCAST_DTYPE):
        out = prototype_attention(prototypes, queries, residual, *weights[:2], weights[2],
                                  *weights[3:])
    low = [t.to(AUTOCAST_DTYPE) for t in [queries, residual, *weights]]
    expected = prototype_attention(prototypes, low[0], low[1], low[2], low[3], low[4], low[5],
                                   low[6])
    assert out.dtype == AUTOCAST_DTYPE and torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_references_run_with_autocast_off_on_the_cast_inputs(device, monkeypatch):
    """The "reference" backend under autocast computes in the autocast dtype, as the kernels do:
    CUDA autocast would otherwise run F.normalize's norm in fp32 inside the reference."""
    # The modules, not the functions pem_kernels.ops re-exports under the same names.
    deform_module = importlib.import_module("pem_kernels.ops.deform_conv")
    attention_module = importlib.import_module("pem_kernels.ops.prototype_attention")
    select_module = importlib.import_module("pem_kernels.ops.prototype_select")

    seen = {}

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen[name] = (torch.is_autocast_enabled(device), args[0].dtype)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(select_module, "prototype_select_ref")
    spy(attention_module, "prototype_attention_ref")
    spy(deform_module, "deform_conv2d_ref")
    keys, queries = torch.randn(1, 40, 16, device=device), torch.randn(1, 5, 16, device=device)
    weight, vector = torch.randn(16, 16, device=device), torch.randn(16, device=device)
    with torch.autocast(device, dtype=AUTOCAST_DTYPE):
        prototypes, _ = prototype_select(keys, queries, None, 4, normalize_keys=True,
                                         backend="reference")
        out = prototype_attention(prototypes, queries, queries, weight, vector, vector, weight,
                                  vector, backend="reference")
        conv = deform_conv2d(torch.randn(1, 4, 6, 6, device=device),
                             torch.randn(1, 18, 6, 6, device=device),
                             torch.randn(2, 4, 3, 3, device=device), padding=1, backend="reference")
    assert seen == {name: (False, AUTOCAST_DTYPE) for name in
                    ("prototype_select_ref", "prototype_attention_ref", "deform_conv2d_ref")}
    assert prototypes.dtype == out.dtype == conv.dtype == AUTOCAST_DTYPE


@pytest.mark.parametrize("device", DEVICES)
def test_pem_cross_attention_keeps_an_fp32_residual_stream(device):
    torch.manual_seed(0)
    layer = PEMCrossAttention(32, 4, backend=_backend(device)).to(device).eval()
    tgt, query_pos = torch.randn(6, 2, 32, device=device), torch.randn(6, 2, 32, device=device)
    memory, pos = torch.randn(2, 32, 5, 7, device=device), torch.randn(2, 32, 5, 7, device=device)
    mask = torch.randn(2, 6, 5, 7, device=device)
    with torch.no_grad():
        full = layer(tgt, memory, mask, pos, query_pos)
        with torch.autocast(device, dtype=AUTOCAST_DTYPE):
            mixed = layer(tgt, memory, mask, pos, query_pos)
    assert mixed.dtype == torch.float32
    # The attention update is computed in bf16 (about 3 significant digits) and added to tgt.
    torch.testing.assert_close(mixed - tgt, full - tgt, rtol=0.05, atol=0.05)


def test_modulated_deform_conv_trains_under_autocast():
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(8, 8, 3, padding=1, backend="cpu")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
        out = conv(torch.nn.functional.conv2d(x, torch.randn(8, 8, 1, 1)))
    assert out.dtype == AUTOCAST_DTYPE
    out.float().square().mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(x.grad).all()
