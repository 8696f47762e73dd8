"""A few calls of each kernel the issues set goals for, for Nsight Compute to profile.

The benchmarks say how long a kernel takes; ``ncu`` says why (achieved occupancy, where warps
stall, memory vs FMA throughput). Each target builds its benchmark's inputs at PEM's size (fp32,
batch 1) and runs the op ``--calls`` times (the first ones compile Triton kernels and warm the
caches), so that ncu can skip those and profile a later launch::

    ncu --section SpeedOfLight --section WarpStateStats -k regex:prototype_select_tile \\
        --launch-skip 2 --launch-count 1 python -m benchmarks.ncu_targets select-cuda

``bash benchmarks/gpu_suite.sh ncu`` profiles every target this way (the kernel names are in
:data:`TARGETS`). Targets:

* ``select-cuda``, ``select-triton``: prototype selection, 32768 px, N=100, C=256, 8 heads;
* ``deform-cuda-forward``, ``deform-cuda-backward``: the deformable conv at (1,128,128,256);
* ``local-representation-triton``: the fused layer's feature projection at 32768 px (inference).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

# target -> the regular expression of the kernel names ncu profiles for it
TARGETS = {
    "select-cuda": "prototype_select_tile_kernel|merge_and_gather_kernel",
    "select-triton": "_select_kernel|_finalize_kernel",
    "deform-cuda-forward": "deform_conv2d_forward_(mma_)?kernel",
    "deform-cuda-backward": "fill_columns_kernel|coordinate_grads_kernel|input_grad_atomic_kernel",
    "local-representation-triton": "_bn_depthwise_conv_kernel|_local_representation_kernel",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ncu_targets",
        description="Run one goal kernel a few times at PEM's size, for Nsight Compute.",
    )
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--calls", type=int, default=4, help="calls of the op (default 4)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls {args.calls}: expected at least 1")
    if not torch.cuda.is_available():
        parser.error(f"{args.target}: needs a CUDA GPU (Nsight Compute profiles GPU kernels)")
    return args


def make_call(target: str, device: torch.device | None = None) -> Callable[[], object]:
    """The op of ``target`` on its inputs (on ``device``, default the GPU) as a call."""
    device = torch.device("cuda") if device is None else device
    generator = torch.Generator(device=device).manual_seed(0)
    if target.startswith("select-"):
        from benchmarks.bench_prototype_select import make_inputs, make_op

        keys, queries, mask = make_inputs(1, 32768, 100, 256, 0.3, torch.float32, device,
                                          generator)
        op = make_op(target.removeprefix("select-"), 8, "per_query", False)
        return lambda: op(keys, queries, mask)
    if target.startswith("deform-"):
        from benchmarks.bench_deform_conv import make_inputs, make_step

        mode = "forward" if target.endswith("forward") else "forward+backward"
        tensors = make_inputs(1, 128, 128, 256, torch.float32, device, generator,
                              with_grad=mode != "forward")
        step = make_step("cuda", mode)
        return lambda: step(tensors)
    from benchmarks.bench_pem_ca import make_inputs, make_layers

    _, memory, _, pos, _ = make_inputs(1, 32768, device, torch.float32, generator)
    layer = make_layers(device, torch.float32, "triton")["fused"]

    def project():
        with torch.no_grad():
            return layer.feature_proj.project_for_selection(memory, pos, "triton")

    return project


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    call = make_call(args.target)
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()
    print(f"{args.target}: {args.calls} calls ({TARGETS[args.target]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
