"""The GPU suite's scheduling (benchmarks/gpu_suite.sh), run with a stand-in Python.

The stand-in answers the suite's probes (a fake GPU, sm_90) and, for every ``python -m MODULE``
step, logs its arguments and environment, sleeps and exits as told, so the order of the steps,
the time box (deadlines, skips, timeouts, partial benchmarks), the exit status and the published
tarball are checked without a GPU in seconds.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))
SUITE = REPO_ROOT / "benchmarks" / "gpu_suite.sh"

STAND_IN = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
built = os.environ["STUB_BUILT"]  # exists once a build ran (or the extension was there)
if args[:1] == ["-c"]:
    if "get_device_name" in args[1]:
        print("Fake GPU 9000")
    elif "get_device_capability" in args[1]:
        print("9.0")
    elif "torch.__version__" in args[1]:
        print("2.11.0")
    elif "EXTENSION_LOADED" in args[1]:  # the extension probe
        sys.exit(0 if os.path.exists(built) else 1)
    elif "ncu_targets" in args[1]:  # the suite reads the ncu targets' table: the real one
        sys.path.insert(0, os.getcwd())
        exec(args[1])
    sys.exit(0)  # import xdist / import pytest_timeout: both "installed"
assert args[0] == "-m", args
module = args[1]
if module == "pip" and not os.environ.get("STUB_BUILD_FAILS"):
    open(built, "w").close()
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({{
        "module": module, "argv": args[2:], "time_scale": os.environ.get("PEM_BENCH_TIME_SCALE"),
        "deadline": os.environ.get("PEM_BENCH_DEADLINE"), "now": time.time(),
        "suite_env": sorted(k for k in os.environ
                            if k in ("RESERVE_S", "STEP_MIN_S", "BENCHMARK", "SUITE_ONLY",
                                     "SUITE_TIERS")),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "backend_env": {{k: v for k, v in os.environ.items()
                         if k.startswith("PEM_KERNELS_BACKEND")}},
    }}) + "\\n")
time.sleep(json.loads(os.environ.get("STUB_SLEEP", "{{}}")).get(module, 0))
sys.exit(json.loads(os.environ.get("STUB_RC", "{{}}")).get(module, 0))
"""

TIER_1 = [  # the goal rows and the model first (every benchmark), then the investigations
    "bench_prototype_select_float32", "bench_prototype_select_float32_ieee",
    "bench_pem_ca_float32",
    "bench_deform_conv_float32_forward", "bench_deform_conv_float32_forward_backward",
    "bench_model_float32_auto",
    "bench_pem_ca_cuda_select", "bench_pem_ca_triton_backend", "profile_pem_ca_float32", "tune",
]
TIER_2 = [
    "bench_prototype_select_bfloat16", "bench_pem_ca_float32_both_compiled",
    "bench_pem_ca_bfloat16", "bench_pem_ca_b2",
    "profile_pem_ca_bfloat16", "bench_deform_conv_bfloat16_forward",
    "bench_deform_conv_bfloat16_forward_backward", "bench_deform_conv_float32_forward_ieee",
    "bench_deform_conv_deterministic",
    "bench_model_bfloat16_auto", "bench_model_float32_triton", "bench_model_compiled",
    "bench_prototype_select_float32_tf32", "bench_pem_ca_float32_tf32",
]


# The suite's own variables: a suite run inside the GPU suite's tests step must not inherit them.
SUITE_VARIABLES = ("RESERVE_S", "STEP_MIN_S", "BENCHMARK", "PEM_BENCH_DEADLINE",
                   "PEM_BENCH_TIME_SCALE")


def current_build_stamp() -> str:
    """The stamp the suite writes after building these sources for the stand-in's GPU (sm_90)
    and torch (2.11.0): the script's recipe."""
    recipe = ("{ find csrc setup.py pyproject.toml -type f | LC_ALL=C sort | xargs sha1sum; "
              "echo 'arch 9.0'; echo 2.11.0; echo 'nvcc flags '; } | sha1sum")
    return subprocess.run(["bash", "-c", recipe], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout


def run_suite(
    tmp_path: Path, *groups: str, extension: bool = True, stamped: bool = True, **env: str
) -> tuple[subprocess.CompletedProcess, list[dict], list[list[str]]]:
    """Runs the suite with the stand-in Python. ``extension``: the machine already has the
    compiled extension (else it is bare, as a machine handed back between calls); ``stamped``:
    built by the suite from these sources (else the suite builds it again)."""
    if extension:
        (tmp_path / "built").touch()
        if stamped and not (tmp_path / "build_stamp").exists():
            (tmp_path / "build_stamp").write_text(current_build_stamp())
    python = tmp_path / "python"
    python.write_text(STAND_IN.format(python=sys.executable))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "out").mkdir(exist_ok=True)
    outer = {key: value for key, value in os.environ.items()
             if key not in SUITE_VARIABLES
             and not key.startswith(("SUITE_", "PEM_KERNELS_BACKEND", "PEM_KERNELS_NVCC"))}
    full_env = dict(
        outer, PYTHON=str(python), STUB_LOG=str(tmp_path / "calls.jsonl"),
        STUB_BUILT=str(tmp_path / "built"), SUITE_BUILD_STAMP=str(tmp_path / "build_stamp"),
        SUITE_RESULTS=str(tmp_path / "results"), OUT=str(tmp_path / "out"),
        SUITE_SANITIZER=str(tmp_path / "no-compute-sanitizer"), **env,
    )
    done = subprocess.run(
        ["bash", str(SUITE), *groups], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env=full_env,
    )
    log = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    summary_file = tmp_path / "results" / "summary.txt"
    summary = summary_file.read_text().splitlines() if summary_file.exists() else []
    steps = [line.split()[:2] for line in summary if not line.startswith(("#", "steps:"))]
    return done, calls, steps


def test_suite_runs_every_step_in_priority_order(tmp_path):
    done, calls, steps = run_suite(
        tmp_path, stamped=False, SUITE_DEADLINE_S="0",
        STUB_RC=json.dumps({"benchmarks.bench_model": 3}),
    )
    names = [name for name, _ in steps]
    # build, then the checks (at the same time: any order), the two benchmark tiers, the plots
    # and the goals report.
    assert names[0] == "build"
    # (The diagnosis of C++ argument errors runs only when named.)
    # With them, tier 1's PEM-CA compiles are made ahead, into torch.compile's caches.
    assert set(names[1:4]) == {"tests", "sanitize", "warm_pem_ca_compiles"}
    assert names[4:] == TIER_1 + TIER_2 + ["plots", "goals"], names
    status = dict(steps)
    # No compute-sanitizer here: a skip. A benchmark that stopped at its deadline (exit 3) is
    # "partial"; everything else passed. Skips and partials are reported, not failures.
    assert status["sanitize"] == "SKIPPED"
    assert all(status[name] == "partial" for name in names if name.startswith("bench_model"))
    assert all(
        status[name] == "rc=0"
        for name in names
        if name != "sanitize" and not name.startswith("bench_model")
    )
    model_steps = sum(name.startswith("bench_model") for name in names)
    assert done.returncode == 0, done.stdout + done.stderr
    ok = len(names) - 1 - model_steps
    assert f"steps: {ok} ok, 0 failed, 0 timed out, {model_steps} partial, 1 skipped" in done.stdout
    # The suite's bookkeeping variables stay out of every step's environment (the tests step
    # once passed RESERVE_S to a suite run by the tests, which then skipped its build).
    assert all(c["suite_env"] == [] for c in calls), [c["suite_env"] for c in calls]
    # Every benchmark gets the suite's time scale and a deadline of its own; the tests and the
    # diagnosis get none (the benchmark scripts the tests run must run whole).
    warm = [c for c in calls if "--warm-compiles" in c["argv"]]
    benchmarks = [c for c in calls if c["module"].startswith("benchmarks.") and c not in warm]
    assert benchmarks and all(c["time_scale"] == "0.4" and c["deadline"] for c in benchmarks)
    assert all(float(c["deadline"]) > c["now"] for c in benchmarks)
    # Only the layer's CUDA-selection step moves an op off "auto".
    moved = [(c["argv"][c["argv"].index("--out-dir") + 1], c["backend_env"]) for c in benchmarks
             if c["backend_env"]]
    assert len(moved) == 1 and moved[0][0].endswith("pem_ca_float32_b1_cuda_select"), moved
    assert moved[0][1] == {"PEM_KERNELS_BACKEND_PROTOTYPE_SELECT": "cuda"}
    tests = next(c for c in calls if c["module"] == "pytest")
    assert tests["deadline"] is None
    # The warm-up makes the compiles of tier 1's PEM-CA step: its options but the providers.
    assert len(warm) == 1 and warm[0]["deadline"] is None, warm
    pem_ca = next(c for c in benchmarks
                  if c["argv"][c["argv"].index("--out-dir") + 1].endswith("pem_ca_float32_b1"))

    def options(argv, drop=("--providers", "--out-dir")):
        pairs = zip(argv, argv[1:] + [""])
        return {(a, b) for a, b in pairs if a.startswith("--") and a not in drop} - {
            ("--warm-compiles", "")}

    assert options(warm[0]["argv"]) == options(pem_ca["argv"])
    # Nor may the environment differ in what enters the graphs (with OMP_NUM_THREADS=1 the CPU
    # graphs differed and every cache lookup missed).
    assert warm[0]["omp_threads"] == pem_ca["omp_threads"]
    assert "compiled" in pem_ca["argv"][pem_ca["argv"].index("--providers") + 1].split(",")
    # The GPU run leaves the CPU-only tests and the CUDA emulation to CI.
    assert tests["argv"][tests["argv"].index("-k") + 1] == "not cpu"
    assert "--ignore=tests/test_cuda_emulation.py" in tests["argv"]
    # Every benchmark command line is one its parser accepts (on a machine without a GPU with the
    # CPU for the GPU): a typo here would cost a GPU run.
    for call in benchmarks:
        module = importlib.import_module(call["module"])
        argv = list(call["argv"])
        if not torch.cuda.is_available():
            argv[argv.index("--device") + 1] = "cpu"
        module.parse_args(argv)
    assert "--durations=40" in tests["argv"] and tests["argv"][-1] == "tests"
    with tarfile.open(tmp_path / "out" / "gpu-suite-results.tgz") as tar:
        assert any(name.endswith("summary.txt") for name in tar.getnames())


def test_suite_keeps_its_deadline(tmp_path):
    # 45 s in all, 20 s for the checks: the tests and the diagnosis hang and are stopped at the
    # phase's end, no benchmark fits before the 20 s kept for the plots, and the plots still run.
    # A step needs 12 s left to start, so both hold while the checks end between 13 s and 33 s
    # after the start; they end at about 17 s (the tests' step is cut to 15 s, leaving `timeout`
    # its slack). With a 40 s deadline, which left 11 s for slow starts, this test failed in both
    # GPU suite runs (14 pytest workers beside the sanitizer) with build or plots skipped (the
    # assertion did not say which; now it prints the steps).
    done, calls, steps = run_suite(
        tmp_path, "build", "check", "diagnose", "bench", "plots", stamped=False,
        SUITE_DEADLINE_S="45",
        SUITE_CHECK_S="20", SUITE_MIN_STEP_S="12",
        STUB_SLEEP=json.dumps({"pytest": 60, "benchmarks.diagnose_cpp_errors": 60}),
    )
    status = dict(steps)
    assert status["build"] == "rc=0" and status["plots"] == "rc=0", steps
    assert status["goals"] == "rc=0", steps
    assert status["tests"] == "timeout" and status["diagnose_cpp_errors"] == "timeout"
    assert all(status[name] == "SKIPPED" for name in TIER_1 + TIER_2)
    assert not any(c["module"].startswith("benchmarks.bench") and "--warm-compiles" not in c["argv"]
                   for c in calls)
    # The two timeouts count; the skips (sanitizer, every benchmark) are reported.
    assert done.returncode == 2, done.stdout + done.stderr
    skipped = 1 + len(TIER_1 + TIER_2)
    assert f"0 failed, 2 timed out, 0 partial, {skipped} skipped" in done.stdout


def test_suite_tiers_pick_the_benchmark_tiers(tmp_path):
    # A second call for what did not fit the first: tier 2 and the plots only.
    done, calls, steps = run_suite(tmp_path, "bench", "plots", SUITE_DEADLINE_S="0",
                                   SUITE_TIERS="2")
    assert [name for name, _ in steps] == TIER_2 + ["plots", "goals"]
    assert done.returncode == 0, done.stdout + done.stderr


def test_ncu_targets_build_their_calls():
    # The calls are built (inputs at PEM's size, layers, ops) without running: their kernels
    # need a GPU. A broken import or signature here would cost a GPU run.
    from benchmarks import ncu_targets

    for target in ncu_targets.TARGETS:
        assert callable(ncu_targets.make_call(target, torch.device("cpu")))
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, "-m", "benchmarks.ncu_targets", "select-cuda"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr


def test_ncu_group_profiles_every_target(tmp_path):
    from benchmarks.ncu_targets import TARGETS

    ncu = tmp_path / "ncu"
    ncu.write_text('#!/bin/bash\necho "$*" >> "$NCU_LOG"\n')
    ncu.chmod(0o755)
    done, _, steps = run_suite(tmp_path, "ncu", SUITE_DEADLINE_S="0", SUITE_NCU=str(ncu),
                               NCU_LOG=str(tmp_path / "ncu.log"))
    assert steps == [[f"ncu_{target}", "rc=0"] for target in TARGETS], done.stdout + done.stderr
    lines = (tmp_path / "ncu.log").read_text().splitlines()
    ncu_runs = [line for line in lines if "--version" not in line]
    for line, (target, kernels) in zip(ncu_runs, TARGETS.items(), strict=True):
        assert f"-k regex:{kernels} " in line and line.endswith(f"benchmarks.ncu_targets {target}")
        assert line.startswith("--clock-control none ")  # never lock the card's clocks
    # Without ncu: a skip.
    (tmp_path / "none").mkdir()
    done, _, steps = run_suite(tmp_path / "none", "ncu", SUITE_DEADLINE_S="0",
                               SUITE_NCU=str(tmp_path / "no-ncu"))
    assert steps[-1] == ["ncu", "SKIPPED"] and done.returncode == 0


def test_suite_only_runs_the_steps_named(tmp_path):
    # A later call for what an earlier one had no time for: two tier-2 steps and the plots.
    only = "bench_deform_conv_deterministic bench_model_compiled plots"
    done, calls, steps = run_suite(tmp_path, "bench", "plots", SUITE_DEADLINE_S="0",
                                   SUITE_TIERS="2", SUITE_ONLY=only)
    assert [name for name, _ in steps] == only.split()
    assert [call["module"] for call in calls] == [
        "benchmarks.bench_deform_conv", "benchmarks.bench_model", "benchmarks"
    ]
    assert done.returncode == 0, done.stdout + done.stderr


def test_build_is_cached_and_a_bare_machine_builds_first(tmp_path):
    """A second call with the same sources, arch and torch skips the minute-long build; a call
    on a bare machine (no extension) builds first even when "build" was not named, and one whose
    build does not give a loading extension says so instead of benchmarking without it."""
    done, calls, steps = run_suite(tmp_path, "build", stamped=False, SUITE_DEADLINE_S="0")
    assert steps == [["build", "rc=0"]], done.stdout + done.stderr
    assert (tmp_path / "build_stamp").read_text() == current_build_stamp()
    done, calls, steps = run_suite(tmp_path, "build", SUITE_DEADLINE_S="0")
    assert steps[-1] == ["build", "cached"] and done.returncode == 0
    assert sum(c["module"] == "pip" for c in calls) == 1  # the second call built nothing
    # Other nvcc flags (an experiment's build): built again, and again back without them.
    flags = "-DPEM_EXPERIMENT=2"
    done, calls, steps = run_suite(tmp_path, "build", SUITE_DEADLINE_S="0",
                                   PEM_KERNELS_NVCC_FLAGS=flags)
    assert steps[-1] == ["build", "rc=0"], done.stdout + done.stderr
    assert (tmp_path / "build_stamp").read_text() != current_build_stamp()
    done, calls, steps = run_suite(tmp_path, "build", SUITE_DEADLINE_S="0")
    assert steps[-1] == ["build", "rc=0"] and (
        tmp_path / "build_stamp").read_text() == current_build_stamp()
    # Sources changed since that build: rebuilt before the benchmarks even when not named.
    (tmp_path / "build_stamp").write_text("a stamp of other sources\n")
    only = "bench_model_float32_auto"
    done, calls, steps = run_suite(tmp_path, "model", SUITE_DEADLINE_S="0", SUITE_TIERS="1",
                                   SUITE_ONLY=only)
    assert steps[-2:] == [["build", "rc=0"], [only, "rc=0"]], done.stdout + done.stderr
    # A failed build that leaves an older extension loading is not stamped: the next call
    # builds again instead of calling it cached.
    failed = tmp_path / "failed"
    failed.mkdir()
    done, calls, steps = run_suite(failed, "build", stamped=False, SUITE_DEADLINE_S="0",
                                   STUB_RC=json.dumps({"pip": 1}))
    assert steps == [["build", "rc=1"]] and done.returncode == 1
    assert not (failed / "build_stamp").exists()
    done, calls, steps = run_suite(failed, "build", stamped=False, SUITE_DEADLINE_S="0")
    assert steps[-1] == ["build", "rc=0"], steps
    bare = tmp_path / "bare"
    bare.mkdir()
    done, calls, steps = run_suite(bare, "model", extension=False, SUITE_DEADLINE_S="0",
                                   SUITE_TIERS="1", SUITE_ONLY=only)
    assert steps == [["build", "rc=0"], [only, "rc=0"]], done.stdout + done.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    done, calls, steps = run_suite(broken, "model", extension=False, SUITE_DEADLINE_S="0",
                                   SUITE_TIERS="1", SUITE_ONLY=only, STUB_BUILD_FAILS="1")
    assert steps == [["build", "rc=0"], ["extension", "FAILED"], [only, "rc=0"]]
    assert done.returncode == 1


def test_unknown_group_is_an_error(tmp_path):
    done, calls, steps = run_suite(tmp_path, "build", "benchmark", SUITE_DEADLINE_S="0")
    assert done.returncode == 2 and "unknown group 'benchmark'" in done.stderr
    assert calls == [] and steps == []
