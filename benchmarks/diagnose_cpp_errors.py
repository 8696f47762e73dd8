"""Diagnoses C++ argument errors that crash the process instead of raising (GPU suite, "diagnose").

On the first GPU machine (torch 2.11, g++ 13.3, Python 3.12) every TORCH_CHECK of pem_kernels._C
whose message streamed an integer (a size, a stride, num_heads) into c10::str killed the process
with a segmentation fault, even in a fresh pytest worker that had launched no Triton kernel,
while checks whose message held only text and dtypes raised RuntimeError as they should; on the
development machines and in an Ubuntu 24.04 chroot with that machine's toolchain all of them
raise. The extension's checks now go through PEM_CHECK (csrc/include/pem_kernels/check.h), which
formats integers with std::to_string. This prints the facts that tell the causes apart: the
toolchain and the C++ runtime the process maps, then each case in a child process of its own (a
crash ends only that child): the extension's own ops (which must raise), and a minimal extension
compiled on the spot whose TORCH_CHECK streams an integer (`check_int`, the old way) next to the
same message preformatted (`check_preformatted_int`, PEM_CHECK's way), also after CUDA was
initialized and a Triton kernel ran, and a native backtrace of `check_int` when a debugger exists.

    python -m benchmarks.diagnose_cpp_errors
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

CHILD_TIMEOUT_S = 120

OPS_PRELUDE = "import torch, pem_kernels\n"
OP_CASES = {
    "op, integer in the message (PEM_CHECK)": (
        "torch.ops.pem_kernels.prototype_select(torch.randn(2, 30, 16), torch.randn(2, 3, 16), "
        "None, 5, False, False)"
    ),
    "op, only text and a dtype in the message": (
        "torch.ops.pem_kernels.prototype_select(torch.randn(2, 30, 16), torch.randn(2, 3, 16), "
        "torch.ones(2, 3, 30), 4, False, False)"
    ),
    "op below autograd (no Python autograd layer), integer in the message (PEM_CHECK)": (
        "torch.ops.pem_kernels.prototype_select.default.redispatch("
        "torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), torch.randn(2, 30, 16), "
        "torch.randn(2, 3, 16), None, 5, False, False)"
    ),
}

# Most crashes came in pytest workers that had run GPU and Triton tests before; a machine like
# that one without a GPU (same OS, compiler, torch, Python) raised as it should. So the minimal
# integer case runs again after each thing such a worker had done first.
PROCESS_STATES = {
    "CUDA initialized": "torch.zeros(1, device='cuda')\n",
    "triton imported": "import triton\n",
    "a Triton kernel launched": (
        "pem_kernels.prototype_select(torch.randn(1, 64, 16, device='cuda'), "
        "torch.randn(1, 3, 16, device='cuda'), None, 4, backend='triton')\n"
        "torch.cuda.synchronize()\n"
    ),
    "scipy and PIL imported": "import scipy.optimize, PIL.Image\n",
}

MINIMAL_SOURCE = textwrap.dedent(
    """
    #include <sstream>
    #include <string>
    #include <torch/extension.h>

    std::string format_int() { return c10::str("n = ", int64_t(5)); }
    std::string ostream_int() { std::ostringstream s; s << int64_t(5); return s.str(); }
    void check_text() { TORCH_CHECK(false, "plain ", "text"); }
    void check_int() { TORCH_CHECK(false, "n = ", int64_t(5)); }
    void check_preformatted_int() { TORCH_CHECK(false, "n = " + std::to_string(int64_t(5))); }
    """
)
MINIMAL_FUNCTIONS = [
    "format_int", "ostream_int", "check_text", "check_int", "check_preformatted_int"
]


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def shell(command: str) -> None:
    done = subprocess.run(
        command, shell=True, capture_output=True, text=True, timeout=60, check=False
    )
    print(f"$ {command}\n{(done.stdout + done.stderr).rstrip()}", flush=True)


def child(label: str, code: str, env: dict[str, str] | None = None) -> None:
    """Runs ``code`` in a fresh interpreter and reports how it ended."""
    wrapped = code + "\nprint('finished without an exception')"
    try:
        done = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", wrapped], capture_output=True, text=True,
            timeout=CHILD_TIMEOUT_S, env=env, check=False,
        )
    except subprocess.TimeoutExpired:
        print(f"[{label}] TIMED OUT after {CHILD_TIMEOUT_S} s", flush=True)
        return
    outcome = "CRASHED" if done.returncode < 0 else f"exit code {done.returncode}"
    tail = "\n    ".join((done.stdout + done.stderr).strip().splitlines()[-6:])
    print(f"[{label}] {outcome}\n    {tail}", flush=True)


def raising(call: str) -> str:
    return f"try:\n    {call}\nexcept RuntimeError as error:\n    print('RuntimeError:', error)\n"


def backtrace(code: str) -> None:
    """Runs ``code`` under cuda-gdb or gdb and prints the native stack where it stops."""
    debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
    if debugger is None:
        print("no cuda-gdb or gdb on PATH", flush=True)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(code)
    command = [debugger, "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable,
               script.name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                              env=dict(os.environ, PYTHONFAULTHANDLER="0"), check=False)
    except subprocess.TimeoutExpired:
        print(f"{debugger} timed out after {CHILD_TIMEOUT_S} s", flush=True)
        return
    finally:
        os.unlink(script.name)
    lines = [
        line for line in (done.stdout + done.stderr).splitlines()
        if line.startswith(("#", "Thread", "Program"))
    ]
    print("\n".join(lines[-40:]) or (done.stdout + done.stderr)[-3000:], flush=True)


def main() -> int:
    import torch

    section("toolchain")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"cxx11 abi {torch.compiled_with_cxx11_abi()}", flush=True)
    for line in torch.__config__.show().splitlines():
        if any(key in line for key in ("GCC", "CXX_COMPILER", "CXX_FLAGS")):
            print("torch config:", line.strip()[:300], flush=True)
    shell("c++ --version | head -n 1; g++ --version | head -n 1")
    import pem_kernels._C as extension

    so_path = extension.__file__
    shell(f"ldd {so_path} | grep -E 'stdc|gcc_s|gomp|libc10|torch_cpu'")
    shell(f"objdump -T {so_path} | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -n 3")
    child(
        "C++ runtime mapped after importing pem_kernels",
        "import pem_kernels\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "print(sorted({l.split()[-1] for l in maps if 'stdc++' in l or 'gcc_s' in l}))",
    )

    section("the extension's own ops (each in a child process; every one must raise)")
    for label, call in OP_CASES.items():
        child(label, OPS_PRELUDE + raising(call))

    from torch.utils.cpp_extension import load_inline

    build_dirs = []
    integer_case = None  # (prelude, call) of the plain minimal extension's check_int
    # Plain, then with the extension's own OpenMP flags (setup.py compiles and links -fopenmp).
    for name, flags in (("pem_diag", []), ("pem_diag_openmp", ["-fopenmp"])):
        section(f"a minimal extension compiled here with the same toolchain, -O3 {' '.join(flags)}")
        build_dir = tempfile.mkdtemp(prefix=f"{name}_")
        build_dirs.append(build_dir)
        try:
            load_inline(name, cpp_sources=MINIMAL_SOURCE, functions=MINIMAL_FUNCTIONS,
                        extra_cflags=["-O3", *flags], extra_ldflags=flags,
                        build_directory=build_dir, verbose=False)
        except Exception as error:  # noqa: BLE001 - report and go on
            print(f"building {name} failed: {error}", flush=True)
            continue
        prelude = f"import sys, torch\nsys.path.insert(0, {build_dir!r})\nimport {name}\n"
        for function in MINIMAL_FUNCTIONS:
            child(f"{name}.{function}", prelude + raising(f"print(repr({name}.{function}()))"))
        if integer_case is None:
            integer_case = (prelude, f"{name}.check_int()")

    if integer_case is not None:
        section("the minimal check_int after what a pytest worker had done first")
        prelude, call = integer_case
        for state, setup in PROCESS_STATES.items():
            child(f"after: {state}", prelude + "import pem_kernels\n" + setup + raising(call))

        section("native backtrace of the minimal check_int")
        backtrace(prelude + raising(call))
    for build_dir in build_dirs:
        shutil.rmtree(build_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
