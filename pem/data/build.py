"""Dataset selection by a short spec string, shared by the train / evaluate / segment commands.

Specs: ``synthetic`` (the generated shapes dataset, in memory), ``cityscapes:ROOT`` and
``ade20k:ROOT`` (folders laid out as documented in :mod:`pem.data.folders`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from pem.data.folders import ADE20KDataset, CityscapesDataset
from pem.data.synthetic import SyntheticPanoptic

__all__ = ["DATASET_KINDS", "build_dataset", "parse_data_spec"]

DATASET_KINDS = ("synthetic", "cityscapes", "ade20k")
# Official split names per dataset, indexed by our "train" / "val".
_SPLITS = {
    "cityscapes": {"train": "train", "val": "val"},
    "ade20k": {"train": "training", "val": "validation"},
}


def parse_data_spec(spec: str) -> tuple[str, str]:
    """(kind, root) of a dataset ``spec`` (``"synthetic"``, ``"cityscapes:ROOT"`` or
    ``"ade20k:ROOT"``; root ``""`` for synthetic), or a ValueError saying what is wrong with it.
    The training command checks its --data with it before building anything."""
    kind, _, root = spec.partition(":")
    if kind not in DATASET_KINDS:
        raise ValueError(
            f"data: expected 'synthetic', 'cityscapes:ROOT' or 'ade20k:ROOT', got {spec!r}"
        )
    if kind == "synthetic" and root:
        raise ValueError(f"data: 'synthetic' takes no root, got {spec!r}")
    if kind != "synthetic" and not root:
        raise ValueError(f"data: {kind!r} needs a root folder, as '{kind}:ROOT', got {spec!r}")
    return kind, root


def build_dataset(
    spec: str,
    split: str,
    task: str = "panoptic",
    transform: Callable[[dict], dict] | None = None,
    *,
    synthetic_size: int = 128,
    synthetic_images: int = 2000,
    seed: int = 0,
) -> Dataset:
    """Returns the dataset that ``spec`` names.

    Args:
        spec: ``"synthetic"``, ``"cityscapes:ROOT"`` or ``"ade20k:ROOT"``.
        split: ``"train"`` or ``"val"``.
        task: ``"panoptic"`` or ``"semantic"``.
        transform: applied to every sample (training augmentation), or None.
        synthetic_size: side of the square synthetic images.
        synthetic_images: number of synthetic images in the split.
        seed: seed of the synthetic images (the "val" split is a separate random stream, the
            same images ``python -m pem.data.synthetic`` writes for that seed).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    kind, root = parse_data_spec(spec)
    if kind == "synthetic":
        return SyntheticPanoptic(
            synthetic_images, size=(synthetic_size, synthetic_size), seed=seed, split=split,
            transform=transform,
        )
    cls = CityscapesDataset if kind == "cityscapes" else ADE20KDataset
    return cls(root, split=_SPLITS[kind][split], task=task, transform=transform)
