"""Known-answer checks of pem.matcher (Hungarian matching) and pem.criterion (SetCriterion)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pem.criterion import (
    SetCriterion,
    dice_loss,
    mask_uncertainty,
    sigmoid_bce_loss,
    uncertain_point_coords_with_randomness,
)
from pem.matcher import HungarianMatcher, pairwise_dice, pairwise_sigmoid_bce, point_sample

K = 4  # real classes; the logits have K + 1 entries


def rect_masks(size: int, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """[T, size, size] bool masks from (y0, y1, x0, x1) boxes."""
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return masks


def perfect_prediction(
    labels: torch.Tensor, masks: torch.Tensor, perm: list[int], num_queries: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [Q, K+1] and mask logits [Q, H, W] where query perm[t] reproduces target t and the
    other queries say "no object" with an empty mask."""
    logits = torch.full((num_queries, K + 1), -scale)
    logits[:, K] = scale
    mask_logits = torch.full((num_queries, *masks.shape[1:]), -scale)
    for t, q in enumerate(perm):
        logits[q] = -scale
        logits[q, labels[t]] = scale
        mask_logits[q] = scale * (2 * masks[t].float() - 1)
    return logits, mask_logits


# --------------------------------------------------------------------------------------------
# Helpers shared by the matcher and the criterion
# --------------------------------------------------------------------------------------------


def test_point_sample_at_pixel_centres_returns_pixels_x_first():
    image = torch.arange(6.0).view(1, 1, 2, 3)  # value = 3 * row + col
    pts = torch.tensor([[[(j + 0.5) / 3, (i + 0.5) / 2] for i in range(2) for j in range(3)]])
    out = point_sample(image, pts)
    assert out.shape == (1, 1, 6)
    torch.testing.assert_close(out[0, 0], torch.arange(6.0))


def test_pairwise_costs_equal_per_pair_losses():
    logits = torch.randn(3, 50)
    targets = (torch.rand(4, 50) > 0.5).float()
    bce = pairwise_sigmoid_bce(logits, targets)
    dice = pairwise_dice(logits, targets)
    assert bce.shape == dice.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(
                bce[i, j], sigmoid_bce_loss(logits[i : i + 1], targets[j : j + 1], 1.0)
            )
            torch.testing.assert_close(
                dice[i, j], dice_loss(logits[i : i + 1], targets[j : j + 1], 1.0)
            )


def test_mask_losses_by_hand():
    # Logit 0 everywhere (prob 1/2) against all-ones targets, 4 points, 2 masks, num_masks 2.
    logits = torch.zeros(2, 4)
    targets = torch.ones(2, 4)
    assert float(sigmoid_bce_loss(logits, targets, 2.0)) == pytest.approx(math.log(2))
    # per mask: 1 - (2 * 2 + 1) / (2 + 4 + 1) = 2/7; summed (4/7) and divided by 2.
    assert float(dice_loss(logits, targets, 2.0)) == pytest.approx(2 / 7)
    assert float(dice_loss(logits, targets, 1.0)) == pytest.approx(4 / 7)


def test_importance_sampling_prefers_uncertain_points():
    # Logit 0 (maximally uncertain) on the left half, 10 on the right half of an 8-wide map.
    # Bilinear values are exactly 0 for x <= 3.5 / 8 (the centre of column 3), so the 75 %
    # uncertain points must all lie there (43.75 % of the 3x oversampled candidates qualify).
    logits = torch.zeros(2, 1, 8, 8)
    logits[..., 4:] = 10.0
    coords = uncertain_point_coords_with_randomness(logits, mask_uncertainty, 400, 3.0, 0.75)
    assert coords.shape == (2, 400, 2)
    assert bool(((coords >= 0) & (coords <= 1)).all())
    assert float(coords[:, :300, 0].max()) <= 3.5 / 8 + 1e-6
    # The remaining 25 % are uniform: some land on the right half.
    assert float(coords[:, 300:, 0].max()) > 0.5
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        uncertain_point_coords_with_randomness(logits, mask_uncertainty, 10, 3.0, 1.5)


# --------------------------------------------------------------------------------------------
# Matcher
# --------------------------------------------------------------------------------------------


def test_matcher_recovers_permuted_copies_of_the_targets():
    size, queries = 16, 6
    masks = rect_masks(size, [(0, 8, 0, 8), (8, 16, 0, 16), (0, 8, 8, 16)])
    labels = torch.tensor([2, 0, 3])
    perm = [4, 0, 3]  # target t is reproduced by query perm[t]
    logits, mask_logits = perfect_prediction(labels, masks, perm, queries, scale=8.0)
    # Second image: one target, reproduced by query 5.
    masks1 = rect_masks(size, [(2, 10, 3, 12)])
    labels1 = torch.tensor([1])
    logits1, mask_logits1 = perfect_prediction(labels1, masks1, [5], queries, scale=8.0)
    outputs = {
        "pred_logits": torch.stack([logits, logits1]),
        "pred_masks": torch.stack([mask_logits, mask_logits1]),
    }
    targets = [{"labels": labels, "masks": masks}, {"labels": labels1, "masks": masks1}]
    indices = HungarianMatcher(num_points=1024)(outputs, targets)
    (src0, tgt0), (src1, tgt1) = indices
    assert src0.dtype == tgt0.dtype == torch.int64
    assert src0.tolist() == [0, 3, 4]  # sorted query indices
    assert tgt0.tolist() == [1, 2, 0]
    assert (src1.tolist(), tgt1.tolist()) == ([5], [0])


def test_matcher_with_zero_targets():
    outputs = {"pred_logits": torch.randn(2, 5, K + 1), "pred_masks": torch.randn(2, 5, 8, 8)}
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)},
        {"labels": torch.tensor([1, 2]), "masks": torch.rand(2, 16, 16) > 0.5},
    ]
    (src0, tgt0), (src1, tgt1) = HungarianMatcher(num_points=256)(outputs, targets)
    assert src0.shape == tgt0.shape == (0,)
    assert src0.dtype == tgt0.dtype == torch.int64
    assert len(src1) == 2 and sorted(tgt1.tolist()) == [0, 1]


def test_matcher_assignment_is_optimal_against_brute_force():
    matcher = HungarianMatcher(num_points=512)
    for seed in range(3):
        torch.manual_seed(seed)
        q, t = 4, 3
        outputs = {"pred_logits": torch.randn(1, q, K + 1), "pred_masks": torch.randn(1, q, 8, 8)}
        labels = torch.randint(0, K, (t,))
        masks = torch.rand(t, 12, 12) > 0.5
        torch.manual_seed(100 + seed)
        ((src, tgt),) = matcher(outputs, [{"labels": labels, "masks": masks}])
        torch.manual_seed(100 + seed)  # same random points as inside forward
        cost = matcher.cost_matrix(
            outputs["pred_logits"][0], outputs["pred_masks"][0], labels, masks
        )
        assert cost.shape == (q, t) and cost.dtype == torch.float32
        best = min(
            sum(float(cost[rows[j], j]) for j in range(t))
            for rows in itertools.permutations(range(q), t)
        )
        assert float(cost[src, tgt].sum()) == pytest.approx(best, rel=1e-6)


def test_matcher_cost_matrix_by_hand():
    # One query with zero logits (p = 1/(K+1)) and zero mask logits (s = 1/2), one all-ones
    # target, sampled at the 4 pixel centres of a 2x2 map: BCE = log 2, dice = 1 - 5/7.
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0)
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    cost = matcher.cost_matrix(
        torch.zeros(1, K + 1), torch.zeros(1, 2, 2), torch.tensor([1]), torch.ones(1, 2, 2), centres
    )
    expected = 2.0 * (-1 / (K + 1)) + 5.0 * math.log(2) + 5.0 * (2 / 7)
    assert float(cost[0, 0]) == pytest.approx(expected, rel=1e-6)


def test_matcher_more_targets_than_queries():
    outputs = {"pred_logits": torch.randn(1, 2, K + 1), "pred_masks": torch.randn(1, 2, 8, 8)}
    targets = [{"labels": torch.tensor([0, 1, 2]), "masks": torch.rand(3, 8, 8) > 0.5}]
    ((src, tgt),) = HungarianMatcher(num_points=128)(outputs, targets)
    assert src.tolist() == [0, 1]
    assert len(set(tgt.tolist())) == 2


def test_matcher_errors_name_the_argument():
    matcher = HungarianMatcher(num_points=16)
    outputs = {"pred_logits": torch.randn(1, 3, K + 1), "pred_masks": torch.randn(1, 3, 4, 4)}
    good = {"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}
    with pytest.raises(ValueError, match="targets"):
        matcher(outputs, [good, good])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]"):
        matcher(outputs, [{"labels": torch.tensor([K]), "masks": torch.ones(1, 4, 4)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]"):
        matcher(outputs, [{"labels": torch.tensor([0]), "masks": torch.ones(2, 4, 4)}])
    with pytest.raises(ValueError, match="pred_masks"):
        bad = {"pred_logits": outputs["pred_logits"], "pred_masks": torch.randn(1, 2, 4, 4)}
        matcher(bad, [good])
    nan_logits = outputs["pred_logits"].clone()
    nan_logits[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="outputs"):
        matcher({"pred_logits": nan_logits, "pred_masks": outputs["pred_masks"]}, [good])
    with pytest.raises(ValueError, match="num_points"):
        HungarianMatcher(num_points=0)


# --------------------------------------------------------------------------------------------
# Criterion
# --------------------------------------------------------------------------------------------

SIZE = 128  # large maps keep the bilinear boundary band (where perfect != 0) small
QUERIES = 6


def batch_targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "labels": torch.tensor([2, 0]),
            "masks": rect_masks(SIZE, [(0, 64, 0, 64), (64, 128, 32, 96)]),
        },
        {"labels": torch.tensor([3]), "masks": rect_masks(SIZE, [(16, 112, 16, 112)])},
    ]


def batch_outputs(targets, perms, scale: float) -> dict[str, torch.Tensor]:
    preds = [
        perfect_prediction(t["labels"], t["masks"], perm, QUERIES, scale)
        for t, perm in zip(targets, perms)
    ]
    return {
        "pred_logits": torch.stack([p[0] for p in preds]),
        "pred_masks": torch.stack([p[1] for p in preds]),
    }


def test_criterion_perfect_prediction_is_near_zero_and_wrong_is_not():
    targets = batch_targets()
    criterion = SetCriterion(num_classes=K)
    perfect = criterion(batch_outputs(targets, [[3, 1], [0]], scale=10.0), targets)
    assert set(perfect) == {"loss_ce", "loss_mask", "loss_dice"}
    assert float(perfect["loss_ce"]) < 1e-3
    # Not exactly 0: points within half a pixel of a mask edge (or of the image border, where
    # grid_sample pads with zeros) see bilinearly blended soft labels, and importance sampling
    # deliberately puts most points there.
    assert float(perfect["loss_mask"]) < 0.1
    assert float(perfect["loss_dice"]) < 0.05

    # Wrong: every class shifted by one and every mask inverted.
    wrong_targets = [
        {"labels": (t["labels"] + 1) % K, "masks": ~t["masks"]} for t in targets
    ]
    wrong = criterion(batch_outputs(wrong_targets, [[3, 1], [0]], scale=10.0), targets)
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        assert float(wrong[key]) > 0.5, key
        assert float(wrong[key]) > 20 * float(perfect[key]), key


def test_criterion_no_object_weight():
    # One target matched by query 0 (zero logits: CE = log(K+1)); the other 3 queries are
    # unmatched and favour "no object" (CE = log(K + e^2) - 2). The weighted mean is
    # (l1 + eos * 3 * l0) / (1 + eos * 3).
    size = 32
    labels = torch.tensor([1])
    masks = rect_masks(size, [(0, 16, 0, 32)])
    logits = torch.zeros(1, 4, K + 1)
    logits[0, 1:, K] = 2.0
    mask_logits = torch.full((1, 4, size, size), 10.0)
    mask_logits[0, 0] = 10.0 * (2 * masks[0].float() - 1)
    mask_logits[0, 1:] = -mask_logits[0, 0]
    outputs = {"pred_logits": logits, "pred_masks": mask_logits}
    targets = [{"labels": labels, "masks": masks}]
    l1 = math.log(K + 1)
    l0 = math.log(K + math.e**2) - 2.0
    results = {}
    for eos in (0.1, 1.0):
        loss = SetCriterion(num_classes=K, eos_coef=eos, num_points=256)(outputs, targets)
        results[eos] = float(loss["loss_ce"])
        assert results[eos] == pytest.approx((l1 + eos * 3 * l0) / (1 + eos * 3), rel=1e-5)
    assert results[0.1] > results[1.0] + 0.1  # down-weighting the easy "no object" queries


def test_criterion_gradients_aux_losses_and_weighted_total():
    targets = batch_targets()
    criterion = SetCriterion(num_classes=K)
    final = {k: v.requires_grad_() for k, v in batch_outputs(targets, [[3, 1], [0]], 2.0).items()}
    aux = [
        {
            "pred_logits": torch.randn(2, QUERIES, K + 1, requires_grad=True),
            "pred_masks": torch.randn(2, QUERIES, 32, 32, requires_grad=True),
        }
        for _ in range(2)
    ]
    losses = criterion({**final, "aux_outputs": aux}, targets)
    names, suffixes = ("loss_ce", "loss_mask", "loss_dice"), ("", "_0", "_1")
    expected_keys = {f"{n}{s}" for n in names for s in suffixes}
    assert set(losses) == expected_keys
    # The random aux outputs are matched separately and score worse than the final output.
    assert float(losses["loss_dice_0"].detach()) > float(losses["loss_dice"].detach())
    total = criterion.weighted_total(losses)
    manual = sum(
        w * losses[f"{n}{s}"]
        for n, w in (("loss_ce", 2.0), ("loss_mask", 5.0), ("loss_dice", 5.0))
        for s in ("", "_0", "_1")
    )
    torch.testing.assert_close(total, manual)
    total.backward()
    for tensor in [*final.values(), *(t for a in aux for t in a.values())]:
        assert tensor.grad is not None
        assert bool(torch.isfinite(tensor.grad).all())
        assert float(tensor.grad.abs().sum()) > 0
    with pytest.raises(KeyError, match="loss_foo"):
        criterion.weight_of("loss_foo")


def test_criterion_matches_each_aux_output_separately():
    # The aux output reproduces the targets with other queries than the final output; reusing
    # the final matching for it would give a large loss.
    targets = batch_targets()
    final = batch_outputs(targets, [[3, 1], [0]], scale=10.0)
    aux = batch_outputs(targets, [[0, 5], [2]], scale=10.0)
    losses = SetCriterion(num_classes=K)({**final, "aux_outputs": [aux]}, targets)
    assert float(losses["loss_ce_0"]) < 1e-3
    assert float(losses["loss_dice_0"]) < 0.05


def test_criterion_normalizes_by_the_number_of_masks():
    # Duplicating an image doubles the summed mask losses and the mask count: same losses.
    targets = batch_targets()[:1]
    outputs = {
        "pred_logits": torch.randn(1, QUERIES, K + 1),
        "pred_masks": torch.randn(1, QUERIES, 32, 32),
    }
    doubled = {k: torch.cat([v, v]) for k, v in outputs.items()}
    criterion = SetCriterion(num_classes=K)
    single = criterion(outputs, targets)
    double = criterion(doubled, targets * 2)
    torch.testing.assert_close(single["loss_ce"], double["loss_ce"])
    for key in ("loss_mask", "loss_dice"):  # equal up to the random choice of points
        assert float(double[key]) == pytest.approx(float(single[key]), rel=0.05), key


def test_criterion_deterministic_with_seed():
    targets = batch_targets()
    outputs = {
        "pred_logits": torch.randn(2, QUERIES, K + 1),
        "pred_masks": torch.randn(2, QUERIES, 32, 32),
    }
    criterion = SetCriterion(num_classes=K, num_points=2048)
    torch.manual_seed(7)
    a = criterion(outputs, targets)
    torch.manual_seed(7)
    b = criterion(outputs, targets)
    torch.manual_seed(8)
    c = criterion(outputs, targets)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Different points give (slightly) different mask losses: the sampling is really random.
    assert not torch.equal(a["loss_mask"], c["loss_mask"])


def test_criterion_zero_targets_and_padding():
    # Image 0 has no target, image 1 a target smaller than image 0's (padded) canvas.
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 64)},
        {"labels": torch.tensor([1]), "masks": rect_masks(32, [(0, 32, 0, 32)])},
    ]
    logits = torch.randn(2, QUERIES, K + 1, requires_grad=True)
    masks = torch.randn(2, QUERIES, 16, 16, requires_grad=True)
    criterion = SetCriterion(num_classes=K, num_points=1024)
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, targets)
    assert all(bool(torch.isfinite(v.detach())) for v in losses.values())
    assert float(losses["loss_mask"].detach()) > 0

    # No target in the whole batch: mask losses are exactly 0 but still part of the graph.
    empty = [targets[0], targets[0]]
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, empty)
    assert float(losses["loss_mask"].detach()) == 0.0
    assert float(losses["loss_dice"].detach()) == 0.0
    # All queries are "no object", so CE is the plain mean over queries.
    expected_ce = torch.nn.functional.cross_entropy(
        logits.detach().reshape(-1, K + 1), torch.full((2 * QUERIES,), K)
    )
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    criterion.weighted_total(losses).backward()
    assert masks.grad is not None and logits.grad is not None


def test_criterion_pads_targets_to_the_batch_canvas():
    # Image 0 is 64x64, image 1 only 32x32, so image 1's masks are zero-padded to 64x64 and the
    # prediction (over the padded canvas) is positive only on the top-left quadrant. A full
    # 32x32 target therefore matches a prediction of the top-left quadrant of the canvas.
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 64)},
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 32, 32, dtype=torch.bool)},
    ]
    canvas_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    canvas_mask[0, :32, :32] = True
    logits, masks = perfect_prediction(torch.tensor([1]), canvas_mask, [0], QUERIES, 10.0)
    outputs = {
        "pred_logits": torch.stack([torch.full_like(logits, 0.0), logits]),
        "pred_masks": torch.stack([torch.zeros_like(masks), masks]),
    }
    losses = SetCriterion(num_classes=K, num_points=2048)(outputs, targets)
    assert float(losses["loss_dice"]) < 0.05
    assert float(losses["loss_mask"]) < 0.2


def test_matcher_pads_targets_to_the_batch_canvas_as_the_criterion():
    """Image 1 is half as tall as image 0: its masks are zero-padded to the batch canvas before
    the points are sampled (as in the mask losses), so matching them unpadded or padded by hand
    assigns the same queries. Query 1 predicts the canvas's top quarter: image 1's top half."""
    top = torch.zeros(2, 64, 64, dtype=torch.bool)
    top[0, :32], top[1, 32:] = True, True
    short = torch.zeros(2, 32, 64, dtype=torch.bool)
    short[0, :16], short[1, 16:] = True, True
    labels = torch.tensor([0, 1])
    pred_masks = torch.full((2, 6, 16, 16), -10.0)
    pred_masks[:, 0, :8] = 10.0  # top half of the canvas
    pred_masks[:, 1, :4] = 10.0  # top quarter
    pred_masks[:, 2, 4:8] = 10.0  # second quarter
    outputs = {"pred_logits": torch.zeros(2, 6, K + 1), "pred_masks": pred_masks}
    matcher = HungarianMatcher(cost_class=0.0, num_points=4000)
    point_results = []
    for masks in (short, F.pad(short, (0, 0, 0, 32))):
        torch.manual_seed(0)
        point_results.append(matcher(outputs, [{"labels": labels, "masks": top},
                                               {"labels": labels, "masks": masks}]))
    (rows, cols), (rows_padded, cols_padded) = point_results[0][1], point_results[1][1]
    assert torch.equal(rows, rows_padded) and torch.equal(cols, cols_padded)
    assert rows[cols == 0].item() == 1  # image 1's top half is the canvas's top quarter


def test_criterion_errors_name_the_argument():
    criterion = SetCriterion(num_classes=K, num_points=64)
    outputs = {"pred_logits": torch.randn(1, 3, K + 2), "pred_masks": torch.randn(1, 3, 4, 4)}
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}]
    with pytest.raises(ValueError, match="pred_logits"):
        criterion(outputs, targets)
    outputs["pred_logits"] = torch.randn(1, 3, K + 1)
    outputs["aux_outputs"] = [{"pred_logits": torch.randn(1, 3, K + 1)}]
    with pytest.raises(KeyError, match="aux_outputs"):
        criterion(outputs, targets)
    with pytest.raises(ValueError, match="eos_coef"):
        SetCriterion(num_classes=K, eos_coef=-1.0)
