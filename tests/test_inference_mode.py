"""The CPU kernels, the layer and the model under ``torch.inference_mode()`` with two threads.

``at::parallel_for`` runs a kernel's ranges on ATen's worker threads, which do not inherit the
caller's InferenceMode. Until the kernels went through ``pem_kernels::parallel_for``
(csrc/include/pem_kernels/parallel.h), every CPU op whose ranges run ATen ops on its own buffers
failed under ``torch.inference_mode()`` as soon as a second thread took a range ("Inplace update
to inference tensor outside InferenceMode"): torch's default on any multi-core machine. Each case
runs under ``no_grad`` and under ``inference_mode`` and expects the same bits (the same kernels in
the same order) and inference tensors out.
"""

from __future__ import annotations

import pytest
import torch

import pem_kernels
from pem_kernels.nn import PEMCrossAttention
from pem_kernels.ops.query_projection import fused_query_projection


@pytest.fixture(autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def same_under_inference_mode(fn) -> None:
    with torch.no_grad():
        expected = fn()
    with torch.inference_mode():
        got = fn()
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.is_inference()
        assert torch.equal(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize_keys", [False, True])
@pytest.mark.parametrize("mask_kind", ["logits", "bool", "none"])
def test_prototype_select(dtype, normalize_keys, mask_kind):
    keys, queries = torch.randn(2, 3000, 64, dtype=dtype), torch.randn(2, 10, 64, dtype=dtype)
    logits = torch.randn(2, 10, 3000)
    mask = {"logits": logits, "bool": logits > 0, "none": None}[mask_kind]
    same_under_inference_mode(lambda: pem_kernels.prototype_select(
        keys, queries, mask, 8, normalize_keys=normalize_keys, backend="cpu"
    ))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_deform_conv2d(dtype, channels_last):
    x = torch.randn(2, 32, 30, 40, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    offset = torch.randn(2, 18, 30, 40, dtype=dtype) * 2
    mask = torch.rand(2, 9, 30, 40, dtype=dtype)
    weight, bias = torch.randn(32, 32, 3, 3, dtype=dtype), torch.randn(32, dtype=dtype)
    same_under_inference_mode(lambda: pem_kernels.deform_conv2d(
        x, offset, weight, bias, padding=1, mask=mask, backend="cpu"
    ))


@pytest.mark.parametrize("normalize", [False, True])
def test_local_representation(normalize):
    layer = PEMCrossAttention(64, 4).eval()
    memory, pos = torch.randn(2, 64, 24, 40), torch.randn(2, 64, 24, 40)
    if normalize:
        with torch.no_grad():  # the kernel normalizes
            assert layer.feature_proj.project_for_selection(memory, pos, "cpu")[1]

        def project():
            return layer.feature_proj.project_for_selection(memory, pos, "cpu")[0]
    else:

        def project():
            return layer.feature_proj.project(memory, pos, "cpu")

    same_under_inference_mode(project)


def test_query_projection():
    layer = PEMCrossAttention(64, 4).eval()
    norm, linear = layer.query_proj
    tgt, query_pos = torch.randn(100, 2, 64), torch.randn(100, 2, 64)
    same_under_inference_mode(lambda: fused_query_projection(
        "cpu", tgt, query_pos, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias
    ))


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_pem_cross_attention(backend):
    torch.manual_seed(0)
    layer = PEMCrossAttention(64, 4, backend=backend).eval()
    q, b, h, w = 20, 2, 24, 40
    args = (
        torch.randn(q, b, 64), torch.randn(b, 64, h, w), torch.randn(b, q, h, w) - 0.5,
        torch.randn(b, 64, h, w), torch.randn(q, b, 64),
    )
    same_under_inference_mode(lambda: layer(*args))


def test_model():
    from pem.model import PEM

    torch.manual_seed(0)
    model = PEM("stdc1", 19, backend="auto").eval()
    images = torch.rand(1, 3, 96, 128) * 255
    same_under_inference_mode(
        lambda: tuple(model(images)[key] for key in ("pred_logits", "pred_masks"))
    )


def test_cpu_kernels_run_their_ranges_through_pem_kernels_parallel_for():
    """A CPU kernel that called at::parallel_for directly would bring the failure back for its
    op (and a test of that op under inference mode might not exist yet)."""
    from pathlib import Path

    sources = sorted((Path(__file__).resolve().parents[1] / "csrc" / "cpu").glob("*.cpp"))
    assert sources
    for source in sources:
        text = source.read_text()
        assert "at::parallel_for(" not in text, f"{source.name}: use pem_kernels::parallel_for"
