"""Hand-computed checks of pem.metrics: semantic mIoU and panoptic quality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pem.metrics import PanopticQuality, SemSegMetric

# --------------------------------------------------------------------------------------------
# mIoU
# --------------------------------------------------------------------------------------------

# K = 3, ignore = 255. Valid (gt, pred) pairs: (0,0) (1,0) (1,1) (2,2) (0,2) (1,1) (0,0);
# the ignored pixel is predicted 1 and must not count as a class-1 prediction.
PRED = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 0]])
TARGET = torch.tensor([[0, 1, 1, 255], [2, 0, 1, 0]])
# class 0: TP 2, GT 3, pred 3 -> 2/4; class 1: TP 2, GT 3, pred 2 -> 2/3; class 2: TP 1, GT 1,
# pred 2 -> 1/2.
EXPECTED_IOU = [0.5, 2 / 3, 0.5]


def test_miou_by_hand_with_ignore_label():
    metric = SemSegMetric(num_classes=3, ignore_label=255)
    metric.update(PRED, TARGET)
    res = metric.compute()
    torch.testing.assert_close(res.iou, torch.tensor(EXPECTED_IOU, dtype=torch.float64))
    assert res.miou == pytest.approx(sum(EXPECTED_IOU) / 3)
    assert res.pixel_accuracy == pytest.approx(5 / 7)
    torch.testing.assert_close(
        res.class_accuracy, torch.tensor([2 / 3, 2 / 3, 1.0], dtype=torch.float64)
    )
    assert int(res.confusion_matrix.sum()) == 7  # the ignored pixel is gone


def test_miou_class_absent_from_both_is_excluded():
    metric = SemSegMetric(num_classes=4, ignore_label=255)
    metric.update(PRED, TARGET)
    res = metric.compute()
    assert math.isnan(float(res.iou[3]))
    assert math.isnan(float(res.class_accuracy[3]))
    # Same mean as with K = 3: the absent class neither counts as 0 nor as 1.
    assert res.miou == pytest.approx(sum(EXPECTED_IOU) / 3)


def test_miou_predicted_only_class_counts_as_zero():
    metric = SemSegMetric(num_classes=4, ignore_label=255)
    pred = PRED.clone()
    pred[1, 3] = 3  # was a correct class-0 pixel
    metric.update(pred, TARGET)
    res = metric.compute()
    # class 0 now: TP 1, GT 3, pred 2 -> 1/4; class 3: TP 0, pred 1 -> 0 and it is averaged.
    expected = [0.25, 2 / 3, 0.5, 0.0]
    torch.testing.assert_close(res.iou, torch.tensor(expected, dtype=torch.float64))
    assert res.miou == pytest.approx(sum(expected) / 4)
    assert math.isnan(float(res.class_accuracy[3]))


def test_miou_streaming_sums_counts_not_per_image_means():
    whole = SemSegMetric(3)
    whole.update(PRED, TARGET)
    split = SemSegMetric(3)
    split.update(PRED[:1], TARGET[:1])
    split.update(PRED[1:].numpy(), TARGET[1:].numpy())  # numpy input accepted too
    a, b = whole.compute(), split.compute()
    torch.testing.assert_close(a.iou, b.iou)
    assert a.miou == pytest.approx(b.miou)
    split.reset()
    assert math.isnan(split.compute().miou)


def test_miou_without_ignore_label_counts_every_pixel():
    metric = SemSegMetric(num_classes=3, ignore_label=None)
    target = TARGET.clone()
    target[0, 3] = 1  # the formerly ignored pixel, predicted 1: now a TP of class 1
    metric.update(PRED, target)
    assert float(metric.compute().iou[1]) == pytest.approx(3 / 4)


def test_miou_errors_name_the_argument():
    metric = SemSegMetric(3)
    with pytest.raises(ValueError, match="pred"):
        metric.update(torch.tensor([[3]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="target"):
        metric.update(torch.tensor([[0]]), torch.tensor([[7]]))
    with pytest.raises(ValueError, match="pred"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="pred"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_label"):
        SemSegMetric(3, ignore_label=1)


# --------------------------------------------------------------------------------------------
# Panoptic quality. Maps are 1 x N rows so that areas can be read off directly.
# --------------------------------------------------------------------------------------------


def row(*runs: tuple[int, int]) -> torch.Tensor:
    """A [1, N] id map from (segment id, length) runs."""
    return torch.cat([torch.full((n,), seg) for seg, n in runs]).view(1, -1)


def segs(*pairs, crowd: tuple[int, ...] = ()) -> list[dict]:
    return [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in pairs]


def test_pq_perfect_prediction():
    gt = torch.tensor([[1, 1, 2, 2], [1, 0, 2, 3], [3, 3, 3, 3]])
    gt_info = segs((1, 1), (2, 1), (3, 10))
    # Same partition, different ids: matching is by overlap, never by id.
    pred = gt.clone()
    for old, new in ((1, 7), (2, 8), (3, 9)):
        pred[gt == old] = new
    pred_info = segs((7, 1), (8, 1), (9, 10))
    pq = PanopticQuality(thing_ids=[1], stuff_ids=[10])
    pq.update((pred, pred_info), (gt, gt_info))
    res = pq.compute()
    for stats in (res.all, res.things, res.stuff):
        assert (stats.pq, stats.sq, stats.rq) == pytest.approx((1.0, 1.0, 1.0))
    assert (res.all.n, res.things.n, res.stuff.n) == (2, 1, 1)
    assert res.per_category[1]["tp"] == 2


# Category 1: GT A = 10 px, pred a = its first 6 px (IoU 0.6, TP); GT B = 5 px, pred b = 2 of
# them (IoU 0.4: b is FP and B is FN). Predicted void (0) elsewhere.
ONE_TP_FP_FN_GT = ([(1, 10), (2, 5)], [(1, 1), (2, 1)])
ONE_TP_FP_FN_PRED = ([(5, 6), (0, 4), (6, 2), (0, 3)], [(5, 1), (6, 1)])


def test_pq_one_tp_one_fp_one_fn():
    pq = PanopticQuality(thing_ids=[1], stuff_ids=[10])
    gt_runs, gt_pairs = ONE_TP_FP_FN_GT
    pred_runs, pred_pairs = ONE_TP_FP_FN_PRED
    pq.update((row(*pred_runs), segs(*pred_pairs)), (row(*gt_runs), segs(*gt_pairs)))
    res = pq.compute()
    cat = res.per_category[1]
    assert (cat["tp"], cat["fp"], cat["fn"]) == (1, 1, 1)
    assert res.all.pq == pytest.approx(0.6 / (1 + 0.5 + 0.5))  # 0.3
    assert res.all.sq == pytest.approx(0.6)
    assert res.all.rq == pytest.approx(0.5)
    assert res.all.n == 1  # stuff category 10 saw nothing and is not averaged
    assert res.stuff.n == 0 and math.isnan(res.stuff.pq)


def test_pq_things_stuff_split():
    gt_runs, gt_pairs = ONE_TP_FP_FN_GT
    pred_runs, pred_pairs = ONE_TP_FP_FN_PRED
    # Append a stuff region (category 10) predicted exactly.
    gt = row(*gt_runs, (3, 5))
    pred = row(*pred_runs, (7, 5))
    pq = PanopticQuality(thing_ids=[1, 2], stuff_ids=[10, 11])
    pq.update((pred, segs(*pred_pairs, (7, 10))), (gt, segs(*gt_pairs, (3, 10))))
    res = pq.compute()
    assert res.things.pq == pytest.approx(0.3)
    assert res.stuff.pq == pytest.approx(1.0)
    assert res.all.pq == pytest.approx(0.65)
    assert (res.things.n, res.stuff.n, res.all.n) == (1, 1, 2)
    assert res.per_category[11]["pq"] == 0.0


def test_pq_iou_of_exactly_one_half_is_not_a_match():
    # GT A = 8 px, B = 4 px (cat 1). Pred a = first half of A (IoU 4/8); pred b = second half
    # of A + all of B (IoU 4/12 with A, 4/8 with B). The threshold is strict: nothing matches.
    gt = row((1, 8), (2, 4))
    pred = row((5, 4), (6, 8))
    pq = PanopticQuality(thing_ids=[1], stuff_ids=[])
    pq.update((pred, segs((5, 1), (6, 1))), (gt, segs((1, 1), (2, 1))))
    cat = pq.compute().per_category[1]
    assert (cat["tp"], cat["fp"], cat["fn"]) == (0, 2, 2)
    assert cat["pq"] == 0.0


def test_pq_void_pixels_are_excluded_from_the_union():
    # GT A = 10 px then 10 void px; the prediction covers all 20. IoU counting void would be
    # 10/20 = 0.5 (no match); with void removed it is 10/10.
    gt = row((1, 10), (0, 10))
    pred = row((5, 20))
    pq = PanopticQuality(thing_ids=[1], stuff_ids=[])
    pq.update((pred, segs((5, 1))), (gt, segs((1, 1))))
    res = pq.compute()
    assert res.per_category[1]["tp"] == 1
    assert res.all.pq == pytest.approx(1.0)


def test_pq_predictions_mostly_on_void_are_not_false_positives():
    # GT: A (cat 1) = 12 px, then 8 void px.
    # a = first 8 px of A (IoU 8/12, TP); c = last 4 px of A + 4 void px (exactly half void:
    # FP); b = 4 void px only (ignored).
    gt = row((1, 12), (0, 8))
    pred = row((5, 8), (7, 4), (6, 4), (7, 4))
    pq = PanopticQuality(thing_ids=[1], stuff_ids=[])
    pq.update((pred, segs((5, 1), (6, 1), (7, 1))), (gt, segs((1, 1))))
    cat = pq.compute().per_category[1]
    assert (cat["tp"], cat["fp"], cat["fn"]) == (1, 1, 0)
    assert cat["pq"] == pytest.approx((8 / 12) / 1.5)


def test_pq_unlisted_gt_ids_are_void():
    # Id 9 appears in the GT map but not in its infos: treated as void, like id 0.
    gt = row((1, 10), (9, 10))
    pred = row((5, 20))
    pq = PanopticQuality(thing_ids=[1], stuff_ids=[])
    pq.update((pred, segs((5, 1))), (gt, segs((1, 1))))
    assert pq.compute().all.pq == pytest.approx(1.0)


def test_pq_crowd_handling():
    # GT: crowd region C (cat 1) = 10 px, then A (cat 1) = 10 px.
    # Pred: p1 (cat 1) on 8 px of C, p3 (cat 2) on the other 2 px of C, p2 (cat 1) = A.
    gt = row((1, 10), (2, 10))
    gt_info = segs((1, 1), (2, 1), crowd=(1,))
    pred = row((11, 8), (13, 2), (12, 10))
    pred_info = segs((11, 1), (12, 1), (13, 2))

    with_crowd = PanopticQuality(thing_ids=[1, 2], stuff_ids=[])
    with_crowd.update((pred, pred_info), (gt, gt_info))
    res = with_crowd.compute()
    c1, c2 = res.per_category[1], res.per_category[2]
    # p1 lies on its category's crowd region: not an FP; the crowd region is not an FN.
    assert (c1["tp"], c1["fp"], c1["fn"]) == (1, 0, 0)
    # p3 lies on a crowd region of another category: an FP.
    assert (c2["tp"], c2["fp"], c2["fn"]) == (0, 1, 0)
    assert res.all.pq == pytest.approx(0.5)

    # Ignoring iscrowd, C is an ordinary segment and p1 matches it with IoU 8/10.
    without = PanopticQuality(thing_ids=[1, 2], stuff_ids=[], use_crowd=False)
    without.update((pred, pred_info), (gt, gt_info))
    c1 = without.compute().per_category[1]
    assert (c1["tp"], c1["fp"], c1["fn"]) == (2, 0, 0)
    assert c1["pq"] == pytest.approx((1.0 + 0.8) / 2)


def test_pq_streaming_sums_counts_over_images():
    pq = PanopticQuality(thing_ids=[1], stuff_ids=[])
    gt = row((1, 4))
    pq.update((row((5, 4)), segs((5, 1))), (gt, segs((1, 1))))  # TP, IoU 1
    # Image 2: the GT is all void, so the prediction lies fully on void: ignored, not an FP.
    pq.update((row((5, 4)), segs((5, 1))), (row((0, 4)), []))
    assert pq.compute().per_category[1]["fp"] == 0
    pq.update((np.full((1, 4), 5), segs((5, 1))), (row((2, 4)), segs((2, 1), (3, 1))))
    res = pq.compute()
    # Image 3: p5 covers GT 2 (cat 1) exactly -> TP; GT 3 has no pixel -> FN.
    cat = res.per_category[1]
    assert (cat["tp"], cat["fp"], cat["fn"]) == (2, 0, 1)
    assert res.all.pq == pytest.approx(2 / 2.5)  # counts pooled, not per-image PQ averaged


def test_pq_errors_name_the_argument():
    pq = PanopticQuality(thing_ids=[1], stuff_ids=[10])
    gt = (row((1, 4)), segs((1, 1)))
    with pytest.raises(ValueError, match=r"pred\[0\]"):
        pq.update((row((5, 2), (6, 2)), segs((5, 1))), gt)  # id 6 unlisted
    with pytest.raises(ValueError, match=r"pred\[1\]"):
        pq.update((row((5, 4)), segs((5, 1), (6, 1))), gt)  # listed id 6 has no pixel
    with pytest.raises(ValueError, match=r"pred\[1\]\[0\]"):
        pq.update((row((5, 4)), segs((5, 3))), gt)  # unknown category
    with pytest.raises(ValueError, match=r"pred\[0\]"):
        pq.update((torch.full((2, 2), 5), segs((5, 1))), gt)  # shape mismatch
    with pytest.raises(TypeError, match="target"):
        pq.update((row((5, 4)), segs((5, 1))), row((1, 4)))
    with pytest.raises(ValueError, match="stuff_ids"):
        PanopticQuality(thing_ids=[1], stuff_ids=[1])
    # Nothing was counted by the failed updates.
    assert pq.compute().all.n == 0
