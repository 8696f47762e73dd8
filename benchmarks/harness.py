"""Shared harness of the pem_kernels benchmark scripts.

Units, everywhere in this module: times in milliseconds (``*_ms``), memory in bytes (``*_bytes``;
scripts convert to MiB for display), bandwidth in GB/s (1e9 bytes per second).

* :func:`measure_time` -- median / p20 / p80 latency of a callable, CUDA events on GPU,
  ``time.perf_counter`` on CPU, optionally rotating over several pre-built input sets.
* :func:`measure_peak_memory` -- peak extra bytes allocated during one call.
* :func:`environment_info` -- device, versions, git commit, command line, UTC timestamp.
* :func:`write_results` / :func:`print_table` -- JSON + CSV files and an aligned text table.
* :func:`progress` / :func:`note` -- a tqdm bar on stderr for sweeps, and messages that do not
  break it.
* :func:`time_scale` / :func:`out_of_time` -- the two knobs a time-boxed run (the GPU suite) sets
  through the environment: ``PEM_BENCH_TIME_SCALE`` scales every adaptive timing budget, and
  ``PEM_BENCH_DEADLINE`` (seconds since the epoch) makes sweeps start no new row after it, so a
  benchmark ends with partial results written instead of being killed with none.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from pem.cli import device_text

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2

__all__ = [
    "MIB",
    "REPO_ROOT",
    "adaptive_repeats",
    "add_device_argument",
    "add_matmul_precision_argument",
    "add_ratios",
    "apply_matmul_precision",
    "checked_device",
    "choose_repeats",
    "default_out_dir",
    "device_slug",
    "environment_info",
    "input_set_count",
    "measure_peak_memory",
    "measure_time",
    "note",
    "out_of_time",
    "print_table",
    "run_until_interrupted",
    "progress",
    "synchronize",
    "time_scale",
    "write_results",
]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    """Waits for all queued work on ``device`` (no-op on CPU, where torch ops are synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(
    fn: Callable[..., Any],
    *,
    device: torch.device | str,
    warmup: int = 3,
    repeats: int = 10,
    inputs: Sequence[Sequence[Any]] | None = None,
) -> dict[str, float]:
    """Times ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    With ``inputs`` (a list of pre-built argument tuples) call ``i`` (counting warmup calls too)
    runs ``fn(*inputs[i % len(inputs)])``, so consecutive calls touch different memory and caches
    do not flatter small problems; without it ``fn()`` is called.

    On CUDA each call is bracketed by two CUDA events on the current stream (GPU time between them,
    including any stall waiting for the host to launch the work) and the device is synchronized
    before the first and after the last call; on CPU ``time.perf_counter`` brackets each call.

    Returns ``{"median_ms", "p20_ms", "p80_ms", "min_ms", "mean_ms", "repeats"}`` with times in
    milliseconds (p20/p80: 20th/80th percentiles, linear interpolation).
    """
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if inputs is not None and len(inputs) == 0:
        raise ValueError("inputs must hold at least one argument tuple")
    counter = 0

    def call() -> None:
        nonlocal counter
        args = () if inputs is None else inputs[counter % len(inputs)]
        counter += 1
        fn(*args)

    for _ in range(warmup):
        call()
    synchronize(device)

    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends):
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(device)
        times_ms = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    else:
        times_ms = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            synchronize(device)
            times_ms.append((time.perf_counter() - t0) * 1e3)

    times = np.asarray(times_ms, dtype=np.float64)
    median, p20, p80 = np.percentile(times, [50, 20, 80])
    return {
        "median_ms": float(median),
        "p20_ms": float(p20),
        "p80_ms": float(p80),
        "min_ms": float(times.min()),
        "mean_ms": float(times.mean()),
        "repeats": int(repeats),
    }


# print_table columns of the fields profile_call adds to a row.
PROFILE_COLUMNS = [
    ("host_ms", "host ms", ".3f"),
    ("device_ms", "device ms", ".3f"),
    ("launches", "launches"),
    ("host_syncs", "syncs"),
    ("top_kernels", "slowest kernels (ms per call, launches)"),
]


def measure_host_time(
    fn: Callable[..., Any],
    *,
    device: torch.device | str,
    inputs: Sequence[Sequence[Any]],
    calls: int = 20,
) -> float:
    """The host's time in ms per call to issue ``fn(*inputs[i % len(inputs)])``: ``calls``
    back-to-back calls with no synchronization inside, the device synchronized before and after
    (outside the timing). On a GPU a value close to the call's latency means the call is
    host-bound."""
    device = torch.device(device)
    synchronize(device)
    started = time.perf_counter()
    for i in range(calls):
        fn(*inputs[i % len(inputs)])
    host_ms = (time.perf_counter() - started) * 1e3 / calls
    synchronize(device)
    return host_ms


def profile_call(
    fn: Callable[..., Any],
    *,
    device: torch.device | str,
    inputs: Sequence[Sequence[Any]],
    host_calls: int = 20,
    profiled_calls: int = 10,
    top: int = 8,
) -> dict[str, Any]:
    """Splits the time of ``fn(*inputs[i % len(inputs)])`` into host and device time.

    Returns ``host_ms`` (the host's time per call to issue it: ``host_calls`` back-to-back calls
    with no synchronization inside, so on a GPU a value close to the call's latency means the call
    is host-bound), ``device_ms`` (CUDA only: the summed time of its device kernels per call, from
    ``torch.profiler``), ``launches`` (kernels per call; on a CPU, ATen ops), ``kernels`` (every
    kernel, on a CPU every ATen op by self time, as ``{"name", "ms", "launches"}`` per call,
    slowest first), ``top_kernels`` (the ``top`` slowest as one line of text) and, on CUDA,
    ``host_syncs`` (:func:`count_host_syncs` of one call: a call that synchronizes is host time
    plus device time, however fast its kernels).
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    host_ms = measure_host_time(fn, device=device, inputs=inputs, calls=host_calls)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for i in range(profiled_calls):
            fn(*inputs[i % len(inputs)])
        synchronize(device)
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if on_cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            duration_us = event.device_time
        else:
            is_aten_op = event.name.startswith("aten::")
            if event.device_type != torch.autograd.DeviceType.CPU or not is_aten_op:
                continue
            duration_us = event.self_cpu_time_total
        entry = totals.setdefault(event.name, [0.0, 0.0])
        entry[0] += duration_us / 1e3 / profiled_calls
        entry[1] += 1 / profiled_calls
    kernels = sorted(
        ({"name": name, "ms": ms, "launches": count} for name, (ms, count) in totals.items()),
        key=lambda k: -k["ms"],
    )

    def short(name: str, width: int = 48) -> str:
        return name if len(name) <= width else name[: width - 3] + "..."

    result: dict[str, Any] = {
        "host_ms": host_ms,
        "launches": round(sum(k["launches"] for k in kernels), 1),
        "kernels": kernels,
        "top_kernels": "; ".join(
            f"{short(k['name'])} {k['ms']:.3f} x{k['launches']:g}" for k in kernels[:top]
        ),
    }
    if on_cuda:
        result["device_ms"] = sum(k["ms"] for k in kernels)
        result["host_syncs"] = count_host_syncs(fn, inputs[0])
    return result


def count_host_syncs(fn: Callable[..., Any], args: Sequence[Any]) -> int:
    """How many times ``fn(*args)`` makes the host wait for the GPU, as counted by
    ``torch.cuda.set_sync_debug_mode("warn")`` (device-to-host copies, ``.item()``, blocking
    host-to-device copies, stream and device synchronizations that go through torch). CUDA
    only; restores the previous debug mode."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def measure_graph_time(
    fn: Callable[..., Any],
    *,
    device: torch.device | str,
    inputs: Sequence[Any] = (),
    repeats: int = 20,
) -> float:
    """Median device time in ms of ``fn(*inputs)`` replayed from a CUDA graph: the kernels' own
    time, without the host's Python, dispatch and launch work (which :func:`measure_time`
    includes when the GPU waits for it). CUDA only; raises what the capture raises for code a
    graph cannot hold. The same input set every replay (a graph is bound to its tensors)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: CUDA graphs need a CUDA device, got {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*inputs)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    graph.replay()
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    times = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    del graph
    return float(np.median(times))


MATMUL_PRECISIONS = ("highest", "high", "medium")


def parse_positive_ints(parser: Any, option: str, text: str) -> list[int]:
    """The comma-separated integers >= 1 of ``option`` (e.g. ``--sizes``), or ``parser.error``
    naming the option and the value: a bad size should not surface as a traceback or as every
    provider failing on an empty tensor."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        parser.error(f"{option} {text}: expected comma-separated integers")
    if not values or min(values) < 1:
        parser.error(f"{option} {text}: expected integers >= 1")
    return values


def add_device_argument(parser: Any) -> None:
    """``--device`` (default cuda when torch sees a GPU, else cpu); check it with
    :func:`checked_device` after parsing."""
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_text,
        help="cpu, cuda or cuda:N (default: cuda when available)",
    )


def checked_device(parser: Any, text: str) -> torch.device:
    """The parsed ``--device``, or ``parser.error`` when it names CUDA on a machine without."""
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {text}: CUDA is not available")
    return device


def add_matmul_precision_argument(parser: Any) -> None:
    """``--matmul-precision``: ``torch.set_float32_matmul_precision`` for the whole run. fp32
    products of PyTorch's matmuls and of the Triton kernels follow it ("high"/"medium": TF32 on
    tensor cores; "highest": IEEE for PyTorch, 3xTF32 for the Triton and CUDA kernels unless
    ``PEM_KERNELS_FP32_DOT=ieee``); every result records both
    (``environment.float32_matmul_precision``, ``environment.triton_fp32_dot``)."""
    parser.add_argument(
        "--matmul-precision", choices=MATMUL_PRECISIONS, default=None,
        help="torch.set_float32_matmul_precision for the run (default: leave torch's setting)",
    )


def _triton_fp32_dot() -> str | None:
    from pem_kernels.triton import fp32_dot_precision

    try:
        return fp32_dot_precision()
    except ValueError as error:  # a bad PEM_KERNELS_FP32_DOT: the kernels will say so
        return f"invalid ({error})"


def apply_matmul_precision(args: Any) -> None:
    if args.matmul_precision is not None:
        torch.set_float32_matmul_precision(args.matmul_precision)


def _positive_float_from_env(name: str) -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ValueError(f"environment variable {name}={text!r}: expected a positive number")
    return value


def time_scale() -> float:
    """Factor on every adaptive timing budget (:func:`adaptive_repeats`), from the environment
    variable ``PEM_BENCH_TIME_SCALE`` (default 1). The GPU suite sets it below 1 to fit its time
    box; the repeat counts stay clamped to each benchmark's minimum, and every row records the
    repeats it got."""
    scale = _positive_float_from_env("PEM_BENCH_TIME_SCALE")
    return 1.0 if scale is None else scale


def out_of_time() -> bool:
    """True once the wall-clock deadline ``PEM_BENCH_DEADLINE`` (seconds since the epoch, as
    ``date +%s`` prints) has passed; never without it. Sweeps check it before each row and skip
    the rest (counted, reported by :func:`report`), so a time-boxed run keeps what it measured."""
    deadline = _positive_float_from_env("PEM_BENCH_DEADLINE")
    return deadline is not None and time.time() >= deadline


def input_set_count(per_set_bytes: int, least_bytes: int, most: int = 8) -> int:
    """How many input sets a benchmark rotates over: enough that together they hold at least
    ``least_bytes`` (more than the GPU's L2 or the CPU's last-level cache, so that no provider
    is timed on a warm cache), at least 2 and at most ``most``."""
    return max(2, min(most, math.ceil(least_bytes / max(per_set_bytes, 1))))


def run_until_interrupted(
    run: Callable[..., tuple[list[dict[str, Any]], int, int]], args: Any, meta: dict[str, Any]
) -> tuple[list[dict[str, Any]], int, int]:
    """``run(args, rows)`` -> (rows, failures, skipped), where ``run`` adds every finished row to
    the list ``rows``. A SIGINT (Ctrl-C, or the GPU suite's ``timeout -s INT`` at a step's limit)
    in the middle of a row ends the sweep with the rows finished so far: ``meta["interrupted"]``
    is set, the failures are the rows with an ``error``, and :func:`report` writes the rows and
    exits 3 (1 with a failure) instead of the benchmark losing them. (Under ``timeout`` the step
    is still recorded as timed out: timeout reports its own status.)"""
    rows: list[dict[str, Any]] = []
    try:
        return run(args, rows)
    except KeyboardInterrupt:
        meta["interrupted"] = True
        return rows, sum("error" in row for row in rows), 0


def adaptive_repeats(
    fn: Callable[..., Any],
    *,
    device: torch.device | str,
    budget_s: float,
    min_repeats: int,
    max_repeats: int,
    warmup: int = 1,
    inputs: Sequence[Sequence[Any]] | None = None,
) -> int:
    """Repeats that fit ``budget_s`` x :func:`time_scale` seconds of timing, from one timed probe
    call after ``warmup`` untimed ones, clamped to [min_repeats, max_repeats]. The probe also
    warms ``fn`` up."""
    probe = measure_time(fn, device=device, warmup=warmup, repeats=1, inputs=inputs)
    repeats = int(budget_s * time_scale() * 1e3 / max(probe["median_ms"], 1e-3))
    return max(min_repeats, min(max_repeats, repeats))


def choose_repeats(
    fn: Callable[..., Any],
    *,
    device: torch.device | str,
    policy: tuple[float, int, int, int],
    inputs: Sequence[Sequence[Any]] | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
) -> tuple[int, int]:
    """(warmup, repeats) for :func:`measure_time`. ``policy`` is (time budget s, min repeats, max
    repeats, warmup calls); explicit ``repeats`` / ``warmup`` win. Without ``repeats`` one probe
    call fits the count to the budget; it also warms up, so the returned warmup is then 0."""
    budget_s, lo, hi, default_warmup = policy
    warmup = default_warmup if warmup is None else warmup
    if repeats is not None:
        return warmup, repeats
    fitted = adaptive_repeats(
        fn, device=device, budget_s=budget_s, min_repeats=lo, max_repeats=hi, warmup=warmup,
        inputs=inputs,
    )
    return 0, fitted


def add_ratios(
    rows: list[dict[str, Any]], *, baseline: dict[str, Any] | None, time_key: str, memory_key: str
) -> None:
    """Sets ``row[time_key]`` = baseline median / row median and ``row[memory_key]`` = row peak /
    baseline peak on every row (None where either side is missing)."""
    for row in rows:
        timed = baseline is not None and "median_ms" in baseline and "median_ms" in row
        row[time_key] = baseline["median_ms"] / row["median_ms"] if timed else None
        measured = (
            baseline is not None and baseline.get("peak_bytes", 0) > 0 and "peak_bytes" in row
        )
        row[memory_key] = row["peak_bytes"] / baseline["peak_bytes"] if measured else None


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def measure_peak_memory(fn: Callable[[], Any], *, device: torch.device | str) -> int:
    """Peak extra bytes allocated while ``fn()`` runs once, beyond what was allocated before.

    Whatever ``fn`` returns counts (it was allocated during the call) and is freed afterwards.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
      ``memory_allocated`` before the call (caching-allocator bytes handed to tensors, not bytes
      reserved from the driver).
    * CPU: the call runs under ``torch.profiler.profile(profile_memory=True)``; the allocator's
      raw memory records (``prof.profiler.kineto_results.events()`` named ``"[memory]"``, one per
      allocation (+bytes) or free (-bytes), with a nanosecond timestamp) are replayed in
      chronological order and the maximum of the running sum of live bytes is the peak. Frees of
      memory allocated before the call make the running sum dip below 0, which is fine: the peak
      is measured from the starting level and clipped at 0. Only allocations made through c10's
      CPU allocator on threads the profiler follows are seen (torch ops and extension kernels
      allocating via ATen: yes; raw malloc inside a kernel: no).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return max(0, int(peak - baseline))
    if device.type != "cpu":
        raise NotImplementedError(f"peak memory on device type {device.type!r}")

    from torch.profiler import ProfilerActivity, profile

    with _filtered_stderr(_KINETO_NOISE):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
    return _cpu_peak_from_profile(prof)


# Kineto's start/stop chatter (and its failed GPU probe on machines without one), written straight
# to file descriptor 2 on every profiler start/stop.
_KINETO_NOISE = re.compile(
    r"^(USDT:.*SyncActivityProfilerHandler|ERROR:.*gpuGetDeviceCount failed)"
)


@contextlib.contextmanager
def _filtered_stderr(drop: re.Pattern[str]):
    """Captures file descriptor 2 meanwhile, then re-emits every line not matching ``drop``."""
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreter): leave stderr alone
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved_fd, 2)
                os.close(saved_fd)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not drop.search(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _cpu_peak_from_profile(prof: Any) -> int:
    """Maximum running sum of CPU allocation/free records of a finished profile, in bytes."""
    records: list[tuple[int, int, int]] = []  # (time_ns, position, signed bytes)
    kineto_results = getattr(prof.profiler, "kineto_results", None)
    if kineto_results is not None:
        for position, event in enumerate(kineto_results.events()):
            if event.name() != "[memory]":
                continue
            if not str(event.device_type()).upper().endswith("CPU"):  # DeviceType.CPU
                continue
            records.append((int(event.start_ns()), position, int(event.nbytes())))
    else:  # pragma: no cover - older/newer profiler without raw results: coarser, per-op net bytes.
        for position, event in enumerate(prof.events()):
            if event.name == "[memory]":
                nbytes = event.cpu_memory_usage
            elif not event.cpu_children:
                nbytes = event.self_cpu_memory_usage
            else:
                continue
            if nbytes:
                records.append((int(event.time_range.start * 1e3), position, int(nbytes)))
    records.sort()
    live = peak = 0
    for _, _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git_commit() -> str | None:
    """Short sha of HEAD plus ``-dirty`` when the tree has changes; None without git or commits."""
    sha = _git("rev-parse", "--short", "HEAD")
    if not sha:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return sha + ("-dirty" if dirty else "")


def device_name(device: torch.device | str) -> str:
    """Human-readable name of ``device``: the GPU's name on CUDA, the CPU model otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_slug(device: torch.device | str) -> str:
    """File-name-safe device tag, e.g. ``cpu-amd-epyc`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    device = torch.device(device)
    name = re.sub(r"\((r|tm|c)\)|\bcpu\b|@.*$|\bprocessor\b", "", device_name(device).lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40].strip("-")
    return f"{device.type}-{name}" if name else device.type


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran.

    ``device`` defaults to the first CUDA GPU when one is available, else the CPU. Keys:
    ``device``, ``device_name`` (GPU name or CPU model), ``cpu_model``, ``cpu_cores``
    (``os.cpu_count()``), ``torch_threads``, ``torch``, ``triton`` (None when absent), ``cuda``
    (torch's CUDA version, None on CPU builds), ``gpu_capability`` / ``gpu_memory_bytes`` /
    ``gpu_peak_bandwidth_gbps`` (CUDA only; the last where torch reports the memory clock),
    ``float32_matmul_precision``, ``triton_fp32_dot`` (CUDA only: see
    :func:`pem_kernels.triton.fp32_dot_precision`), ``python``, ``platform``, ``git_commit``
    (short sha, ``-dirty`` with uncommitted changes to tracked files, None without git or
    commits), ``command`` (exact command line, shell-quoted), ``argv`` (the list),
    ``timestamp_utc`` (ISO 8601).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton missing or broken: just not reported
        triton_version = None
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # "highest" = IEEE fp32 matmuls; "high"/"medium" let torch and the Triton kernels use TF32.
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        # The Triton kernels' fp32 products on a GPU: "tf32x3" (fp32 accuracy), "tf32" or "ieee";
        # the CUDA kernels' tensor-core products follow the same rule.
        "triton_fp32_dot": _triton_fp32_dot() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "command": shlex.join(argv),
        "argv": argv,
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_bytes"] = int(props.total_memory)
        # Peak memory bandwidth in GB/s: two transfers per memory clock (kHz) over the bus
        # (bits), the CUDA samples' formula; what benchmarks.goals holds achieved GB/s against.
        clock_khz = getattr(props, "memory_clock_rate", 0)
        bus_bits = getattr(props, "memory_bus_width", 0)
        if clock_khz and bus_bits:
            info["gpu_peak_bandwidth_gbps"] = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return info


def default_out_dir(device: torch.device | str) -> Path:
    """``benchmarks/results/<YYYY-MM-DD (UTC)>-<device slug>`` under the repository root."""
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return REPO_ROOT / "benchmarks" / "results" / f"{today}-{device_slug(device)}"


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Strict-JSON version of ``value``: non-finite floats become None, tensors/numpy scalars
    become Python numbers, paths/devices/dtypes become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, type(None), str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    return str(value)


def write_results(
    rows: list[dict[str, Any]],
    out_dir: str | os.PathLike,
    name: str,
    meta: dict[str, Any],
) -> tuple[Path, Path]:
    """Writes ``<out_dir>/<name>.json`` (``{"meta": meta, "rows": rows}``) and ``<name>.csv``.

    The CSV has one column per key seen in any row (first-seen order); missing values and None
    are empty cells; list/dict values are JSON-encoded. Non-finite floats are written as JSON null
    (empty in the CSV). Returns ``(json_path, csv_path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    clean_rows = _jsonable(list(rows))
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump({"meta": _jsonable(meta), "rows": clean_rows}, handle, indent=2, allow_nan=False)
        handle.write("\n")
    columns: list[str] = []
    for row in clean_rows:
        columns += [key for key in row if key not in columns]
    with open(csv_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in clean_rows:
            writer.writerow(
                {
                    key: json.dumps(value) if isinstance(value, (list, dict)) else value
                    for key, value in row.items()
                }
            )
    return json_path, csv_path


Column = str | tuple[str, str] | tuple[str, str, str | Callable[[Any], str]]


def report(
    rows: list[dict[str, Any]],
    failures: int,
    *,
    meta: dict[str, Any],
    started: float,
    columns: Sequence[Column],
    out_dir: str | os.PathLike,
    name: str,
    what: str = "run",
    skipped: int = 0,
    replaced: bool | None = None,
) -> int:
    """The end of every benchmark command: the elapsed time into ``meta``, the table, the JSON and
    CSV files (:func:`write_results`), where they went, and the exit status: 1 when any of the
    ``failures`` (``what``-s, e.g. backend runs) failed, else 3 when ``skipped`` of them were
    left out at the deadline (:func:`out_of_time`; recorded as ``meta["skipped_at_deadline"]``),
    else 0. ``replaced``: whether the files existed before this run (default: checked here;
    a benchmark that saves as it goes checks before its first save)."""
    meta["elapsed_s"] = time.perf_counter() - started
    if skipped:
        meta["skipped_at_deadline"] = skipped
    print_table(rows, columns)
    if meta.get("interrupted"):
        print(f"interrupted (SIGINT): wrote the {len(rows)} rows finished before it",
              file=sys.stderr)
    if replaced is None:
        replaced = (Path(out_dir) / f"{name}.json").exists()
    json_path, csv_path = write_results(rows, out_dir, name, meta)
    print(f"wrote {json_path} and {csv_path} ({meta['elapsed_s']:.0f} s)", flush=True)
    if replaced:
        # The default folder is per date and device: a second run of the same benchmark that
        # day (another --dtype, say) replaces the first one's files.
        print(f"note: this replaced the {name} results of an earlier run in {out_dir}; pass "
              "--out-dir to keep runs apart", file=sys.stderr)
    if failures:
        print(f"{failures} {what}(s) failed", file=sys.stderr)
    if skipped:
        print(f"{skipped} {what}(s) not run: PEM_BENCH_DEADLINE passed", file=sys.stderr)
    return 1 if failures else 3 if skipped or meta.get("interrupted") else 0


def _format_cell(value: Any, fmt: str | Callable[[Any], str] | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if callable(fmt):
        return fmt(value)
    if fmt:
        return format(value, fmt)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e5 else f"{value:.4g}"
    return str(value)


def print_table(
    rows: Iterable[dict[str, Any]], columns: Sequence[Column], *, file: Any = None
) -> str:
    """Prints ``rows`` as an aligned plain-text table (to stdout by default) and returns the text.

    Each column is a row key, ``(key, header)`` or ``(key, header, fmt)`` where ``fmt`` is a
    format spec (``".2f"``) or a callable. Numbers are right-aligned, text left-aligned; missing
    values show as ``-``.
    """
    specs = []
    for column in columns:
        if isinstance(column, str):
            specs.append((column, column, None))
        elif len(column) == 2:
            specs.append((column[0], column[1], None))
        else:
            specs.append(tuple(column))
    rows = list(rows)
    cells = [[_format_cell(row.get(key), fmt) for key, _, fmt in specs] for row in rows]
    numeric = [
        all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
        for key, _, _ in specs
    ]
    widths = [
        max([len(header)] + [len(line[i]) for line in cells])
        for i, (_, header, _) in enumerate(specs)
    ]

    def render(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(width) if is_num else value.ljust(width)
            for value, width, is_num in zip(values, widths, numeric)
        ).rstrip()

    lines = [render([header for _, header, _ in specs]), "  ".join("-" * w for w in widths)]
    lines += [render(line) for line in cells]
    text = "\n".join(lines)
    print(text, file=file if file is not None else sys.stdout, flush=True)
    return text


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class _NoBar:
    """Stand-in for a tqdm bar when tqdm is missing: iterates, ignores updates."""

    def __init__(self, iterable: Iterable[Any] | None = None, **_: Any) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    disable: bool | None = None,
) -> Any:
    """A tqdm progress bar on stderr for sweeps (use as an iterator or ``with`` + ``update()``).

    ``disable=None`` (default) hides the bar when stderr is not a terminal; set the environment
    variable ``PEM_BENCH_PROGRESS=1`` to force it on, ``0`` to force it off.
    """
    forced = os.environ.get("PEM_BENCH_PROGRESS")
    if forced is not None and forced != "":
        disable = forced.lower() in ("0", "false", "no", "off")
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a bench dependency
        return _NoBar(iterable)
    return tqdm(
        iterable, total=total, desc=desc, file=sys.stderr, disable=disable, dynamic_ncols=True
    )


def note(message: str) -> None:
    """Prints ``message`` to stdout without garbling an active progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
    except ImportError:  # pragma: no cover
        print(message)
    sys.stdout.flush()
