"""Inference post-processing of PEM: semantic and panoptic results, as the official code.

PEM's ``maskformer_model.py`` is Mask2Former's (facts section 6). Per image:

1. the final layer's mask logits ``[Q, Hp / 4, Wp / 4]`` are upsampled bilinearly
   (``align_corners=False``) to the padded input size ``(Hp, Wp)``;
2. semantic-only models run :func:`semantic_inference` on the padded canvas and then
   :func:`sem_seg_postprocess` (crop the padding, resize to the output size); panoptic models
   post-process the *masks* to the output size first and run both :func:`semantic_inference` and
   :func:`panoptic_inference` there (``PANOPTIC_ON`` configs also report mIoU).

``output_size`` is the size of the original image when the model ran on a resized copy (the
official ``height`` / ``width``); by default it is the size the model saw.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "OBJECT_MASK_THRESHOLD",
    "OVERLAP_THRESHOLD",
    "panoptic_inference",
    "postprocess",
    "sem_seg_postprocess",
    "semantic_inference",
]

OBJECT_MASK_THRESHOLD = 0.8
OVERLAP_THRESHOLD = 0.8


def _check_size(name: str, size: object) -> tuple[int, int]:
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ValueError(f"{name}: expected a (height, width) pair of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def sem_seg_postprocess(
    result: Tensor, image_size: tuple[int, int], output_size: tuple[int, int]
) -> Tensor:
    """Crops the padding off ``result`` and resizes it to ``output_size``.

    Args:
        result: ``[C, Hp, Wp]`` per-pixel scores or logits on the padded canvas.
        image_size: ``(H, W)`` of the image inside the canvas (top-left aligned).
        output_size: ``(Ho, Wo)`` to resize to (bilinear, ``align_corners=False``).

    Returns:
        ``[C, Ho, Wo]``.
    """
    if not isinstance(result, Tensor) or result.dim() != 3:
        raise ValueError(f"result: expected a Tensor [C, Hp, Wp], got {_describe(result)}")
    h, w = _check_size("image_size", image_size)
    out_h, out_w = _check_size("output_size", output_size)
    if h > result.shape[1] or w > result.shape[2]:
        raise ValueError(
            f"image_size: {(h, w)} exceeds the canvas {tuple(result.shape[1:])} of result"
        )
    cropped = result[None, :, :h, :w]
    if (h, w) == (out_h, out_w):
        return cropped[0]
    return F.interpolate(cropped, size=(out_h, out_w), mode="bilinear", align_corners=False)[0]


def semantic_inference(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """Per-class scores: ``sum_q softmax(mask_cls)[q, c] * sigmoid(mask_pred)[q]``.

    Args:
        mask_cls: ``[Q, K + 1]`` class logits (the last class is "no object", dropped).
        mask_pred: ``[Q, H, W]`` mask logits.

    Returns:
        ``[K, H, W]`` scores (not normalized over classes; the per-pixel argmax is the
        semantic prediction).
    """
    _check_pair(mask_cls, mask_pred)
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    thing_ids: Collection[int],
    object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
) -> tuple[Tensor, list[dict[str, object]]]:
    """Mask2Former's panoptic merging.

    A query is kept when its most likely class is not "no object" and that class's probability
    exceeds ``object_mask_threshold``. Every pixel goes to the kept query with the largest
    ``score * sigmoid(mask)``; query k's segment is the pixels assigned to it whose
    ``sigmoid(mask_k) >= 0.5``. A query is dropped when it has no such pixel, or when the pixels
    assigned to it are fewer than ``overlap_threshold`` times its own ``sigmoid >= 0.5`` area
    (mostly hidden by other queries). Queries of the same stuff class share one segment. Segment
    ids count from 1 in query order; 0 is "no segment".

    Args:
        mask_cls: ``[Q, K + 1]`` class logits.
        mask_pred: ``[Q, H, W]`` mask logits.
        thing_ids: contiguous class ids that are things (the rest are stuff).

    Returns:
        ``(panoptic_seg [H, W] int32, segments_info)``, each info
        ``{"id": int, "isthing": bool, "category_id": int}``.
    """
    _check_pair(mask_cls, mask_pred)
    num_classes = mask_cls.shape[-1] - 1
    things = {int(c) for c in thing_ids}
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    masks = mask_pred.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]

    h, w = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    segments_info: list[dict[str, object]] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info

    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    # One device->host transfer for all queries instead of three .item() calls per query.
    assigned = cur_mask_ids[None] == torch.arange(len(cur_classes), device=mask_pred.device)[
        :, None, None
    ]
    confident = cur_masks >= 0.5
    segments = assigned & confident
    mask_areas = assigned.flatten(1).sum(1).tolist()
    original_areas = confident.flatten(1).sum(1).tolist()
    segment_areas = segments.flatten(1).sum(1).tolist()

    stuff_segment_of_class: dict[int, int] = {}
    current_id = 0
    for k, pred_class in enumerate(cur_classes.tolist()):
        if mask_areas[k] == 0 or original_areas[k] == 0 or segment_areas[k] == 0:
            continue
        if mask_areas[k] / original_areas[k] < overlap_threshold:
            continue
        isthing = pred_class in things
        if not isthing and pred_class in stuff_segment_of_class:
            panoptic_seg[segments[k]] = stuff_segment_of_class[pred_class]
            continue
        current_id += 1
        if not isthing:
            stuff_segment_of_class[pred_class] = current_id
        panoptic_seg[segments[k]] = current_id
        segments_info.append({"id": current_id, "isthing": isthing, "category_id": pred_class})
    return panoptic_seg, segments_info


def postprocess(
    outputs: Mapping[str, object],
    output_sizes: Sequence[tuple[int, int]] | None = None,
    *,
    panoptic: bool = False,
    thing_ids: Collection[int] = (),
    object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
) -> list[dict[str, object]]:
    """Turns :class:`pem.model.PEM` outputs into per-image results, as the official inference.

    Args:
        outputs: the model's output dict (``pred_logits [B, Q, K+1]``, ``pred_masks [B, Q, Hp/4,
            Wp/4]``, ``image_size (H, W)``, ``padded_size (Hp, Wp)``).
        output_sizes: ``B`` ``(Ho, Wo)`` sizes to resize each result to (the original image size
            when the model saw a resized image); default ``image_size`` for every image.
        panoptic: also run :func:`panoptic_inference` (and post-process the masks before
            inference, as the official panoptic configs do).
        thing_ids: contiguous thing class ids (needed when ``panoptic``).

    Returns:
        ``B`` dicts with ``"sem_seg"``: ``[K, Ho, Wo]`` class scores, and when ``panoptic``
        ``"panoptic_seg"``: ``(segment ids [Ho, Wo] int32, segments_info)``.
    """
    if not isinstance(outputs, Mapping) or not {"pred_logits", "pred_masks"} <= outputs.keys():
        raise ValueError("outputs: expected the PEM output dict with pred_logits and pred_masks")
    mask_cls_all, mask_pred_all = outputs["pred_logits"], outputs["pred_masks"]
    if not isinstance(mask_pred_all, Tensor) or mask_pred_all.dim() != 4:
        raise ValueError(
            f"outputs['pred_masks']: expected a Tensor [B, Q, h, w], got {_describe(mask_pred_all)}"
        )
    batch = mask_pred_all.shape[0]
    image_size = _check_size("outputs['image_size']", outputs.get("image_size"))
    padded_size = _check_size("outputs['padded_size']", outputs.get("padded_size"))
    if output_sizes is None:
        output_sizes = [image_size] * batch
    if len(output_sizes) != batch:
        raise ValueError(
            f"output_sizes: expected {batch} sizes (one per image), got {len(output_sizes)}"
        )
    masks_up = F.interpolate(
        mask_pred_all, size=padded_size, mode="bilinear", align_corners=False
    )
    results = []
    for b in range(batch):
        out_size = _check_size(f"output_sizes[{b}]", output_sizes[b])
        mask_cls, mask_pred = mask_cls_all[b], masks_up[b]
        result: dict[str, object] = {}
        if panoptic:
            mask_pred = sem_seg_postprocess(mask_pred, image_size, out_size)
            mask_cls = mask_cls.to(mask_pred)
            result["sem_seg"] = semantic_inference(mask_cls, mask_pred)
            result["panoptic_seg"] = panoptic_inference(
                mask_cls, mask_pred, thing_ids, object_mask_threshold, overlap_threshold
            )
        else:
            scores = semantic_inference(mask_cls, mask_pred)
            result["sem_seg"] = sem_seg_postprocess(scores, image_size, out_size)
        results.append(result)
    return results


def _check_pair(mask_cls: Tensor, mask_pred: Tensor) -> None:
    if not isinstance(mask_cls, Tensor) or mask_cls.dim() != 2 or mask_cls.shape[1] < 2:
        raise ValueError(
            f"mask_cls: expected a Tensor [Q, K + 1] with K >= 1, got {_describe(mask_cls)}"
        )
    if not isinstance(mask_pred, Tensor) or mask_pred.dim() != 3:
        raise ValueError(f"mask_pred: expected a Tensor [Q, H, W], got {_describe(mask_pred)}")
    if mask_pred.shape[0] != mask_cls.shape[0]:
        raise ValueError(
            f"mask_pred: {mask_pred.shape[0]} queries, but mask_cls has {mask_cls.shape[0]}"
        )


def _describe(value: object) -> str:
    return str(list(value.shape)) if isinstance(value, Tensor) else type(value).__name__
