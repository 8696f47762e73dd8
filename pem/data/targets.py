"""Per-image training targets and batch collation (Mask2Former's dataset-mapper conventions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pem.data.common import TASKS, Sample

__all__ = ["collate", "instance_targets"]


def instance_targets(
    sample: Mapping[str, Any], task: str = "panoptic", ignore_label: int = 255
) -> dict[str, Tensor]:
    """Ground-truth masks and classes of one sample, as the matcher and criterion expect them.

    * ``task="panoptic"``: one mask per non-crowd entry of ``segments_info``, in that order,
      labelled with its ``category_id`` (``panoptic == id``). Crowd segments give no target;
      their pixels simply belong to no mask (Mask2Former's panoptic mapper).
    * ``task="semantic"``: one mask per class present in ``sem_seg``, in increasing class order,
      ``ignore_label`` excluded (Mask2Former's semantic mapper).

    Args:
        sample: a sample dict (``sem_seg`` / ``panoptic`` ``[H, W]`` int64, ``segments_info``).
        task: ``"panoptic"`` or ``"semantic"``.
        ignore_label: the ``sem_seg`` value to skip (semantic task).

    Returns:
        ``{"labels": int64 [T], "masks": bool [T, H, W]}``, on the device of the label map.
    """
    if task == "panoptic":
        panoptic = sample["panoptic"]
        kept = [s for s in sample["segments_info"] if not int(s.get("iscrowd", 0))]
        ids = torch.tensor([int(s["id"]) for s in kept], dtype=torch.int64, device=panoptic.device)
        labels = torch.tensor(
            [int(s["category_id"]) for s in kept], dtype=torch.int64, device=panoptic.device
        )
        masks = panoptic[None] == ids[:, None, None]
    elif task == "semantic":
        sem = sample["sem_seg"]
        labels = torch.unique(sem)  # sorted
        labels = labels[labels != ignore_label].to(torch.int64)
        masks = sem[None] == labels[:, None, None]
    else:
        raise ValueError(f"instance_targets: task={task!r}; expected one of {list(TASKS)}")
    return {"labels": labels, "masks": masks}


def collate(samples: Sequence[Sample]) -> tuple[Tensor, list[Sample]]:
    """Batch samples of one size (a DataLoader ``collate_fn``).

    Training crops every sample to one size and evaluation runs one image per batch, so images
    are stacked as they are: no padding.

    Args:
        samples: non-empty list of samples with ``image`` uint8 ``[3, H, W]``, all the same size.

    Returns:
        ``(images, samples)``: ``images`` float32 ``[B, 3, H, W]`` with values 0-255 (not
        normalized) and the samples themselves, as a list.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("collate: samples is empty; expected at least one sample")
    shapes = []
    for i, s in enumerate(samples):
        image = s["image"]
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            got = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(
                f"collate: samples[{i}]['image'] must be a Tensor [3, H, W], got {got}"
            )
        shapes.append(tuple(image.shape[1:]))
    if len(set(shapes)) > 1:
        raise ValueError(
            "collate: images must all have the same size (crop for training, batch size 1 for "
            f"evaluation); got (H, W) sizes {shapes}"
        )
    images = torch.stack([s["image"] for s in samples]).to(torch.float32)
    return images, samples
