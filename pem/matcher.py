"""Hungarian matcher between predicted queries and ground-truth masks (Mask2Former's, used by PEM).

PEM's ``pem/modeling/matcher.py`` is byte-identical to Mask2Former's. For every image (and,
in the criterion, separately for the final output and for every auxiliary output) the matcher
builds a ``[Q, T]`` cost matrix

    C = w_class * (-softmax(logits)[q, label_t])
      + w_mask  * BCE(mask_logits_q, mask_t)      (mean over the sampled points)
      + w_dice  * (1 - (2 <s_q, m_t> + 1) / (sum s_q + sum m_t + 1)),   s = sigmoid(mask_logits)

with both mask costs evaluated on ``num_points`` points drawn uniformly at random in the image and
shared by all masks of that image, and solves it with ``scipy.optimize.linear_sum_assignment``.
The point sampling draws from torch's global RNG, so ``torch.manual_seed`` makes it repeatable.

This module also holds the helpers shared with :mod:`pem.criterion`: :func:`point_sample` and the
pairwise costs :func:`pairwise_sigmoid_bce` and :func:`pairwise_dice`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = [
    "HungarianMatcher",
    "check_outputs",
    "check_targets",
    "pairwise_dice",
    "pairwise_sigmoid_bce",
    "point_sample",
]


def point_sample(input: Tensor, point_coords: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinearly sample ``input`` at points given in normalized [0, 1] image coordinates.

    A thin wrapper over :func:`torch.nn.functional.grid_sample` (zero padding, the PointRend /
    Mask2Former convention): ``(0, 0)`` is the top-left corner of the image and ``(1, 1)`` the
    bottom-right corner, so with ``align_corners=False`` the centre of pixel ``(i, j)`` of an
    ``[H, W]`` map is the point ``((j + 0.5) / W, (i + 0.5) / H)``. Coordinates are ``(x, y)``.
    Because the coordinates are resolution-free, predictions and targets of different sizes are
    sampled at the same places.

    Args:
        input: ``[N, C, H, W]`` floating tensor.
        point_coords: ``[N, P, 2]`` points, or ``[N, Hg, Wg, 2]`` a grid of points, in [0, 1].
        align_corners: forwarded to ``grid_sample``.

    Returns:
        ``[N, C, P]`` (or ``[N, C, Hg, Wg]`` for a grid) sampled values.
    """
    if input.dim() != 4:
        raise ValueError(f"input: expected [N, C, H, W], got shape {list(input.shape)}")
    if point_coords.dim() not in (3, 4) or point_coords.shape[-1] != 2:
        raise ValueError(
            f"point_coords: expected [N, P, 2] or [N, Hg, Wg, 2], got {list(point_coords.shape)}"
        )
    as_list = point_coords.dim() == 3
    grid = point_coords.unsqueeze(2) if as_list else point_coords
    # grid_sample wants [-1, 1]; the [0, 1] convention keeps callers independent of that detail.
    out = F.grid_sample(input, 2.0 * grid - 1.0, mode="bilinear", align_corners=align_corners)
    return out.squeeze(3) if as_list else out


def pairwise_sigmoid_bce(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy with logits for every (prediction, target) pair.

    Args:
        inputs: ``[N, P]`` mask logits at P points.
        targets: ``[M, P]`` target values in [0, 1] at the same points.

    Returns:
        ``[N, M]`` with ``[n, m] = mean_p BCE(inputs[n, p], targets[m, p])``.
    """
    num_points = inputs.shape[1]
    # BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0), so all pairs come out of two matmuls
    # instead of an [N, M, P] tensor.
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    cost = pos @ targets.transpose(0, 1) + neg @ (1.0 - targets).transpose(0, 1)
    return cost / num_points


def pairwise_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice loss (with +1 smoothing) for every (prediction, target) pair.

    Args:
        inputs: ``[N, P]`` mask logits at P points (a sigmoid is applied here).
        targets: ``[M, P]`` target values in [0, 1] at the same points.

    Returns:
        ``[N, M]`` with ``[n, m] = 1 - (2 * sum_p s*t + 1) / (sum_p s + sum_p t + 1)``,
        ``s = sigmoid(inputs[n])``, ``t = targets[m]``.
    """
    probs = inputs.sigmoid()
    numerator = 2.0 * (probs @ targets.transpose(0, 1))
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def check_outputs(outputs: Mapping[str, Tensor], name: str = "outputs") -> tuple[Tensor, Tensor]:
    """Validate a Mask2Former output dict and return ``(pred_logits, pred_masks)``.

    ``pred_logits`` must be ``[B, Q, K+1]`` and ``pred_masks`` ``[B, Q, h, w]``, both floating.
    """
    if not isinstance(outputs, Mapping):
        raise TypeError(f"{name}: expected a dict, got {type(outputs).__name__}")
    for key in ("pred_logits", "pred_masks"):
        if key not in outputs:
            raise KeyError(f"{name}: missing key {key!r}")
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"{name}['pred_logits']: expected a float Tensor [B, Q, K+1]")
    if not isinstance(masks, Tensor) or masks.dim() != 4 or not masks.is_floating_point():
        raise ValueError(f"{name}['pred_masks']: expected a float Tensor [B, Q, h, w]")
    if masks.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"{name}['pred_masks']: batch and query dims {list(masks.shape[:2])} differ from "
            f"pred_logits' {list(logits.shape[:2])}"
        )
    if logits.shape[2] < 2:
        raise ValueError(f"{name}['pred_logits']: needs K+1 >= 2 classes, got {logits.shape[2]}")
    return logits, masks


def check_targets(targets: Sequence[Mapping[str, Tensor]], batch: int, num_classes: int) -> None:
    """Validate ``targets``: ``batch`` dicts with ``labels [T] int64`` in [0, K) and ``masks
    [T, H, W]`` (bool or float)."""
    if isinstance(targets, Mapping) or not isinstance(targets, Sequence):
        raise TypeError(f"targets: expected a list of dicts, got {type(targets).__name__}")
    if len(targets) != batch:
        raise ValueError(f"targets: expected {batch} entries (one per image), got {len(targets)}")
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "labels" not in t or "masks" not in t:
            raise KeyError(f"targets[{i}]: expected a dict with 'labels' and 'masks'")
        labels, masks = t["labels"], t["masks"]
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"targets[{i}]['labels']: expected an int64 Tensor [T]")
        if not isinstance(masks, Tensor) or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{i}]['masks']: expected a Tensor [T, H, W] with T = "
                f"{labels.shape[0]} (len of labels), got "
                f"{list(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"targets[{i}]['labels']: values must be in [0, {num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth masks by minimum total cost.

    Args:
        cost_class: weight of the class cost (``-p(target class)``). PEM/Mask2Former: 2.0.
        cost_mask: weight of the pairwise sigmoid BCE cost. PEM/Mask2Former: 5.0.
        cost_dice: weight of the pairwise dice cost. PEM/Mask2Former: 5.0.
        num_points: points per image at which the mask costs are evaluated (12544 = 112^2).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("cost_class, cost_mask, cost_dice: all costs are 0")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points: expected a positive int, got {num_points!r}")
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        labels: Tensor,
        masks: Tensor,
        point_coords: Tensor | None = None,
    ) -> Tensor:
        """The ``[Q, T]`` fp32 matching cost of one image.

        Args:
            pred_logits: ``[Q, K+1]`` class logits (the last class is "no object").
            pred_masks: ``[Q, h, w]`` mask logits.
            labels: ``[T]`` int64 target classes.
            masks: ``[T, H, W]`` target masks (bool or float; any resolution).
            point_coords: ``[P, 2]`` points in [0, 1] to evaluate the mask costs at; ``None``
                draws ``num_points`` uniform random points (the training behaviour).
        """
        # fp32 throughout (Mask2Former disables autocast here): BCE/dice sums over 12544 points
        # in fp16 lose the small cost differences that decide the assignment.
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            probs = pred_logits.float().softmax(-1)
            cost_class = -probs[:, labels]
            if point_coords is None:
                point_coords = torch.rand(self.num_points, 2, device=pred_masks.device)
            elif point_coords.dim() != 2 or point_coords.shape[1] != 2:
                raise ValueError(
                    f"point_coords: expected [P, 2], got {list(point_coords.shape)}"
                )
            coords = point_coords.to(device=pred_masks.device, dtype=torch.float32)
            out = pred_masks.float()[:, None]
            tgt = masks.to(device=pred_masks.device, dtype=torch.float32)[:, None]
            out_pts = point_sample(out, coords.expand(len(out), -1, -1))[:, 0]
            tgt_pts = point_sample(tgt, coords.expand(len(tgt), -1, -1))[:, 0]
            cost_mask = pairwise_sigmoid_bce(out_pts, tgt_pts)
            cost_dice = pairwise_dice(out_pts, tgt_pts)
            return (
                self.cost_class * cost_class
                + self.cost_mask * cost_mask
                + self.cost_dice * cost_dice
            )

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w]}`` (other keys,
                such as ``aux_outputs``, are ignored).
            targets: ``B`` dicts ``{"labels": [T_b] int64, "masks": [T_b, H, W] bool/float}``.

        Returns:
            For each image a pair ``(pred_idx [min(Q, T_b)], tgt_idx [min(Q, T_b)])`` of int64 CPU
            tensors: query ``pred_idx[i]`` is assigned to target ``tgt_idx[i]``; ``pred_idx`` is
            sorted ascending. Images without targets give two empty tensors.
        """
        logits, pred_masks = check_outputs(outputs)
        batch, _, k_plus_1 = logits.shape
        check_targets(targets, batch, k_plus_1 - 1)
        # The point coordinates refer to the batch's padded canvas, as in the criterion's mask
        # losses (and Mask2Former, whose targets arrive padded): an image smaller than the
        # largest has its masks zero-padded right and bottom.
        pad_h = max(int(t["masks"].shape[-2]) for t in targets)
        pad_w = max(int(t["masks"].shape[-1]) for t in targets)
        indices: list[tuple[Tensor, Tensor]] = []
        for b in range(batch):
            labels, masks = targets[b]["labels"], targets[b]["masks"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            height, width = masks.shape[-2:]
            if (height, width) != (pad_h, pad_w):
                masks = F.pad(masks.to(torch.float32), (0, pad_w - width, 0, pad_h - height))
            cost = self.cost_matrix(logits[b], pred_masks[b], labels.to(logits.device), masks)
            cost = cost.cpu()
            if not bool(torch.isfinite(cost).all()):
                raise ValueError(
                    f"outputs: the matching cost of image {b} is not finite (NaN/inf in "
                    "pred_logits or pred_masks?)"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
