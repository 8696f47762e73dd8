"""Where the time of one PEM-CA layer call goes: host (launch) time, device time, each kernel.

A latency benchmark gives one number per call; this splits it, so that a slow variant can be
told apart as host-bound (Python, dispatch and launch overhead: the GPU waits for work) or
device-bound (a slow kernel), and names its slowest kernels. Run from the repository root::

    python -m benchmarks.profile_pem_ca [--device cpu|cuda] [--dtype float32|bfloat16]
        [--sizes 32768] [--batch 1] [--modes forward] [--variants triton,cuda,reference,compiled]
        [--top 8] [--out-dir DIR]

Variants: ``triton``, ``cuda``, ``cpu`` (:class:`pem_kernels.nn.PEMCrossAttention` on that
backend), ``reference`` (backend="reference") and ``compiled`` (``torch.compile`` of reference);
the layers and inputs are those of :mod:`benchmarks.bench_pem_ca`. Per variant and size:

* ``wall_ms``: median latency as the benchmark measures it (CUDA events around each call);
* ``host_ms``, ``device_ms``, ``launches`` and the slowest kernels: see
  :func:`benchmarks.harness.profile_call` (on a GPU, when ``host_ms`` is close to ``wall_ms``
  the variant is host-bound).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from benchmarks import harness
from benchmarks.bench_pem_ca import DTYPES, make_inputs, make_layers, make_step

VARIANTS = ("triton", "cuda", "cpu", "reference", "compiled")
MODES = ("forward", "forward+backward")

TABLE_COLUMNS = [
    ("hw", "HW"),
    ("mode", "mode"),
    ("variant", "variant"),
    ("wall_ms", "wall ms", ".3f"),
    *harness.PROFILE_COLUMNS,
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_pem_ca",
        description="Host vs device time of one PEM-CA layer call, and its slowest kernels.",
    )
    harness.add_device_argument(parser)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="32768", help="comma-separated pixel counts HW")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", default="forward", help=f"comma-separated, from {MODES}")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    device = harness.checked_device(parser, args.device)
    if args.variants is None:
        args.variants = (
            "triton,cuda,reference,compiled" if device.type == "cuda" else "cpu,reference"
        )
    try:
        args.sizes = [int(size) for size in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if any(size < 2 for size in args.sizes):
        parser.error(f"--sizes: every size must be >= 2, got {args.sizes}")
    args.modes, args.variants = args.modes.split(","), args.variants.split(",")
    for name, values, allowed in (
        ("--modes", args.modes, MODES), ("--variants", args.variants, VARIANTS)
    ):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"{name}: unknown {unknown}, expected from {allowed}")
    if args.batch < 1 or args.top < 1:
        parser.error(f"--batch and --top must be >= 1, got {args.batch} and {args.top}")
    return args


def make_variant(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    backend = "reference" if name in ("reference", "compiled") else name
    layer = make_layers(device, dtype, backend)["fused"]
    return torch.compile(layer) if name == "compiled" else layer


def run(
    args: argparse.Namespace, rows: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], int, int]:
    """Profiles every (size, variant, mode); returns (rows, failed runs, runs skipped at the
    deadline)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    rows = [] if rows is None else rows  # the caller's list keeps the rows of an interrupted run
    failures = skipped = 0
    total = len(args.sizes) * len(args.modes) * len(args.variants)
    with harness.progress(total=total, desc="profile pem_ca") as bar:
        for hw in args.sizes:
            inputs = [make_inputs(args.batch, hw, device, dtype, generator) for _ in range(2)]
            for variant in args.variants:
                if variant == "compiled":
                    torch._dynamo.reset()
                layer = None
                for mode in args.modes:
                    if harness.out_of_time():
                        skipped += 1
                        bar.update(1)
                        continue
                    bar.set_postfix_str(f"HW={hw} {mode} {variant}")
                    row: dict[str, Any] = {
                        "op": "pem_ca_profile", "device": str(device), "dtype": args.dtype,
                        "batch": args.batch, "hw": hw, "mode": mode, "variant": variant,
                    }
                    try:
                        if layer is None:  # not "layer or": a compiled module has no truth
                            layer = make_variant(variant, device, dtype)
                        step = make_step(layer, mode)
                        timing = harness.measure_time(
                            step, device=device, warmup=3, repeats=20, inputs=inputs
                        )
                        row["wall_ms"] = timing["median_ms"]
                        row.update(
                            harness.profile_call(step, device=device, inputs=inputs, top=args.top)
                        )
                    except Exception as error:  # noqa: BLE001 - report it, keep going
                        failures += 1
                        row["error"] = f"{type(error).__name__}: {error}"
                        harness.note(f"ERROR: HW={hw} {mode} {variant}: {row['error']}")
                    rows.append(row)
                    bar.update(1)
            del inputs
    return rows, failures, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    meta = {
        "benchmark": "pem_ca_profile",
        "environment": harness.environment_info(device),
        "config": dict(vars(args)),
        "units": {
            "*_ms": "milliseconds per layer call", "launches": "kernels (CPU: ATen ops) per call"
        },
    }
    print(
        f"PEM-CA profile on {meta['environment']['device_name']} ({device}), dtype={args.dtype} "
        f"B={args.batch}: host vs device time per call",
        flush=True,
    )
    rows, failures, skipped = harness.run_until_interrupted(run, args, meta)
    return harness.report(
        rows, failures, meta=meta, started=started, columns=TABLE_COLUMNS,
        out_dir=args.out_dir or harness.default_out_dir(device), name="pem_ca_profile",
        what="variant run", skipped=skipped,
    )


if __name__ == "__main__":
    sys.exit(main())
