"""Tests of PEM's inference post-processing on hand-made predictions with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pem.inference import (
    panoptic_inference,
    postprocess,
    sem_seg_postprocess,
    semantic_inference,
)
from pem.model import PEM

BIG = 20.0  # a logit whose sigmoid / softmax is 1 to float precision


def _cls(labels: list[int], num_classes: int, confidence: float = BIG) -> torch.Tensor:
    """[Q, K + 1] logits whose softmax puts ~all mass on ``labels[q]``."""
    logits = torch.zeros(len(labels), num_classes + 1)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = confidence
    return logits


def test_semantic_inference_matches_the_definition() -> None:
    torch.manual_seed(0)
    mask_cls, mask_pred = torch.randn(5, 4), torch.randn(5, 6, 7)
    out = semantic_inference(mask_cls, mask_pred)
    probs = mask_cls.softmax(-1)[:, :3]
    expected = (probs[:, :, None, None] * mask_pred.sigmoid()[:, None]).sum(0)
    assert out.shape == (3, 6, 7)
    torch.testing.assert_close(out, expected)


def test_semantic_inference_picks_the_class_of_the_covering_query() -> None:
    mask_pred = torch.full((2, 4, 4), -BIG)
    mask_pred[0, :, :2] = BIG
    mask_pred[1, :, 2:] = BIG
    out = semantic_inference(_cls([2, 0], num_classes=3), mask_pred)
    expected = torch.tensor([[2, 2, 0, 0]] * 4)
    assert torch.equal(out.argmax(0), expected)


def test_panoptic_inference_hand_made_case() -> None:
    # 6x6 canvas, K = 3 classes; class 0 is a thing, classes 1 and 2 are stuff.
    h = w = 6
    mask_pred = torch.full((7, h, w), -BIG)
    mask_pred[0, :3, :3] = BIG  # thing (class 0), top-left
    mask_pred[1, :3, 3:] = BIG  # thing (class 0), top-right: a second instance
    mask_pred[2, 3:, :3] = BIG  # stuff class 2, bottom-left
    mask_pred[3, 3:, 3:] = BIG  # stuff class 2 again, bottom-right: merged into one segment
    mask_pred[4, :, :] = 0.5  # class 1 covering everything weakly: loses every pixel -> dropped
    mask_pred[5, 0, 0] = BIG  # "no object" query: never kept
    mask_pred[6, 5, 5] = BIG  # class 1 with a low score (0.5 < 0.8): not kept
    mask_cls = _cls([0, 0, 2, 2, 1, 3, 1], num_classes=3)
    mask_cls[6] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # softmax 0.25 everywhere
    seg, infos = panoptic_inference(mask_cls, mask_pred, thing_ids={0})

    expected = torch.zeros(h, w, dtype=torch.int32)
    expected[:3, :3] = 1
    expected[:3, 3:] = 2
    expected[3:, :] = 3
    assert seg.dtype == torch.int32
    assert torch.equal(seg, expected)
    assert infos == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": True, "category_id": 0},
        {"id": 3, "isthing": False, "category_id": 2},
    ]


def test_panoptic_inference_overlap_threshold_drops_hidden_queries() -> None:
    mask_pred = torch.full((2, 4, 10), -BIG)
    mask_pred[0, :, :] = BIG  # wins every pixel
    mask_pred[1, :, :10] = BIG  # same area but lower score: owns nothing -> dropped
    mask_cls = _cls([0, 1], num_classes=2)
    mask_cls[1, 1] = 3.0  # score ~0.9: kept, but always loses the argmax to query 0
    seg, infos = panoptic_inference(mask_cls, mask_pred, thing_ids={0, 1})
    assert [i["category_id"] for i in infos] == [0]
    assert torch.equal(seg, torch.ones(4, 10, dtype=torch.int32))

    # Query 1 keeps 7 of its 10 columns: 70% < 80% drops it; a 0.6 threshold keeps it.
    mask_pred[0] = -BIG
    mask_pred[0, :, :3] = BIG
    mask_cls[0, 0] = BIG * 2  # query 0 beats query 1 on its three columns
    _, infos = panoptic_inference(mask_cls, mask_pred, thing_ids={0, 1})
    assert [i["category_id"] for i in infos] == [0]
    seg, infos = panoptic_inference(mask_cls, mask_pred, thing_ids={0, 1}, overlap_threshold=0.6)
    assert [i["category_id"] for i in infos] == [0, 1]
    assert (seg == 2).sum() == 4 * 7


def test_panoptic_inference_empty_when_nothing_is_confident() -> None:
    seg, infos = panoptic_inference(torch.zeros(3, 5), torch.randn(3, 4, 4), thing_ids=())
    assert infos == [] and torch.equal(seg, torch.zeros(4, 4, dtype=torch.int32))


def test_sem_seg_postprocess_crops_then_resizes() -> None:
    result = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 8, 8)
    assert torch.equal(sem_seg_postprocess(result, (5, 6), (5, 6)), result[:, :5, :6])
    out = sem_seg_postprocess(result, (4, 4), (8, 8))
    expected = F.interpolate(result[None, :, :4, :4], size=(8, 8), mode="bilinear")[0]
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="image_size"):
        sem_seg_postprocess(result, (9, 4), (8, 8))
    with pytest.raises(ValueError, match="output_size"):
        sem_seg_postprocess(result, (4, 4), (0, 8))


def _fake_outputs(batch: int, image_size: tuple[int, int], padded: tuple[int, int]) -> dict:
    torch.manual_seed(1)
    return {
        "pred_logits": torch.randn(batch, 6, 4),
        "pred_masks": torch.randn(batch, 6, padded[0] // 4, padded[1] // 4),
        "image_size": image_size,
        "padded_size": padded,
    }


def test_postprocess_semantic_follows_the_official_order() -> None:
    out = _fake_outputs(2, (50, 70), (64, 96))
    results = postprocess(out, output_sizes=[(50, 70), (100, 140)])
    up = F.interpolate(out["pred_masks"], size=(64, 96), mode="bilinear", align_corners=False)
    for b, size in enumerate([(50, 70), (100, 140)]):
        scores = semantic_inference(out["pred_logits"][b], up[b])
        expected = sem_seg_postprocess(scores, (50, 70), size)
        assert results[b]["sem_seg"].shape == (3, *size)
        torch.testing.assert_close(results[b]["sem_seg"], expected)
        assert "panoptic_seg" not in results[b]


def test_postprocess_panoptic_resizes_masks_first() -> None:
    out = _fake_outputs(1, (50, 70), (64, 96))
    out["pred_logits"][0, :, 0] = BIG  # every query confidently class 0 (a thing)
    (result,) = postprocess(out, output_sizes=[(25, 35)], panoptic=True, thing_ids={0})
    up = F.interpolate(out["pred_masks"], size=(64, 96), mode="bilinear", align_corners=False)
    masks = sem_seg_postprocess(up[0], (50, 70), (25, 35))
    torch.testing.assert_close(result["sem_seg"], semantic_inference(out["pred_logits"][0], masks))
    seg, infos = result["panoptic_seg"]
    ref_seg, ref_infos = panoptic_inference(out["pred_logits"][0], masks, {0})
    assert seg.shape == (25, 35) and torch.equal(seg, ref_seg) and infos == ref_infos


def test_postprocess_bad_inputs() -> None:
    out = _fake_outputs(2, (50, 70), (64, 96))
    with pytest.raises(ValueError, match="output_sizes: expected 2"):
        postprocess(out, output_sizes=[(50, 70)])
    with pytest.raises(ValueError, match="pred_logits and pred_masks"):
        postprocess({"pred_masks": out["pred_masks"]})
    with pytest.raises(ValueError, match="image_size"):
        postprocess({**out, "image_size": None})
    with pytest.raises(ValueError, match="mask_pred: 3 queries"):
        semantic_inference(torch.zeros(2, 4), torch.zeros(3, 4, 4))


def test_model_outputs_postprocess_to_the_image_size() -> None:
    model = PEM("stdc1", num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 50, 70) * 255)
    (result,) = postprocess(out, panoptic=True, thing_ids={0, 1})
    assert result["sem_seg"].shape == (5, 50, 70)
    seg, infos = result["panoptic_seg"]
    assert seg.shape == (50, 70)
    assert set(torch.unique(seg).tolist()) <= {0} | {i["id"] for i in infos}
