"""Whole-model benchmark: PEM inference latency, peak memory and FLOPs, fused vs reference.

Run from the repository root::

    python -m benchmarks model [--device cpu|cuda] [--dtype float32|bfloat16]
        [--sizes 512x512,1024x2048] [--backbone r50|stdc1|stdc2] [--num-classes 19] [--batch 1]
        [--providers fused,reference,compiled] [--fused-backend NAME] [--repeats N]
        [--no-flops] [--profile] [--out-dir DIR]

(also ``python -m benchmarks.bench_model``). One :class:`pem.model.PEM` (random weights, eval
mode, ``requires_grad_(False)``, run under ``torch.no_grad()``: inference) on images of
``--batch`` x 3 x H x W, uniform in [0, 255), at each ``--sizes`` entry ``HxW`` (512x512: ADE20K,
1024x2048: Cityscapes). Providers, all with the same weights:

* ``fused``: the model with ``backend=--fused-backend`` (default ``auto``, what a user gets, as
  in the PEM-CA benchmark): PEM-CA and the deformable convs on pem_kernels' fused ops;
* ``reference``: ``backend="reference"``, the pure-PyTorch ops (the official computation);
* ``compiled``: ``torch.compile`` of the reference model (inductor, default mode; compiled
  afresh per size, the compile is not timed but reported as ``compile_s``). Default on a GPU
  only: on the 2-core CPU machine compiling the R50 model takes about 150 s per size (measured
  at 512x512, while a forward takes about 1 s), so there it is opt-in (``--providers``).

``--dtype bfloat16`` casts the model's parameters and buffers and the images to bf16 (as the
layer benchmarks do) rather than using autocast: the fused ops check that all their tensors share
one dtype, which autocast's per-op casting does not guarantee.

Per size and provider the table and the files report:

* ``median_ms`` / ``p20_ms`` / ``p80_ms``: latency of one forward, rotating over two image sets;
  repeats adapt to the cost of a call (``choose_repeats``; CPU: 15 s budget, 3..20 repeats; CUDA:
  2 s, 10..200) unless ``--repeats``.
* ``peak_mib``: peak extra memory of one forward in MiB (activations and outputs, beyond the
  weights and the input; ``benchmarks.harness.measure_peak_memory``).
* ``speedup_vs_reference`` (reference median / median) and ``memory_vs_reference`` (peak / the
  reference's peak).
* ``gflop_per_image``: FLOPs of one forward per image from ``torch.utils.flop_counter``, with the
  formulas of :mod:`pem_kernels.flops` for the custom ops (torch's convention: 2 per
  multiply-accumulate of matmuls and convolutions; elementwise work is not counted). The fused
  and the reference model therefore count the same FLOPs; a difference is reported as a warning.
  ``compiled`` runs the reference's computation and repeats its count. ``gflop_per_s``: FLOPs /
  median. ``--no-flops`` skips the count (the first forward still runs, untimed).
* ``max_abs_diff``: max |pred_logits - reference pred_logits| from the first forward (a sanity
  check; the argmax of prototype selection can flip on near-ties, so it is not asserted).
* ``mask_density`` / ``empty_query_fraction``: over the 6 PEM-CA calls of the first forward, the
  fraction of (query, pixel) pairs the masks allow and of queries whose mask allows no pixel
  (which then select over all pixels). The weights are random, and a randomly initialized PEM
  predicts masks that allow almost nothing (R50, seed 0: 99.5% of the queries empty on average),
  unlike a trained one; kernels whose speed depends on the mask see that case.
* with ``--profile``, ``host_ms``, ``device_ms``, ``launches``, ``host_syncs`` and the slowest
  kernels of one forward (:func:`benchmarks.harness.profile_call`, over 5 forwards): a forward
  whose latency is near its host time, or that synchronizes, is host-bound.

Every provider's first forward (the FLOP count, or the compile) is untimed and also warms it up.
CPU defaults: R50 at 512x512 and 1024x2048, fused and reference: about 3.5 minutes on 2 cores
(measured 207 s; one forward takes about 1 s at 512x512 and 15 s at 1024x2048). Results go to
``benchmarks/results/<YYYY-MM-DD>-<device-slug>/model.{json,csv}`` unless ``--out-dir``; they are
rewritten after every provider, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROVIDERS = ("fused", "reference", "compiled")
BACKBONES = ("r50", "stdc1", "stdc2")
FUSED_OPS = ("prototype_select", "prototype_attention", "deform_conv2d")
# Per device type: (default sizes, default providers).
DEFAULTS = {
    "cpu": ("512x512,1024x2048", "fused,reference"),
    "cuda": ("512x512,1024x2048", "fused,reference,compiled"),
}
# Per device type: (seconds of timing per size and provider, min repeats, max repeats, warmup).
# The untimed first forward (FLOP count or compile) and the peak-memory forward warm up already.
REPEAT_POLICY = {"cpu": (15.0, 3, 20, 0), "cuda": (2.0, 10, 200, 3)}
INPUT_SETS = 2
# Forwards timed back to back for the host time, then profiled, with --profile: a model forward
# takes 20-40 ms on a GPU and about a second on the 2-core CPU.
PROFILE_CALLS = 5

TABLE_COLUMNS = [
    ("size", "size"),
    ("provider", "provider"),
    ("median_ms", "median ms", ".1f"),
    ("p20_ms", "p20 ms", ".1f"),
    ("p80_ms", "p80 ms", ".1f"),
    ("speedup_vs_reference", "x vs ref", ".2f"),
    ("peak_mib", "peak MiB", ".1f"),
    ("memory_vs_reference", "mem vs ref", ".2f"),
    ("gflop_per_image", "GFLOP/img", ".1f"),
    ("gflop_per_s", "GFLOP/s", ".1f"),
    ("max_abs_diff", "max diff", ".1e"),
    ("empty_query_fraction", "empty q", ".2f"),
    ("compile_s", "compile s", ".0f"),
    ("repeats", "reps"),
]


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x2048"`` -> (1024, 2048)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected HxW, e.g. 512x512 or 1024x2048"
        ) from None
    if min(height, width) < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: H and W must be >= 1")
    return height, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_model",
        description="Whole PEM model: inference latency, peak memory and FLOPs, fused vs "
        "reference.",
    )
    harness.add_device_argument(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated image sizes HxW (default: 512x512,1024x2048)"
    )
    parser.add_argument("--backbone", choices=BACKBONES, default="r50")
    parser.add_argument("--num-classes", type=int, default=19, help="K (19 Cityscapes, 150 ADE20K)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--providers", default=None,
        help=f"comma-separated from {PROVIDERS} (default: fused,reference on CPU, all on CUDA)",
    )
    parser.add_argument(
        "--fused-backend", default="auto", help="backend of the fused model (default: auto)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: adaptive)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument(
        "--flops", action=argparse.BooleanOptionalAction, default=True,
        help="count FLOPs with torch.utils.flop_counter in the first forward (default: yes)",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="also split each forward into host and device time, count its launches and host "
        "syncs, and list its slowest kernels (benchmarks.harness.profile_call)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", default=None, help="default: benchmarks/results/<date>-<device>"
    )
    args = parser.parse_args(argv)
    device_type = harness.checked_device(parser, args.device).type
    sizes, providers = DEFAULTS[device_type]
    args.sizes_given = args.sizes is not None
    try:
        args.sizes = [parse_size(s.strip()) for s in (args.sizes or sizes).split(",") if s.strip()]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--sizes: {error}")
    if not args.sizes:
        parser.error("--sizes: expected at least one HxW")
    args.providers_given = args.providers is not None
    args.providers = [p.strip() for p in (args.providers or providers).split(",") if p.strip()]
    unknown = sorted(set(args.providers) - set(PROVIDERS))
    if unknown or not args.providers:
        parser.error(f"--providers: unknown {unknown}, expected from {PROVIDERS}")
    args.providers = list(dict.fromkeys(args.providers))
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.num_classes < 1:
        parser.error("--num-classes must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if "fused" in args.providers:
        problem = fused_backend_problem(
            args.fused_backend, torch.device(args.device), DTYPES[args.dtype]
        )
        if problem:
            parser.error(f"--fused-backend {args.fused_backend}: {problem}")
    return args


def fused_backend_problem(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when every fused op of the model can run on ``backend``, else why not."""
    import pem_kernels

    if backend not in pem_kernels.BACKENDS:
        return f"expected one of {pem_kernels.BACKENDS}"
    if backend == "auto":
        return None
    for op in FUSED_OPS:
        available = pem_kernels.available_backends(op, device, dtype)
        if backend not in available:
            return (
                f"{op} cannot run it on {device.type} for {dtype} (available there: "
                f"{', '.join(available)})"
            )
    return None


def make_models(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """The eager models by provider, sharing one set of random weights (``compiled`` is made per
    size by :func:`run`)."""
    from pem.model import PEM

    torch.manual_seed(args.seed)
    models: dict[str, Any] = {}
    base = PEM(args.backbone, args.num_classes, backend="reference")
    if "fused" in args.providers:
        fused = PEM(args.backbone, args.num_classes, backend=args.fused_backend)
        fused.load_state_dict(base.state_dict())
        models["fused"] = fused
    if "reference" in args.providers or "compiled" in args.providers:
        models["reference"] = base
    # requires_grad_(False): inference, and FlopCounterMode's module tracker rejects parameters
    # that require grad when they are passed between modules under no_grad.
    return {
        name: model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        for name, model in models.items()
    }


def make_step(model: Callable[..., Any]) -> Callable[[torch.Tensor], Any]:
    def forward(images: torch.Tensor) -> Any:
        with torch.no_grad():
            return model(images)

    return forward


@contextlib.contextmanager
def pem_ca_mask_statistics(model: torch.nn.Module):
    """Yields a list that receives, per PEM-CA call of ``model`` meanwhile, (fraction of allowed
    (query, pixel) pairs, fraction of queries with no allowed pixel), allowed = mask logit >= 0
    as in the layer."""
    from pem_kernels.nn import PEMCrossAttention

    stats: list[tuple[float, float]] = []

    def record(module, args, kwargs) -> None:
        mask = args[2] if len(args) > 2 else kwargs.get("memory_mask")
        if mask is not None:
            allowed = ~(mask.detach().flatten(2) < 0)
            stats.append((allowed.float().mean().item(), (~allowed.any(-1)).float().mean().item()))

    handles = [
        module.register_forward_pre_hook(record, with_kwargs=True)
        for module in model.modules() if isinstance(module, PEMCrossAttention)
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def make_images(batch: int, height: int, width: int, device, dtype, generator) -> torch.Tensor:
    images = torch.rand(batch, 3, height, width, generator=generator, device=device) * 255.0
    return images.to(dtype)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(
    args: argparse.Namespace,
    meta: dict[str, Any],
    on_progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], int, int]:
    """Runs the sweep; returns (rows, failed provider runs, provider runs skipped at the deadline
    (:func:`harness.out_of_time`)). Adds ``parameters`` and
    ``flops_by_op`` (size -> provider -> op -> FLOPs) to ``meta``; ``on_progress(rows so far)``
    runs after every provider."""
    from pem_kernels.flops import count_flops

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    policy = REPEAT_POLICY[device.type]
    models = make_models(args, device, dtype)
    meta["parameters"] = parameter_count(next(iter(models.values())))
    harness.note(f"PEM {args.backbone}, K={args.num_classes}: {meta['parameters']:,} parameters")
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    # The Triton ops exist only once their modules are imported; FLOP formulas need them first.
    include_triton = args.fused_backend == "triton" or (
        args.fused_backend == "auto" and device.type == "cuda"
    )
    rows: list[dict[str, Any]] = []
    flops_by_op: dict[str, Any] = meta.setdefault("flops_by_op", {})
    failures = skipped = 0
    with harness.progress(total=len(args.sizes) * len(args.providers), desc="model") as bar:
        for height, width in args.sizes:
            if harness.out_of_time():
                skipped += len(args.providers)
                bar.update(len(args.providers))
                continue
            size = f"{height}x{width}"
            bar.set_postfix_str(f"{size}: inputs")
            inputs = [
                (make_images(args.batch, height, width, device, dtype, generator),)
                for _ in range(INPUT_SETS)
            ]
            if "compiled" in args.providers:
                # A fresh compile per size keeps dynamic-shape guards out of the measurement.
                torch._dynamo.reset()
                models["compiled"] = torch.compile(models["reference"])
            counted: dict[str, tuple[int, dict[str, int]]] = {}  # eager model name -> FLOPs
            logits: dict[str, torch.Tensor] = {}
            group: list[dict[str, Any]] = []
            for provider in args.providers:
                if harness.out_of_time():
                    skipped += 1
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"{size}: {provider}")
                eager = "reference" if provider == "compiled" else provider
                row: dict[str, Any] = {
                    "model": "pem", "backbone": args.backbone, "num_classes": args.num_classes,
                    "device": str(device), "dtype": args.dtype, "batch": args.batch,
                    "size": size, "height": height, "width": width, "provider": provider,
                    "backend": args.fused_backend if provider == "fused" else "reference",
                }
                try:
                    step = make_step(models[provider])
                    # First forward, untimed: the FLOP count and mask statistics (eager), or the
                    # compile.
                    started = time.perf_counter()
                    if provider == "compiled":
                        out = step(*inputs[0])
                        harness.synchronize(device)
                        row["compile_s"] = time.perf_counter() - started
                    else:
                        with pem_ca_mask_statistics(models[provider]) as stats:
                            if args.flops:
                                out, total, per_op = count_flops(
                                    step, *inputs[0],
                                    include_triton=include_triton and provider == "fused",
                                )
                                counted[provider] = (total, per_op)
                            else:
                                out = step(*inputs[0])
                        if stats:
                            row["mask_density"] = sum(a for a, _ in stats) / len(stats)
                            row["empty_query_fraction"] = sum(e for _, e in stats) / len(stats)
                    logits[provider] = out["pred_logits"].detach().float().cpu()
                    del out
                    if args.flops and eager not in counted:  # compiled without a reference row
                        counted[eager] = count_flops(make_step(models[eager]), *inputs[0])[1:]
                    if args.flops:
                        row["flops"] = counted[eager][0]
                        row["gflop_per_image"] = counted[eager][0] / args.batch / 1e9
                        flops_by_op.setdefault(size, {})[provider] = counted[eager][1]
                    row["peak_bytes"] = harness.measure_peak_memory(
                        functools.partial(step, *inputs[0]), device=device
                    )
                    row["peak_mib"] = row["peak_bytes"] / harness.MIB
                    warmup, repeats = harness.choose_repeats(
                        step, device=device, policy=policy, inputs=inputs, repeats=args.repeats,
                        warmup=args.warmup,
                    )
                    row.update(
                        harness.measure_time(
                            step, device=device, warmup=warmup, repeats=repeats, inputs=inputs
                        )
                    )
                    row["warmup"] = warmup
                    if args.profile:
                        row.update(harness.profile_call(
                            step, device=device, inputs=inputs, host_calls=PROFILE_CALLS,
                            profiled_calls=PROFILE_CALLS,
                        ))
                    if "flops" in row:
                        row["gflop_per_s"] = row["flops"] / (row["median_ms"] * 1e-3) / 1e9
                except Exception as error:  # noqa: BLE001 - report it, keep sweeping
                    failures += 1
                    row["error"] = f"{type(error).__name__}: {error}"
                    harness.note(f"ERROR: {size} {provider}: {row['error']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                group.append(row)
                bar.update(1)
                if on_progress is not None:
                    on_progress(rows + group)
            reference_logits = logits.get("reference")
            for row in group:
                mine = logits.get(row["provider"])
                if reference_logits is not None and mine is not None:
                    row["max_abs_diff"] = (mine - reference_logits).abs().max().item()
            if "fused" in counted and "reference" in counted:
                fused_flops, reference_flops = counted["fused"][0], counted["reference"][0]
                if fused_flops != reference_flops:
                    harness.note(
                        f"WARNING: {size}: the fused model counts {fused_flops} FLOPs, the "
                        f"reference {reference_flops} (see pem_kernels/flops.py)"
                    )
            base = next(
                (r for r in group if r["provider"] == "reference" and "median_ms" in r), None
            )
            harness.add_ratios(
                group, baseline=base, time_key="speedup_vs_reference",
                memory_key="memory_vs_reference",
            )
            rows += group
            if on_progress is not None:
                on_progress(rows)
            del inputs
            models.pop("compiled", None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, failures, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    started = time.perf_counter()
    import pem_kernels

    meta: dict[str, Any] = {
        "benchmark": "model",
        "environment": harness.environment_info(device),
        "config": dict(vars(args)),
        "backends": {op: pem_kernels.available_backends(op, device, dtype) for op in FUSED_OPS},
        "inference": "eval mode, requires_grad_(False), torch.no_grad(); images uniform in "
        "[0, 255); bfloat16 casts the model and the images (no autocast)",
        "tf32": {"cuda_matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32},
        "flop_convention": "torch.utils.flop_counter with pem_kernels.flops formulas: 2 per "
        "multiply-accumulate of matmuls and convolutions (deformable conv: its GEMM; prototype "
        "selection: its similarity GEMM); elementwise work not counted",
        "units": {"*_ms": "milliseconds", "peak_mib": "MiB", "peak_bytes": "bytes",
                  "flops": "FLOPs of one forward of the batch", "gflop_per_image": "1e9 FLOPs",
                  "gflop_per_s": "flops / median, 1e9 FLOP/s", "compile_s": "seconds",
                  "speedup_vs_reference": "reference median / median",
                  "memory_vs_reference": "peak_bytes / reference peak_bytes",
                  "max_abs_diff": "max |pred_logits - reference pred_logits|",
                  "mask_density": "allowed (query, pixel) fraction, mean over PEM-CA calls",
                  "empty_query_fraction": "queries with an empty mask, mean over PEM-CA calls"},
    }
    env = meta["environment"]
    print(
        f"PEM ({args.backbone}, K={args.num_classes}) inference on {env['device_name']} "
        f"({device}, {env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch threads), dtype={args.dtype} B={args.batch}; providers "
        f"{args.providers}, fused model on backend {args.fused_backend!r}; available backends "
        f"{meta['backends']}",
        flush=True,
    )
    if device.type == "cpu" and not args.providers_given:
        print("note: the CPU default leaves out 'compiled' (R50: about 150 s of compile per size "
              "on 2 cores); pass --providers fused,reference,compiled to include it")
    out_dir = args.out_dir or harness.default_out_dir(device)
    replaced = (Path(out_dir) / "model.json").exists()  # before save() writes it

    def save(rows: list[dict[str, Any]]) -> tuple[Any, Any]:
        meta["elapsed_s"] = time.perf_counter() - started
        return harness.write_results(rows, out_dir, "model", meta)

    rows, failures, skipped = run(args, meta, on_progress=save)
    return harness.report(
        rows, failures, meta=meta, started=started,
        columns=TABLE_COLUMNS + (harness.PROFILE_COLUMNS if args.profile else []), out_dir=out_dir,
        name="model", what="provider run", skipped=skipped, replaced=replaced,
    )


if __name__ == "__main__":
    sys.exit(main())
