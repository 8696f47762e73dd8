"""The sample contract shared by every PEM dataset, and helpers to build and check samples.

A dataset is a ``torch.utils.data.Dataset`` with an ``info: DatasetInfo`` attribute whose
``__getitem__`` returns a :data:`Sample` dict::

    {"image":         uint8 Tensor [3, H, W], RGB,
     "sem_seg":       int64 Tensor [H, W], contiguous class ids in [0, K) or info.ignore_label,
     "panoptic":      int64 Tensor [H, W], segment ids, 0 = void / unlabelled,
     "segments_info": list of {"id": int > 0, "category_id": int in [0, K),
                               "isthing": bool, "iscrowd": int (0 or 1)},
     "file_name":     str}

Every ``segments_info`` entry names a segment id that occurs in ``panoptic``, and every non-zero
id of ``panoptic`` has exactly one entry (the COCO panoptic rules), so a segment never has zero
pixels. ``sem_seg`` and ``panoptic`` are separate annotations; they agree wherever both exist
(see :func:`semantic_from_panoptic`), but ``sem_seg`` may also label pixels that ``panoptic``
leaves void. :func:`validate_sample` checks all of this.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TASKS",
    "DatasetInfo",
    "Sample",
    "SegmentInfo",
    "distinct_colors",
    "id2rgb",
    "prune_segments",
    "rgb2id",
    "semantic_from_panoptic",
    "validate_sample",
]

# The two tasks a dataset can be loaded for (and targets built for).
TASKS = ("panoptic", "semantic")

# Largest segment id the COCO panoptic PNG encoding (id = R + 256 G + 256^2 B) can store.
MAX_SEGMENT_ID = 256**3 - 1


class SegmentInfo(TypedDict):
    """One panoptic segment: ``id`` as in the ``panoptic`` map, contiguous ``category_id``."""

    id: int
    category_id: int
    isthing: bool
    iscrowd: int


class Sample(TypedDict):
    """One dataset item (see the module docstring for the meaning of each field)."""

    image: Tensor
    sem_seg: Tensor
    panoptic: Tensor
    segments_info: list[SegmentInfo]
    file_name: str


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset's label space.

    Attributes:
        name: dataset name, for messages and logs.
        class_names: one name per contiguous class id ``0..K-1``.
        thing_ids: contiguous ids of the countable ("thing") classes; the others are stuff.
        colors: one RGB triple (0-255) per class, for overlays.
        ignore_label: ``sem_seg`` value of unlabelled pixels (outside ``[0, K)``).
    """

    name: str
    class_names: tuple[str, ...]
    thing_ids: frozenset[int]
    colors: tuple[tuple[int, int, int], ...]
    ignore_label: int = 255

    def __post_init__(self) -> None:
        k = len(self.class_names)
        if k == 0:
            raise ValueError(f"DatasetInfo({self.name!r}): class_names is empty, expected >= 1")
        if len(self.colors) != k:
            raise ValueError(
                f"DatasetInfo({self.name!r}): colors has {len(self.colors)} entries, expected "
                f"one per class ({k})"
            )
        for c, color in enumerate(self.colors):
            if len(color) != 3 or any(not 0 <= int(v) <= 255 for v in color):
                raise ValueError(
                    f"DatasetInfo({self.name!r}): colors[{c}] = {color!r}, expected 3 ints in "
                    "[0, 255]"
                )
        bad = sorted(t for t in self.thing_ids if not 0 <= t < k)
        if bad:
            raise ValueError(f"DatasetInfo({self.name!r}): thing_ids {bad} are outside [0, {k})")
        if 0 <= self.ignore_label < k:
            raise ValueError(
                f"DatasetInfo({self.name!r}): ignore_label = {self.ignore_label} is a class id; "
                f"expected a value outside [0, {k})"
            )

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.class_names)

    @property
    def stuff_ids(self) -> frozenset[int]:
        """Contiguous ids of the stuff classes (every class that is not a thing)."""
        return frozenset(range(self.num_classes)) - self.thing_ids


def distinct_colors(n: int) -> tuple[tuple[int, int, int], ...]:
    """``n`` deterministic, well-separated RGB colors (for classes without a color of their own).

    Hues advance by the golden ratio so that neighbouring class ids get far-apart hues for any
    ``n``; saturation and value cycle so that colors stay distinct when hues come close.
    """
    colors = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        sat = (0.85, 0.6, 1.0)[i % 3]
        val = (0.95, 0.75, 0.55)[(i // 3) % 3]
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(colors)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Decode a COCO-panoptic PNG: ``[H, W, 3]`` uint8 RGB -> ``[H, W]`` int64 ids
    ``R + 256 G + 256^2 B``."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb2id: expected an [H, W, 3] array, got shape {list(rgb.shape)}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Encode segment ids for a COCO-panoptic PNG: ``[H, W]`` ints in ``[0, 256^3)`` ->
    ``[H, W, 3]`` uint8 RGB (inverse of :func:`rgb2id`)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(
            f"id2rgb: ids must be in [0, {MAX_SEGMENT_ID}], got [{ids.min()}, {ids.max()}]"
        )
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def semantic_from_panoptic(
    panoptic: Tensor, segments_info: Sequence[Mapping[str, Any]], ignore_label: int = 255
) -> Tensor:
    """The semantic map implied by a panoptic annotation.

    Args:
        panoptic: ``[H, W]`` int64 segment ids (0 = void).
        segments_info: entries with ``id`` and contiguous ``category_id``.
        ignore_label: value for void pixels and for ids without an entry.

    Returns:
        ``[H, W]`` int64: each pixel's segment category, ``ignore_label`` where void.
    """
    out = torch.full_like(panoptic, ignore_label, dtype=torch.int64)
    for seg in segments_info:
        out[panoptic == int(seg["id"])] = int(seg["category_id"])
    return out


def prune_segments(panoptic: Tensor, segments_info: Sequence[SegmentInfo]) -> list[SegmentInfo]:
    """Keep the entries of ``segments_info`` whose id still occurs in ``panoptic`` ``[H, W]``.

    Used after cropping (or any transform that can remove pixels): a segment without pixels
    would become an empty ground-truth mask. The order of the kept entries is unchanged.
    """
    present = set(torch.unique(panoptic).tolist())
    return [dict(seg) for seg in segments_info if int(seg["id"]) in present]  # type: ignore[misc]


def validate_sample(sample: Mapping[str, Any], info: DatasetInfo | None = None) -> None:
    """Raise if ``sample`` breaks the sample contract (see the module docstring).

    Checks keys, dtypes and shapes, that the three maps share one ``[H, W]``, that segment ids
    are unique, positive and present in ``panoptic``, that ``panoptic`` has no unlisted non-zero
    id and, with ``info``, the class ranges and each segment's ``isthing`` flag.
    """
    for key in ("image", "sem_seg", "panoptic", "segments_info", "file_name"):
        if key not in sample:
            raise KeyError(f"sample: missing key {key!r}; has {sorted(sample)}")
    name = sample["file_name"]
    image, sem, pan = sample["image"], sample["sem_seg"], sample["panoptic"]
    if not isinstance(name, str):
        raise TypeError(f"sample['file_name']: expected str, got {type(name).__name__}")
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"{name}: 'image' must be a uint8 Tensor [3, H, W]")
    if image.shape[0] != 3:
        raise ValueError(f"{name}: 'image' must have 3 channels, got shape {list(image.shape)}")
    hw = tuple(image.shape[1:])
    for key, t in (("sem_seg", sem), ("panoptic", pan)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64:
            raise ValueError(f"{name}: {key!r} must be an int64 Tensor [H, W]")
        if tuple(t.shape) != hw:
            raise ValueError(
                f"{name}: {key!r} has shape {list(t.shape)}, expected the image's [H, W] = "
                f"{list(hw)}"
            )
    segs = sample["segments_info"]
    ids = [int(s["id"]) for s in segs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: duplicate segment ids in segments_info: {ids}")
    if any(i <= 0 for i in ids):
        raise ValueError(f"{name}: segment ids must be > 0, got {ids}")
    present = set(torch.unique(pan).tolist()) - {0}
    if present != set(ids):
        raise ValueError(
            f"{name}: ids in 'panoptic' {sorted(present)} differ from the segments_info ids "
            f"{sorted(ids)}"
        )
    if info is None:
        return
    k = info.num_classes
    bad = torch.unique(sem[(sem != info.ignore_label) & ((sem < 0) | (sem >= k))]).tolist()
    if bad:
        raise ValueError(f"{name}: sem_seg values {bad} are neither in [0, {k}) nor ignore")
    for s in segs:
        c = int(s["category_id"])
        if not 0 <= c < k:
            raise ValueError(f"{name}: segment {s['id']} has category_id {c}, not in [0, {k})")
        if bool(s["isthing"]) != (c in info.thing_ids):
            raise ValueError(
                f"{name}: segment {s['id']} of class {c} ({info.class_names[c]}) has isthing="
                f"{s['isthing']}, but {info.name} says {c in info.thing_ids}"
            )
