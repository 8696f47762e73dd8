"""Fast tests of the benchmark harness (benchmarks/harness.py) and bench_prototype_select."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from conftest import HAS_CUDA  # noqa: E402
MIB = harness.MIB


def test_measure_time_quantiles_are_ordered_and_sane():
    result = harness.measure_time(lambda: time.sleep(0.002), device="cpu", warmup=1, repeats=15)
    assert result["repeats"] == 15
    assert result["min_ms"] <= result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]
    # A 2 ms sleep takes at least 2 ms and, even on a loaded machine, well under 100 ms.
    assert 2.0 <= result["median_ms"] < 100.0


def test_measure_time_rotates_inputs_and_counts_calls():
    seen = []
    inputs = [(0,), (1,), (2,)]
    result = harness.measure_time(seen.append, device="cpu", warmup=2, repeats=7, inputs=inputs)
    assert result["repeats"] == 7
    assert seen == [i % 3 for i in range(9)]


def test_measure_host_time_is_per_call_and_rotates_inputs():
    seen = []

    def call(value):
        seen.append(value)
        time.sleep(0.002)

    host_ms = harness.measure_host_time(call, device="cpu", inputs=[(0,), (1,)], calls=5)
    assert seen == [0, 1, 0, 1, 0]
    assert 2.0 <= host_ms < 100.0


def test_measure_time_rejects_bad_arguments():
    with pytest.raises(ValueError):
        harness.measure_time(lambda: None, device="cpu", warmup=0, repeats=0)
    with pytest.raises(ValueError):
        harness.measure_time(lambda: None, device="cpu", warmup=0, repeats=1, inputs=[])


def _alloc_free_alloc():
    big = torch.empty(100 * MIB, dtype=torch.uint8)
    big.fill_(1)
    del big
    small = torch.empty(10 * MIB, dtype=torch.uint8)
    small.fill_(1)
    return small


def test_peak_memory_of_known_allocation_cpu():
    peak = harness.measure_peak_memory(_alloc_free_alloc, device="cpu")
    assert abs(peak - 100 * MIB) <= 0.1 * 100 * MIB, peak / MIB


def test_peak_memory_counts_overlapping_live_tensors_cpu():
    def overlapping():
        a = torch.ones(30 * MIB // 4)  # 30 MiB live ...
        b = torch.ones(20 * MIB // 4)  # ... plus 20 MiB: peak 50 MiB
        del a
        c = torch.ones(10 * MIB // 4)  # 30 MiB live
        return b, c

    peak = harness.measure_peak_memory(overlapping, device="cpu")
    assert abs(peak - 50 * MIB) <= 0.1 * 50 * MIB, peak / MIB


def test_peak_memory_of_noop_is_about_zero_cpu():
    existing = torch.ones(5 * MIB // 4)
    assert harness.measure_peak_memory(lambda: None, device="cpu") < 64 * 1024
    # Freeing memory allocated before the call is not negative usage.
    holder = [existing]
    del existing
    assert harness.measure_peak_memory(lambda: holder.clear(), device="cpu") < 64 * 1024


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_of_known_allocation_cuda():
    def alloc():
        big = torch.empty(100 * MIB, dtype=torch.uint8, device="cuda")
        del big
        return torch.empty(10 * MIB, dtype=torch.uint8, device="cuda")

    peak = harness.measure_peak_memory(alloc, device="cuda")
    assert abs(peak - 100 * MIB) <= 0.1 * 100 * MIB
    assert harness.measure_peak_memory(lambda: None, device="cuda") < 64 * 1024
    result = harness.measure_time(
        lambda: torch.empty(MIB, device="cuda").fill_(1), device="cuda", warmup=2, repeats=10
    )
    assert 0 < result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]


def test_graph_time_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        harness.measure_graph_time(lambda: None, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_time_of_known_kernels_cuda():
    x = torch.randn(1 << 24, device="cuda")  # 64 MiB: a scale is ~128 MiB of traffic
    one = harness.measure_graph_time(lambda t: t.mul_(1.0), device="cuda", inputs=(x,))
    four = harness.measure_graph_time(
        lambda t: [t.mul_(1.0) for _ in range(4)], device="cuda", inputs=(x,)
    )
    assert 0 < one < four < 50  # ms; four passes take longer than one


def test_results_round_trip_through_json_and_csv(tmp_path):
    rows = [
        {"hw": 2048, "backend": "reference", "median_ms": 1.5, "ok": True, "speedup": None},
        {"hw": 8192, "backend": "cpu", "median_ms": 0.25, "ok": False, "extra": "x",
         "bad": float("nan")},
    ]
    meta = {"environment": {"device": "cpu"}, "sizes": [2048, 8192]}
    json_path, csv_path = harness.write_results(rows, tmp_path / "sub", "demo", meta)
    assert json_path == tmp_path / "sub" / "demo.json" and csv_path == tmp_path / "sub" / "demo.csv"

    loaded = json.loads(json_path.read_text())
    assert loaded["meta"] == meta
    assert loaded["rows"][0] == rows[0]
    assert loaded["rows"][1]["bad"] is None  # NaN is not valid JSON: written as null
    assert {k: v for k, v in loaded["rows"][1].items() if k != "bad"} == {
        k: v for k, v in rows[1].items() if k != "bad"
    }

    with open(csv_path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == ["hw", "backend", "median_ms", "ok", "speedup", "extra", "bad"]
    assert [int(r["hw"]) for r in read] == [2048, 8192]
    assert [float(r["median_ms"]) for r in read] == [1.5, 0.25]
    assert read[0]["speedup"] == "" and read[0]["extra"] == "" and read[1]["extra"] == "x"


def test_print_table_aligns_columns():
    rows = [{"name": "reference", "ms": 12.3456, "n": 3}, {"name": "cpu", "ms": 1.0, "n": None}]
    buffer = io.StringIO()
    text = harness.print_table(rows, ["name", ("ms", "time ms", ".2f"), ("n", "reps")], file=buffer)
    assert buffer.getvalue().rstrip("\n") == text
    lines = text.splitlines()
    assert lines[0].split() == ["name", "time", "ms", "reps"]
    assert "12.35" in lines[2] and "1.00" in lines[3] and lines[3].endswith("-")
    # Numbers right-aligned: the time column ends at the same offset on every data row.
    assert lines[2].index("12.35") + 5 == lines[3].index("1.00") + 4


def test_environment_info_has_the_essentials():
    info = harness.environment_info("cpu")
    for key in ("device_name", "cpu_cores", "torch", "python", "git_commit", "command",
                "timestamp_utc"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert info["device_name"] and info["cpu_cores"] >= 1
    assert info["timestamp_utc"].endswith("+00:00")
    json.dumps(info)  # must be serializable as is
    assert harness.device_slug("cpu").startswith("cpu")
    assert all(ch.isalnum() or ch == "-" for ch in harness.device_slug("cpu"))


def test_environment_info_records_the_gpus_peak_bandwidth(monkeypatch):
    """On CUDA: 2 transfers per memory clock over the bus, what benchmarks.goals holds GB/s
    against (an H100 SXM's 2619 MHz x 5120 bits: 3352 GB/s, its datasheet's 3.35 TB/s). The
    device queries are stood in for here; a GPU run records the real ones."""
    from types import SimpleNamespace

    props = SimpleNamespace(major=9, minor=0, total_memory=80 << 30,
                            memory_clock_rate=2_619_000, memory_bus_width=5120)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(harness, "_triton_fp32_dot", lambda: "tf32x3")
    info = harness.environment_info("cuda:0")
    assert info["gpu_peak_bandwidth_gbps"] == pytest.approx(3352.3, abs=0.1)
    assert info["gpu_capability"] == "9.0"
    del props.memory_clock_rate  # a torch without the field: no figure rather than a wrong one
    assert "gpu_peak_bandwidth_gbps" not in harness.environment_info("cuda:0")


def test_progress_bar_counts_and_never_breaks():
    assert list(harness.progress(range(4), desc="x", disable=True)) == [0, 1, 2, 3]
    with harness.progress(total=2, desc="y") as bar:  # stderr is not a TTY under pytest
        bar.update(2)
        bar.set_postfix_str("done")


def test_bench_prototype_select_script_runs_and_writes(tmp_path):
    env = dict(os.environ, PEM_BENCH_PROGRESS="0")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_prototype_select", "--device", "cpu",
         "--sizes", "256", "--repeats", "2", "--backends", "reference", "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((tmp_path / "prototype_select.json").read_text())
    (row,) = data["rows"]
    assert row["backend"] == "reference" and row["hw"] == 256 and row["repeats"] == 2
    assert row["median_ms"] > 0 and row["indices_ok"] is True and row["speedup"] == 1.0
    assert row["peak_bytes"] > 0
    assert data["meta"]["environment"]["command"].count("--sizes") == 1
    with open(tmp_path / "prototype_select.csv", newline="") as handle:
        assert [r["backend"] for r in csv.DictReader(handle)] == ["reference"]
    assert "reference" in done.stdout and "median ms" in done.stdout


def test_matmul_precision_option_is_applied_and_recorded(tmp_path):
    env = dict(os.environ, PEM_BENCH_PROGRESS="0")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "prototype-select", "--device", "cpu",
         "--sizes", "256", "--repeats", "1", "--backends", "reference",
         "--matmul-precision", "high", "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    meta = json.loads((tmp_path / "prototype_select.json").read_text())["meta"]
    assert meta["environment"]["float32_matmul_precision"] == "high"
    assert meta["config"]["matmul_precision"] == "high"


def test_bench_pem_ca_script_runs_every_provider(tmp_path):
    env = dict(os.environ, PEM_BENCH_PROGRESS="0")
    providers = ["fused", "reference", "mask2former", "sdpa"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "pem-ca", "--device", "cpu", "--sizes", "2048",
         "--repeats", "1", "--modes", "forward,forward+backward",
         "--providers", ",".join(providers), "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "pem_ca.json").read_text())["rows"]
    assert [(r["mode"], r["provider"]) for r in rows] == [
        (mode, p) for mode in ("forward", "forward+backward") for p in providers
    ]
    for row in rows:
        assert "error" not in row and row["median_ms"] > 0 and row["peak_bytes"] > 0
        assert row["speedup_vs_mask2former"] > 0
    from benchmarks.plots import plot_folder

    (png,) = plot_folder(tmp_path)
    assert png.name == "pem_ca.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_pem_ca_warm_compiles_makes_the_sweeps_compiled_calls(monkeypatch, tmp_path):
    """--warm-compiles calls the compiled provider at every size and mode as the sweep first
    does (same shapes, same grad mode: the same graphs for torch.compile's caches), with a fresh
    compile per size, and writes nothing. torch.compile is a recorder here: the check is of the
    calls, not of the compiler."""
    import benchmarks.bench_pem_ca as bench

    calls: list[tuple] = []

    class Recorder(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer
            calls.append("compile")

        def forward(self, tgt, memory, *rest):
            calls.append((tuple(memory.shape), memory.requires_grad, torch.is_grad_enabled()))
            return self.layer(tgt, memory, *rest)

    monkeypatch.setattr(torch, "compile", Recorder)
    monkeypatch.setenv("PEM_BENCH_PROGRESS", "0")
    common = ["--device", "cpu", "--sizes", "32,128", "--modes", "forward,forward+backward"]
    assert bench.main(common + ["--providers", "compiled", "--warm-compiles",
                                "--out-dir", str(tmp_path / "warm")]) == 0
    assert not (tmp_path / "warm").exists()
    warmed, calls[:] = list(calls), []
    assert bench.main(common + ["--providers", "reference,compiled", "--repeats", "1",
                                "--out-dir", str(tmp_path / "sweep")]) == 0

    def first_calls(recorded):  # each distinct call in order, compiles kept
        seen, order = set(), []
        for call in recorded:
            if call == "compile" or call not in seen:
                seen.add(call)
                order.append(call)
        return order

    # Two compiles per size (reference and fused layers), then forward (no grad), then
    # forward+backward (inputs that require grad), at 4x8 and 8x16 pixels.
    expected = []
    for shape in [(1, 256, 4, 8), (1, 256, 8, 16)]:
        expected += ["compile", "compile", (shape, False, False), (shape, True, True)]
    assert first_calls(warmed) == expected
    assert first_calls(calls) == expected


PTXAS_LOG = """\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_ZN11pem_kernels12_GLOBAL__N_114example_kernelIfEEvPKT_' \
for 'sm_90'
ptxas info    : Function properties for _ZN11pem_kernels12_GLOBAL__N_114example_kernelIfEEvPKT_
    336 bytes stack frame, 648 bytes spill stores, 580 bytes spill loads
ptxas info    : Used 236 registers, used 1 barriers, 38208 bytes smem
ptxas info    : Compiling entry function '_Z5smallPf' for 'sm_90'
ptxas info    : Function properties for _Z5smallPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
"""


def test_ptxas_stats_reads_registers_spills_and_occupancy():
    """ptxas-stats' parsing of a ``ptxas -v`` log (the compile itself, about 90 s per source, is
    left out of the test run) and its warps-per-SM rule: 236 registers round to 240, 7680 per
    warp, so 8 warps (one 256-thread block) fit 65536; 128 give 16 warps; 32 the maximum 64."""
    from benchmarks import ptxas_stats

    assert [ptxas_stats.warps_per_sm_by_registers(r) for r in (236, 190, 128, 40, 32)] == [
        8, 10, 16, 51, 64]
    first, second = ptxas_stats.parse(PTXAS_LOG)
    assert (first["registers"], first["spill_stores"], first["spill_loads"],
            first["smem_bytes"], first["warps_per_sm"]) == (236, 648, 580, 38208, 8)
    assert (second["registers"], second["spill_stores"], second["smem_bytes"],
            second["warps_per_sm"]) == (32, 0, 0, 64)
    if shutil.which("c++filt"):
        assert first["kernel"].startswith("void example_kernel<float>"), first["kernel"]
        assert second["kernel"] == "small", second["kernel"]
    assert "example_kernel" in ptxas_stats.table(
        [dict(first, source="deform_conv2d"), dict(second, source="x")])


def test_ptxas_stats_compiles_as_the_extension_builds(monkeypatch):
    """The nvcc call carries setup.py's flags (PEM_KERNELS_NVCC_FLAGS included), its include
    directories and ptxas's report, for the architecture asked for."""
    from benchmarks import ptxas_stats

    monkeypatch.setenv("PEM_KERNELS_NVCC_FLAGS", "-DPEM_EXPERIMENT=2")
    for variable in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST"):  # setup.py sets them: restored after
        if variable in os.environ:
            monkeypatch.setenv(variable, os.environ[variable])
        else:
            monkeypatch.delenv(variable, raising=False)
    try:
        command = ptxas_stats.nvcc_command(Path("x.cu"), Path("x.o"), "90")
    except SystemExit as error:  # no CUDA torch or no nvcc: nothing to compile with
        pytest.skip(str(error))
    assert command[1:3] == ["-c", "x.cu"]
    assert "-DPEM_EXPERIMENT=2" in command and "--expt-relaxed-constexpr" in command
    assert f"-I{REPO_ROOT / 'csrc' / 'include'}" in command
    assert command[-3:] == ["-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v"]


def test_warm_compiles_needs_a_compiled_provider():
    import benchmarks.bench_pem_ca as bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--providers", "fused", "--warm-compiles"])


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_bench_deform_conv_script_runs_and_profiles(tmp_path, mode):
    env = dict(os.environ, PEM_BENCH_PROGRESS="0")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "deform-conv", "--device", "cpu",
         "--sizes", "512x512/32", "--repeats", "1", "--mode", mode, "--backends", "reference,cpu",
         "--profile", "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    name = "deform_conv" if mode == "forward" else "deform_conv_forward_backward"
    rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["reference", "cpu"]
    for row in rows:
        assert "error" not in row and row["shape"] == "(1,128,16,16)" and row["median_ms"] > 0
        assert row["max_err"] < 1e-3 and row["host_ms"] > 0 and row["kernels"]
    assert "slowest kernels" in done.stdout
    from benchmarks.plots import plot_folder

    # No torchvision in this run: the bars show the speedup over the reference.
    (png,) = plot_folder(tmp_path)
    assert png.name == f"{name}.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_pem_ca_splits_host_and_kernel_time(tmp_path):
    env = dict(os.environ, PEM_BENCH_PROGRESS="0")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "profile-pem-ca", "--device", "cpu", "--sizes", "512",
         "--variants", "cpu,reference", "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "pem_ca_profile.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["cpu", "reference"]
    for row in rows:
        assert "error" not in row and row["wall_ms"] > 0 and row["host_ms"] > 0
        assert row["launches"] > 0 and "device_ms" not in row  # no device kernels on a CPU
        times = [k["ms"] for k in row["kernels"]]
        assert times == sorted(times, reverse=True) and all(
            k["name"].startswith("aten::") for k in row["kernels"]
        )
    # The reference materializes the similarity and takes its argmax; the fused CPU layer does not.
    assert any(k["name"] == "aten::argmax" for k in rows[1]["kernels"])
    assert not any(k["name"] == "aten::argmax" for k in rows[0]["kernels"])
    from benchmarks.plots import plot_folder

    assert plot_folder(tmp_path) == []  # a table, not a plot


def test_time_scale_scales_adaptive_budgets(monkeypatch):
    monkeypatch.delenv("PEM_BENCH_TIME_SCALE", raising=False)
    assert harness.time_scale() == 1.0
    # A 10 ms call and a 1 s budget: 100 repeats, 25 at scale 0.25 (clamped to [1, 1000]).
    def sleepy():
        time.sleep(0.01)

    full = harness.adaptive_repeats(sleepy, device="cpu", budget_s=1.0, min_repeats=1,
                                    max_repeats=1000)
    monkeypatch.setenv("PEM_BENCH_TIME_SCALE", "0.25")
    assert harness.time_scale() == 0.25
    scaled = harness.adaptive_repeats(sleepy, device="cpu", budget_s=1.0, min_repeats=1,
                                      max_repeats=1000)
    assert 0 < scaled < full <= 100
    assert abs(scaled - full / 4) <= 0.5 * full / 4 + 1  # the probe call's jitter aside
    for bad in ("0", "-1", "abc", "inf", "nan"):
        monkeypatch.setenv("PEM_BENCH_TIME_SCALE", bad)
        with pytest.raises(ValueError, match="PEM_BENCH_TIME_SCALE"):
            harness.time_scale()


def test_out_of_time_follows_the_deadline(monkeypatch):
    monkeypatch.delenv("PEM_BENCH_DEADLINE", raising=False)
    assert not harness.out_of_time()
    monkeypatch.setenv("PEM_BENCH_DEADLINE", str(time.time() + 3600))
    assert not harness.out_of_time()
    monkeypatch.setenv("PEM_BENCH_DEADLINE", str(time.time() - 1))
    assert harness.out_of_time()
    monkeypatch.setenv("PEM_BENCH_DEADLINE", "tomorrow")
    with pytest.raises(ValueError, match="PEM_BENCH_DEADLINE='tomorrow'"):
        harness.out_of_time()


def test_report_exit_status_counts_failures_then_skips(tmp_path, capsys):
    def status(failures, skipped):
        meta: dict = {}
        rc = harness.report([{"x": 1}], failures, meta=meta, started=time.perf_counter(),
                            columns=["x"], out_dir=tmp_path, name="r", what="case", skipped=skipped)
        return rc, meta.get("skipped_at_deadline")

    assert status(0, 0) == (0, None)
    assert "replaced" not in capsys.readouterr().err
    assert status(0, 3) == (3, 3)
    assert "note: this replaced the r results of an earlier run" in capsys.readouterr().err
    assert status(1, 3) == (1, 3)
    assert "3 case(s) not run: PEM_BENCH_DEADLINE passed" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["meta"]["skipped_at_deadline"] == 3


@pytest.mark.parametrize(
    "command, name",
    [
        (["prototype-select", "--sizes", "256,512", "--backends", "reference"], "prototype_select"),
        (["pem-ca", "--sizes", "512", "--providers", "reference"], "pem_ca"),
        (["deform-conv", "--sizes", "512x512/32", "--backends", "reference"], "deform_conv"),
        (["profile-pem-ca", "--sizes", "512", "--variants", "reference"], "pem_ca_profile"),
        (["model", "--sizes", "64x64", "--providers", "reference", "--no-flops"], "model"),
    ],
)
def test_benchmarks_past_the_deadline_write_what_they_have_and_exit_3(tmp_path, command, name):
    env = dict(os.environ, PEM_BENCH_PROGRESS="0", PEM_BENCH_DEADLINE=str(time.time() - 1))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", *command, "--device", "cpu",
         "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["rows"] == [] and data["meta"]["skipped_at_deadline"] >= 1
    assert "PEM_BENCH_DEADLINE passed" in done.stderr


def test_front_end_rejects_unknown_comparisons():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "no-such-thing"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=60,
    )
    assert done.returncode == 2 and "pem-ca" in done.stdout


def test_profile_pem_ca_reuses_a_compiled_layer_across_modes(monkeypatch):
    # A compiled module has no truth value (bool() reaches the layer's missing __len__): the
    # profile once asked it "layer or ..." and every compiled row after the first mode failed.
    from benchmarks import profile_pem_ca

    made = []

    def make_variant(name, device, dtype):
        made.append(name)
        layer = profile_pem_ca.make_layers(device, dtype, "reference")["fused"]
        return torch.compile(layer, backend="eager")

    monkeypatch.setattr(profile_pem_ca, "make_variant", make_variant)
    monkeypatch.setenv("PEM_BENCH_PROGRESS", "0")
    args = profile_pem_ca.parse_args([
        "--device", "cpu", "--sizes", "64", "--variants", "compiled",
        "--modes", "forward,forward+backward",
    ])
    rows, failures, skipped = profile_pem_ca.run(args)
    assert (failures, skipped, made) == (0, 0, ["compiled"])
    assert [row["mode"] for row in rows] == ["forward", "forward+backward"]
    assert all("error" not in row and row["wall_ms"] > 0 for row in rows)


@pytest.mark.skipif(HAS_CUDA, reason="compile-only checks: with a GPU the kernels run")
def test_sass_stats_of_a_kernel_compiled_for_sm90(tmp_path):
    """``python -m benchmarks sass-stats``: one row per specialization the test module's sm_90
    script compiles, with the compiler's counts (registers, loops with their tensor-core
    instructions) and one MMA layout where the products are unchained."""
    pytest.importorskip("triton.backends.nvidia")
    from benchmarks import sass_stats

    assert "test_query_projection" in sass_stats.modules_with_scripts()
    rows = sass_stats.collect("test_query_projection")
    assert [row["constexprs"]["DOT_PRECISION"] for row in rows] == ["tf32", "tf32", "tf32x3",
                                                                     "tf32x3"]
    for row in rows:
        assert row["kernel"] == "_query_projection_kernel" and row["num_warps"] == 8
        assert 0 < row["registers"] <= 255 and row["spill_bytes"] >= 0 and row["mma_layouts"] == 1
        loop = row["loops"][0]  # the K loop of the GEMM: tensor-core instructions and a barrier
        assert loop["instructions"] > loop["mma"] > 0 and loop["barriers"] > 0
    # 3xTF32 makes three products per K step where TF32 makes one
    assert rows[2]["loops"][0]["mma"] >= 3 * rows[0]["loops"][0]["mma"]
    out = tmp_path / "stats.json"
    assert sass_stats.main(["test_query_projection", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == rows
    with pytest.raises(SystemExit, match="no _SM90_COMPILE script"):
        sass_stats.collect("test_benchmark_harness")


@pytest.mark.skipif(HAS_CUDA, reason="compile-only checks: with a GPU the kernels run")
def test_pem_selection_compiles_without_spills_or_layout_conversions():
    """The selection kernel as launched at PEM's sizes (``sass-stats pem_selection``): on sm_90
    the tensor-core product modes keep one MMA layout with at most 4 barriers per pixel tile
    (Triton's chained tf32x3 had 2 layouts and 22 barriers). With a bool mask nothing spills
    (before the allowed-first loop IEEE products spilled 16 bytes per thread with
    normalize_keys); with the mask logits the PEM-CA layer passes, fp32 3xTF32 with
    normalize_keys holds a tile of fp32 logits on top of its 254 registers and spills 44 bytes
    per thread (Triton 3.8): allowed up to 64."""
    pytest.importorskip("triton.backends.nvidia")
    from benchmarks import sass_stats

    rows = sass_stats.collect("pem_selection")
    modes = [(row["constexprs"]["MASK_LOGITS"], row["dtype"], row["constexprs"]["DOT_PRECISION"],
              row["constexprs"]["NORMALIZE"]) for row in rows]
    assert modes == [(logits, dtype, precision, normalize)
                     for logits in (False, True)
                     for dtype, precision in [("fp32", "tf32x3"), ("fp32", "tf32"),
                                              ("fp32", "ieee"), ("bf16", "tf32")]
                     for normalize in (False, True)]
    for row in rows:
        assert row["kernel"] == "_select_kernel" and row["registers"] <= 255
        logits = row["constexprs"]["MASK_LOGITS"]
        assert row["spill_bytes"] <= (64 if logits else 0), row
        if row["constexprs"]["DOT_PRECISION"] != "ieee":
            assert row["mma_layouts"] == 1 and row["loops"][0]["barriers"] <= 4, row


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the suite runs `tune` at full size")
def test_tune_checks_every_candidate_against_the_configuration_in_use(tmp_path):
    """`python -m benchmarks tune --small` under the interpreter: every candidate runs and
    matches the configuration in use (bit for bit where only the tiling changes), which is
    first in each experiment; no times without a GPU."""
    pytest.importorskip("triton")
    from benchmarks import tune_configs

    assert tune_configs.main(["--small", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    by_experiment: dict[str, list[dict]] = {}
    for row in rows:
        by_experiment.setdefault(row["experiment"], []).append(row)
    assert sorted(by_experiment) == sorted(tune_configs.EXPERIMENTS)
    for experiment, runs in by_experiment.items():
        assert [row["in_use"] for row in runs] == [True] + [False] * (len(runs) - 1)
        assert len(runs) >= 2, experiment
        for row in runs:
            assert row["check"] == "identical" or row["check"].startswith("ok ("), row
            assert "device_ms" not in row
    assert tune_configs._identical(torch.zeros(3), torch.ones(3)) == "DIFFERS"
    assert tune_configs._fp32_close(torch.ones(3) * 1.001, torch.ones(3)).startswith("DIFFERS")
    with pytest.raises(SystemExit):
        tune_configs.parse_args(["no_such_experiment"])


def test_tune_stops_at_the_suite_deadline(tmp_path, monkeypatch):
    """Past PEM_BENCH_DEADLINE `tune` starts no experiment, writes its (empty) results and exits
    with 3, as the other benchmarks do when the GPU suite's time box runs out."""
    from benchmarks import tune_configs

    monkeypatch.setenv("PEM_BENCH_DEADLINE", "1")  # 1 s after the epoch: long past
    assert tune_configs.main(["--small", "--out-dir", str(tmp_path)]) == 3
    result = json.loads((tmp_path / "tune.json").read_text())
    assert result["rows"] == []
    assert result["meta"]["skipped_at_deadline"] == len(tune_configs.EXPERIMENTS)


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("bench_pem_ca", ["--sizes", "abc"], "--sizes abc: expected comma-separated integers"),
        ("bench_pem_ca", ["--sizes", "2048,0"], "--sizes 2048,0: expected integers >= 1"),
        ("bench_pem_ca", ["--batch", "0"], "--batch 0: expected >= 1"),
        ("bench_prototype_select", ["--sizes", "-5"], "--sizes -5: expected integers >= 1"),
        ("bench_prototype_select", ["--heads", "0"], "--heads 0: expected >= 1"),
        ("bench_prototype_select", ["--density", "2"], "--density 2.0: expected a fraction"),
        ("bench_pem_ca", ["--fused-backend", "gpu"], "--fused-backend gpu: expected one of"),
        ("bench_deform_conv", ["--channels", "0"], "--channels 0: expected >= 1"),
        *[(module, ["--device", "foo"], "--device: expected cpu, cuda or cuda:N, got 'foo'")
          for module in ("bench_pem_ca", "bench_prototype_select", "bench_deform_conv",
                         "bench_model", "profile_pem_ca", "tune_configs")],
    ],
)
def test_bad_benchmark_options_are_usage_errors(module, argv, message, capsys):
    """A bad size or count is a usage error naming the option, not a traceback or a table of
    failed providers."""
    import importlib

    parse_args = importlib.import_module(f"benchmarks.{module}").parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "--device", "cpu"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_until_interrupted_keeps_the_finished_rows(tmp_path, capsys):
    """A SIGINT in the middle of a sweep (the GPU suite's timeout at a step's limit) keeps the
    rows finished before it; a failed one among them still fails the run, and report says it
    was interrupted (not that a deadline passed)."""

    def sweep(args, rows):
        rows.append({"row": 1})
        rows.append({"row": 2, "error": "RuntimeError: boom"})
        raise KeyboardInterrupt

    meta: dict = {}
    rows, failures, skipped = harness.run_until_interrupted(sweep, None, meta)
    assert (rows, failures, skipped) == ([{"row": 1}, {"row": 2, "error": "RuntimeError: boom"}],
                                         1, 0)
    assert meta["interrupted"] is True
    rc = harness.report(rows, failures, meta=meta, started=time.perf_counter(), columns=["row"],
                        out_dir=tmp_path, name="r", skipped=skipped)
    err = capsys.readouterr().err
    assert rc == 1 and "interrupted (SIGINT): wrote the 2 rows" in err
    assert "PEM_BENCH_DEADLINE" not in err
    assert len(json.loads((tmp_path / "r.json").read_text())["rows"]) == 2
    meta = {}
    rc = harness.report([{"row": 1}], 0, meta={"interrupted": True}, started=time.perf_counter(),
                        columns=["row"], out_dir=tmp_path, name="s")
    assert rc == 3
    assert harness.run_until_interrupted(lambda args, rows: (rows, 2, 0), None, meta) == ([], 2, 0)
    assert "interrupted" not in meta


def test_input_set_count_fills_the_rotation_bytes():
    mib = harness.MIB
    assert harness.input_set_count(5 * mib, 128 * mib) == 8  # small sets: up to 8
    assert harness.input_set_count(40 * mib, 128 * mib) == 4
    assert harness.input_set_count(512 * mib, 128 * mib) == 2  # never fewer than 2
