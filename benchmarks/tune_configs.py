"""Candidate launch configurations of the Triton kernels, timed against the ones in use.

Run from the repository root::

    python -m benchmarks tune [EXPERIMENT ...] [--device cuda] [--small] [--repeats 50]
        [--out-dir DIR]

Each experiment runs one kernel (or one path) at PEM's sizes with every candidate configuration,
checks each candidate's result against the configuration in use (bit-identical where only the
tiling changes; within fp32 accuracy where the products change) and, on CUDA, times it as the
median device time of CUDA-graph replays (``benchmarks.harness.measure_graph_time``: the kernels
alone). It chooses nothing: its table is the evidence for changing a default in the code, which the
sm_90 compiler's counts (``sass-stats``) can only suggest. Experiments:

* ``bn_depthwise``: the exact-fp32 path's BN + depthwise-conv kernel
  (``local_representation.BN_DEPTHWISE_CONFIG``) at B=1, C=256, 128 x 256 pixels, with pos.
* ``projection_fp32``: exact-fp32 keys through the two-step path (that kernel, then cuBLAS's IEEE
  SGEMM) against the fused kernel with 3xTF32 products (``local_representation.FP32_TWO_STEP``).
* ``layer_fp32_projection``: the same choice where it counts, the whole PEM-CA forward (fp32,
  ``backend="triton"``, 32768 px, 100 queries, 8 heads, mask logits): the two-step keys leave
  their L2 normalization to the selection (a norm pass, and each key tile scaled), the fused kernel
  normalizes them itself, two launches fewer (a latency gain this device time leaves out). One
  allowed pixel per query, so that both select the same pixels and their outputs compare within
  fp32 accuracy (random scores have near-ties that either rounding may break differently).
* ``attention_columns``: the prototype attention's forward (fp32, 100 queries, C = 256, norm over
  the queries, batch 1) with 16 (in use since the H200 run of 2026-11-27 timed it 1.11x
  faster) and 32 output channels per program (``prototype_attention.ATTENTION_COLUMNS``): 16 or
  8 programs.
* ``select_splits``: the Triton selection (fp32, 32768 px, 100 queries, 8 heads, mask logits,
  normalize_keys, official rule) with the pixel axis split for 1 (in use), 2, 4 and 8 waves of
  programs per SM.
* ``select_tiles``: the same call with (pixels per tile, warps) of (64, 8) (in use for 3xTF32),
  (32, 8), (32, 4) and (64, 4): the kernel holds a tile's [pixels, 128 queries] scores in
  registers (254 per thread at 64 x 8, one program per SM); smaller tiles or fewer warps trade
  registers for programs per SM.

``--small`` shrinks every shape for a CPU run under ``TRITON_INTERPRET=1`` (checks only, no
times), which is how the tests run it. Past ``PEM_BENCH_DEADLINE`` (the GPU suite's time box) no
further candidate starts; what was measured is written and the exit status is 3. Results go to
``<out-dir>/tune.{json,csv}`` (default ``benchmarks/results/<date>-<device>``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import torch

from benchmarks import harness
from pem_kernels.triton import interpreter_requested

EXPERIMENTS = ("bn_depthwise", "projection_fp32", "layer_fp32_projection", "attention_columns",
               "select_splits", "select_tiles")
TABLE_COLUMNS = [
    ("experiment", "experiment"),
    ("candidate", "candidate"),
    ("in_use", "in use"),
    ("device_ms", "device ms", ".4f"),
    ("vs_in_use", "x vs in use", ".2f"),
    ("check", "check"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks tune",
        description="Triton launch configurations timed against the ones in use.",
    )
    parser.add_argument("experiments", nargs="*",
                        help=f"any of {', '.join(EXPERIMENTS)} (default: all)")
    harness.add_device_argument(parser)
    parser.add_argument("--small", action="store_true",
                        help="small shapes, for a check under the Triton interpreter")
    parser.add_argument("--repeats", type=int, default=50, help="CUDA-graph replays timed")
    parser.add_argument("--out-dir", default=None,
                        help="default: benchmarks/results/<date>-<device>")
    args = parser.parse_args(argv)
    harness.checked_device(parser, args.device)
    unknown = sorted(set(args.experiments) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"experiments: expected any of {EXPERIMENTS}, got {unknown}")
    return args


def _feature_inputs(device: torch.device, small: bool) -> dict[str, Any]:
    """The feature projection's operands: memory and pos [B, C, H, W] fp32 and its weights."""
    channels, height, width = (16, 5, 19) if small else (256, 128, 256)
    randn = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    return {
        "memory": randn(1, channels, height, width), "pos": randn(1, channels, height, width),
        "bn": (randn(channels), randn(channels).abs() + 0.5, randn(channels).abs() + 0.5,
               randn(channels), 1e-5),  # running mean and var, weight, bias, eps
        "dw_weight": randn(channels, 1, 3, 3) / 3, "dw_bias": randn(channels),
        "weight": randn(channels, channels) / channels**0.5, "bias": randn(channels),
    }


def _bn_depthwise(device: torch.device, small: bool) -> list[tuple[str, Callable, Callable]]:
    from pem_kernels.triton import cdiv
    from pem_kernels.triton import local_representation as module

    x = _feature_inputs(device, small)
    _, channels, height, width = x["memory"].shape
    operands = (x["memory"], x["pos"], *x["bn"], x["dw_weight"].reshape(channels, 9),
                x["dw_bias"])
    out = torch.empty(1, height * width, channels, device=device)

    def run_with(config: dict) -> Callable[[], torch.Tensor]:
        grid = (height * cdiv(width, config["BLOCK_P"]), cdiv(channels, config["BLOCK_C"]), 1)

        def run() -> torch.Tensor:
            module._bn_depthwise_conv_kernel[grid](
                *operands, out, channels, height, width, HAS_POS=True, **config)
            return out

        return run

    in_use = dict(module.BN_DEPTHWISE_CONFIG)
    candidates = [in_use] + [
        {"BLOCK_P": p, "BLOCK_C": c, "num_warps": w}
        for p, c, w in [(64, 32, 4), (32, 32, 4), (32, 16, 4), (64, 32, 8), (128, 16, 4),
                        (128, 8, 4), (64, 8, 2)]
        if (p, c, w) != (in_use["BLOCK_P"], in_use["BLOCK_C"], in_use["num_warps"])
    ]
    return [
        (f"{c['BLOCK_P']}px x {c['BLOCK_C']}ch, {c['num_warps']} warps", run_with(c), _identical)
        for c in candidates
    ]


def _projection_fp32(device: torch.device, small: bool) -> list[tuple[str, Callable, Callable]]:
    from pem_kernels.triton import local_representation as module

    x = _feature_inputs(device, small)
    body = module.local_representation_triton

    def run_with(two_step: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            saved, module.FP32_TWO_STEP = module.FP32_TWO_STEP, two_step
            try:
                return body(x["memory"], x["pos"], *x["bn"], x["dw_weight"], x["dw_bias"],
                            x["weight"], x["bias"], False)
            finally:
                module.FP32_TWO_STEP = saved

        return run

    order = [module.FP32_TWO_STEP, not module.FP32_TWO_STEP]
    names = {True: "BN+dwconv kernel, cuBLAS SGEMM", False: "fused kernel, 3xTF32"}
    return [(names[two_step], run_with(two_step), _fp32_close) for two_step in order]


def _layer_fp32_projection(
    device: torch.device, small: bool
) -> list[tuple[str, Callable, Callable]]:
    from pem_kernels.nn import PEMCrossAttention
    from pem_kernels.triton import local_representation as module

    channels, heads, queries, height, width = (32, 4, 5, 5, 19) if small else (256, 8, 100, 128,
                                                                               256)
    layer = PEMCrossAttention(channels, heads, backend="triton").to(device).eval()
    randn = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    tgt, query_pos = randn(queries, 1, channels), randn(queries, 1, channels)
    memory, pos = randn(1, channels, height, width), randn(1, channels, height, width)
    logits = torch.full((1, queries, height * width), -1.0, device=device)
    logits[0, torch.arange(queries, device=device),
           torch.randperm(height * width, device=device)[:queries]] = 1.0
    logits = logits.view(1, queries, height, width)

    def run_with(two_step: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            saved, module.FP32_TWO_STEP = module.FP32_TWO_STEP, two_step
            try:
                return layer(tgt, memory, logits, pos, query_pos)
            finally:
                module.FP32_TWO_STEP = saved

        return run

    order = [module.FP32_TWO_STEP, not module.FP32_TWO_STEP]
    names = {True: "PEM-CA, two-step keys normalized by the selection",
             False: "PEM-CA, fused 3xTF32 keys normalized in the kernel"}
    return [(names[two_step], run_with(two_step), _fp32_close) for two_step in order]


def _attention_columns(device: torch.device, small: bool) -> list[tuple[str, Callable, Callable]]:
    from pem_kernels.triton import call_triton_op
    from pem_kernels.triton import prototype_attention as module

    queries, channels = (5, 32) if small else (100, 256)
    randn = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    operands = (randn(1, queries, channels), randn(1, queries, channels),
                randn(1, queries, channels), randn(channels, channels) / channels**0.5,
                randn(channels), randn(1, 1, channels), randn(channels, channels) / channels**0.5,
                randn(channels), True)

    def run_with(columns: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            saved, module.ATTENTION_COLUMNS = module.ATTENTION_COLUMNS, columns
            try:
                return call_triton_op(module.prototype_attention_triton, *operands)[0]
            finally:
                module.ATTENTION_COLUMNS = saved

        return run

    in_use = module.ATTENTION_COLUMNS
    return [(f"{columns} channels per program", run_with(columns), _fp32_close)
            for columns in [in_use] + [c for c in (32, 16) if c != in_use]]


def _select_call(device: torch.device, small: bool):
    """(pixel tiles, the select kernel's configuration in use, a function that makes a runner
    of PEM-CA's selection call with one of the module's hooks set to a value; None leaves the
    configuration in use)."""
    from pem_kernels.triton import call_triton_op
    from pem_kernels.triton import prototype_select as module

    pixels, channels, queries, heads = (300, 32, 5, 4) if small else (32768, 256, 100, 8)
    keys = torch.randn(1, pixels, channels, device=device)
    query = torch.randn(1, queries, channels, device=device)
    logits = torch.randn(1, queries, pixels, device=device) - 0.5
    config = module._select_config(keys.device, heads, pixels, queries, channels // heads,
                                   module.dot_operands(keys.dtype, module.INTERPRET,
                                                       keys.device)[1])

    def run_with(hook: str, value: Any) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            saved = getattr(module, hook)
            setattr(module, hook, value)
            try:
                return call_triton_op(module.prototype_select_triton, keys, query, logits, heads,
                                      True, True)[1]
            finally:
                setattr(module, hook, saved)

        return run

    return -(-pixels // config[0]), config, run_with


def _select_splits(device: torch.device, small: bool) -> list[tuple[str, Callable, Callable]]:
    tiles, config, run_with = _select_call(device, small)
    splits_in_use = config[5]  # one wave of programs: splits per wave
    runs = [(f"{splits_in_use} splits (in use)", run_with("_SPLITS_OVERRIDE", None), _identical)]
    for waves in (2, 4, 8):
        splits = min(tiles, splits_in_use * waves)
        if splits != splits_in_use:
            runs.append((f"{splits} splits", run_with("_SPLITS_OVERRIDE", splits), _identical))
    return runs


def _select_tiles(device: torch.device, small: bool) -> list[tuple[str, Callable, Callable]]:
    _, config, run_with = _select_call(device, small)
    in_use = (config[0], config[7])
    runs = [(f"{in_use[0]} px x {in_use[1]} warps (in use)", run_with("_TILE_OVERRIDE", None),
             _identical)]
    for tile in ((64, 8), (32, 8), (32, 4), (64, 4)):
        if tile != in_use:
            runs.append((f"{tile[0]} px x {tile[1]} warps", run_with("_TILE_OVERRIDE", tile),
                         _identical))
    return runs


def _identical(result: torch.Tensor, expected: torch.Tensor) -> str:
    return "identical" if torch.equal(result, expected) else "DIFFERS"


def _fp32_close(result: torch.Tensor, expected: torch.Tensor) -> str:
    """Within fp32 accuracy of the configuration in use: max error relative to the largest
    magnitude (3xTF32 sums carry about 5e-7 relative error per product)."""
    error = ((result - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    return f"{'ok' if error < 1e-5 else 'DIFFERS'} (max rel. error {error:.1e})"


def run(
    args: argparse.Namespace, rows: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], int, int]:
    """Times every candidate of the experiments asked for; returns (rows, failed candidates or
    experiments, candidates skipped at the deadline). Rows are added to ``rows`` as they finish
    (the caller's list keeps them when the run is interrupted)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    builders = {"bn_depthwise": _bn_depthwise, "projection_fp32": _projection_fp32,
                "layer_fp32_projection": _layer_fp32_projection,
                "attention_columns": _attention_columns, "select_splits": _select_splits,
                "select_tiles": _select_tiles}
    rows = [] if rows is None else rows
    failures = skipped = 0
    with torch.no_grad():
        for experiment in args.experiments or EXPERIMENTS:
            if harness.out_of_time():  # the suite's time box: keep what was measured
                skipped += 1
                continue
            try:
                runs = builders[experiment](device, args.small)
                expected = runs[0][1]().clone()
                in_use_ms = None
                for index, (name, call, check) in enumerate(runs):
                    if index and harness.out_of_time():
                        skipped += len(runs) - index
                        break
                    row: dict[str, Any] = {"experiment": experiment, "candidate": name,
                                           "in_use": index == 0}
                    row["check"] = check(call(), expected)
                    failures += "DIFFERS" in row["check"]
                    if device.type == "cuda":
                        row["device_ms"] = harness.measure_graph_time(
                            call, device=device, repeats=args.repeats)
                        if index == 0:
                            in_use_ms = row["device_ms"]
                        row["vs_in_use"] = in_use_ms / row["device_ms"]
                    rows.append(row)
            except Exception as error:  # one experiment's failure leaves the others to run
                failures += 1
                rows.append({"experiment": experiment, "check": f"ERROR: {error!r}"[:200]})
                print(f"ERROR: {experiment}: {error!r}", file=sys.stderr)
    return rows, failures, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not interpreter_requested():
        print("tune: CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    meta = {"command": " ".join(sys.argv), "small": args.small,
            "environment": harness.environment_info(device)}
    rows, failures, skipped = harness.run_until_interrupted(run, args, meta)
    return harness.report(
        rows, failures, meta=meta, started=started, columns=TABLE_COLUMNS,
        out_dir=args.out_dir or harness.default_out_dir(device), name="tune", what="candidate",
        skipped=skipped,
    )


if __name__ == "__main__":
    sys.exit(main())
