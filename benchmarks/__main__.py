"""Command-line front end of the benchmarks: ``python -m benchmarks <comparison> [options]``.

Comparisons (each is also runnable as its own module; ``--help`` after a name lists its options,
all of which take ``--device``, ``--dtype`` and ``--sizes``):

    pem-ca            PEM-CA (fused, reference, torch.compile) vs masked cross-attention
    prototype-select  prototype selection alone, every backend vs the eager reference
    deform-conv       deformable convolution, every backend vs torchvision and the reference
    model             the whole PEM model: inference latency, peak memory, FLOPs, fused vs reference
    profile-pem-ca    one PEM-CA layer call split into host and device time, slowest kernels
    sass-stats        the Triton kernels compiled for sm_90 without a GPU: registers, spills,
                      instructions and barriers per loop iteration (the compiler's counts)
    ptxas-stats       the CUDA C++ kernels compiled for sm_90 without a GPU: registers, spills,
                      shared memory and warps per SM by registers (ptxas's counts)
    tune              candidate launch configurations of the Triton kernels timed (on a GPU)
                      against the ones in use, each checked against them
    plots             PNG plots from the JSON results in a folder
    goals             the issues' performance goals checked against the JSON results in a
                      folder, met or not (goals.md, goals.json)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pem-ca": "benchmarks.bench_pem_ca",
    "prototype-select": "benchmarks.bench_prototype_select",
    "deform-conv": "benchmarks.bench_deform_conv",
    "model": "benchmarks.bench_model",
    "profile-pem-ca": "benchmarks.profile_pem_ca",
    "sass-stats": "benchmarks.sass_stats",
    "ptxas-stats": "benchmarks.ptxas_stats",
    "tune": "benchmarks.tune_configs",
    "plots": "benchmarks.plots",
    "goals": "benchmarks.goals",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown comparison {argv[0]!r}; expected one of {sorted(COMMANDS)}")
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]])
    sys.argv = [f"python -m benchmarks {argv[0]}"] + argv[1:]
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
