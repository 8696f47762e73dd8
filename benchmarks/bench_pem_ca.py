"""PEM-CA vs masked cross-attention: latency and peak memory over increasing resolutions.

The project's main benchmark (the paper's Fig. 4 with the fused layer added). Run from the
repository root::

    python -m benchmarks.bench_pem_ca [--device cpu|cuda] [--dtype float32|bfloat16]
        [--sizes 2048,8192,32768,131072] [--batch 1] [--modes forward,forward+backward]
        [--providers fused,reference,compiled,fused_compiled,mask2former,sdpa] [--repeats N]
        [--out-dir DIR] [--matmul-precision highest|high|medium] [--warm-compiles]

One decoder cross-attention layer (C=256, 8 heads, Q=100 queries) over a feature map of HW pixels
with aspect 1:2 (2048 = 32x64, 8192 = 64x128, 32768 = 128x256, 131072 = 256x512, the 1/32 ... 1/4
levels of a 1024x2048 image). Inputs: tgt [Q, B, C], memory and pos [B, C, H, W], query_pos
[Q, B, C] standard normal; mask logits [B, Q, H, W] normal with mean -0.52 (about 30% of pixels
allowed per query). Providers (same inputs, same layer interface):

* ``fused``: :class:`pem_kernels.nn.PEMCrossAttention` on ``--fused-backend`` (default
  ``auto``, what a user gets: the C++ kernels on a CPU, and on a GPU the C++ kernels with the
  Triton selection for fp32 (README, Backends); the backend each of the
  layer's ops resolves to is recorded in the results' meta as ``fused_backends``);
* ``reference``: the same layer with ``backend="reference"`` (eager pure PyTorch, which is the
  official PEM computation);
* ``compiled``: ``torch.compile`` of ``reference`` (inductor, compiled once per size, not timed);
* ``fused_compiled``: ``torch.compile`` of ``fused`` (its ops enter inductor's graph as custom
  ops / user Triton kernels: no Python dispatch per op; on by default on a GPU only, where eager
  launch overhead matters);
* ``mask2former``: Mask2Former's masked cross-attention (``nn.MultiheadAttention`` + LayerNorm);
* ``sdpa``: the same with ``F.scaled_dot_product_attention`` and a boolean mask.

Each row: median / p20 / p80 ms over repeats (inputs rotate over ``input_sets`` sets that hold
at least 128 MiB together, 2 to 8, so that no provider meets a warm cache), peak extra memory,
and the speedup of every provider against ``mask2former`` and ``reference`` of the same run; on
CUDA the forward rows also give ``graph_ms``, the device time of the forward replayed from a CUDA
graph (the host's Python, dispatch and launch work removed).
``forward`` runs under ``torch.no_grad()``; ``forward+backward`` also back-propagates
``out.sum()`` into the parameters and into tgt and memory. Layers are in eval mode.

``--warm-compiles`` times and writes nothing: it makes the compiled providers' first call at every
size and mode, as a sweep with the same options does, so that torch.compile's on-disk caches
(Inductor's FX graph cache, AOTAutograd's cache, Triton's kernels) hold what that sweep compiles;
run later, the sweep loads its compiled code from them. The GPU suite warms tier 1's compiles so
during its correctness checks, on two compile threads.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from typing import Any, Callable

import torch

from benchmarks import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROTATION_BYTES = 128 * harness.MIB  # input sets rotate until they hold at least this much
PROVIDERS = ("fused", "reference", "compiled", "fused_compiled", "mask2former", "sdpa")
COMPILED_PROVIDERS = ("compiled", "fused_compiled")
CPU_PROVIDERS = ("fused", "reference", "compiled", "mask2former", "sdpa")
MODES = ("forward", "forward+backward")
# Per device: (default sizes, default providers, timing budget s, min repeats, max repeats).
DEFAULTS = {
    "cpu": ("2048,8192,32768", ",".join(CPU_PROVIDERS), 3.0, 3, 50),
    "cuda": ("2048,8192,32768,131072", ",".join(PROVIDERS), 1.0, 20, 500),
}
D_MODEL, HEADS, QUERIES = 256, 8, 100
MASK_LOGIT_MEAN = -0.52  # P(N(-0.52, 1) >= 0) = 0.30

TABLE_COLUMNS = [
    ("hw", "HW"),
    ("mode", "mode"),
    ("provider", "provider"),
    ("median_ms", "median ms", ".3f"),
    ("p20_ms", "p20 ms", ".3f"),
    ("p80_ms", "p80 ms", ".3f"),
    ("graph_ms", "graph ms", ".3f"),
    ("peak_mib", "peak MiB", ".1f"),
    ("speedup_vs_mask2former", "x vs M2F", ".2f"),
    ("speedup_vs_reference", "x vs ref", ".2f"),
    ("repeats", "reps"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_pem_ca",
        description="PEM-CA (fused, reference, compiled) vs Mask2Former masked cross-attention.",
    )
    harness.add_device_argument(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--sizes", default=None, help="pixel counts HW (comma-separated)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", default="forward", help=f"comma-separated from {MODES}")
    parser.add_argument("--providers", default=None, help=f"comma-separated from {PROVIDERS}")
    parser.add_argument(
        "--fused-backend", default="auto", help="backend of the fused layer (default: auto)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: adaptive)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", default=None, help="default: benchmarks/results/<date>-<device>"
    )
    harness.add_matmul_precision_argument(parser)
    parser.add_argument(
        "--warm-compiles", action="store_true",
        help="only compile and call the compiled providers once per size and mode (filling "
        "torch.compile's caches for a later run of the same sweep); nothing is timed or written",
    )
    args = parser.parse_args(argv)
    device_type = harness.checked_device(parser, args.device).type
    sizes, providers, *_ = DEFAULTS[device_type]
    args.sizes = harness.parse_positive_ints(parser, "--sizes", args.sizes or sizes)
    for size in args.sizes:
        height = math.isqrt(size // 2)
        if 2 * height * height != size:
            parser.error(f"--sizes {size}: expected 2*h*h pixels (e.g. 2048, 8192, 32768)")
    from pem_kernels import BACKENDS

    if args.fused_backend not in BACKENDS:
        parser.error(f"--fused-backend {args.fused_backend}: expected one of {BACKENDS}")
    args.providers = [p.strip() for p in (args.providers or providers).split(",") if p.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name, values, allowed in (
        ("--providers", args.providers, PROVIDERS), ("--modes", args.modes, MODES)
    ):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"{name}: unknown {unknown}, expected from {allowed}")
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: expected >= 1")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.warm_compiles and not set(args.providers) & set(COMPILED_PROVIDERS):
        parser.error(f"--warm-compiles: --providers {','.join(args.providers)} has none of "
                     f"{COMPILED_PROVIDERS} to compile")
    return args


def fused_backends(backend: str, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The backend each op of the fused layer's inference forward runs on for ``backend`` (what
    ``"auto"`` resolves to on this machine), or why it cannot run."""
    from pem_kernels import BackendUnavailableError
    from pem_kernels.nn import pem_cross_attention as layer_module

    resolved = {}
    for name, backends in (("prototype_select", layer_module.SELECT_BACKENDS),
                           ("projections", layer_module.PROJECTION_BACKENDS),
                           ("prototype_attention", layer_module.ATTENTION_BACKENDS)):
        try:
            resolved[name] = backends.resolve(backend, device, dtype)
        except BackendUnavailableError as error:
            resolved[name] = f"unavailable: {error}"
    return resolved


def make_layers(
    device: torch.device, dtype: torch.dtype, fused_backend: str
) -> dict[str, torch.nn.Module]:
    from pem_kernels.nn import MaskedCrossAttention, PEMCrossAttention, SDPAMaskedCrossAttention

    fused = PEMCrossAttention(D_MODEL, HEADS, backend=fused_backend)
    reference = PEMCrossAttention(D_MODEL, HEADS, backend="reference")
    reference.load_state_dict(fused.state_dict())
    mask2former = MaskedCrossAttention(D_MODEL, HEADS)
    sdpa = SDPAMaskedCrossAttention(D_MODEL, HEADS)
    sdpa.load_state_dict(mask2former.state_dict())
    layers = {"fused": fused, "reference": reference, "mask2former": mask2former, "sdpa": sdpa}
    return {name: layer.to(device=device, dtype=dtype).eval() for name, layer in layers.items()}


def compile_layers(layers: dict[str, torch.nn.Module]) -> None:
    """Fresh ``torch.compile`` wrappers of the reference and fused layers, made once per size:
    a new compile per size keeps dynamic-shape guards out of the measurement."""
    torch._dynamo.reset()
    layers["compiled"] = torch.compile(layers["reference"])
    layers["fused_compiled"] = torch.compile(layers["fused"])


def make_inputs(batch: int, hw: int, device: torch.device, dtype: torch.dtype, generator) -> tuple:
    height = math.isqrt(hw // 2)
    width = 2 * height

    def normal(*shape, mean=0.0):
        return (torch.randn(*shape, generator=generator, device=device) + mean).to(dtype)

    return (
        normal(QUERIES, batch, D_MODEL),
        normal(batch, D_MODEL, height, width),
        normal(batch, QUERIES, height, width, mean=MASK_LOGIT_MEAN),
        normal(batch, D_MODEL, height, width),
        normal(QUERIES, batch, D_MODEL),
    )


def make_step(layer: torch.nn.Module, mode: str) -> Callable[..., Any]:
    if mode == "forward":

        def forward(*inputs):
            with torch.no_grad():
                return layer(*inputs)

        return forward

    def forward_backward(tgt, memory, mask, pos, query_pos):
        tgt = tgt.detach().requires_grad_(True)
        memory = memory.detach().requires_grad_(True)
        layer(tgt, memory, mask, pos, query_pos).float().sum().backward()
        layer.zero_grad(set_to_none=True)

    return forward_backward


def graph_time(step, device, inputs, hw: int, provider: str) -> dict[str, Any]:
    """``graph_ms``: the device time of one forward replayed from a CUDA graph (no host work),
    beside the eager latency, which includes whatever the host adds; or ``graph_error`` when the
    provider cannot be captured (a column, not a failed row)."""
    try:
        return {"graph_ms": harness.measure_graph_time(step, device=device, inputs=inputs)}
    except Exception as error:  # noqa: BLE001
        harness.note(
            f"WARNING: HW={hw} {provider}: no graph time ({type(error).__name__}: {error})"
        )
        return {"graph_error": f"{type(error).__name__}: {error}"}


def run(
    args: argparse.Namespace, rows: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], int, int]:
    """Runs the sweep; returns (rows, failed provider runs, provider runs skipped at the
    deadline)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    _, _, budget_s, min_repeats, max_repeats = DEFAULTS[device.type]
    layers = make_layers(device, dtype, args.fused_backend)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    rows = [] if rows is None else rows  # the caller's list keeps the rows of an interrupted run
    failures = skipped = 0
    total = len(args.sizes) * len(args.modes) * len(args.providers)
    with harness.progress(total=total, desc="pem_ca") as bar:
        for hw in args.sizes:
            if harness.out_of_time():
                skipped += len(args.modes) * len(args.providers)
                bar.update(len(args.modes) * len(args.providers))
                continue
            first = make_inputs(args.batch, hw, device, dtype, generator)
            per_set = sum(t.numel() * t.element_size() for t in first)
            sets = harness.input_set_count(per_set, ROTATION_BYTES)
            inputs = [first] + [
                make_inputs(args.batch, hw, device, dtype, generator) for _ in range(sets - 1)
            ]
            if set(args.providers) & set(COMPILED_PROVIDERS):
                compile_layers(layers)
            for mode in args.modes:
                group: list[dict[str, Any]] = []
                for provider in args.providers:
                    if harness.out_of_time():
                        skipped += 1
                        bar.update(1)
                        continue
                    bar.set_postfix_str(f"HW={hw} {mode} {provider}")
                    row: dict[str, Any] = {
                        "op": "pem_ca", "device": str(device), "dtype": args.dtype,
                        "batch": args.batch, "hw": hw, "queries": QUERIES, "channels": D_MODEL,
                        "heads": HEADS, "mode": mode, "provider": provider,
                        "input_sets": sets,
                    }
                    try:
                        step = make_step(layers[provider], mode)
                        row["peak_bytes"] = harness.measure_peak_memory(
                            functools.partial(step, *inputs[0]), device=device
                        )
                        row["peak_mib"] = row["peak_bytes"] / harness.MIB
                        repeats = args.repeats or harness.adaptive_repeats(
                            step, device=device, budget_s=budget_s, min_repeats=min_repeats,
                            max_repeats=max_repeats, inputs=inputs,
                        )
                        row.update(
                            harness.measure_time(
                                step, device=device, warmup=1, repeats=repeats, inputs=inputs
                            )
                        )
                        if device.type == "cuda" and mode == "forward":
                            row.update(graph_time(step, device, inputs[0], hw, provider))
                    except Exception as error:  # noqa: BLE001 - report it, keep sweeping
                        failures += 1
                        row["error"] = f"{type(error).__name__}: {error}"
                        harness.note(f"ERROR: HW={hw} {mode} {provider}: {row['error']}")
                    group.append(row)
                    bar.update(1)
                for baseline in ("mask2former", "reference"):
                    base = next(
                        (r for r in group if r["provider"] == baseline and "median_ms" in r), None
                    )
                    harness.add_ratios(
                        group, baseline=base, time_key=f"speedup_vs_{baseline}",
                        memory_key=f"memory_vs_{baseline}",
                    )
                rows += group
            del inputs
    return rows, failures, skipped


def warm_compiles(args: argparse.Namespace) -> int:
    """``--warm-compiles``: the compiled providers' first call at every size and mode, in
    :func:`run`'s order, on layers and inputs made as there (the same graphs, so the same cache
    entries); returns the exit status."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    layers = make_layers(device, dtype, args.fused_backend)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    providers = [p for p in args.providers if p in COMPILED_PROVIDERS]
    started = time.perf_counter()
    for hw in args.sizes:
        inputs = make_inputs(args.batch, hw, device, dtype, generator)
        compile_layers(layers)
        for mode in args.modes:
            for provider in providers:
                make_step(layers[provider], mode)(*inputs)
        harness.synchronize(device)
        print(f"warmed {','.join(providers)} at HW={hw} ({','.join(args.modes)}), "
              f"{time.perf_counter() - started:.0f} s in all", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.apply_matmul_precision(args)
    if args.warm_compiles:
        return warm_compiles(args)
    device = torch.device(args.device)
    started = time.perf_counter()
    import pem_kernels
    from pem_kernels.nn import MaskedCrossAttention

    meta = {
        "benchmark": "pem_ca",
        "environment": harness.environment_info(device),
        "config": dict(vars(args)),
        "backends": {
            op: pem_kernels.available_backends(op, device, DTYPES[args.dtype])
            for op in ("prototype_select", "prototype_attention")
        },
        "fused_backends": fused_backends(args.fused_backend, device, DTYPES[args.dtype]),
        # True: the mask2former rows made Mask2Former's own call (benchmarks.goals counts only
        # those); runs before 2026-11-27 timed need_weights=False, the SDPA kernel.
        "mask2former_need_weights": MaskedCrossAttention.need_weights,
        "units": {"*_ms": "milliseconds", "graph_ms": "median device time of a forward replayed "
                  "from a CUDA graph (CUDA, forward rows)", "peak_mib": "MiB",
                  "speedup_vs_*": "baseline median / median",
                  "memory_vs_*": "peak_bytes / baseline peak_bytes"},
    }
    env = meta["environment"]
    print(
        f"PEM-CA vs masked cross-attention on {env['device_name']} ({device}), dtype={args.dtype} "
        f"B={args.batch} Q={QUERIES} C={D_MODEL} heads={HEADS}; fused layer on backend "
        f"{args.fused_backend!r} ({meta['fused_backends']}); available backends "
        f"{meta['backends']}",
        flush=True,
    )
    rows, failures, skipped = harness.run_until_interrupted(run, args, meta)
    return harness.report(
        rows, failures, meta=meta, started=started,
        # graph_ms exists on CUDA only: no column of dashes on a CPU
        columns=[c for c in TABLE_COLUMNS if device.type == "cuda" or c[0] != "graph_ms"],
        out_dir=args.out_dir or harness.default_out_dir(device), name="pem_ca",
        what="provider run", skipped=skipped,
    )


if __name__ == "__main__":
    sys.exit(main())
