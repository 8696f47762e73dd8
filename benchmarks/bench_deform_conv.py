"""Benchmark of deformable convolution (DCNv2): pem_kernels backends vs torchvision, reference.

Run from the repository root::

    python -m benchmarks.bench_deform_conv [--device cpu|cuda]
        [--dtype float32|bfloat16|float16] [--mode forward|forward+backward] [--batch 1,8]
        [--sizes 512x512/32,1024x2048/16,...] [--channels 128] [--channels-last] [--repeats N]
        [--out-dir DIR] [--backends reference,cpu,torchvision]

Shapes are those of PEM's deformable pixel decoder: C_in = C_out = ``--channels`` (128), a 3x3
kernel with padding 1, stride 1, one offset group, with a modulation mask and a bias, on the
feature maps at strides 32, 16 and 8 of a 1024x2048 (Cityscapes) and a 512x512 (ADE20K) image.
A size ``IMAGExIMAGE/STRIDE`` means the feature map ``IMAGE_H / STRIDE x IMAGE_W / STRIDE``.
Inputs: features standard normal, offsets 2 * standard normal (so samples leave the image near
its border), mask uniform in [0, 1), weight scaled by 1/sqrt(fan_in), bias standard normal.

Backends: ``reference`` is ``pem_kernels.reference.deform_conv2d_ref`` (eager, builds the full
column tensor); ``torchvision`` is ``torchvision.ops.deform_conv2d``; every other name is
``pem_kernels.deform_conv2d(..., backend=name)`` and is skipped, with a note, when
``pem_kernels.available_backends("deform_conv2d", device, dtype)`` lacks it.

Per size and backend the table and the files report:

* ``median_ms`` / ``p20_ms`` / ``p80_ms``: latency of one call (``--mode forward``) or of one
  forward plus backward of all five inputs (``--mode forward+backward``), in milliseconds,
  rotating over ``input_sets`` pre-built input sets (enough to hold >= 64 MiB, 2 to 8 sets).
* ``vs_tv``: torchvision median / backend median (same run; > 1 means faster than torchvision).
* ``peak_mib``: peak extra memory of one call in MiB (2**20 bytes), see
  ``benchmarks.harness.measure_peak_memory``; ``mem_vs_tv``: backend peak / torchvision peak.
* ``gflops``: 2 * B * C_out * C_in * 9 * H * W (x3 with backward) / median, in 1e9 flop/s: the
  dense convolution's arithmetic, a yardstick rather than the kernels' true operation count.
* ``max_err``: checked once per size before timing, the largest absolute difference of the
  backend's output from the reference's (or torchvision's when the reference is not run).

Default repeats adapt to the cost of a call: after warmup, one probe call is timed and
``repeats = clamp(time_budget / probe, min, max)`` (CPU: 4 s, 3..100; CUDA: 1 s, 20..1000).
``--repeats N`` fixes the count. Batches default to 1 and 8 on CUDA; the default CPU sweep runs
batch 1 only and skips the 1024x2048/8 feature map (where the reference takes seconds and about
600 MiB per call), so it finishes in a few minutes on 2 cores; pass ``--batch`` / ``--sizes`` to
widen it. Results go to ``benchmarks/results/<YYYY-MM-DD>-<device-slug>/deform_conv.{json,csv}``
(``deform_conv_forward_backward.{json,csv}`` with ``--mode forward+backward``) unless
``--out-dir``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from typing import Any, Callable

import torch

from benchmarks import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("forward", "forward+backward")
ALL_SIZES = (
    "512x512/32", "512x512/16", "512x512/8", "1024x2048/32", "1024x2048/16", "1024x2048/8",
)
# The CPU default leaves out the largest map (see the module docstring).
DEFAULT_CPU_SIZES = ALL_SIZES[:-1]
KERNEL = 3
# Per device type: (seconds of timing per size and backend, min repeats, max repeats, warmup calls).
REPEAT_POLICY = {"cpu": (4.0, 3, 100, 1), "cuda": (1.0, 20, 1000, 10)}
ROTATION_BYTES = 64 * harness.MIB
TORCHVISION = "torchvision"
# The tensors of one call, in the positional order of torchvision.ops.deform_conv2d.
CONV_TENSORS = ("input", "offset", "weight", "bias", "mask")

TABLE_COLUMNS = [
    ("batch", "B"),
    ("size", "size"),
    ("shape", "input"),
    ("backend", "backend"),
    ("median_ms", "median ms", ".2f"),
    ("p20_ms", "p20 ms", ".2f"),
    ("p80_ms", "p80 ms", ".2f"),
    ("vs_tv", "vs tv", ".2f"),
    ("peak_mib", "peak MiB", ".1f"),
    ("mem_vs_tv", "mem vs tv", ".3f"),
    ("gflops", "GFLOP/s", ".1f"),
    ("max_err", "max err", ".1e"),
    ("repeats", "reps"),
]


def parse_size(text: str) -> tuple[str, int, int]:
    """``"1024x2048/16"`` -> (label, feature height, feature width)."""
    try:
        image, stride = text.split("/")
        image_h, image_w = (int(v) for v in image.lower().split("x"))
        stride_value = int(stride)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected IMAGE_HxIMAGE_W/STRIDE, e.g. 1024x2048/16"
        ) from None
    if min(image_h, image_w, stride_value) < 1 or image_h % stride_value or image_w % stride_value:
        raise argparse.ArgumentTypeError(f"size {text!r}: the stride must divide the image size")
    return text, image_h // stride_value, image_w // stride_value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_deform_conv",
        description="Deformable convolution: pem_kernels backends vs torchvision and reference.",
    )
    harness.add_device_argument(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--mode", choices=MODES, default="forward")
    parser.add_argument(
        "--sizes", default=None,
        help="comma-separated IMAGE_HxIMAGE_W/STRIDE feature maps "
        f"(default: all on CUDA, all but {ALL_SIZES[-1]} on CPU)",
    )
    parser.add_argument(
        "--batch", default=None,
        help="comma-separated batch sizes B (default: 1,8 on CUDA, 1 on CPU)",
    )
    parser.add_argument("--channels", type=int, default=128, help="C_in = C_out")
    parser.add_argument(
        "--channels-last", action="store_true",
        help="give every backend a channels_last input (each returns its own output layout: "
        "NCHW from the C++ kernels and torchvision, channels_last from Triton)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: adaptive)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--input-sets", type=int, default=None, help="input sets to rotate over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--deterministic", action="store_true",
        help="run under torch.use_deterministic_algorithms(True): the cuda backend's backward "
        "then gathers its input gradient over a sorted list instead of using atomics "
        "(torchvision's CUDA backward uses atomics too)",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="also split each backend's call into host and device time and list its slowest "
        "kernels (benchmarks.harness.profile_call)",
    )
    parser.add_argument(
        "--out-dir", default=None, help="default: benchmarks/results/<date>-<device>"
    )
    parser.add_argument(
        "--backends", default=None,
        help="comma-separated; default: reference, torchvision and every available pem_kernels "
        "backend of the device",
    )
    args = parser.parse_args(argv)
    device_type = harness.checked_device(parser, args.device).type
    default_sizes = DEFAULT_CPU_SIZES if device_type == "cpu" else ALL_SIZES
    args.sizes_given = args.sizes is not None
    args.batch_given = args.batch is not None
    try:
        args.batch = [
            int(v) for v in (args.batch or ("1" if device_type == "cpu" else "1,8")).split(",")
            if v.strip()
        ]
    except ValueError:
        parser.error(f"--batch {args.batch!r}: expected comma-separated integers")
    try:
        args.sizes = [
            parse_size(s.strip())
            for s in (args.sizes.split(",") if args.sizes_given else default_sizes)
            if s.strip()
        ]
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.backends is not None:
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.batch or min(args.batch) < 1:
        parser.error("--batch: every batch size must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.channels < 1:
        parser.error(f"--channels {args.channels}: expected >= 1")
    return args


def make_inputs(
    b: int, c: int, h: int, w: int, dtype: torch.dtype, device: torch.device,
    generator: torch.Generator, with_grad: bool, channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """One input set of the PEM decoder's deformable 3x3 convolution (see the module docstring)."""
    taps = KERNEL * KERNEL

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    tensors = {
        "input": randn(b, c, h, w),
        "offset": 2.0 * randn(b, 2 * taps, h, w),
        "weight": randn(c, c, KERNEL, KERNEL) / math.sqrt(c * taps),
        "bias": randn(c),
        "mask": torch.rand(b, taps, h, w, generator=generator, device=device),
    }
    if channels_last:
        tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    tensors = {name: t.to(dtype).requires_grad_(with_grad) for name, t in tensors.items()}
    if with_grad:
        tensors["grad_output"] = randn(b, c, h, w).to(dtype)
    return tensors


def torchvision_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when torchvision's deform_conv2d runs on ``device`` in ``dtype`` (a tiny trial call;
    its CPU and CUDA kernels have no bfloat16 version, for instance), else why not."""
    try:
        import torchvision.ops
    except ImportError as error:
        return f"cannot import torchvision.ops ({error})"
    try:
        options = dict(device=device, dtype=dtype)
        torchvision.ops.deform_conv2d(
            torch.zeros(1, 1, 3, 3, **options), torch.zeros(1, 2, 3, 3, **options),
            torch.zeros(1, 1, 1, 1, **options),
        )
    except Exception as error:  # noqa: BLE001 - any failure means it cannot be benchmarked
        return f"it fails on {device} for {dtype}: {str(error).splitlines()[0]}"
    return None


def resolve_backends(
    requested: list[str] | None, device: torch.device, dtype: torch.dtype
) -> list[str]:
    """The backends to run; unavailable ones are skipped with a note."""
    try:
        import pem_kernels
    except ImportError as error:
        harness.note(f"note: cannot import pem_kernels ({error}); its backends cannot run")
        pem_kernels = None
    available: list[str] = []
    if pem_kernels is not None:
        available = list(pem_kernels.available_backends("deform_conv2d", device, dtype))
    torchvision_problem = torchvision_unavailable_reason(device, dtype)
    if requested is None:
        requested = ["reference", TORCHVISION] + [b for b in available if b != "reference"]
    chosen = []
    for name in dict.fromkeys(requested):  # dedupe, keep order
        if name == TORCHVISION:
            if torchvision_problem is None:
                chosen.append(name)
            else:
                harness.note(f"note: skipping backend 'torchvision': {torchvision_problem}")
        elif name in available:
            chosen.append(name)
        else:
            harness.note(
                f"note: skipping backend {name!r}: not available on {device} for {dtype} "
                f"(available pem_kernels backends: {', '.join(available) or 'none'})"
            )
    return chosen


def make_conv(backend: str) -> Callable[..., torch.Tensor]:
    """``conv(input, offset, weight, bias, mask) -> output`` for one backend name."""
    if backend == TORCHVISION:
        import torchvision.ops

        def conv(input, offset, weight, bias, mask):
            return torchvision.ops.deform_conv2d(input, offset, weight, bias, padding=1, mask=mask)

    elif backend == "reference":
        from pem_kernels.reference import deform_conv2d_ref

        def conv(input, offset, weight, bias, mask):
            return deform_conv2d_ref(input, offset, weight, bias, padding=1, mask=mask)

    else:
        import pem_kernels

        def conv(input, offset, weight, bias, mask):
            return pem_kernels.deform_conv2d(
                input, offset, weight, bias, padding=1, mask=mask, backend=backend
            )

    return conv


def make_step(backend: str, mode: str) -> Callable[[dict[str, torch.Tensor]], Any]:
    """One timed call on an input set: the forward, or the forward and backward of all inputs."""
    conv = make_conv(backend)

    if mode == "forward":

        def step(tensors):
            with torch.no_grad():
                return conv(*(tensors[n] for n in CONV_TENSORS))

    else:

        def step(tensors):
            leaves = [tensors[n] for n in CONV_TENSORS]
            out = conv(*leaves)
            return torch.autograd.grad(out, leaves, tensors["grad_output"])

    return step


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
    with_grad = args.mode == "forward+backward"
    c = args.channels
    problems = [(b, label, h, w) for b in args.batch for label, h, w in args.sizes]
    rows = [] if rows is None else rows  # the caller's list keeps the rows of an interrupted run
    failures = skipped = 0
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)

    bar = harness.progress(total=len(problems) * len(backends), desc="deform_conv2d")
    with bar:
        for b, label, h, w in problems:
            if harness.out_of_time():
                skipped += len(backends)
                bar.update(len(backends))
                continue
            bar.set_postfix_str(f"{label}: inputs")
            per_set = (b * c * h * w * (2 if with_grad else 1) + b * 27 * h * w) * itemsize
            sets = args.input_sets or harness.input_set_count(per_set, ROTATION_BYTES)
            inputs = [
                (make_inputs(b, c, h, w, dtype, device, generator, with_grad, args.channels_last),)
                for _ in range(sets)
            ]
            flops = 2 * b * c * c * KERNEL * KERNEL * h * w * (3 if with_grad else 1)
            # One output to check every backend against, computed by the most trusted backend run.
            checker = next((n for n in ("reference", TORCHVISION) if n in backends), None)
            expected = None
            if checker is not None:
                bar.set_postfix_str(f"{label}: {checker} check")
                with torch.no_grad():
                    expected = make_conv(checker)(*(inputs[0][0][n] for n in CONV_TENSORS))
                expected = expected.float()
            size_rows: list[dict[str, Any]] = []
            for backend in backends:
                if harness.out_of_time():
                    skipped += 1
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"{label}: {backend}")
                row: dict[str, Any] = {
                    "op": "deform_conv2d", "device": str(device), "dtype": args.dtype,
                    "mode": args.mode, "size": label, "shape": f"({b},{c},{h},{w})", "batch": b,
                    "channels": c, "height": h, "width": w, "kernel": KERNEL,
                    "offset_groups": 1, "channels_last": args.channels_last, "backend": backend,
                    "input_sets": sets, "flops": flops,
                }
                try:
                    step = make_step(backend, args.mode)
                    if expected is not None:
                        with torch.no_grad():
                            out = make_conv(backend)(*(inputs[0][0][n] for n in CONV_TENSORS))
                        harness.synchronize(device)
                        row["max_err"] = (out.float() - expected).abs().max().item()
                        del out
                    row["peak_bytes"] = harness.measure_peak_memory(
                        functools.partial(step, inputs[0][0]), device=device
                    )
                    row["peak_mib"] = row["peak_bytes"] / harness.MIB
                    warmup, repeats = harness.choose_repeats(
                        step, device=device, inputs=inputs, repeats=args.repeats,
                        warmup=args.warmup,
                        policy=REPEAT_POLICY.get(device.type, REPEAT_POLICY["cpu"]),
                    )
                    timing = harness.measure_time(
                        step, device=device, warmup=warmup, repeats=repeats, inputs=inputs
                    )
                    row.update(timing)
                    row["warmup"] = warmup
                    row["gflops"] = flops / (timing["median_ms"] * 1e-3) / 1e9
                    if args.profile:
                        row.update(harness.profile_call(step, device=device, inputs=inputs))
                except Exception as error:  # noqa: BLE001 - report, keep sweeping
                    failures += 1
                    row["error"] = f"{type(error).__name__}: {error}"
                    harness.note(f"ERROR: {label} backend={backend}: {row['error']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                size_rows.append(row)
                bar.update(1)
            tv_row = next(
                (r for r in size_rows if r["backend"] == TORCHVISION and "median_ms" in r), None
            )
            harness.add_ratios(size_rows, baseline=tv_row, time_key="vs_tv", memory_key="mem_vs_tv")
            rows += size_rows
            del inputs, expected
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, failures, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.deterministic:
        # cuBLAS reads this when its handle is created: before the first GEMM.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    meta = {
        "benchmark": "deform_conv2d",
        "environment": harness.environment_info(device),
        "config": {k: v for k, v in vars(args).items()},
        "problem": "C_in = C_out = channels, 3x3 kernel, padding 1, stride 1, offset_groups 1, "
        "with mask and bias (PEM's deformable pixel decoder)",
        "units": {"*_ms": "milliseconds", "peak_mib": "MiB", "peak_bytes": "bytes",
                  "gflops": "1e9 flop/s of the dense convolution's arithmetic",
                  "vs_tv": "torchvision median / median",
                  "mem_vs_tv": "peak_bytes / torchvision peak_bytes",
                  "max_err": "max |output - checker output| (reference, else torchvision)"},
    }
    env = meta["environment"]
    print(
        f"deform_conv2d {args.mode} on {env['device_name']} ({device}, {env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch threads), dtype={args.dtype} B={args.batch} "
        f"C={args.channels} 3x3 pad 1, mask + bias"
        + (", channels_last input" if args.channels_last else ""),
        flush=True,
    )
    if device.type == "cpu" and not args.batch_given:
        print("note: the default CPU sweep runs batch 1 only; pass --batch 1,8 for more")
    if device.type == "cpu" and not args.sizes_given:
        print(f"note: the default CPU sweep skips {ALL_SIZES[-1]}; pass --sizes to include it")
    rows, failures, skipped = harness.run_until_interrupted(run, args, meta)
    return harness.report(
        rows, failures, meta=meta, started=started,
        columns=TABLE_COLUMNS + (harness.PROFILE_COLUMNS if args.profile else []),
        out_dir=args.out_dir or harness.default_out_dir(device),
        name="deform_conv" if args.mode == "forward" else "deform_conv_forward_backward",
        what="backend run", skipped=skipped,
    )


if __name__ == "__main__":
    sys.exit(main())
