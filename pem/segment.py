"""Segmenting one image: \
``python -m pem.segment --checkpoint OUT/last.pt --image IN --out OUT.png``.

Runs a trained PEM on an RGB image file and saves the image with its segmentation blended on top
(``--alpha``): the class colors of the dataset, every thing instance in its own shade of its
class color, and segment boundaries drawn in white. Panoptic models draw the panoptic result,
semantic models the per-pixel argmax. The segments found are listed on stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pem.cli import check_device, check_ints, device_text
from pem_kernels import BACKENDS

__all__ = ["colorize", "main", "overlay"]


def _instance_shade(color: Sequence[int], instance: int) -> np.ndarray:
    """The class color, lightened or darkened a little per instance so touching instances of one
    class stay apart (instance 0 keeps the class color)."""
    factor = 1.0 + 0.25 * ((instance % 5) - 2) / 2 if instance else 1.0
    return np.clip(np.asarray(color, dtype=np.float32) * factor, 0, 255)


def colorize(
    segment_ids: Tensor,
    segments_info: Sequence[Mapping[str, object]],
    colors: Sequence[Sequence[int]],
) -> np.ndarray:
    """``[H, W]`` segment ids -> ``[H, W, 3]`` float RGB (black where no segment).

    Each info names an ``id`` of the map, its ``category_id`` and ``isthing``.
    """
    ids = segment_ids.cpu().numpy()
    out = np.zeros((*ids.shape, 3), dtype=np.float32)
    instances: dict[int, int] = {}
    for info in segments_info:
        cat = int(info["category_id"])  # type: ignore[arg-type]
        if not 0 <= cat < len(colors):
            raise ValueError(
                f"segments_info: category_id {cat} has no color ({len(colors)} classes)"
            )
        shade = 0
        if info.get("isthing"):
            shade = instances.get(cat, 0)
            instances[cat] = shade + 1
        out[ids == int(info["id"])] = _instance_shade(colors[cat], shade)  # type: ignore[arg-type]
    return out


def overlay(
    image: Tensor, colored: np.ndarray, segment_ids: Tensor, alpha: float = 0.5
) -> np.ndarray:
    """Blends ``colored`` ``[H, W, 3]`` onto ``image`` ``[3, H, W]`` uint8 where a segment exists,
    and draws white boundaries between different segment ids. Returns ``[H, W, 3]`` uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    ids = segment_ids.cpu().numpy()
    labelled = (ids != 0)[..., None]
    out = np.where(labelled, (1 - alpha) * rgb + alpha * colored, rgb)
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    out[edge] = 255.0
    return out.round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    from pem.data.folders import read_image
    from pem.evaluate import predict
    from pem.train import load_checkpoint, model_from_checkpoint

    p = argparse.ArgumentParser(prog="python -m pem.segment", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a pem.train checkpoint (OUT/last.pt)")
    p.add_argument("--image", required=True, help="input image file (any format PIL reads)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the colors")
    p.add_argument("--task", default=None, choices=("panoptic", "semantic"))
    p.add_argument("--short-side", type=int, default=None, help="test-time resize short side")
    p.add_argument("--max-size", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   type=device_text, help="cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    args = p.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha: expected a value in [0, 1], got {args.alpha}")
    check_ints(p, args, {"short_side": 1, "max_size": 1})
    check_device(p, args.device)
    # An extension PIL can write (it reads more formats than it writes: .psd, .pcd, ...).
    if Image.registered_extensions().get(Path(args.out).suffix.lower()) not in Image.SAVE:
        p.error(f"--out: expected an image file name PIL can write (.png, .jpg, ...), got "
                f"{args.out!r}")
    image_path = Path(args.image)
    if not image_path.is_file():
        p.error(f"--image: no file at {str(image_path)!r}")
    try:
        image = read_image(image_path)
    except OSError as error:  # PIL's UnidentifiedImageError included
        p.error(f"--image: {str(image_path)!r} is not an image PIL can read ({error})")

    try:
        state = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        p.error(f"--{error}")
    info = state["dataset_info"]
    task = args.task or state.get("task", "panoptic")
    model = model_from_checkpoint(state, args.backend).to(args.device)
    with torch.no_grad():
        result = predict(model, image, info["thing_ids"], task, torch.device(args.device),
                         short_side=args.short_side, max_size=args.max_size)
    if task == "panoptic":
        segment_ids, segments_info = result["panoptic_seg"]
    else:
        # Semantic result as segments: one per class present, id = class + 1.
        classes = result["sem_seg"].argmax(0)
        segment_ids = classes + 1
        segments_info = [{"id": c + 1, "category_id": c, "isthing": False}
                         for c in torch.unique(classes).tolist()]
    colored = colorize(segment_ids, segments_info, info["colors"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, colored, segment_ids, args.alpha)).save(args.out)
    names = info["class_names"]
    total = segment_ids.numel()
    print(f"{args.image}: {len(segments_info)} segments -> {args.out}")
    for seg in segments_info:
        area = int((segment_ids == seg["id"]).sum())
        kind = "thing" if seg.get("isthing") else "stuff"
        print(
            f"  {seg['id']:>3}  {names[seg['category_id']]:<16} {kind:<6} "
            f"{100 * area / total:5.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
