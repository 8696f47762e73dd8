"""Data for training and evaluating PEM.

Every dataset is a ``torch.utils.data.Dataset`` with an ``info: DatasetInfo`` attribute whose
items are :class:`Sample` dicts (contract in :mod:`pem.data.common`)::

    {"image": uint8 [3, H, W] RGB, "sem_seg": int64 [H, W] (ignore 255),
     "panoptic": int64 [H, W] (0 = void), "segments_info": [{"id", "category_id", "isthing",
     "iscrowd"}], "file_name": str}

* :mod:`pem.data.folders`: :class:`CityscapesDataset`, :class:`ADE20KDataset` (standard layouts);
* :mod:`pem.data.synthetic`: :class:`SyntheticPanoptic` (in memory) and :func:`write_synthetic`
  (ADE20K layout on disk; also ``python -m pem.data.synthetic``);
* :mod:`pem.data.transforms`: the official training augmentation, :func:`train_transforms`;
* :mod:`pem.data.targets`: :func:`instance_targets` (masks + labels for the criterion) and
  :func:`collate`.

Typical training loop input::

    ds = ADE20KDataset(root, "training", transform=train_transforms(640, 640, 2560))
    loader = DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate)
    for images, samples in loader:          # images: float32 [B, 3, 640, 640], 0-255
        targets = [instance_targets(s, "panoptic") for s in samples]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pem.data.common import (
    TASKS,
    DatasetInfo,
    Sample,
    SegmentInfo,
    distinct_colors,
    id2rgb,
    prune_segments,
    rgb2id,
    semantic_from_panoptic,
    validate_sample,
)
from pem.data.folders import CITYSCAPES_INFO, ADE20KDataset, CityscapesDataset
from pem.data.targets import collate, instance_targets
from pem.data.transforms import (
    ColorJitterSSD,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    crop_sample,
    hflip_sample,
    pad_sample,
    resize_sample,
    train_scales,
    train_transforms,
)

if TYPE_CHECKING:
    from pem.data.synthetic import SYNTHETIC_INFO, SyntheticPanoptic, write_synthetic

# pem.data.synthetic is imported on first use instead of here: `python -m pem.data.synthetic`
# imports this package first, and runpy warns (and runs a second copy of the module) when the
# package has already imported it.
_LAZY = {
    name: "pem.data.synthetic"
    for name in ("SYNTHETIC_INFO", "SyntheticPanoptic", "write_synthetic")
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pem.data' has no attribute {name!r}")


__all__ = [
    "CITYSCAPES_INFO",
    "SYNTHETIC_INFO",
    "TASKS",
    "ADE20KDataset",
    "CityscapesDataset",
    "ColorJitterSSD",
    "Compose",
    "DatasetInfo",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "Sample",
    "SegmentInfo",
    "SyntheticPanoptic",
    "collate",
    "crop_sample",
    "distinct_colors",
    "hflip_sample",
    "id2rgb",
    "instance_targets",
    "pad_sample",
    "prune_segments",
    "resize_sample",
    "rgb2id",
    "semantic_from_panoptic",
    "train_scales",
    "train_transforms",
    "validate_sample",
    "write_synthetic",
]
