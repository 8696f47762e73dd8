"""Static profile of the Triton kernels for an H100 (sm_90), made without a GPU.

Compiles every kernel specialization that the tests' sm_90 compile checks build (the
``_SM90_COMPILE`` script of each ``tests/test_*.py`` that has one), assembles it with Triton's
bundled ptxas, disassembles the cubin with its cuobjdump and prints per specialization: registers
and spilled bytes per thread, shared memory, the distinct MMA layouts of its TTGIR, and for its two
largest loops the instructions, barriers (``BAR.SYNC``) and tensor-core instructions per iteration.

What it is for: comparing two versions of a kernel on a machine without a GPU. The counts are the
compiler's, not measurements: fewer instructions or barriers per iteration usually mean a faster
loop, but only a GPU run says by how much. The tests' specializations take no integer argument as
1 or as a multiple of 16 (a real launch does, for strides and sizes), which changes the code and
even register allocation: ``pem_selection`` compiles the selection kernel as a launch at PEM's
sizes would (the IEEE variant spilled 5 KB per thread there, none in the tests' specialization).
(This is how the chained 3xTF32 products of Triton's ``tf32x3`` showed up: two MMA layouts and 22
barriers per pixel tile in the selection kernel, see ``pem_kernels/triton/products.py``.)

    python -m benchmarks sass-stats                        # everything below
    python -m benchmarks sass-stats pem_selection          # the selection at PEM's sizes
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
    _report(fn, kernel, constants, num_warps)
    return kernel


def compile_launch(fn, args, constants, num_warps=4, num_stages=3):
    """compile_sm90 specialized as a launch with these argument values: ``args`` maps each
    runtime argument to an int or, for a pointer, its type ("*fp32"); an int equal to 1 becomes a
    constant, a multiple of 16 and every pointer get Triton's divisibility hint."""
    from triton.backends.compiler import GPUTarget

    signature, constants, attrs = {}, dict(constants), {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants,
                                       attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    _report(fn, kernel, constants, num_warps)
    return kernel


def _report(fn, kernel, constants, num_warps):
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
        # the element type of its first pointer argument (fp32, bf16, ...)
        "dtype": next((t[1:] for t in kernel.src.signature.values() if str(t).startswith("*")),
                      None),
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
'''

# The selection kernel as a launch at PEM's sizes makes it (B=1, 32768 pixels, 100 queries,
# C=256 in 8 heads, contiguous tensors), with a bool mask and with the mask logits (in the keys'
# dtype) that the PEM-CA layer passes: the tests' specializations take no integer as 1 or as a
# multiple of 16, and that changes register allocation (IEEE products spilled 5 KB per thread
# at PEM's sizes and none in the tests' specialization).
_PEM_SELECTION = """
import torch
from pem_kernels.triton import prototype_select as K

HW, N, C, HEADS = 32768, 100, 256, 8
for logits in (False, True):
    for dtype, precision in [("fp32", "tf32x3"), ("fp32", "tf32"), ("fp32", "ieee"),
                             ("bf16", "tf32")]:
        for normalize in (False, True):
            block_p, block_n, block_d, block_dc, _, _, _, num_warps = K._select_config(
                torch.device("cpu"), HEADS, HW, N, C // HEADS, precision)
            args = dict(
                keys_ptr="*" + dtype, queries_ptr="*" + dtype,
                mask_ptr="*" + dtype if logits else "*i1", inverse_ptr="*fp32",
                partials_ptr="*i64", allowed_seen_ptr="*i32", pixels=HW, num_queries=N,
                head_dim=C // HEADS, num_heads=HEADS, tiles_per_split=8, slots=HEADS * N,
                stride_kb=HW * C, stride_kp=C, stride_kc=1,
                stride_qb=N * C, stride_qn=C, stride_qc=1, stride_mb=N * HW, stride_mn=HW,
                stride_mp=1)
            compile_launch(K._select_kernel, args, dict(
                HAS_MASK=True, MASK_LOGITS=logits, NORMALIZE=normalize, OFFICIAL=True,
                INTERPRETED=False, DOT_PRECISION=precision,
                SCALE_KEYS=K.scales_key_tiles(normalize, precision, dtype == "fp32"),
                BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DC=block_dc),
                num_warps=num_warps)
"""

# The constexprs shown in the table (the others are in the JSON).
_SHOWN = ("DOT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_J", "NORMALIZE",
          "MASK_LOGITS", "PIXEL_MAJOR", "NORM_OVER_QUERIES")


def modules_with_scripts() -> list[str]:
    return sorted(p.stem for p in TESTS.glob("test_*.py") if SCRIPT_MARK in p.read_text())


def collect(module: str) -> list[dict]:
    """Statistics of every specialization ``tests/<module>.py``'s sm_90 script compiles, or with
    ``module`` "pem_selection", of the selection kernel as launched at PEM's sizes."""
    if module == "pem_selection":
        return _run(_PEM_SELECTION, module)
    source = (TESTS / f"{module}.py").read_text()
    if SCRIPT_MARK not in source:
        raise SystemExit(f"tests/{module}.py has no {SCRIPT_MARK.split(' ')[0]} script")
    return _run(source.split(SCRIPT_MARK, 1)[1].split('"""', 1)[0], module)


def _run(script: str, module: str) -> list[dict]:
    sys.path.insert(0, str(TESTS))
    try:
        from conftest import SM90_COMPILE_PRELUDE
    finally:
        sys.path.remove(str(TESTS))
    # Compiled, not interpreted: triton.jit decides when the kernel modules are imported.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SM90_COMPILE_PRELUDE + _STATS_PRELUDE + script],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    if result.returncode:
        raise SystemExit(f"{module}: the compile script failed:\n{result.stderr[-3000:]}")
    return [
        dict(json.loads(line[len("STATS "):]), module=module)
        for line in result.stdout.splitlines() if line.startswith("STATS ")
    ]


def table(rows: list[dict]) -> str:
    lines = [f"{'kernel':30s} {'specialization':62s} {'warps':>5s} {'regs':>4s} {'spill':>5s} "
             f"{'smem KB':>7s} {'mma':>3s}  largest loops (instructions/barriers/mma)"]
    for row in rows:
        shown = ", ".join([str(row["dtype"])] + [
            f"{k}={row['constexprs'][k]}" for k in _SHOWN if k in row["constexprs"]])
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
    parser.add_argument(
        "modules", nargs="*",
        help="test modules, or pem_selection: the selection kernel specialized as at PEM's sizes "
        "(default: pem_selection and every test module with a script)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    modules = args.modules or ["pem_selection"] + modules_with_scripts()
    rows = []
    for module in modules:
        what = "PEM's selection" if module == "pem_selection" else f"tests/{module}.py"
        print(f"compiling the sm_90 specializations of {what} ...", file=sys.stderr)
        rows += collect(module)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
