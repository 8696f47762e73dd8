"""PNG plots from benchmark JSON files: ``python -m benchmarks plots RESULTS_DIR``.

For every ``pem_ca*.json`` under the folder: latency vs pixels, one line per provider and mode
(the paper's Fig. 4 with the fused layer added), log-log. For every ``deform_conv*.json``: the
speedup of each backend over torchvision (over the reference in runs without torchvision, such as
bf16) per feature-map size. For every
``prototype_select*.json``: latency vs pixels per backend. For every ``model*.json`` (the
whole-model benchmark): median latency (p20-p80 whiskers, speedup over the reference) and peak
memory vs input size, one line per provider. Each PNG is written next to its JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def _title(meta: dict, what: str) -> str:
    env = meta.get("environment", {})
    config = meta.get("config", {})
    batch = config.get("batch", "?")
    if isinstance(batch, list):  # the deformable-conv sweep's batch sizes
        batch = ", ".join(str(b) for b in batch)
    details = f"{config.get('dtype', '?')}, B={batch}"
    if config.get("fused_backend"):  # which kernels the PEM-CA and model "fused" rows ran
        details += f", fused on {config['fused_backend']}"
    return f"{what} on {env.get('device_name', '?')} ({details})"


def plot_latency_vs_pixels(json_path: Path, series_key: str, what: str) -> Path:
    data = json.loads(json_path.read_text())
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in data["rows"]:
        if row.get("median_ms") is None:
            continue
        label = row[series_key] if "mode" not in row else f"{row[series_key]} ({row['mode']})"
        series[label].append((row["hw"], row["median_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p for p, _ in points], [t for _, t in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("pixels (H x W)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(_title(data["meta"], what))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_speedup_bars(json_path: Path) -> Path:
    """Speedup of every backend over torchvision per size, or over the reference where the run
    has no torchvision rows (torchvision has no bf16 kernel)."""
    data = json.loads(json_path.read_text())
    timed = [r for r in data["rows"] if r.get("median_ms") is not None]
    baseline = "torchvision" if any(r["backend"] == "torchvision" for r in timed) else "reference"

    def size_of(row: dict) -> str:
        return f"{row['size']} B={row['batch']}"

    base_ms = {size_of(r): r["median_ms"] for r in timed if r["backend"] == baseline}
    rows = [r for r in timed if r["backend"] != baseline and size_of(r) in base_ms]
    sizes = list(dict.fromkeys(size_of(r) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sizes)), 4.5))
    width = 0.8 / max(1, len(backends))
    for i, backend in enumerate(backends):
        values = {
            size_of(r): base_ms[size_of(r)] / r["median_ms"]
            for r in rows if r["backend"] == backend
        }
        xs = [j + i * width for j in range(len(sizes))]
        ax.bar(xs, [values.get(s, 0.0) for s in sizes], width, label=backend)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(sizes))])
    ax.set_xticklabels(sizes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"speedup over {baseline} (x)")
    ax.set_title(
        _title(data["meta"], f"deform_conv2d {data['meta'].get('config', {}).get('mode', '')}")
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_model_latency(json_path: Path) -> Path:
    """Whole-model median latency (p20-p80 whiskers, speedup over the reference next to each
    point) and peak memory vs input pixels, one line per provider, log-log."""
    data = json.loads(json_path.read_text())
    rows = [r for r in data["rows"] if r.get("median_ms") is not None]
    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(11, 4.5))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        points = sorted(
            (r["height"] * r["width"], r) for r in rows if r["provider"] == provider
        )
        pixels = [p for p, _ in points]
        medians = [r["median_ms"] for _, r in points]
        whiskers = [
            [r["median_ms"] - r.get("p20_ms", r["median_ms"]) for _, r in points],
            [r.get("p80_ms", r["median_ms"]) - r["median_ms"] for _, r in points],
        ]
        line = ax_time.errorbar(pixels, medians, yerr=whiskers, marker="o", capsize=3,
                                label=provider)
        for x, (_, r) in zip(pixels, points):
            speedup = r.get("speedup_vs_reference")
            if speedup is not None and provider != "reference":
                ax_time.annotate(f"{speedup:.2f}x", (x, r["median_ms"]), fontsize=7,
                                 xytext=(5, -10), textcoords="offset points",
                                 color=line[0].get_color())
        memory = [(p, r["peak_mib"]) for p, r in points if r.get("peak_mib")]
        ax_memory.plot([p for p, _ in memory], [m for _, m in memory], marker="o", label=provider)
    sizes = {r["height"] * r["width"]: r["size"] for r in rows}
    for ax, label in ((ax_time, "median latency (ms), p20-p80"),
                      (ax_memory, "peak extra memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(sizes), [sizes[p] for p in sorted(sizes)], fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.margins(x=0.15)
        ax.set_xlabel("input image (H x W)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    config = data["meta"].get("config", {})
    fig.suptitle(_title(data["meta"], f"PEM {config.get('backbone', '?')} inference"), fontsize=10)
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_folder(folder: Path) -> list[Path]:
    """Writes every plot the folder's JSON files allow; returns the PNG paths."""
    written = []
    for path in sorted(folder.rglob("*.json")):
        name = path.stem
        if name.startswith("pem_ca_profile"):
            continue  # a table of host / device time, printed by its command
        if name.startswith("pem_ca"):
            written.append(
                plot_latency_vs_pixels(path, "provider", "PEM-CA vs masked cross-attention")
            )
        elif name.startswith("prototype_select"):
            written.append(plot_latency_vs_pixels(path, "backend", "prototype selection"))
        elif name.startswith("deform_conv"):
            written.append(plot_speedup_bars(path))
        elif name.startswith("model"):
            written.append(plot_model_latency(path))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks plots", description=__doc__.splitlines()[0]
    )
    parser.add_argument("folder", type=Path, help="a results folder (searched recursively)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"folder: {args.folder} is not a directory")
    written = plot_folder(args.folder)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no pem_ca / prototype_select / deform_conv / model JSON files under {args.folder}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
