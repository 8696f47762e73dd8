"""The prototype-attention reference against a line-by-line replica of the official PEM_CA tail."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pem_kernels
from pem_kernels.reference import prototype_attention_ref


def official_tail(prototypes, queries, residual, proj, final, alpha):
    """PEM_CA.forward steps 6-8 as in the official code (facts §1), on [B, N, C] tensors."""
    out = F.normalize(proj(prototypes * queries), dim=1) * alpha + prototypes
    out = final(out)
    return out + residual


def make_layer(channels, dtype=torch.float64):
    proj, final = nn.Linear(channels, channels).to(dtype), nn.Linear(channels, channels).to(dtype)
    alpha = nn.Parameter(torch.rand(1, 1, channels, dtype=dtype) + 0.5)
    return proj, final, alpha


@pytest.mark.parametrize("shape", [(2, 100, 32), (1, 1, 8), (3, 7, 16)], ids=str)
def test_query_normalization_matches_official_code(shape):
    batch, queries, channels = shape
    proj, final, alpha = make_layer(channels)
    p, q, r = (torch.randn(batch, queries, channels, dtype=torch.float64) for _ in range(3))
    expected = official_tail(p, q, r, proj, final, alpha)
    got = pem_kernels.prototype_attention(
        p, q, r, proj.weight, proj.bias, alpha, final.weight, final.bias, normalize="queries"
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_channel_normalization_is_the_papers_l2_over_channels():
    proj, final, alpha = make_layer(16)
    p, q, r = (torch.randn(2, 5, 16, dtype=torch.float64) for _ in range(3))
    attended = F.linear(p * q, proj.weight, proj.bias)
    unit = attended / attended.norm(dim=-1, keepdim=True)
    expected = F.linear(unit * alpha.reshape(-1) + p, final.weight, final.bias) + r
    got = prototype_attention_ref(
        p, q, r, proj.weight, proj.bias, alpha, final.weight, final.bias, normalize="channels"
    )
    torch.testing.assert_close(got, expected)
    # The two axes really differ.
    other = prototype_attention_ref(
        p, q, r, proj.weight, proj.bias, alpha, final.weight, final.bias, normalize="queries"
    )
    assert (other - got).abs().max() > 1e-3


@pytest.mark.parametrize("normalize", ["queries", "channels"])
def test_gradcheck(normalize):
    proj, final, alpha = make_layer(6)
    tensors = [torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    params = [proj.weight, proj.bias, alpha, final.weight, final.bias]

    def run(p, q, r, *weights):
        return prototype_attention_ref(p, q, r, *weights, normalize=normalize)

    assert torch.autograd.gradcheck(run, (*tensors, *params))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(queries=a["queries"][:, :-1]), "queries"),
        (lambda a: a.update(proj_weight=a["proj_weight"][:, :-1]), "proj_weight"),
        (lambda a: a.update(out_bias=a["out_bias"][:-1]), "out_bias"),
        (lambda a: a.update(alpha=a["alpha"][..., :-1]), "alpha"),
        (lambda a: a.update(residual=a["residual"].to("meta")), "residual"),
        (lambda a: a.update(normalize="pixels"), "normalize"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    proj, final, alpha = make_layer(8, torch.float32)
    args = dict(
        prototypes=torch.randn(2, 3, 8), queries=torch.randn(2, 3, 8),
        residual=torch.randn(2, 3, 8),
        proj_weight=proj.weight, proj_bias=proj.bias, alpha=alpha, out_weight=final.weight,
        out_bias=final.bias, normalize="queries",
    )
    mutate(args)
    with pytest.raises(ValueError, match=match):
        pem_kernels.prototype_attention(**args)


@pytest.mark.parametrize("name", ["queries", "residual", "proj_weight", "alpha", "out_bias"])
def test_mixed_dtypes_name_the_argument(name):
    """Outside autocast every tensor must have the prototypes' dtype (a fused kernel would
    otherwise read it as it is, the reference fail inside a matmul)."""
    proj, final, alpha = make_layer(8, torch.float32)
    args = dict(
        prototypes=torch.randn(2, 3, 8), queries=torch.randn(2, 3, 8),
        residual=torch.randn(2, 3, 8),
        proj_weight=proj.weight, proj_bias=proj.bias, alpha=alpha, out_weight=final.weight,
        out_bias=final.bias,
    )
    args[name] = args[name].double()
    with pytest.raises(TypeError, match=f"{name}: dtype torch.float64, expected prototypes'"):
        pem_kernels.prototype_attention(**args)


def test_unavailable_backend_is_a_clear_error():
    proj, final, alpha = make_layer(8, torch.float32)
    p = torch.randn(1, 2, 8)
    with pytest.raises(pem_kernels.BackendUnavailableError, match="prototype_attention"):
        pem_kernels.prototype_attention(
            p, p, p, proj.weight, proj.bias, alpha, final.weight, final.bias, backend="cuda"
        )
