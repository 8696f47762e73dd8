"""Static profile of the Triton kernels for an H100 (sm_90), made without a GPU.

Compiles every kernel specialization that the tests' sm_90 compile checks build (the
``_SM90_COMPILE`` script of each ``tests/test_*.py`` that has one), assembles it with Triton's
bundled ptxas, disassembles the cubin with its cuobjdump and prints per specialization: registers
and spilled bytes per thread, shared memory, the distinct MMA layouts of its TTGIR, and for its two
largest loops the instructions, barriers (``BAR.SYNC``) and tensor-core instructions per iteration.

What it is for: comparing two versions of a kernel on a machine without a GPU. The counts are the
compiler's, not measurements: fewer instructions or barriers per iteration usually mean a faster
loop, but only a GPU run says by how much. The tests' specializations take no integer argument as
1 or as a multiple of 16 (a real launch does, for strides and sizes), so the absolute counts differ
from a real launch's; versions of the same kernel compare fine. (This is how the chained 3xTF32
products of Triton's ``tf32x3`` showed up: two MMA layouts and 22 barriers per pixel tile in the
selection kernel, see ``pem_kernels/triton/products.py``.)

    python -m benchmarks sass-stats                        # every test module with a script
    python -m benchmarks sass-stats test_prototype_select_triton --json stats.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
SCRIPT_MARK = '_SM90_COMPILE = """'

# Appended to conftest's SM90_COMPILE_PRELUDE: a compile_sm90 that also prints one JSON line of
# statistics per specialization it compiles.
_STATS_PRELUDE = r'''
import collections, json, os, re, subprocess, tempfile
import triton.backends.nvidia as _nvidia

_BIN = os.path.join(os.path.dirname(_nvidia.__file__), "bin")
_compile = compile_sm90


def _loops(sass):
    """(instructions, barriers, tensor-core instructions) of each backward-branch loop."""
    code = [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    where = {address: i for i, (address, _) in enumerate(code)}
    loops = []
    for i, (address, text) in enumerate(code):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in where:
            body = [t for _, t in code[where[int(target.group(1), 16)]:i + 1]]
            loops.append((len(body), sum("BAR.SYNC" in t for t in body),
                          sum("GMMA" in t or "HMMA" in t for t in body)))
    return len(code), sorted(loops, reverse=True)[:2]


def compile_sm90(fn, signature_of, constants, num_warps=4, num_stages=3):
    kernel = _compile(fn, signature_of, constants, num_warps, num_stages)
    with tempfile.TemporaryDirectory() as folder:
        ptx, cubin = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
        open(ptx, "w").write(kernel.asm["ptx"])
        info = subprocess.run([os.path.join(_BIN, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o",
                               cubin], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    instructions, loops = _loops(sass)
    print("STATS " + json.dumps({
        "kernel": fn.__name__,
        "constexprs": {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                       for k, v in constants.items()},
        "num_warps": num_warps,
        "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
        "shared_bytes": kernel.metadata.shared,
        "mma_layouts": len(set(re.findall(r"^#mma\d* = ", kernel.asm["ttgir"], re.M))),
        "instructions": instructions,
        "loops": [dict(zip(("instructions", "barriers", "mma"), loop)) for loop in loops],
    }), flush=True)
    return kernel
'''

# The constexprs shown in the table (the others are in the JSON).
_SHOWN = ("DOT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_J", "NORMALIZE", "FALLBACK",
          "PIXEL_MAJOR", "NORM_OVER_QUERIES")


def modules_with_scripts() -> list[str]:
    return sorted(p.stem for p in TESTS.glob("test_*.py") if SCRIPT_MARK in p.read_text())


def collect(module: str) -> list[dict]:
    """Statistics of every specialization ``tests/<module>.py``'s sm_90 script compiles."""
    sys.path.insert(0, str(TESTS))
    try:
        from conftest import SM90_COMPILE_PRELUDE
    finally:
        sys.path.remove(str(TESTS))
    source = (TESTS / f"{module}.py").read_text()
    if SCRIPT_MARK not in source:
        raise SystemExit(f"tests/{module}.py has no {SCRIPT_MARK.split(' ')[0]} script")
    script = source.split(SCRIPT_MARK, 1)[1].split('"""', 1)[0]
    # Compiled, not interpreted: triton.jit decides when the kernel modules are imported.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SM90_COMPILE_PRELUDE + _STATS_PRELUDE + script],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    if result.returncode:
        raise SystemExit(f"tests/{module}.py's script failed:\n{result.stderr[-3000:]}")
    return [
        dict(json.loads(line[len("STATS "):]), module=module)
        for line in result.stdout.splitlines() if line.startswith("STATS ")
    ]


def table(rows: list[dict]) -> str:
    lines = [f"{'kernel':30s} {'specialization':62s} {'warps':>5s} {'regs':>4s} {'spill':>5s} "
             f"{'smem KB':>7s} {'mma':>3s}  largest loops (instructions/barriers/mma)"]
    for row in rows:
        shown = ", ".join(f"{k}={row['constexprs'][k]}" for k in _SHOWN if k in row["constexprs"])
        loops = "  ".join(f"{x['instructions']}/{x['barriers']}/{x['mma']}" for x in row["loops"])
        lines.append(
            f"{row['kernel']:30s} {shown[:62]:62s} {row['num_warps']:5d} {row['registers']:4d} "
            f"{row['spill_bytes']:5d} {row['shared_bytes'] / 1024:7.1f} {row['mma_layouts']:3d}  "
            f"{loops}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks sass-stats", description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("modules", nargs="*", help="test modules (default: all with a script)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    modules = args.modules or modules_with_scripts()
    rows = []
    for module in modules:
        print(f"compiling the sm_90 specializations of tests/{module}.py ...", file=sys.stderr)
        rows += collect(module)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
