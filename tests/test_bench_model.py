"""Tests of the whole-model benchmark (benchmarks/bench_model.py) and of pem_kernels.flops.

FLOP convention (pem_kernels/flops.py): 2 per multiply-accumulate of each op's dense GEMM, as
torch's own matmul/conv formulas; elementwise work is not counted, neither in the fused ops nor in
the reference's ATen ops. The fused and reference computations therefore count exactly the same
FLOPs, which is what these tests assert (tolerance 0).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import pem_kernels
from pem_kernels.flops import (
    count_flops,
    deform_conv2d_flops,
    prototype_select_flops,
    register_flop_formulas,
)
from pem_kernels.reference import deform_conv2d_ref, prototype_select_ref

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_model  # noqa: E402

needs_extension = pytest.mark.skipif(
    not pem_kernels.EXTENSION_LOADED, reason="pem_kernels._C is not built"
)
needs_triton = pytest.mark.skipif(
    "triton" not in pem_kernels.available_backends(
        "prototype_select", "cuda" if torch.cuda.is_available() else "cpu"
    ),
    reason="the triton backend cannot run here",
)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _flops(fn, *args, **kwargs) -> int:
    return count_flops(fn, *args, **kwargs)[1]


# ------------------------------------------------------------------------------------------
# FLOP formulas
# ------------------------------------------------------------------------------------------


@needs_extension
def test_formulas_are_registered_for_the_cpp_ops():
    names = register_flop_formulas()
    for name in ("deform_conv2d", "_deform_conv2d_backward", "prototype_select",
                 "prototype_attention"):
        assert name in names
        assert getattr(torch.ops.pem_kernels, name) in flop_registry
    assert register_flop_formulas() == names  # idempotent: no duplicate registration error


@needs_extension
def test_deform_conv2d_flops_follow_torch_conv_formula_and_reference():
    # Groups, stride and a non-square kernel, so every factor of the formula matters.
    x = torch.randn(2, 8, 11, 13)
    weight = torch.randn(6, 4, 3, 2)  # groups = 2
    out_h, out_w = (11 + 2 - 3) // 2 + 1, (13 + 2 - 2) // 2 + 1
    offset = torch.randn(2, 2 * 6, out_h, out_w)
    mask = torch.rand(2, 6, out_h, out_w)
    args = (x, offset, weight, None, 2, 1, 1, mask)
    expected = 2 * 2 * 6 * 4 * 3 * 2 * out_h * out_w
    assert deform_conv2d_flops(x.shape, weight.shape, (2, 6, out_h, out_w)) == expected
    assert _flops(pem_kernels.deform_conv2d, *args, backend="cpu") == expected
    assert _flops(deform_conv2d_ref, *args) == expected
    # torch's own formula for the same (undeformed) convolution gives the same count.
    assert _flops(F.conv2d, x, weight, None, 2, 1, 1, 2) == expected


@needs_extension
def test_deform_conv2d_backward_counts_like_the_reference_autograd():
    def forward_backward(backend):
        tensors = [torch.randn(1, 4, 9, 9), torch.randn(1, 18, 9, 9), torch.randn(5, 4, 3, 3),
                   torch.randn(5), torch.rand(1, 9, 9, 9)]
        for t in tensors:
            t.requires_grad_(True)
        x, offset, weight, bias, mask = tensors

        def run():
            out = pem_kernels.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask, backend=backend)
            out.sum().backward()

        return _flops(run)

    forward = 2 * 5 * 4 * 9 * 9 * 9
    # Forward GEMM + the input-side and weight-gradient GEMMs of the backward.
    assert forward_backward("cpu") == forward_backward("reference") == 3 * forward


@needs_extension
def test_prototype_select_flops_are_the_similarity_gemm():
    keys, queries = torch.randn(2, 50, 32), torch.randn(2, 7, 32)
    mask = torch.rand(2, 7, 50) < 0.5
    expected = 2 * 2 * 7 * 50 * 32  # 2 * B * heads * N * HW * (C / heads), heads = 4
    assert prototype_select_flops(keys.shape, queries.shape) == expected
    for normalize in (False, True):
        fused = _flops(pem_kernels.prototype_select, keys, queries, mask, 4,
                       normalize_keys=normalize, backend="cpu")
        assert fused == _flops(prototype_select_ref, keys, queries, mask, 4,
                               normalize_keys=normalize) == expected


@needs_triton
def test_triton_op_formulas_match_the_reference():
    names = register_flop_formulas(include_triton=True)
    assert {"deform_conv2d_triton", "prototype_select_triton", "prototype_attention_triton",
            "_prototype_attention_backward_triton"} <= set(names)
    device = TRITON_DEVICE
    keys, queries = torch.randn(1, 40, 32, device=device), torch.randn(1, 5, 32, device=device)
    mask = torch.rand(1, 5, 40, device=device) < 0.5
    assert _flops(pem_kernels.prototype_select, keys, queries, mask, 4, backend="triton") == (
        _flops(prototype_select_ref, keys, queries, mask, 4)
    )
    x, weight = torch.randn(1, 16, 6, 6, device=device), torch.randn(16, 16, 3, 3, device=device)
    offset, dmask = torch.randn(1, 18, 6, 6, device=device), torch.rand(1, 9, 6, 6, device=device)
    args = (x, offset, weight, None, 1, 1, 1, dmask)
    assert _flops(pem_kernels.deform_conv2d, *args, backend="triton") == _flops(
        deform_conv2d_ref, *args
    ) == 2 * 16 * 16 * 9 * 36

    n, c = 6, 32

    def attention(backend):
        prototypes = torch.randn(2, n, c, device=device, requires_grad=True)
        q, residual = torch.randn(2, n, c, device=device), torch.randn(2, n, c, device=device)
        weights = [torch.randn(c, c, device=device, requires_grad=True) for _ in range(2)]
        biases = [torch.randn(c, device=device, requires_grad=True) for _ in range(2)]
        alpha = torch.ones(1, 1, c, device=device, requires_grad=True)

        def run():
            out = pem_kernels.prototype_attention(
                prototypes, q, residual, weights[0], biases[0], alpha, weights[1], biases[1],
                backend=backend,
            )
            out.sum().backward()

        return _flops(run)

    # Two [C, C] linears: 4*B*N*C*C forward, twice that backward (input and weight gradients).
    assert attention("triton") == attention("reference") == 3 * 4 * 2 * n * c * c


@needs_extension
def test_fused_and_reference_models_count_the_same_flops():
    from pem.model import PEM

    model = PEM("stdc1", 19, backend="cpu").eval().requires_grad_(False)
    images = torch.rand(1, 3, 64, 96) * 255

    def counts(backend):
        model.set_backend(backend)
        with torch.no_grad():
            _, total, per_op = count_flops(model, images)
        return total, per_op

    fused_total, fused = counts("cpu")
    reference_total, reference = counts("reference")
    assert fused_total == reference_total > 1e9
    # The custom ops are counted with their formulas: 3 deformable 3x3 convs (128 -> 128) at
    # strides 32, 16, 8, and 6 decoder layers cycling over those levels (100 queries, C = 256).
    pixels = sum((64 // s) * (96 // s) for s in (32, 16, 8))
    assert fused["pem_kernels.deform_conv2d"] == 2 * 128 * 128 * 9 * pixels
    assert fused["pem_kernels.prototype_select"] == 2 * 100 * 256 * 2 * pixels
    assert not any(op.startswith("pem_kernels.") for op in reference)
    # ... and they replace exactly the reference's matmuls and convolutions of the same math
    # (which of bmm and mm a reference matmul is counted as depends on the torch version).
    def dense(counts):
        return sum(counts.get(op, 0) for op in ("aten.bmm", "aten.mm", "aten.convolution"))

    custom = sum(flops for op, flops in fused.items() if op.startswith("pem_kernels."))
    assert set(op for op in fused if op.startswith("pem_kernels.")) == {
        "pem_kernels.deform_conv2d", "pem_kernels.prototype_select",
        "pem_kernels.local_representation", "pem_kernels.query_projection",
    }
    # The query projection replaces a Linear (an addmm); the others dense ops.
    queries = fused["pem_kernels.query_projection"]
    assert queries == 6 * 2 * 100 * 256 * 256
    assert dense(reference) == dense(fused) + custom - queries
    assert reference["aten.addmm"] == fused["aten.addmm"] + queries


def test_count_flops_without_custom_ops_equals_flop_counter_mode():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    out, total, per_op = count_flops(layer, x)
    assert out.shape == (4, 8)
    assert total == counter.get_total_flops() == 2 * 4 * 16 * 8
    assert per_op == {"aten.addmm": 2 * 4 * 16 * 8}


# ------------------------------------------------------------------------------------------
# The benchmark script
# ------------------------------------------------------------------------------------------


def _run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PEM_BENCH_PROGRESS="0")
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "model", *args], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def _check_tiny_run(out_dir: Path, device: str, fused_backend: str) -> None:
    """The JSON/CSV/PNG of a stdc1 64x96 run with providers fused, reference and 1 repeat."""
    data = json.loads((out_dir / "model.json").read_text())
    rows = data["rows"]
    assert [(r["size"], r["provider"]) for r in rows] == [
        ("64x96", "fused"), ("64x96", "reference")
    ]
    fused, reference = rows
    assert fused["backend"] == fused_backend and reference["backend"] == "reference"
    for row in rows:
        assert "error" not in row
        assert row["device"].startswith(device) and row["backbone"] == "stdc1"
        assert row["dtype"] == "float32" and row["batch"] == 1 and row["repeats"] == 1
        assert row["height"] == 64 and row["width"] == 96
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["peak_bytes"] > 0 and row["peak_mib"] == row["peak_bytes"] / 2**20
        assert row["gflop_per_image"] > 1.0
        assert row["gflop_per_s"] == pytest.approx(row["flops"] / row["median_ms"] * 1e-6)
        # Deterministic on the CPU (measured: ~1e-6); on a GPU an argmax near-tie of prototype
        # selection may flip between kernels, so only finiteness is checked there.
        assert row["max_abs_diff"] < 1e-3 if device == "cpu" else math.isfinite(row["max_abs_diff"])
    assert fused["flops"] == reference["flops"]
    for row in rows:  # both eager models see the same masks: same weights, same images
        assert 0.0 <= row["mask_density"] <= 1.0 and 0.0 <= row["empty_query_fraction"] <= 1.0
    assert fused["empty_query_fraction"] == pytest.approx(
        reference["empty_query_fraction"], abs=0.02
    )
    assert reference["speedup_vs_reference"] == 1.0 and reference["memory_vs_reference"] == 1.0
    assert fused["speedup_vs_reference"] == pytest.approx(
        reference["median_ms"] / fused["median_ms"]
    )
    assert reference["max_abs_diff"] == 0.0
    meta = data["meta"]
    assert meta["benchmark"] == "model" and meta["parameters"] > 1e6
    assert meta["config"]["sizes"] == [[64, 96]]
    by_op = meta["flops_by_op"]["64x96"]
    assert any(op.startswith("pem_kernels.deform_conv2d") for op in by_op["fused"])
    assert sum(by_op["fused"].values()) == sum(by_op["reference"].values()) == fused["flops"]
    assert "--sizes" in meta["environment"]["command"]
    for row in rows:  # --profile
        assert row["host_ms"] > 0 and row["launches"] > 0 and row["top_kernels"]
        assert row["kernels"][0]["ms"] >= row["kernels"][-1]["ms"] >= 0
        if device == "cuda":
            assert row["device_ms"] > 0
        else:
            assert "device_ms" not in row and "host_syncs" not in row
    if device == "cuda":
        assert fused["host_syncs"] == 0  # tests/test_host_syncs.py names the culprit

    with open(out_dir / "model.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["provider"] for r in table] == ["fused", "reference"]
    for column in ("size", "median_ms", "p20_ms", "p80_ms", "peak_mib", "gflop_per_image",
                   "speedup_vs_reference", "memory_vs_reference", "max_abs_diff"):
        assert column in table[0] and table[0][column] != ""

    from benchmarks.plots import plot_folder

    (png,) = plot_folder(out_dir)
    assert png.name == "model.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_extension
def test_model_cli_tiny_run_writes_json_csv_and_plot(tmp_path):
    done = _run_cli("--device", "cpu", "--backbone", "stdc1", "--sizes", "64x96", "--repeats", "1",
                    "--profile", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "median ms" in done.stdout and "GFLOP/img" in done.stdout and "host ms" in done.stdout
    assert "wrote" in done.stdout
    # A fresh folder: no note about replacing an earlier run (the saves as it goes are its own).
    assert "replaced" not in done.stderr
    _check_tiny_run(tmp_path, "cpu", "auto")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_cli_tiny_run_cuda(tmp_path):
    done = _run_cli("--device", "cuda", "--backbone", "stdc1", "--sizes", "64x96", "--repeats", "1",
                    "--providers", "fused,reference", "--profile", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    _check_tiny_run(tmp_path, "cuda", "auto")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "512"], "expected HxW"),
        (["--sizes", "0x64"], "H and W must be >= 1"),
        (["--sizes", ","], "at least one"),
        (["--providers", "fused,bogus"], "unknown ['bogus']"),
        (["--backbone", "r101"], "invalid choice"),
        (["--dtype", "float16"], "invalid choice"),
        (["--fused-backend", "nope"], "expected one of"),
        (["--device", "cpu", "--fused-backend", "cuda"], "cannot run it on cpu"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--num-classes", "0"], "--num-classes must be >= 1"),
        (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_bad_arguments_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        bench_model.parse_args(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench_model.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_cpu_defaults():
    args = bench_model.parse_args(["--device", "cpu"])
    assert args.sizes == [(512, 512), (1024, 2048)]
    assert args.providers == ["fused", "reference"] and args.fused_backend == "auto"
    assert args.backbone == "r50" and args.num_classes == 19 and args.batch == 1
    assert args.dtype == "float32" and args.flops


def test_front_end_lists_and_forwards_the_model_command():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=60,
    )
    assert done.returncode == 0 and "model" in done.stdout
    done = _run_cli("--sizes", "abc", timeout=120)
    assert done.returncode == 2
    assert "bench_model: error: --sizes: size 'abc': expected HxW" in done.stderr
