"""Benchmark of prototype selection: the package's kernel backends vs the eager reference.

Run from the repository root::

    python -m benchmarks.bench_prototype_select [--device cpu|cuda]
        [--dtype float32|bfloat16|float16] [--sizes 2048,8192,32768,131072] [--batch 1]
        [--queries 100] [--channels 256] [--heads 8] [--density 0.3] [--repeats N]
        [--out-dir DIR] [--backends reference,cpu] [--matmul-precision highest|high|medium]

Inputs per pixel count HW: keys [B, HW, C] and queries [B, N, C] standard normal (in ``--dtype``),
mask [B, N, HW] bool with each entry True with probability ``--density``. Backend ``reference``
is ``pem_kernels.reference.prototype_select_ref`` (eager, materializes the [B, heads, HW, N]
similarity); every other name is ``pem_kernels.prototype_select(..., backend=name)`` and is skipped,
with a note, when ``pem_kernels.available_backends("prototype_select", device, dtype)`` lacks it.

Per size and backend the table and the files report:

* ``median_ms`` / ``p20_ms`` / ``p80_ms``: latency of one call in milliseconds, rotating over
  ``input_sets`` pre-built input sets (enough to hold >= 128 MiB of inputs, 2 to 8 sets).
* ``speedup``: reference median / backend median (same run); ``-`` without a reference row.
* ``peak_mib``: peak extra memory of one call in MiB (2**20 bytes), see
  ``benchmarks.harness.measure_peak_memory``; ``mem_ratio``: backend peak / reference peak.
* ``gbps``: ``floor_bytes / median`` in GB/s (1e9 bytes/s), against the bandwidth floor, the bytes
  any implementation must move at minimum::

      floor_bytes = B*HW*C*s      (keys, read once)
                  + B*N*HW        (mask, 1 byte per bool)
                  + B*N*C*s       (queries, read once)
                  + B*N*C*s       (prototypes, written once)
                  + B*heads*N*8   (indices, int64, written once)

  with ``s`` the element size of ``--dtype``. The similarity tensor is not part of the floor.
* ``graph_ms`` / ``graph_gbps`` (CUDA only): the device time of one call replayed from a CUDA
  graph (``benchmarks.harness.measure_graph_time``: the kernels alone, no host work) and the
  bandwidth against the floor it achieves; the latency above includes the host's launch work
  whenever the GPU waits for it.
* ``host_ms`` (CUDA only): the host's time to issue one call (``harness.measure_host_time``, 20
  calls back to back): where it is above ``graph_ms``, it sets the latency. (On the H200 on
  2026-11-27 the Triton kernel's bf16 calls had latencies of about 0.14 ms up to 8192 px where
  the fp32 ones had 0.02-0.04, with device times of 0.02-0.04 ms for both: this column says
  whether the host is why.)
* ``indices_ok`` / ``mismatches``: checked once per size before timing, the backend's indices
  against the reference's evaluated in fp32 on the same values (a mismatch prints a warning, it
  does not abort). For half-precision inputs that is what the kernels compute (fp32 products
  and sums); the reference row itself then counts where its half-precision similarities pick
  differently among near-ties (at 32768 px in bf16 on the 2026-11-26 H200 run, when the check
  was against it, the CUDA and Triton kernels both differed from it in 14 of 6400 indices).

Default repeats adapt to the cost of a call: after warmup, one probe call is timed and
``repeats = clamp(time_budget / probe, min, max)`` (CPU: 6 s, 3..200; CUDA: 1 s, 20..1000), so the
default CPU sweep (four sizes, reference + cpu) takes about 2-3 minutes on 2 cores.
``--repeats N`` fixes the count. Results go to
``benchmarks/results/<YYYY-MM-DD>-<device-slug>/prototype_select.{json,csv}`` unless ``--out-dir``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any, Callable

import torch

from benchmarks import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SIZES = "2048,8192,32768,131072"
# Per device type: (seconds of timing per size and backend, min repeats, max repeats, warmup calls).
REPEAT_POLICY = {"cpu": (6.0, 3, 200, 1), "cuda": (1.0, 20, 1000, 10)}
ROTATION_BYTES = 128 * harness.MIB  # input sets rotate until they hold at least this much

TABLE_COLUMNS = [
    ("hw", "HW"),
    ("backend", "backend"),
    ("median_ms", "median ms", ".3f"),
    ("p20_ms", "p20 ms", ".3f"),
    ("p80_ms", "p80 ms", ".3f"),
    ("speedup", "speedup", ".2f"),
    ("peak_mib", "peak MiB", ".1f"),
    ("mem_ratio", "mem ratio", ".3f"),
    ("gbps", "GB/s", ".2f"),
    ("graph_ms", "graph ms", ".4f"),
    ("graph_gbps", "graph GB/s", ".1f"),
    ("host_ms", "host ms", ".4f"),
    ("repeats", "reps"),
    ("indices_ok", "idx ok"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_prototype_select",
        description="Prototype selection: pem_kernels backends vs the eager reference.",
    )
    harness.add_device_argument(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="pixel counts HW, comma-separated")
    parser.add_argument("--batch", type=int, default=1, help="B")
    parser.add_argument("--queries", type=int, default=100, help="N")
    parser.add_argument("--channels", type=int, default=256, help="C")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.3, help="fraction of True mask pixels")
    parser.add_argument("--empty", default="per_query", help="empty-query rule passed to the op")
    parser.add_argument("--normalize-keys", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: adaptive)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--input-sets", type=int, default=None, help="input sets to rotate over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", default=None, help="default: benchmarks/results/<date>-<device>"
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated; default: reference plus every available backend of the device",
    )
    harness.add_matmul_precision_argument(parser)
    args = parser.parse_args(argv)
    harness.checked_device(parser, args.device)
    args.sizes = harness.parse_positive_ints(parser, "--sizes", args.sizes)
    for option in ("batch", "queries", "channels", "heads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} {getattr(args, option)}: expected >= 1")
    if not 0.0 <= args.density <= 1.0:
        parser.error(f"--density {args.density}: expected a fraction in [0, 1]")
    if args.backends is not None:
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.channels % args.heads:
        parser.error(f"--channels {args.channels} is not divisible by --heads {args.heads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def floor_bytes(b: int, hw: int, n: int, c: int, heads: int, itemsize: int) -> int:
    """Minimum bytes moved by one call (see the module docstring)."""
    return b * hw * c * itemsize + b * n * hw + 2 * b * n * c * itemsize + b * heads * n * 8


def make_inputs(
    b: int, hw: int, n: int, c: int, density: float, dtype: torch.dtype, device: torch.device,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One input set: keys [B, HW, C], queries [B, N, C] (standard normal), mask [B, N, HW] bool."""
    keys = torch.randn(b, hw, c, generator=generator, device=device).to(dtype)
    queries = torch.randn(b, n, c, generator=generator, device=device).to(dtype)
    mask = torch.rand(b, n, hw, generator=generator, device=device) < density
    return keys, queries, mask


def resolve_backends(
    requested: list[str] | None, device: torch.device, dtype: torch.dtype
) -> list[str]:
    """The backends to run: ``reference`` always works; others must be listed as available."""
    try:
        import pem_kernels
    except ImportError as error:
        harness.note(f"note: cannot import pem_kernels ({error}); only 'reference' could run")
        pem_kernels = None
    available: list[str] = []
    if pem_kernels is not None and hasattr(pem_kernels, "available_backends"):
        available = list(pem_kernels.available_backends("prototype_select", device, dtype))
    elif pem_kernels is not None:
        harness.note("note: pem_kernels.available_backends is missing; only 'reference' can run")
    if requested is None:
        requested = ["reference"] + [b for b in available if b != "reference"]
    chosen = []
    for name in dict.fromkeys(requested):  # dedupe, keep order
        if name == "reference" or (name == "auto" and hasattr(pem_kernels, "prototype_select")):
            chosen.append(name)
        elif name in available:
            chosen.append(name)
        else:
            harness.note(
                f"note: skipping backend {name!r}: not available on {device} for {dtype} "
                f"(available: {', '.join(available) or 'none'})"
            )
    return chosen


def make_op(backend: str, heads: int, empty: str, normalize_keys: bool) -> Callable[..., Any]:
    """``op(keys, queries, mask) -> (prototypes, indices)`` for one backend name."""
    if backend == "reference":
        from pem_kernels.reference import prototype_select_ref

        def op(keys, queries, mask):
            return prototype_select_ref(
                keys, queries, mask, heads, empty=empty, normalize_keys=normalize_keys
            )

    else:
        import pem_kernels

        def op(keys, queries, mask):
            return pem_kernels.prototype_select(
                keys, queries, mask, heads, empty=empty, normalize_keys=normalize_keys,
                backend=backend,
            )

    return op


def run(
    args: argparse.Namespace, rows: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], int, int]:
    """Runs the sweep; returns (rows, number of backend runs that failed, number skipped at the
    deadline)."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    backends = resolve_backends(args.backends, device, dtype)
    if not backends:
        raise SystemExit("no backend to run")
    b, n, c, heads = args.batch, args.queries, args.channels, args.heads
    rows = [] if rows is None else rows  # the caller's list keeps the rows of an interrupted run
    failures = skipped = 0
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)

    bar = harness.progress(total=len(args.sizes) * len(backends), desc="prototype_select")
    with torch.no_grad(), bar:
        for hw in args.sizes:
            if harness.out_of_time():
                skipped += len(backends)
                bar.update(len(backends))
                continue
            bar.set_postfix_str(f"HW={hw}: inputs")
            floor = floor_bytes(b, hw, n, c, heads, itemsize)
            per_set = b * hw * c * itemsize + b * n * c * itemsize + b * n * hw
            sets = args.input_sets or harness.input_set_count(per_set, ROTATION_BYTES)
            inputs = [
                make_inputs(b, hw, n, c, args.density, dtype, device, generator)
                for _ in range(sets)
            ]
            bar.set_postfix_str(f"HW={hw}: reference check")
            ref_op = make_op("reference", heads, args.empty, args.normalize_keys)
            # In fp32 on the same values: what the kernels compute (fp32 products and sums) for
            # half-precision inputs too, where the reference's own half-precision matmul rounds
            # the similarities and picks differently among near-ties.
            ref_indices = ref_op(*(
                t.float() if t is not None and t.is_floating_point() else t for t in inputs[0]
            ))[1]
            size_rows: list[dict[str, Any]] = []
            for backend in backends:
                if harness.out_of_time():
                    skipped += 1
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"HW={hw}: {backend}")
                row: dict[str, Any] = {
                    "op": "prototype_select", "device": str(device), "dtype": args.dtype,
                    "batch": b, "hw": hw, "queries": n, "channels": c, "heads": heads,
                    "density": args.density, "empty": args.empty,
                    "normalize_keys": args.normalize_keys, "backend": backend,
                    "input_sets": sets, "floor_bytes": floor,
                }
                try:
                    op = make_op(backend, heads, args.empty, args.normalize_keys)
                    # Correctness check, also the first warmup call (the reference already ran).
                    indices = op(*inputs[0])[1]
                    harness.synchronize(device)
                    mismatches = (
                        int((indices != ref_indices).sum().item())
                        if indices.shape == ref_indices.shape
                        else ref_indices.numel()
                    )
                    row["indices_ok"] = mismatches == 0
                    row["mismatches"] = mismatches
                    if mismatches:
                        harness.note(
                            f"WARNING: HW={hw} backend={backend}: {mismatches} of "
                            f"{ref_indices.numel()} indices differ from the reference's in fp32"
                        )
                    del indices
                    row["peak_bytes"] = harness.measure_peak_memory(
                        functools.partial(op, *inputs[0]), device=device
                    )
                    row["peak_mib"] = row["peak_bytes"] / harness.MIB
                    warmup, repeats = harness.choose_repeats(
                        op, device=device, inputs=inputs, repeats=args.repeats, warmup=args.warmup,
                        policy=REPEAT_POLICY.get(device.type, REPEAT_POLICY["cpu"]),
                    )
                    timing = harness.measure_time(
                        op, device=device, warmup=warmup, repeats=repeats, inputs=inputs
                    )
                    row.update(timing)
                    row["warmup"] = warmup
                    row["gbps"] = floor / (timing["median_ms"] * 1e-3) / 1e9
                    if device.type == "cuda":
                        row["host_ms"] = harness.measure_host_time(
                            op, device=device, inputs=inputs
                        )
                        try:
                            row["graph_ms"] = harness.measure_graph_time(
                                op, device=device, inputs=inputs[0]
                            )
                            row["graph_gbps"] = floor / (row["graph_ms"] * 1e-3) / 1e9
                        except Exception as error:  # noqa: BLE001 - a column, not the row
                            row["graph_error"] = f"{type(error).__name__}: {error}"
                            harness.note(
                                f"WARNING: HW={hw} backend={backend}: no graph time ({error})"
                            )
                except Exception as error:  # noqa: BLE001 - report, keep sweeping
                    failures += 1
                    row["error"] = f"{type(error).__name__}: {error}"
                    harness.note(f"ERROR: HW={hw} backend={backend}: {row['error']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                size_rows.append(row)
                bar.update(1)
            ref_row = next(
                (r for r in size_rows if r["backend"] == "reference" and "median_ms" in r), None
            )
            harness.add_ratios(
                size_rows, baseline=ref_row, time_key="speedup", memory_key="mem_ratio"
            )
            rows += size_rows
            del inputs, ref_indices
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, failures, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.apply_matmul_precision(args)
    device = torch.device(args.device)
    started = time.perf_counter()
    meta = {
        "benchmark": "prototype_select",
        "environment": harness.environment_info(device),
        "config": {k: v for k, v in vars(args).items()},
        "bandwidth_floor": "B*HW*C*s + B*N*HW + 2*B*N*C*s + B*heads*N*8 bytes (s = dtype size)",
        "units": {"*_ms": "milliseconds", "peak_mib": "MiB", "peak_bytes": "bytes",
                  "gbps": "1e9 bytes/s vs floor_bytes", "graph_gbps": "the same, of graph_ms",
                  "speedup": "reference median / median",
                  "mem_ratio": "peak_bytes / reference peak_bytes"},
    }
    env = meta["environment"]
    print(
        f"prototype_select on {env['device_name']} ({device}, {env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch threads), dtype={args.dtype} B={args.batch} "
        f"N={args.queries} C={args.channels} heads={args.heads} density={args.density}",
        flush=True,
    )
    rows, failures, skipped = harness.run_until_interrupted(run, args, meta)
    return harness.report(
        rows, failures, meta=meta, started=started, columns=TABLE_COLUMNS,
        out_dir=args.out_dir or harness.default_out_dir(device), name="prototype_select",
        what="backend run", skipped=skipped,
    )


if __name__ == "__main__":
    sys.exit(main())
