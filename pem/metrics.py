"""Evaluation metrics for PEM: semantic-segmentation mIoU and panoptic quality (PQ).

Both metrics are streaming accumulators: call ``update`` once per image, then ``compute``.
``update`` reduces each image to a few integer counts on the CPU, so memory does not grow with the
number of images and the result does not depend on the order of the images.

* :class:`SemSegMetric` follows the standard semantic-segmentation evaluators (detectron2's
  ``SemSegEvaluator``, mmseg): one confusion matrix over all pixels of all images, IoU per class,
  and the mean over the classes that occur in the ground truth or the prediction.
* :class:`PanopticQuality` is written to the published definition (Kirillov et al., "Panoptic
  Segmentation", CVPR 2019) with the void and crowd rules of the COCO panoptic API
  (``panopticapi/evaluation.py``), which the Cityscapes and ADE20K panoptic numbers of PEM and
  Mask2Former are computed with.

All results are fractions in [0, 1] (the evaluators print them multiplied by 100).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PanopticQuality",
    "PanopticResult",
    "PQStats",
    "SegmentInfo",
    "SemSegMetric",
    "SemSegResult",
]

ArrayLike = Union[Tensor, np.ndarray]
# A segment info is a mapping with at least "id" and "category_id" (and optionally "iscrowd"),
# the format of the COCO panoptic JSON and of detectron2's panoptic predictions.
SegmentInfo = Mapping[str, Any]


def _as_label_map(name: str, value: ArrayLike) -> Tensor:
    """Validate an integer ``[H, W]`` map and return it as an int64 CPU tensor."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a Tensor or numpy array, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D map [H, W], got shape {list(value.shape)}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {value.dtype}")
    # Counting happens on the CPU: the per-image work is a bincount, and keeping the
    # accumulators on the CPU makes the result independent of where the model ran.
    return value.detach().to(device="cpu", dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SemSegResult:
    """Result of :meth:`SemSegMetric.compute` (all values are fractions in [0, 1]).

    Attributes:
        iou: ``[K]`` float64 per-class IoU. NaN for a class that occurs neither in the ground truth
            nor in the prediction (it is excluded from ``miou``); 0 for a class that is predicted
            but absent from the ground truth (it counts in ``miou``).
        miou: mean of ``iou`` over the classes that are not NaN. NaN if no valid pixel was seen.
        pixel_accuracy: correctly labelled valid pixels / valid pixels (ignore pixels excluded).
        class_accuracy: ``[K]`` float64 per-class recall, NaN for classes without ground truth.
        mean_accuracy: mean of ``class_accuracy`` over the classes with ground truth.
        confusion_matrix: ``[K, K]`` int64 counts, rows = ground truth, columns = prediction.
    """

    iou: Tensor
    miou: float
    pixel_accuracy: float
    class_accuracy: Tensor
    mean_accuracy: float
    confusion_matrix: Tensor


class SemSegMetric:
    """Streaming confusion-matrix accumulator for semantic segmentation.

    Conventions (the same as detectron2's ``SemSegEvaluator``):

    * Pixels whose target equals ``ignore_label`` are dropped entirely, whatever was predicted
      there; they count neither as a prediction nor as ground truth.
    * ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` with the counts summed over every image seen.
    * mIoU averages over the classes with ``TP_c + FP_c + FN_c > 0``, i.e. present in the target or
      in the prediction of at least one image. A class with no ground truth and no prediction is
      excluded (its IoU is NaN, not 0 and not 1); a class that is only predicted has IoU 0 and
      lowers the mean.

    Args:
        num_classes: number of classes K; valid labels are ``0 .. K-1``.
        ignore_label: target value to ignore (255 in detectron2's datasets). ``None`` disables it.
    """

    def __init__(self, num_classes: int, ignore_label: int | None = 255) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if ignore_label is not None and 0 <= ignore_label < num_classes:
            raise ValueError(
                f"ignore_label: {ignore_label} is a valid class id (num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one image.

        Args:
            pred: ``[H, W]`` integer map of predicted class ids in ``[0, K)`` (the per-pixel argmax
                of the semantic-inference scores).
            target: ``[H, W]`` integer map of ground-truth class ids in ``[0, K)`` or
                ``ignore_label``.

        Raises:
            ValueError: shapes differ, or a value is outside the allowed range (the error names the
                argument and the offending value).
        """
        pred_t = _as_label_map("pred", pred)
        target_t = _as_label_map("target", target)
        if pred_t.shape != target_t.shape:
            raise ValueError(
                f"pred: shape {list(pred_t.shape)} differs from target shape "
                f"{list(target_t.shape)}"
            )
        k = self.num_classes
        valid = torch.ones_like(target_t, dtype=torch.bool)
        if self.ignore_label is not None:
            valid = target_t != self.ignore_label
        target_v = target_t[valid]
        pred_v = pred_t[valid]
        # Out-of-range ids are errors rather than silently ignored: a wrong number of classes or
        # an un-mapped dataset label would otherwise distort the metric without a trace.
        bad_target = (target_v < 0) | (target_v >= k)
        if bool(bad_target.any()):
            value = int(target_v[bad_target][0])
            raise ValueError(
                f"target: value {value} is neither a class id in [0, {k}) nor "
                f"ignore_label={self.ignore_label}"
            )
        bad_pred = (pred_v < 0) | (pred_v >= k)
        if bool(bad_pred.any()):
            value = int(pred_v[bad_pred][0])
            raise ValueError(f"pred: value {value} is not a class id in [0, {k})")
        counts = torch.bincount(target_v * k + pred_v, minlength=k * k)
        self._confusion += counts.view(k, k)

    def compute(self) -> SemSegResult:
        """Return per-class IoU, mIoU, pixel accuracy and class accuracies (see the class doc)."""
        conf = self._confusion.to(torch.float64)
        tp = conf.diagonal()
        gt_count = conf.sum(dim=1)  # TP + FN
        pred_count = conf.sum(dim=0)  # TP + FP
        union = gt_count + pred_count - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        # union == 0 exactly when the class has neither ground truth nor prediction.
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        class_acc = torch.where(gt_count > 0, tp / gt_count.clamp(min=1), nan)
        total = float(gt_count.sum())
        return SemSegResult(
            iou=iou,
            miou=float(iou.nanmean()) if bool((union > 0).any()) else float("nan"),
            pixel_accuracy=float(tp.sum()) / total if total > 0 else float("nan"),
            class_accuracy=class_acc,
            mean_accuracy=float(class_acc.nanmean()) if total > 0 else float("nan"),
            confusion_matrix=self._confusion.clone(),
        )


# --------------------------------------------------------------------------------------------
# Panoptic quality
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PQStats:
    """PQ, SQ and RQ averaged over ``n`` categories (fractions in [0, 1]; NaN when ``n == 0``)."""

    pq: float
    sq: float
    rq: float
    n: int


@dataclass(frozen=True)
class PanopticResult:
    """Result of :meth:`PanopticQuality.compute`.

    Attributes:
        all: averages over every category with at least one TP, FP or FN.
        things: the same average restricted to thing categories.
        stuff: the same average restricted to stuff categories.
        per_category: ``{category_id: {"pq", "sq", "rq", "tp", "fp", "fn", "iou_sum"}}`` for every
            category given to the constructor; categories with no TP, FP or FN have pq = sq = rq =
            0 there and are left out of the averages.
    """

    all: PQStats
    things: PQStats
    stuff: PQStats
    per_category: dict[int, dict[str, float]]


class PanopticQuality:
    """Streaming panoptic quality (PQ = SQ x RQ), per category and averaged.

    Definition (Kirillov et al. 2019), per category c, with counts summed over all images:
    a predicted and a ground-truth segment of the same category *match* when their IoU is > 0.5
    (such a match is unique, so no assignment problem arises); matched pairs are TP, unmatched
    predictions FP, unmatched ground-truth segments FN, and

        PQ_c = sum_{TP} IoU / (|TP| + |FP|/2 + |FN|/2),
        SQ_c = sum_{TP} IoU / |TP|  (0 when |TP| = 0),   RQ_c = |TP| / (|TP| + |FP|/2 + |FN|/2).

    PQ, SQ and RQ are averaged over the categories with |TP| + |FP| + |FN| > 0; PQ_things and
    PQ_stuff average over the thing and the stuff categories among them.

    Void and crowd, as in the COCO panoptic API:

    * Void: a ground-truth pixel whose segment id is ``void_id`` or is not listed in the
      ground-truth segment infos is void. Void pixels are removed from the IoU:
      ``union = |P| + |G| - |P & G| - |P & void|``. An unmatched prediction more than half of
      whose pixels lie on void is not an FP. Predicted pixels with id ``void_id`` are unlabelled;
      they belong to no segment.
    * Crowd (when ``use_crowd``): a ground-truth segment with ``"iscrowd": 1`` is never matched
      and never an FN; an unmatched prediction is not an FP when its pixels on void plus its
      pixels on the crowd regions of its own category exceed half of its area. (The COCO API keeps
      one crowd region per category and image; here the overlaps with all of them are added.)
      With ``use_crowd=False`` the ``iscrowd`` flag is ignored and crowd segments are scored like
      any other segment.

    Args:
        thing_ids: category ids of the thing classes.
        stuff_ids: category ids of the stuff classes (disjoint from ``thing_ids``).
        void_id: segment id of unlabelled pixels in both maps (0 in the COCO panoptic format).
        use_crowd: honour ``iscrowd`` in the ground-truth segment infos (see above).
    """

    def __init__(
        self,
        thing_ids: Iterable[int],
        stuff_ids: Iterable[int],
        void_id: int = 0,
        use_crowd: bool = True,
    ) -> None:
        things = {int(c) for c in thing_ids}
        stuff = {int(c) for c in stuff_ids}
        if things & stuff:
            raise ValueError(
                f"stuff_ids: categories {sorted(things & stuff)} are also in thing_ids"
            )
        if not things and not stuff:
            raise ValueError("thing_ids, stuff_ids: at least one category is required")
        self.thing_ids = frozenset(things)
        self.stuff_ids = frozenset(stuff)
        self.void_id = int(void_id)
        self.use_crowd = bool(use_crowd)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        cats = sorted(self.thing_ids | self.stuff_ids)
        self._tp = dict.fromkeys(cats, 0)
        self._fp = dict.fromkeys(cats, 0)
        self._fn = dict.fromkeys(cats, 0)
        self._iou = dict.fromkeys(cats, 0.0)

    def _check_infos(
        self, name: str, infos: Sequence[SegmentInfo]
    ) -> dict[int, tuple[int, bool]]:
        """Return ``{segment id: (category id, is crowd)}`` after validating the infos."""
        if isinstance(infos, (str, bytes)) or not isinstance(infos, Sequence):
            raise TypeError(f"{name}: expected a list of segment infos, got {type(infos).__name__}")
        out: dict[int, tuple[int, bool]] = {}
        for i, info in enumerate(infos):
            if not isinstance(info, Mapping) or "id" not in info or "category_id" not in info:
                raise ValueError(f"{name}[{i}]: expected a mapping with 'id' and 'category_id'")
            seg_id, cat = int(info["id"]), int(info["category_id"])
            if seg_id == self.void_id:
                raise ValueError(f"{name}[{i}]: segment id {seg_id} is the void id")
            if seg_id in out:
                raise ValueError(f"{name}[{i}]: duplicate segment id {seg_id}")
            if cat not in self._tp:
                raise ValueError(
                    f"{name}[{i}]: category_id {cat} is neither in thing_ids nor in stuff_ids"
                )
            out[seg_id] = (cat, bool(info.get("iscrowd", 0)))
        return out

    def update(
        self,
        pred: tuple[ArrayLike, Sequence[SegmentInfo]],
        target: tuple[ArrayLike, Sequence[SegmentInfo]],
    ) -> None:
        """Add one image.

        Args:
            pred: ``(segment id map [H, W] int, segment infos)``: the panoptic prediction. Every
                non-void id in the map must be listed in the infos and every listed segment must
                have at least one pixel (the COCO panoptic API rejects both). Each info is
                ``{"id": int, "category_id": int}``; other keys are ignored.
            target: ``(segment id map [H, W] int, segment infos)``: the ground truth. Infos may
                carry ``"iscrowd"``. Pixels with ids not listed are void; a listed segment with no
                pixel is an FN (it cannot be matched).

        Raises:
            ValueError / TypeError: malformed input, naming ``pred`` or ``target``.
        """
        for name, value in (("pred", pred), ("target", target)):
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise TypeError(f"{name}: expected a (segment id map, segment infos) pair")
        pred_map = _as_label_map("pred[0]", pred[0])
        gt_map = _as_label_map("target[0]", target[0])
        if pred_map.shape != gt_map.shape:
            raise ValueError(
                f"pred[0]: shape {list(pred_map.shape)} differs from target[0] shape "
                f"{list(gt_map.shape)}"
            )
        pred_segs = self._check_infos("pred[1]", pred[1])
        gt_segs = self._check_infos("target[1]", target[1])
        if not self.use_crowd:
            gt_segs = {k: (cat, False) for k, (cat, _) in gt_segs.items()}

        # Compact the (arbitrary, possibly large) ids to 0..n-1 so that the joint histogram of
        # (gt id, pred id) pairs is one bincount without any risk of overflowing a packed key.
        gt_ids, gt_inv = torch.unique(gt_map.flatten(), return_inverse=True)
        pred_ids, pred_inv = torch.unique(pred_map.flatten(), return_inverse=True)
        n_gt, n_pred = gt_ids.numel(), pred_ids.numel()
        joint_t = torch.bincount(gt_inv * n_pred + pred_inv, minlength=n_gt * n_pred)
        joint = joint_t.view(n_gt, n_pred).numpy()
        gt_row = {g: r for r, g in enumerate(gt_ids.tolist())}
        pred_col = {p: c for c, p in enumerate(pred_ids.tolist())}
        pred_area = {p: int(joint[:, c].sum()) for p, c in pred_col.items()}
        gt_area = {g: int(joint[r].sum()) for g, r in gt_row.items()}

        unknown = [p for p in pred_col if p != self.void_id and p not in pred_segs]
        if unknown:
            raise ValueError(f"pred[0]: segment ids {unknown} are not listed in pred[1]")
        missing = [p for p in pred_segs if p not in pred_col]
        if missing:
            raise ValueError(f"pred[1]: segments {missing} have no pixel in pred[0]")

        # Overlap of each prediction with GT void: every GT id that is not a listed segment
        # (the void id included) is void.
        void_rows = [r for g, r in gt_row.items() if g not in gt_segs]
        void_overlap = joint[void_rows].sum(0) if void_rows else np.zeros(n_pred, np.int64)
        void_by_pred = {p: int(void_overlap[c]) for p, c in pred_col.items()}

        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for g, (g_cat, g_crowd) in gt_segs.items():
            if g_crowd or g not in gt_row:
                continue
            r = gt_row[g]
            for c in np.flatnonzero(joint[r]).tolist():
                p = int(pred_ids[c])
                if p not in pred_segs or pred_segs[p][0] != g_cat:
                    continue
                inter = int(joint[r, c])
                union = pred_area[p] + gt_area[g] - inter - void_by_pred[p]
                iou = inter / union
                # IoU > 0.5 makes the match unique (Kirillov et al. 2019, Theorem 1), so no
                # assignment step is needed: a segment has at most one partner above 0.5.
                if iou > 0.5:
                    self._tp[g_cat] += 1
                    self._iou[g_cat] += iou
                    gt_matched.add(g)
                    pred_matched.add(p)

        crowd_rows: dict[int, list[int]] = {}
        for g, (cat, crowd) in gt_segs.items():
            if g in gt_matched:
                continue
            if crowd:
                if g in gt_row:
                    crowd_rows.setdefault(cat, []).append(gt_row[g])
                continue
            self._fn[cat] += 1

        for p, (cat, _) in pred_segs.items():
            if p in pred_matched:
                continue
            c = pred_col[p]
            ignored = void_by_pred[p] + sum(int(joint[r, c]) for r in crowd_rows.get(cat, ()))
            # Mostly-void (or mostly-crowd) predictions are not penalized: the ground truth does
            # not say what should be there.
            if ignored / pred_area[p] > 0.5:
                continue
            self._fp[cat] += 1

    def _average(self, cats: Iterable[int]) -> PQStats:
        pq = sq = rq = 0.0
        n = 0
        for c in cats:
            tp, fp, fn = self._tp[c], self._fp[c], self._fn[c]
            if tp + fp + fn == 0:
                continue
            n += 1
            denom = tp + 0.5 * fp + 0.5 * fn
            pq += self._iou[c] / denom
            sq += self._iou[c] / tp if tp else 0.0
            rq += tp / denom
        if n == 0:
            nan = float("nan")
            return PQStats(pq=nan, sq=nan, rq=nan, n=0)
        return PQStats(pq=pq / n, sq=sq / n, rq=rq / n, n=n)

    def compute(self) -> PanopticResult:
        """Return PQ/SQ/RQ overall, for things, for stuff, and per category (see the class doc)."""
        per_category: dict[int, dict[str, float]] = {}
        for c in self._tp:
            tp, fp, fn, iou = self._tp[c], self._fp[c], self._fn[c], self._iou[c]
            denom = tp + 0.5 * fp + 0.5 * fn
            per_category[c] = {
                "pq": iou / denom if denom else 0.0,
                "sq": iou / tp if tp else 0.0,
                "rq": tp / denom if denom else 0.0,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "iou_sum": iou,
            }
        return PanopticResult(
            all=self._average(self._tp),
            things=self._average(sorted(self.thing_ids)),
            stuff=self._average(sorted(self.stuff_ids)),
            per_category=per_category,
        )
