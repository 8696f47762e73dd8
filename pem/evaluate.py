"""Evaluating PEM: ``python -m pem.evaluate --checkpoint OUT/last.pt [--data SPEC]``.

Runs the model on every validation image (batch 1, as detectron2's evaluators), post-processes as
the official inference (:mod:`pem.inference`) and prints mIoU, and for panoptic models PQ, SQ, RQ,
PQ_things and PQ_stuff, plus a per-class table. ``--short-side`` resizes each image so its short
side has that length (capped by ``--max-size`` on the long side, detectron2's ResizeShortestEdge
at test time); predictions are then resized back and scored at the original resolution.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from pem.cli import check_device, check_ints, device_text, dumps
from pem.data.build import build_dataset, parse_data_spec
from pem.inference import postprocess
from pem.metrics import PanopticQuality, PanopticResult, SemSegMetric, SemSegResult
from pem_kernels import BACKENDS

__all__ = ["EvalResult", "evaluate", "format_table", "main", "resized_shape"]


@dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation: ``semantic`` always, ``panoptic`` for panoptic models."""

    class_names: tuple[str, ...]
    semantic: SemSegResult
    panoptic: PanopticResult | None
    num_images: int

    def summary(self) -> dict[str, float]:
        """Headline numbers in percent: mIoU, and PQ / SQ / RQ / PQ_th / PQ_st if panoptic."""
        out = {"mIoU": 100 * self.semantic.miou}
        if self.panoptic is not None:
            p = self.panoptic
            out |= {"PQ": 100 * p.all.pq, "SQ": 100 * p.all.sq, "RQ": 100 * p.all.rq,
                    "PQ_th": 100 * p.things.pq, "PQ_st": 100 * p.stuff.pq}
        return {k: round(v, 2) for k, v in out.items()}


def resized_shape(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge output size: short side -> ``short_side``, long side
    capped at ``max_size``, rounded to the nearest pixel."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    task: str,
    device: torch.device | str = "cpu",
    *,
    progress: bool = True,
    max_images: int | None = None,
    short_side: int | None = None,
    max_size: int = 4096,
) -> EvalResult:
    """Scores ``model`` (a :class:`pem.model.PEM` in eval mode) on ``dataset``.

    Args:
        model: the model; its output is post-processed with the dataset's thing classes.
        dataset: samples as :mod:`pem.data` defines them, with an ``info`` attribute.
        task: ``"panoptic"`` (mIoU and PQ) or ``"semantic"`` (mIoU).
        device: where the model runs.
        progress: show a progress bar.
        max_images: score only the first ``max_images`` images.
        short_side, max_size: optional test-time resize (see the module docstring).
    """
    if task not in ("panoptic", "semantic"):
        raise ValueError(f"task: expected 'panoptic' or 'semantic', got {task!r}")
    info = dataset.info
    device = torch.device(device)
    semantic = SemSegMetric(info.num_classes, ignore_label=info.ignore_label)
    panoptic = (
        PanopticQuality(info.thing_ids, info.stuff_ids) if task == "panoptic" else None
    )
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    for i in tqdm(range(count), desc="evaluate", disable=not progress, dynamic_ncols=True):
        sample = dataset[i]
        result = predict(model, sample["image"], info.thing_ids, task, device,
                         short_side=short_side, max_size=max_size)
        semantic.update(result["sem_seg"].argmax(0).cpu(), sample["sem_seg"])
        if panoptic is not None:
            seg, infos = result["panoptic_seg"]
            panoptic.update((seg.cpu(), infos), (sample["panoptic"], sample["segments_info"]))
    return EvalResult(
        tuple(info.class_names),
        semantic.compute(),
        panoptic.compute() if panoptic is not None else None,
        count,
    )


def predict(
    model: nn.Module,
    image: Tensor,
    thing_ids,
    task: str,
    device: torch.device,
    *,
    short_side: int | None = None,
    max_size: int = 4096,
) -> dict[str, object]:
    """One image ``[3, H, W]`` (uint8 or float 0-255) -> :func:`pem.inference.postprocess`'s
    result at the original ``H x W``."""
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected an RGB Tensor [3, H, W], got {_describe(image)}")
    h, w = image.shape[-2:]
    # In the model's dtype (a model cast to bf16 takes bf16 images; see PEM.preprocess); fp32
    # for a model without floating parameters.
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else None
    x = image.to(device=device, dtype=dtype or torch.float32)[None]
    if short_side is not None:
        size = resized_shape(h, w, short_side, max_size)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    outputs = model(x)
    (result,) = postprocess(
        outputs, output_sizes=[(h, w)], panoptic=task == "panoptic", thing_ids=thing_ids
    )
    return result


def format_table(result: EvalResult) -> str:
    """The headline numbers and a per-class table (IoU, and PQ / SQ / RQ when panoptic)."""
    lines = [f"images: {result.num_images}"]
    lines.append("  ".join(f"{k} {v:.2f}" for k, v in result.summary().items()))
    header = f"{'class':<20}{'IoU':>8}"
    if result.panoptic is not None:
        header += f"{'PQ':>8}{'SQ':>8}{'RQ':>8}"
    lines.append(header)
    for c, name in enumerate(result.class_names):
        row = f"{name:<20}{_pct(result.semantic.iou[c].item()):>8}"
        if result.panoptic is not None:
            cat = result.panoptic.per_category[c]
            seen = cat["tp"] + cat["fp"] + cat["fn"] > 0
            for key in ("pq", "sq", "rq"):
                row += f"{_pct(cat[key] if seen else math.nan):>8}"
        lines.append(row)
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


def _describe(value: object) -> str:
    return str(list(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def main(argv: list[str] | None = None) -> int:
    from pem.train import load_checkpoint, model_from_checkpoint

    p = argparse.ArgumentParser(prog="python -m pem.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a pem.train checkpoint (OUT/last.pt)")
    p.add_argument("--data", default=None, help="dataset spec (default: the training data)")
    p.add_argument("--task", default=None, choices=("panoptic", "semantic"),
                   help="default: the checkpoint's task")
    p.add_argument("--images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--short-side", type=int, default=None, help="test-time resize short side")
    p.add_argument("--max-size", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   type=device_text, help="cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")
    args = p.parse_args(argv)
    check_ints(p, args, {"images": 1, "short_side": 1, "max_size": 1})
    check_device(p, args.device)

    try:
        state = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        p.error(f"--{error}")
    train_args = state.get("train_args", {})
    task = args.task or state.get("task", "panoptic")
    spec = args.data or train_args.get("data", "synthetic")
    try:
        parse_data_spec(spec)
    except ValueError as error:
        p.error(f"--{error}")
    try:
        dataset = build_dataset(
            spec, "val", task,
            synthetic_size=train_args.get("synthetic_size", 128),
            synthetic_images=(
                args.images if args.images is not None else train_args.get("eval_images", 50)
            ),
            seed=train_args.get("seed", 0),
        )
    except (FileNotFoundError, ValueError) as error:
        p.error(f"--data: {error}")
    if dataset.info.num_classes != state["model_config"]["num_classes"]:
        p.error(
            f"--data: {spec!r} has {dataset.info.num_classes} classes, the checkpoint's model "
            f"{state['model_config']['num_classes']}"
        )
    model = model_from_checkpoint(state, args.backend).to(args.device)
    result = evaluate(model, dataset, task, args.device, max_images=args.images,
                      short_side=args.short_side, max_size=args.max_size)
    print(f"{args.checkpoint} (iteration {state.get('iteration')}) on {spec} val, task {task}")
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(dumps({"checkpoint": args.checkpoint, "data": spec, "task": task,
                           **result.summary()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
