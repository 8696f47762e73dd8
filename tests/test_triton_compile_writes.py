"""What torch.compile believes each Triton kernel writes, checked without a GPU.

Under torch.compile a ``triton_op``'s launches go through ``wrap_triton``, and torch decides which
tensor arguments a kernel writes by following every store's address back through the kernel's
TTIR. The analysis is conservative: a pointer passed to a helper function whose result reaches a
store's address counts as written. A kernel that seems to write one of its op's inputs makes the
compiled graph copy into that input, and for a leaf that requires grad compiling the backward
fails ("a leaf Variable that requires grad is being used in an in-place operation": the Triton
deform op's input-gradient scatter, seen on an H200). The GPU tests compile the ops; this test
asks torch's analysis directly: the ops run once under the interpreter with every launch recorded
(with the names of the arguments that are the op's inputs), then a fresh process without the
interpreter runs the analysis on each launch for an sm_90 target.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(
    HAS_CUDA, reason="with a GPU the compile tests run the ops under torch.compile"
)

_ANALYSIS = r"""
import importlib, json, sys
import torch, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from torch._higher_order_ops import triton_kernel_wrap as wrap


class _SM90Driver:  # the TTIR is made for a target; no GPU is asked
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_SM90Driver())


def written(kernel, kwargs):
    if hasattr(wrap, "identify_accessed_tensors"):  # torch >= 2.12
        accesses = wrap.identify_accessed_tensors(kernel, kwargs, {})
        return sorted(dep.name for dep in accesses.read_writes.writes)
    return sorted(wrap.identify_mutated_tensors(kernel, kwargs, {}))


def decode(value):
    kind, v = next(iter(value.items()))
    if kind == "tensor":
        return torch.empty(2, dtype=getattr(torch, v))
    return tl.dtype(v) if kind == "tl" else v


result = []
for launch in json.load(open(sys.argv[1])):
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    kwargs = {name: decode(value) for name, value in launch["args"].items()}
    result.append(written(kernel, kwargs))
json.dump(result, open(sys.argv[2], "w"))
"""


def _encode(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    return {"tl": str(value)}  # a triton dtype given as a constexpr


def _op_inputs(bodies) -> list[torch.Tensor]:
    """The tensors the innermost running ``pem_triton_op`` body was called with."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code in bodies:
            code = frame.f_code
            names = code.co_varnames[: code.co_argcount]
            return [frame.f_locals[n] for n in names if isinstance(frame.f_locals[n], torch.Tensor)]
        frame = frame.f_back
    raise AssertionError("a kernel launched outside a pem_triton_op body")


@contextlib.contextmanager
def _recorded_launches(monkeypatch):
    """Every launch made through ``pem_kernels.triton.launcher`` while inside: the kernel, its
    arguments (tensors by dtype) and the names of those arguments that alias an input of the op
    that launched it."""
    import pem_kernels.triton as pt

    launches = []
    original = pt._OnTensorDevice.__getitem__

    def getitem(self, grid):
        launch = original(self, grid)
        fn = self.kernel.fn

        def run(*args, **kwargs):
            names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
            bound = {**dict(zip(names, args)), **kwargs}
            bodies = {body.__code__ for body in pt._BODIES.values()}  # ops register on import
            inputs = {t.untyped_storage().data_ptr() for t in _op_inputs(bodies) if t.numel()}
            launches.append({
                "module": fn.__module__, "kernel": fn.__name__,
                "args": {name: _encode(bound[name]) for name in names},
                "inputs": sorted(
                    name for name in names if isinstance(bound[name], torch.Tensor)
                    and bound[name].numel()
                    and bound[name].untyped_storage().data_ptr() in inputs
                ),
            })
            return launch(*args, **kwargs)

        return run

    monkeypatch.setattr(pt._OnTensorDevice, "__getitem__", getitem)
    yield launches


def _run_pem_ca(attention_norm: str) -> None:
    from pem_kernels.nn import PEMCrossAttention

    layer = PEMCrossAttention(32, 4, attention_norm=attention_norm, backend="triton")
    tgt, pos_q = torch.randn(4, 1, 32), torch.randn(4, 1, 32)
    memory, pos = torch.randn(1, 32, 3, 5), torch.randn(1, 32, 3, 5)
    mask = torch.randn(1, 4, 3, 5)
    memory.requires_grad_(True)
    layer(tgt, memory, mask, pos, pos_q).square().sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(tgt, memory, mask, pos, pos_q)
        # TF32 allowed: the one-kernel local representation instead of conv + addmm
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            layer(tgt, memory, mask, pos, pos_q)
        finally:
            torch.set_float32_matmul_precision(previous)


def _run_deform(with_mask: bool, channels_last: bool, deterministic: bool) -> None:
    from pem_kernels.triton import deform_conv2d as triton_dcn

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    input = torch.randn(1, 4, 5, 6).to(memory_format=memory_format).requires_grad_(True)
    offset = torch.randn(1, 18, 5, 6, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    mask = torch.rand(1, 9, 5, 6, requires_grad=True) if with_mask else None
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        triton_dcn.deform_conv2d(input, offset, weight, None, 1, 1, 1, mask).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_no_kernel_seems_to_write_its_ops_inputs(monkeypatch, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    import pem_kernels.triton as pt

    if not pt.interpreter_requested():
        pytest.skip("records the launches under the interpreter (TRITON_INTERPRET=1)")
    with _recorded_launches(monkeypatch) as launches:
        for attention_norm in ("queries", "channels"):
            _run_pem_ca(attention_norm)
        for with_mask, channels_last, deterministic in (
            (True, False, False), (False, True, False), (True, True, True)
        ):
            _run_deform(with_mask, channels_last, deterministic)
    # Every kernel of the package ran at least once.
    kernels = {
        name for module in ("deform_conv2d", "local_representation", "prototype_attention",
                            "prototype_select", "query_projection")
        for name, obj in vars(__import__(f"pem_kernels.triton.{module}", fromlist=["_"])).items()
        if name.endswith("_kernel") and hasattr(obj, "fn")
    }
    assert kernels == {launch["kernel"] for launch in launches}

    # One analysis per distinct launch (kernel, argument types and values, inputs).
    launches = list({json.dumps(launch, sort_keys=True): launch for launch in launches}.values())
    recorded, analysed = tmp_path / "launches.json", tmp_path / "written.json"
    recorded.write_text(json.dumps(launches))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _ANALYSIS, str(recorded), str(analysed)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    written = json.loads(analysed.read_text())
    assert len(written) == len(launches)
    for launch, names in zip(launches, written):
        where = f"{launch['kernel']} ({launch['module']})"
        assert names, f"{where}: the analysis found no write at all"
        assert not set(names) & set(launch["inputs"]), (
            f"{where}: torch.compile would take {sorted(set(names) & set(launch['inputs']))} "
            f"(inputs of its op) as written; all it sees written: {names}"
        )
