"""A small synthetic panoptic dataset, generated in memory or written in the ADE20K layout.

Each image is a scene of 7 classes (:data:`SYNTHETIC_INFO`):

* **stuff** (ids 0-3: sky, grass, water, wall): the background is cut into 2 or 3 bands by wavy
  boundaries (horizontal or vertical bands), one distinct stuff class per band, each with a base
  color jittered per image and its own texture: a smooth gradient (sky), vertical streaks
  (grass), ripples (water), bricks (wall);
* **things** (ids 4-6: circle, square, triangle): 1 to 6 instances painted on top in random
  order, so later ones occlude earlier ones, with random size, position and rotation. Each class
  has its own color family (red circles, yellow squares, purple triangles) jittered per
  instance, plus shading and noise, so both shape and tint identify the class.

Labels are exact: ``panoptic`` has one segment per stuff class present and one per visible
thing instance (ids 1, 2, ... in that order; no void pixels), ``sem_seg`` is the class of each
pixel's segment, and the image is drawn from those same maps. An instance hidden for more than
70 % of its in-image area is removed before drawing (the topmost instance is never hidden, so at
least one thing remains), and a segment left without pixels is never listed.

Every sample is a pure function of ``(seed, split, index, size)`` (NumPy's ``default_rng`` seeded
with ``[seed, split, index]``), so it does not depend on access order or on DataLoader workers.

Command line: ``python -m pem.data.synthetic --out DIR [--train N --val N --size 128 --seed 0]``
writes the dataset with :func:`write_synthetic`; read it back with
``pem.data.ADE20KDataset(DIR, split="training" | "validation")``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pem.data.common import DatasetInfo, Sample, SegmentInfo, id2rgb

__all__ = ["SYNTHETIC_INFO", "SyntheticPanoptic", "generate_sample", "main", "write_synthetic"]

SYNTHETIC_INFO = DatasetInfo(
    name="synthetic_panoptic",
    class_names=("sky", "grass", "water", "wall", "circle", "square", "triangle"),
    thing_ids=frozenset({4, 5, 6}),
    colors=(
        (70, 130, 180), (80, 180, 60), (30, 60, 200), (140, 100, 80),
        (220, 40, 40), (240, 200, 0), (160, 60, 220),
    ),
)  # fmt: skip

SKY, GRASS, WATER, WALL, CIRCLE, SQUARE, TRIANGLE = range(7)
STUFF_CLASSES = (SKY, GRASS, WATER, WALL)
THING_CLASSES = (CIRCLE, SQUARE, TRIANGLE)
SPLITS = {"train": 0, "val": 1}
# ADE20K folder names of the splits written by write_synthetic.
ADE_SPLITS = {"train": "training", "val": "validation"}

# Base RGB colors used for drawing (not the overlay colors of SYNTHETIC_INFO).
_STUFF_BASE = {
    SKY: (125, 180, 235),
    GRASS: (70, 150, 55),
    WATER: (35, 85, 165),
    WALL: (150, 105, 85),
}
_THING_BASE = {CIRCLE: (215, 55, 50), SQUARE: (230, 195, 45), TRIANGLE: (145, 60, 195)}
# Start of the "info.description" of the JSON files written by write_synthetic.
_JSON_DESCRIPTION = "SyntheticPanoptic"
# A thing is dropped when less than this fraction of its in-image area stays visible.
_MIN_VISIBLE_FRACTION = 0.3

Transform = Callable[[Sample], Sample]
PathLike = str | Path


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 8 for s in size):
        raise ValueError(f"size={tuple(size)!r}: expected (H, W), two ints >= 8")
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------------------------
# Scene generation
# --------------------------------------------------------------------------------------------


def _stuff_layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[int]]:
    """Cut the image into 2-3 bands along wavy boundaries.

    Returns:
        ``[H, W]`` int band index and the stuff class of each band.
    """
    n = int(rng.integers(2, 4))
    classes = [int(c) for c in rng.choice(STUFF_CLASSES, size=n, replace=False)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizontal = rng.random() < 0.6
    # t runs across the bands, s along them; both normalized to [0, 1).
    t, s = (yy / h, xx / w) if horizontal else (xx / w, yy / h)
    band = np.zeros((h, w), dtype=np.int64)
    spacing = 1.0 / n
    for i in range(1, n):
        # Jitter and the two waves together stay below half the band spacing, so consecutive
        # boundaries never cross and every band keeps a positive width.
        jitter = rng.uniform(-0.15, 0.15) * spacing
        a1, a2 = rng.uniform(0.05, 0.2) * spacing, rng.uniform(0.0, 0.1) * spacing
        f1, f2 = rng.uniform(0.5, 2.0), rng.uniform(2.0, 5.0)
        p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
        boundary = (
            i * spacing + jitter
            + a1 * np.sin(2 * np.pi * f1 * s + p1) + a2 * np.sin(2 * np.pi * f2 * s + p2)
        )  # fmt: skip
        band += (t >= boundary).astype(np.int64)
    return band, classes


def _thing_mask(
    cls: int, cy: float, cx: float, r: float, angle: float, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Boolean ``[H, W]`` mask of one shape of "radius" ``r`` centered at ``(cy, cx)``."""
    dy, dx = yy - cy, xx - cx
    if cls == CIRCLE:
        return dx * dx + dy * dy <= r * r
    if cls == SQUARE:
        half = 0.85 * r  # about the area of the circle of radius r
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if cls == TRIANGLE:
        # Equilateral triangle of circumradius R: inside iff the projection on each of the three
        # outward edge normals is at most the inradius R / 2.
        big_r = 1.4 * r
        inside = np.ones(yy.shape, dtype=bool)
        for k in range(3):
            a = angle + np.pi / 3 + 2 * np.pi * k / 3
            inside &= dx * np.cos(a) + dy * np.sin(a) <= big_r / 2
        return inside
    raise ValueError(f"_thing_mask: cls={cls} is not a thing class {THING_CLASSES}")


def _place_things(
    rng: np.random.Generator, h: int, w: int
) -> list[tuple[int, np.ndarray, tuple[float, float, float]]]:
    """Draw 1-6 random shapes; returns ``(class, full in-image mask, tint)`` in painting order."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    things = []
    short = min(h, w)
    for _ in range(int(rng.integers(1, 7))):
        cls = int(rng.choice(THING_CLASSES))
        r = max(3.0, rng.uniform(0.07, 0.2) * short)
        # The center is a pixel inside the image, so every shape covers at least that pixel.
        cy, cx = float(rng.integers(0, h)), float(rng.integers(0, w))
        mask = _thing_mask(cls, cy, cx, r, rng.uniform(0, 2 * np.pi), yy, xx)
        tint = tuple(float(np.clip(c + rng.uniform(-25, 25), 0, 255)) for c in _THING_BASE[cls])
        things.append((cls, mask, tint))
    return things


def _visible_instances(masks: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """``[H, W]`` index of the topmost shape at each pixel (-1 where none)."""
    top = np.full((h, w), -1, dtype=np.int64)
    for i, m in enumerate(masks):
        top[m] = i
    return top


def _stuff_texture(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """``[H, W, 3]`` float texture of one stuff class over the whole image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(_STUFF_BASE[cls], dtype=np.float32) + rng.uniform(-15, 15, size=3)
    if cls == SKY:
        shade = 40.0 * (yy / h - 0.5)
        tex = base + shade[..., None] + rng.normal(0, 3, (h, w, 1))
    elif cls == GRASS:
        # Noise that changes slowly along y and fast along x: vertical blades.
        coarse = rng.normal(0, 1, (h // 4 + 2, w))
        streaks = np.repeat(coarse, 4, axis=0)[:h]
        tex = (
            base
            + 22.0 * streaks[..., None] * np.array([0.6, 1.0, 0.4])
            + rng.normal(0, 6, (h, w, 1))
        )
    elif cls == WATER:
        period = rng.uniform(5, 9)
        phase = rng.uniform(0, 2 * np.pi)
        wobble = 0.15 * np.sin(2 * np.pi * xx / rng.uniform(20, 40))
        ripple = np.sin(2 * np.pi * (yy / period + wobble) + phase)
        tex = (
            base
            + 25.0 * ripple[..., None] * np.array([0.5, 0.8, 1.0])
            + rng.normal(0, 4, (h, w, 1))
        )
    elif cls == WALL:
        bh = rng.uniform(6, 10)
        bw = 2.2 * bh
        row = np.floor(yy / bh)
        offset = (row % 2) * bw / 2  # alternate rows are shifted by half a brick
        mortar = ((yy % bh) < 1.5) | (((xx + offset) % bw) < 1.5)
        tex = np.where(mortar[..., None], np.array([205.0, 195.0, 185.0]), base)
        tex = tex + rng.normal(0, 6, (h, w, 1))
    else:
        raise ValueError(f"_stuff_texture: cls={cls} is not a stuff class {STUFF_CLASSES}")
    return tex.astype(np.float32)


def _thing_colors(
    rng: np.random.Generator, tint: tuple[float, float, float], mask: np.ndarray
) -> np.ndarray:
    """``[N, 3]`` colors for the N pixels of ``mask``: tint, a linear light ramp, noise."""
    ys, xs = np.nonzero(mask)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (ys - ys.mean()) * np.sin(angle) + (xs - xs.mean()) * np.cos(angle)
    ramp = ramp / (np.abs(ramp).max() + 1e-6)
    colors = np.array(tint, dtype=np.float32)[None] * (1.0 + 0.18 * ramp[:, None])
    return colors + rng.normal(0, 6, (len(ys), 3))


def generate_sample(index: int, size: tuple[int, int], seed: int, split: str = "train") -> Sample:
    """Generate synthetic sample ``index`` (see the module docstring).

    Args:
        index: sample index (>= 0).
        size: ``(H, W)``.
        seed: dataset seed.
        split: ``"train"`` or ``"val"``: independent streams for the same seed.

    Returns:
        A sample dict: image ``[3, H, W]`` uint8, sem_seg and panoptic ``[H, W]`` int64.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
    if index < 0:
        raise ValueError(f"index={index}: expected >= 0")
    h, w = _check_size(size)
    rng = np.random.default_rng([seed, SPLITS[split], index])

    band, band_classes = _stuff_layout(rng, h, w)
    things = _place_things(rng, h, w)
    # Drop heavily occluded shapes, then re-check: removing one can only uncover the others.
    while True:
        top = _visible_instances([m for _, m, _ in things], h, w)
        keep = [
            i for i, (_, m, _) in enumerate(things)
            if (top == i).sum() >= _MIN_VISIBLE_FRACTION * m.sum()
        ]  # fmt: skip
        if len(keep) == len(things):
            break
        things = [things[i] for i in keep]

    panoptic = np.zeros((h, w), dtype=np.int64)
    sem_seg = np.zeros((h, w), dtype=np.int64)
    image = np.zeros((h, w, 3), dtype=np.float32)
    segments: list[SegmentInfo] = []
    stuff = top < 0
    for b, cls in sorted(enumerate(band_classes), key=lambda bc: bc[1]):
        region = stuff & (band == b)
        # The texture is drawn even for an empty region so that the random stream (and hence
        # the rest of the image) does not depend on which regions the things covered.
        texture = _stuff_texture(rng, cls, h, w)
        if not region.any():
            continue
        seg_id = len(segments) + 1
        segments.append({"id": seg_id, "category_id": cls, "isthing": False, "iscrowd": 0})
        panoptic[region] = seg_id
        sem_seg[region] = cls
        image[region] = texture[region]
    for i, (cls, _, tint) in enumerate(things):
        region = top == i
        seg_id = len(segments) + 1
        segments.append({"id": seg_id, "category_id": cls, "isthing": True, "iscrowd": 0})
        panoptic[region] = seg_id
        sem_seg[region] = cls
        image[region] = _thing_colors(rng, tint, region)
    image += rng.normal(0, 3, image.shape)
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return {
        "image": torch.from_numpy(image_u8).permute(2, 0, 1).contiguous(),
        "sem_seg": torch.from_numpy(sem_seg),
        "panoptic": torch.from_numpy(panoptic),
        "segments_info": segments,
        "file_name": f"synthetic_{split}_{index:06d}.png",
    }


class SyntheticPanoptic(Dataset):
    """In-memory synthetic panoptic dataset (scene description in the module docstring).

    Args:
        num_images: dataset length.
        size: ``(H, W)`` of every image (each >= 8).
        seed: dataset seed; sample ``i`` depends only on ``(seed, split, i, size)``.
        split: ``"train"`` or ``"val"``, two independent streams for one seed.
        transform: applied to every generated sample.

    ``info`` is :data:`SYNTHETIC_INFO` (K = 7, things = circle, square, triangle).
    """

    info: DatasetInfo = SYNTHETIC_INFO

    def __init__(
        self,
        num_images: int,
        size: tuple[int, int] = (128, 128),
        seed: int = 0,
        *,
        split: str = "train",
        transform: Transform | None = None,
    ) -> None:
        if int(num_images) != num_images or num_images < 0:
            raise ValueError(f"num_images={num_images!r}: expected an int >= 0")
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
        self.num_images = int(num_images)
        self.size = _check_size(size)
        self.seed = int(seed)
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} samples")
        sample = generate_sample(index % self.num_images, self.size, self.seed, self.split)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def __repr__(self) -> str:
        return (
            f"SyntheticPanoptic(num_images={self.num_images}, size={self.size}, "
            f"seed={self.seed}, split={self.split!r})"
        )


# --------------------------------------------------------------------------------------------
# Writing in the ADE20K layout
# --------------------------------------------------------------------------------------------


def _categories() -> list[dict[str, Any]]:
    # Dataset category ids are class + 1, the values of the semantic PNGs, so that the JSON and
    # the semantic maps use the same ids (pem.data.ADE20KDataset maps both back by position).
    return [
        {
            "id": c + 1,
            "name": name,
            "isthing": int(c in SYNTHETIC_INFO.thing_ids),
            "color": list(SYNTHETIC_INFO.colors[c]),
        }
        for c, name in enumerate(SYNTHETIC_INFO.class_names)
    ]


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [
        int(xs.min()),
        int(ys.min()),
        int(xs.max() - xs.min() + 1),
        int(ys.max() - ys.min() + 1),
    ]


def _written_by_us(path: Path) -> bool:
    """Whether ``path`` (a split folder or JSON) looks like :func:`write_synthetic` output."""
    if path.is_dir():
        return all(f.is_file() and f.name.startswith("synthetic_") for f in path.iterdir())
    try:
        with open(path) as f:
            description = json.load(f).get("info", {}).get("description", "")
    except (OSError, ValueError, AttributeError):
        return False
    return str(description).startswith(_JSON_DESCRIPTION)


def write_synthetic(
    root: PathLike,
    num_train: int,
    num_val: int,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``SyntheticPanoptic`` train and val splits to ``root`` in the ADE20K layout.

    Writes ``root/ADEChallengeData2016/`` with ``images/<split>/<name>.png`` (lossless, so
    loading gives back the exact pixels), ``annotations/<split>/<name>.png`` (class + 1),
    ``ade20k_panoptic_<split>/<name>.png`` (RGB-encoded ids) and ``ade20k_panoptic_<split>.json``,
    for ``<split>`` = ``training`` (``split="train"`` samples) and ``validation``
    (``split="val"``). ``pem.data.ADE20KDataset(root, split)`` reads back the same samples
    (same image, sem_seg, panoptic and segments_info; ``file_name`` becomes the image path).

    Args:
        root: output folder (created if needed).
        num_train, num_val: number of images per split (each >= 1).
        size: ``(H, W)``.
        seed: dataset seed.
        overwrite: replace existing split folders; without it existing ones are an error.
        progress: show a tqdm progress bar.

    Returns:
        ``root`` as a Path.
    """
    for arg, n in (("num_train", num_train), ("num_val", num_val)):
        if int(n) != n or n < 1:
            raise ValueError(f"{arg}={n!r}: expected an int >= 1")
    size = _check_size(size)
    root = Path(root)
    base = root / "ADEChallengeData2016"
    outputs = []
    for split, ade in ADE_SPLITS.items():
        dirs = [base / "images" / ade, base / "annotations" / ade, base / f"ade20k_panoptic_{ade}"]
        json_path = base / f"ade20k_panoptic_{ade}.json"
        existing = [p for p in (*dirs, json_path) if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"write_synthetic: {existing[0]} already exists; pass overwrite=True "
                "(--overwrite) to replace the split"
            )
        for p in existing:
            # --overwrite must never delete a real ADE20K download pointed at by mistake.
            if not _written_by_us(p):
                raise FileExistsError(
                    f"write_synthetic: refusing to overwrite {p}: it holds files that "
                    "write_synthetic did not write"
                )
        for p in existing:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        outputs.append((split, ade, dirs, json_path))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_train + num_val, desc="synthetic", unit="img")
    for split, ade, (image_dir, sem_dir, pan_dir), json_path in outputs:
        for d in (image_dir, sem_dir, pan_dir):
            d.mkdir(parents=True)
        dataset = SyntheticPanoptic(
            num_train if split == "train" else num_val, size, seed, split=split
        )
        images, annotations = [], []
        for i in range(len(dataset)):
            sample = dataset[i]
            name = Path(sample["file_name"]).stem
            pan = sample["panoptic"].numpy()
            Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(
                image_dir / f"{name}.png"
            )
            sem = sample["sem_seg"].numpy()
            sem_png = np.where(sem == SYNTHETIC_INFO.ignore_label, 0, sem + 1).astype(np.uint8)
            Image.fromarray(sem_png).save(sem_dir / f"{name}.png")
            Image.fromarray(id2rgb(pan)).save(pan_dir / f"{name}.png")
            images.append(
                {"id": name, "file_name": f"{name}.png", "height": size[0], "width": size[1]}
            )
            annotations.append(
                {
                    "image_id": name,
                    "file_name": f"{name}.png",
                    "segments_info": [
                        {
                            "id": seg["id"],
                            "category_id": seg["category_id"] + 1,
                            "iscrowd": seg["iscrowd"],
                            "isthing": int(seg["isthing"]),
                            "area": int((pan == seg["id"]).sum()),
                            "bbox": _bbox(pan == seg["id"]),
                        }
                        for seg in sample["segments_info"]
                    ],
                }
            )
            if bar is not None:
                bar.update(1)
        with open(json_path, "w") as f:
            json.dump(
                {
                    "info": {"description": f"{_JSON_DESCRIPTION} seed={seed} split={split}"},
                    "images": images,
                    "annotations": annotations,
                    "categories": _categories(),
                },
                f,
            )
    if bar is not None:
        bar.close()
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (``python -m pem.data.synthetic --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m pem.data.synthetic",
        description="Write the synthetic panoptic dataset in the ADE20K layout "
        "(read it with pem.data.ADE20KDataset).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    parser.add_argument(
        "--size", type=int, nargs="+", default=[128], metavar="N",
        help="image size: one value (square) or H W (default 128)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing splits")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error(f"--size takes 1 or 2 values, got {len(args.size)}")
    size = (args.size[0], args.size[-1])
    try:
        root = write_synthetic(
            args.out, args.train, args.val, size, args.seed, overwrite=args.overwrite, progress=True
        )
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    print(f"wrote {args.train} training and {args.val} validation images to {root}")


if __name__ == "__main__":
    main()
