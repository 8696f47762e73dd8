"""The issues' performance goals, checked against a results folder.

``python -m benchmarks goals RESULTS_DIR`` reads every benchmark JSON under the folder
(``prototype_select``, ``pem_ca``, ``deform_conv``), finds the rows each goal names, and prints
one line per measured row with the ratios, the thresholds and a verdict, then writes the same
table to ``goals.md`` and ``goals.json`` in the folder. The GPU suite runs it after the plots, so
that a GPU call's closing note reports every ratio from the files, met or not, instead of from
numbers read off a log.

The goals (issue #3: the fused PEM-CA; issue #4: the deformable convolution):

* ``select``: the prototype selection alone at 32768 px, fp32, B=1, on CUDA: each kernel backend
  at least 8x the eager reference and at 60% or more of the GPU's peak memory bandwidth (the
  benchmark's ``gbps``: its bandwidth floor over the latency, host work included; the device
  time's ``graph_gbps`` is shown beside it);
* ``pem_ca_forward``: the fused PEM-CA layer's forward at 32768 px, fp32, B=1, on CUDA: at least
  3x Mask2Former's masked cross-attention and 1.5x ``torch.compile(reference)``, latency against
  latency from one file;
* ``deform_forward``: the deformable-conv forward in fp32 on CUDA, at every PEM shape measured:
  at least 3x torchvision, with at most half its peak memory;
* ``deform_forward_backward``: the same with the backward: at least 2x, at most half the memory;
* ``deform_cpu_forward``: the deformable-conv forward on the CPU at (1,128,64,128): at least 1.5x
  torchvision, with less peak memory.

A row counts only under the conditions of its goal: a Mask2Former ratio only from files whose
baseline made Mask2Former's own call (``mask2former_need_weights`` in the file's meta, written
since 2026-11-27; earlier files timed ``need_weights=False``, PyTorch's SDPA kernel); a selection
row only when its indices matched the reference's; a bandwidth check only with the GPU's peak
known (from the device's memory clock and bus width as the benchmark recorded them, else from a
table of datasheet figures). A check that cannot be made is "unknown", and a goal with an unknown
check is not met. The GPU goals were set for an H100; rows from another GPU say which.

This module reads JSON only (no torch import): it runs anywhere the results are.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

GOAL_DEVICE = "NVIDIA H100"  # the GPU the issues set their GPU goals for
SELECT_PIXELS = 32768
PEM_CA_PIXELS = 32768
CPU_DEFORM_SHAPE = "(1,128,64,128)"

# Peak memory bandwidth in GB/s (1e9 bytes/s) from NVIDIA's datasheets, for result files written
# before the benchmarks recorded the device's memory clock and bus width.
DATASHEET_BANDWIDTH_GBPS = {
    "NVIDIA H100 80GB HBM3": 3350.0,  # H100 SXM5
    "NVIDIA H100 PCIe": 2000.0,
    "NVIDIA H100 NVL": 3900.0,
    "NVIDIA H200": 4800.0,
}


@dataclass
class Check:
    """One condition of a goal: ``value`` compared with ``threshold`` (``>=``, ``<=`` or ``<``);
    ``value`` None means it could not be measured from the files."""

    what: str
    value: float | None
    op: str
    threshold: float

    @property
    def passed(self) -> bool | None:
        if self.value is None or not math.isfinite(self.value):
            return None
        return {">=": self.value >= self.threshold, "<=": self.value <= self.threshold,
                "<": self.value < self.threshold}[self.op]

    def text(self) -> str:
        value = "unknown" if self.value is None else f"{self.value:.3g}"
        return f"{self.what} {value} (goal {self.op} {self.threshold:g})"


@dataclass
class Evaluation:
    """A goal against one measured row."""

    goal: str
    issue: int
    file: str
    device_name: str
    conditions: str
    measured: str
    checks: list[Check] = field(default_factory=list)
    not_counted: str | None = None  # why the row cannot decide the goal

    @property
    def verdict(self) -> str:
        if self.not_counted:
            return f"not counted: {self.not_counted}"
        passed = [check.passed for check in self.checks]
        if all(p is True for p in passed):
            return "met"
        if any(p is False for p in passed):
            return "not met"
        return "unknown"

    def as_dict(self) -> dict:
        data = asdict(self)
        for check, as_dict in zip(self.checks, data["checks"]):
            as_dict["passed"] = check.passed
        data["verdict"] = self.verdict
        return data


# ---- reading the files ----------------------------------------------------------------------


def load_results(folder: Path) -> list[tuple[Path, dict]]:
    """(path, parsed JSON) of every benchmark result file under ``folder``, sorted by path.
    Files that are not benchmark results (no ``meta.benchmark``) are skipped."""
    found = []
    for path in sorted(folder.rglob("*.json")):
        if path.name == "goals.json":
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(data, dict) and isinstance(data.get("meta"), dict)
                and isinstance(data.get("rows"), list) and data["meta"].get("benchmark")):
            data["rows"] = [row for row in data["rows"] if isinstance(row, dict)]
            if not isinstance(data["meta"].get("environment"), dict):
                data["meta"]["environment"] = {}
            if not isinstance(data["meta"].get("config"), dict):
                data["meta"]["config"] = {}
            found.append((path, data))
    return found


def peak_bandwidth_gbps(environment: dict) -> tuple[float | None, str]:
    """(peak GB/s, where the figure comes from) of the GPU a file was measured on."""
    recorded = environment.get("gpu_peak_bandwidth_gbps")
    if recorded:
        return float(recorded), "memory clock x bus width"
    name = environment.get("device_name", "")
    if name in DATASHEET_BANDWIDTH_GBPS:
        return DATASHEET_BANDWIDTH_GBPS[name], "datasheet"
    return None, "unknown"


def _number(row: dict, key: str) -> float:
    """``row[key]`` for a format string: NaN where the file has no number (missing or null)."""
    value = row.get(key)
    return float("nan") if value is None else value


def _device_type(environment: dict) -> str:
    return str(environment.get("device") or "").split(":")[0]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def _precision_note(meta: dict) -> str:
    """The fp32 product rules a file ran under, where they are not the defaults."""
    environment = meta.get("environment", {})
    precision = environment.get("float32_matmul_precision") or "highest"
    note = "" if precision == "highest" else f", TF32 allowed (matmul precision {precision})"
    products = environment.get("triton_fp32_dot")
    if products not in (None, "tf32x3"):  # PEM_KERNELS_FP32_DOT, the kernels' fp32 products
        note += f", kernel products {products}"
    return note


def _device_note(environment: dict) -> str:
    name = environment.get("device_name", "?")
    return "" if name.startswith(GOAL_DEVICE) else f" (goal set for an H100; ran on {name})"


# ---- the goals ------------------------------------------------------------------------------


def select_goal(path: str, data: dict) -> Iterator[Evaluation]:
    meta, env = data["meta"], data["meta"].get("environment", {})
    config = meta.get("config", {})
    if _device_type(env) != "cuda" or config.get("dtype") != "float32":
        return
    peak, source = peak_bandwidth_gbps(env)
    for row in data["rows"]:
        if (row.get("hw") != SELECT_PIXELS or row.get("batch") != 1
                or row.get("backend") == "reference" or row.get("median_ms") is None):
            continue
        reference = next(
            (r for r in data["rows"] if r.get("backend") == "reference"
             and r.get("hw") == row["hw"] and r.get("batch") == row["batch"]), None,
        )
        ref_ms = reference.get("median_ms") if reference else None
        fraction = row["gbps"] / peak if peak and row.get("gbps") is not None else None
        yield Evaluation(
            goal="select", issue=3, file=path, device_name=env.get("device_name", "?"),
            conditions=f"backend={row['backend']}, {row['hw']} px, fp32, B=1, "
            f"normalize_keys={row.get('normalize_keys')}{_precision_note(meta)}"
            f"{_device_note(env)}",
            measured=f"{row['median_ms']:.3f} ms vs reference "
            + (f"{ref_ms:.3f} ms" if ref_ms else "not measured")
            + f"; {_number(row, 'gbps'):.0f} GB/s of "
            + (f"{peak:.0f} ({source})" if peak else "an unknown peak")
            # the device time's bandwidth, for reading: the goal counts the latency's
            + (f", {row['graph_gbps']:.0f} GB/s on the device alone ({row['graph_ms']:.3f} ms)"
               if row.get("graph_gbps") and row.get("graph_ms") else ""),
            checks=[
                Check("speedup vs eager reference", _ratio(ref_ms, row["median_ms"]), ">=", 8.0),
                Check("fraction of peak bandwidth", fraction, ">=", 0.60),
            ],
            not_counted=None if row.get("indices_ok", True) else "indices differ from the "
            "reference's",
        )


def pem_ca_forward_goal(path: str, data: dict) -> Iterator[Evaluation]:
    meta, env = data["meta"], data["meta"].get("environment", {})
    config = meta.get("config", {})
    if (_device_type(env) != "cuda" or config.get("dtype") != "float32"
            or config.get("batch") != 1):
        return
    rows = {
        r["provider"]: r for r in data["rows"]
        if r.get("hw") == PEM_CA_PIXELS and r.get("mode") == "forward"
    }
    fused = rows.get("fused")
    if fused is None or fused.get("median_ms") is None:
        return
    m2f, compiled = rows.get("mask2former", {}), rows.get("compiled", {})
    real_m2f = bool(meta.get("mask2former_need_weights"))
    m2f_ratio = _ratio(m2f.get("median_ms"), fused["median_ms"]) if real_m2f else None
    parts = [f"{fused['median_ms']:.3f} ms (device {fused['graph_ms']:.3f})"
             if fused.get("graph_ms") else f"{fused['median_ms']:.3f} ms"]
    for name, row in (("Mask2Former", m2f), ("compiled", compiled)):
        if row.get("median_ms"):
            device = f", device {row['graph_ms']:.3f}" if row.get("graph_ms") else ""
            parts.append(f"{name} {row['median_ms']:.3f} ms{device}")
        else:
            parts.append(f"{name} not measured")
    m2f_what = "speedup vs Mask2Former" if real_m2f else (
        "speedup vs Mask2Former (this file's baseline passed need_weights=False: not its call)"
    )
    layer = f"fused on {config.get('fused_backend', '?')}"
    resolved = meta.get("fused_backends")
    if isinstance(resolved, dict) and resolved:  # what "auto" ran (files since 2026-11-27)
        layer += " (" + ", ".join(f"{op} {backend}" for op, backend in resolved.items()) + ")"
    yield Evaluation(
        goal="pem_ca_forward", issue=3, file=path, device_name=env.get("device_name", "?"),
        conditions=f"{layer}, {PEM_CA_PIXELS} px, fp32, B=1, "
        f"forward{_precision_note(meta)}{_device_note(env)}",
        measured="; ".join(parts),
        checks=[
            Check(m2f_what, m2f_ratio, ">=", 3.0),
            Check("speedup vs torch.compile(reference)",
                  _ratio(compiled.get("median_ms"), fused["median_ms"]), ">=", 1.5),
        ],
    )


def _deform_goal(name: str, mode: str, device: str, speedup: float, memory_op: str,
                 memory: float, shape: str | None = None) -> Callable:
    def evaluate(path: str, data: dict) -> Iterator[Evaluation]:
        meta, env = data["meta"], data["meta"].get("environment", {})
        config = meta.get("config", {})
        if (_device_type(env) != device or config.get("mode") != mode
                or config.get("dtype") != "float32"):
            return
        layout = ", channels_last" if config.get("channels_last") else ""
        layout += ", deterministic" if config.get("deterministic") else ""
        for row in data["rows"]:
            if (row.get("backend") in ("torchvision", "reference")
                    or row.get("median_ms") is None or (shape and row.get("shape") != shape)):
                continue
            tv = next(
                (r for r in data["rows"] if r.get("backend") == "torchvision"
                 and r.get("shape") == row.get("shape") and r.get("batch") == row.get("batch")),
                {},
            )
            yield Evaluation(
                goal=name, issue=4, file=path, device_name=env.get("device_name", "?"),
                conditions=f"backend={row['backend']}, {row.get('shape')} ({row.get('size')}), "
                f"fp32, {mode}{layout}{_precision_note(meta)}"
                + (_device_note(env) if device == "cuda" else ""),
                measured=f"{row['median_ms']:.3f} ms vs torchvision "
                + (f"{tv['median_ms']:.3f} ms" if tv.get("median_ms") else "not measured")
                + f"; peak {_number(row, 'peak_mib'):.1f} vs "
                + (f"{tv['peak_mib']:.1f} MiB" if tv.get("peak_mib") is not None else "? MiB"),
                checks=[
                    Check("speedup vs torchvision", _ratio(tv.get("median_ms"),
                                                           row["median_ms"]), ">=", speedup),
                    Check("peak memory vs torchvision",
                          row["peak_bytes"] / tv["peak_bytes"]
                          if tv.get("peak_bytes") and row.get("peak_bytes") is not None
                          else None, memory_op, memory),
                ],
            )

    return evaluate


# name: (the benchmark whose files it reads, what it asks, its evaluation)
GOALS: dict[str, tuple[str, str, Callable]] = {
    "select": (
        "prototype_select",
        "#3 prototype selection at 32768 px (CUDA, fp32): >= 8x eager reference, >= 60% of "
        "peak bandwidth",
        select_goal,
    ),
    "pem_ca_forward": (
        "pem_ca",
        "#3 PEM-CA forward at 32768 px (CUDA, fp32, B=1): >= 3x Mask2Former, >= 1.5x "
        "torch.compile(reference)",
        pem_ca_forward_goal,
    ),
    "deform_forward": (
        "deform_conv2d",
        "#4 deform conv forward (CUDA, fp32): >= 3x torchvision, <= 0.5x its peak memory",
        _deform_goal("deform_forward", "forward", "cuda", 3.0, "<=", 0.5),
    ),
    "deform_forward_backward": (
        "deform_conv2d",
        "#4 deform conv forward+backward (CUDA, fp32): >= 2x torchvision, <= 0.5x its peak "
        "memory",
        _deform_goal("deform_forward_backward", "forward+backward", "cuda", 2.0, "<=", 0.5),
    ),
    "deform_cpu_forward": (
        "deform_conv2d",
        f"#4 deform conv forward on the CPU at {CPU_DEFORM_SHAPE}: >= 1.5x torchvision, less "
        "peak memory",
        _deform_goal("deform_cpu_forward", "forward", "cpu", 1.5, "<", 1.0,
                     shape=CPU_DEFORM_SHAPE),
    ),
}


def evaluate_folder(folder: Path) -> list[Evaluation]:
    """Every goal against every matching row of the result files under ``folder``."""
    evaluations = []
    for path, data in load_results(folder):
        relative = path.relative_to(folder).as_posix()
        for benchmark, _, evaluate in GOALS.values():
            if data["meta"]["benchmark"] == benchmark:
                evaluations.extend(evaluate(relative, data))
    return evaluations


def summary_lines(evaluations: list[Evaluation]) -> list[str]:
    """One line per goal: how many of its rows met it, or that the folder has none."""
    lines = []
    for name, (_, title, _) in GOALS.items():
        rows = [e for e in evaluations if e.goal == name]
        if not rows:
            lines.append(f"{title}: not measured in this folder")
            continue
        met = sum(e.verdict == "met" for e in rows)
        undecided = sum(e.verdict != "met" and e.verdict != "not met" for e in rows)
        lines.append(f"{title}: met in {met} of {len(rows)} rows"
                     + (f" ({undecided} unknown or not counted)" if undecided else ""))
    return lines


def markdown(folder: Path, evaluations: list[Evaluation]) -> str:
    out = [f"# Goals against `{folder.as_posix()}`", "",
           "Written by `python -m benchmarks goals`; see `benchmarks/goals.py` for each goal's "
           "conditions.", ""]
    out += [f"- {line}" for line in summary_lines(evaluations)]
    out += ["", "| goal | conditions | measured | checks | verdict | file |",
            "|---|---|---|---|---|---|"]
    for e in evaluations:
        checks = "; ".join(check.text() for check in e.checks)
        out.append(f"| {e.goal} (#{e.issue}) | {e.conditions} | {e.measured} | {checks} | "
                   f"{e.verdict} | {e.file} |")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks goals",
        description="Check the issues' performance goals against the benchmark JSON files in a "
        "results folder; writes goals.md and goals.json there.",
    )
    parser.add_argument("folder", type=Path, help="a results folder, e.g. "
                        "benchmarks/results/2026-11-26-nvidia-h200")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; write no goals.md / goals.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.folder.is_dir():
        print(f"goals: folder {str(args.folder)!r} does not exist or is not a folder",
              file=sys.stderr)
        return 2
    if not load_results(args.folder):
        print(f"goals: no benchmark JSON files under {str(args.folder)!r}", file=sys.stderr)
        return 2
    evaluations = evaluate_folder(args.folder)
    text = markdown(args.folder, evaluations)
    print(text, end="")
    if not args.no_write:
        (args.folder / "goals.md").write_text(text)
        (args.folder / "goals.json").write_text(json.dumps(
            {"folder": args.folder.as_posix(), "summary": summary_lines(evaluations),
             "evaluations": [e.as_dict() for e in evaluations]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
