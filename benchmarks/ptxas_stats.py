"""Occupancy of the CUDA C++ kernels on an H100 (sm_90), read off ptxas without a GPU.

Compiles ``csrc/cuda/*.cu`` (or the sources named) for one architecture with the extension's own
nvcc flags (taken from ``setup.py``, ``PEM_KERNELS_NVCC_FLAGS`` included) and ``-Xptxas -v``, and
prints per kernel: registers and spilled bytes per thread, static shared memory, and how many
warps an SM can hold by its registers alone (65536 per SM, allocated per warp in units of 256).
A 256-thread block is 8 warps: a kernel held to 8 warps runs one block per SM.

What it is for: checking, on a machine without a GPU, what a change does to register pressure
(this is how the deform forward's tensor-core kernel showed up at 232-248 registers, one block per
SM). The counts are the compiler's; only a GPU run says what they cost. Each source takes about a
minute and a half on two cores.

    python -m benchmarks ptxas-stats                          # every csrc/cuda/*.cu
    python -m benchmarks ptxas-stats deform_conv2d --json stats.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "csrc" / "cuda"
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
REGISTER_UNIT = 256  # registers are allocated per warp in units of this many


def warps_per_sm_by_registers(registers: int) -> int:
    """The warps an SM holds when each thread uses ``registers`` (sm_80/sm_90 rules)."""
    per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_UNIT) * REGISTER_UNIT
    return min(MAX_WARPS_PER_SM, REGISTERS_PER_SM // per_warp)


def _demangle(names: list[str]) -> list[str]:
    """c++filt's names, shortened (the anonymous namespace and the argument list dropped); the
    mangled names where c++filt is missing."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    demangled = done.stdout.splitlines() if done.returncode == 0 else names
    short = [_drop_arguments(re.sub(r"pem_kernels::\(anonymous namespace\)::", "", name))
             for name in demangled]
    return short if len(short) == len(names) else names


def _drop_arguments(name: str) -> str:
    """``void f<T>(A, B)`` -> ``void f<T>``: the trailing parenthesized argument list."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def parse(log: str) -> list[dict]:
    """One row per kernel of a ``ptxas -v`` log: kernel, registers, spill_stores, spill_loads
    (bytes per thread), smem_bytes (static), warps_per_sm (by registers)."""
    rows: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = {"mangled": entry.group(1)}
            rows.append(current)
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            current["spill_stores"], current["spill_loads"] = map(int, spills.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem_bytes"] = int(smem.group(1)) if smem else 0
            current["warps_per_sm"] = warps_per_sm_by_registers(current["registers"])
            current = None
    rows = [row for row in rows if "registers" in row]
    for row, name in zip(rows, _demangle([row["mangled"] for row in rows])):
        row["kernel"] = name
    return rows


def _extension_build_args() -> tuple[list[str], list[str]]:
    """(include directories, nvcc flags) of the extension as setup.py builds it: its setup() call
    is recorded instead of run."""
    import setuptools

    captured: dict = {}
    real_setup = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    sys.path.insert(0, str(ROOT))
    try:
        sys.modules.pop("setup", None)
        import setup  # noqa: F401  (runs the build description)
    finally:
        setuptools.setup = real_setup
        sys.path.remove(str(ROOT))
    extension = captured["ext_modules"][0]
    nvcc = extension.extra_compile_args.get("nvcc")
    if nvcc is None:
        raise SystemExit("ptxas-stats: setup.py builds no CUDA sources here (no CUDA torch or "
                         "no nvcc)")
    macros = [f"-D{name}" if value is None else f"-D{name}={value}"
              for name, value in extension.define_macros]
    return [str(ROOT / d) for d in extension.include_dirs], nvcc + macros


def nvcc_command(source: Path, output: Path, arch: str) -> list[str]:
    """The nvcc call that compiles ``source`` for sm_``arch`` as the extension's build does, with
    ptxas's per-kernel report."""
    from torch.utils import cpp_extension

    includes, flags = _extension_build_args()
    # setup.py finds the toolkit (nvcc on PATH may be a wrapper script) and sets CUDA_HOME.
    cuda_home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "/usr/local/cuda"
    includes += cpp_extension.include_paths()
    includes += [os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"]]
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    return [
        nvcc, "-c", str(source), "-o", str(output), *(f"-I{d}" for d in includes),
        *cpp_extension.COMMON_NVCC_FLAGS, *flags, "-std=c++20", "-DTORCH_EXTENSION_NAME=_C",
        "--compiler-options", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-Xptxas", "-v",
    ]


def collect(name: str, arch: str) -> list[dict]:
    source = SOURCES / f"{name}.cu"
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run(nvcc_command(source, Path(folder) / "kernel.o", arch),
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ptxas-stats: nvcc failed on {source.name}:\n{done.stderr[-3000:]}")
    rows = parse(done.stdout + done.stderr)
    for row in rows:
        row["source"] = name
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'source':22} {'regs':>4} {'spill st/ld B':>13} {'smem B':>7} {'warps/SM':>8}  "
             "kernel"]
    for r in rows:
        lines.append(f"{r['source']:22} {r['registers']:4d} "
                     f"{r.get('spill_stores', 0):6d}/{r.get('spill_loads', 0):<6d} "
                     f"{r['smem_bytes']:7d} {r['warps_per_sm']:8d}  {r['kernel'][:100]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = sorted(p.stem for p in SOURCES.glob("*.cu"))
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks ptxas-stats", description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("sources", nargs="*", help=f"any of {', '.join(names)} (default: all)")
    parser.add_argument("--arch", default="90", help="compute capability, e.g. 90 (default)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sources) - set(names))
    if unknown:
        parser.error(f"sources: expected any of {names}, got {unknown}")
    if not re.fullmatch(r"\d{2,3}a?", args.arch):
        parser.error(f"--arch {args.arch}: expected a compute capability such as 90")
    rows = [row for name in (args.sources or names) for row in collect(name, args.arch)]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
