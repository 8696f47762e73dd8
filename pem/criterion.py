"""Training losses of PEM: Mask2Former's ``SetCriterion`` (PEM's ``criterion.py`` is identical).

For the final output and for every auxiliary (per-decoder-layer) output the criterion

1. matches queries to ground-truth masks with :class:`pem.matcher.HungarianMatcher` (a separate
   matching per output),
2. computes ``loss_ce``: softmax cross-entropy over K+1 classes for *all* queries, the unmatched
   ones labelled "no object" (index K), with class weights ``1, ..., 1, eos_coef``,
3. computes ``loss_mask`` (sigmoid BCE) and ``loss_dice`` on the matched (query, mask) pairs at
   ``num_points`` points per pair chosen by PointRend importance sampling,

and normalizes the mask losses by the number of ground-truth masks in the batch (averaged over
processes under ``torch.distributed``, clamped at >= 1). Aux losses get the suffix ``_i`` (``i`` =
index in ``outputs["aux_outputs"]``). :meth:`SetCriterion.weighted_total` applies the loss weights
(class 2, mask 5, dice 5 for every output) and sums.

Random points come from torch's global RNG: with ``torch.manual_seed`` the losses are repeatable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pem.matcher import HungarianMatcher, check_outputs, check_targets, point_sample

__all__ = [
    "SetCriterion",
    "dice_loss",
    "mask_uncertainty",
    "sigmoid_bce_loss",
    "uncertain_point_coords_with_randomness",
]

LOSS_NAMES = ("loss_ce", "loss_mask", "loss_dice")


def sigmoid_bce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Sigmoid BCE averaged over points, summed over masks, divided by ``num_masks``.

    Args:
        inputs: ``[N, P]`` mask logits at P points.
        targets: ``[N, P]`` targets in [0, 1] at the same points.
        num_masks: normalizer (the batch's ground-truth mask count, >= 1).

    Returns:
        Scalar tensor.
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice loss with +1 smoothing, summed over masks, divided by ``num_masks``.

    Args:
        inputs: ``[N, P]`` mask logits (a sigmoid is applied here).
        targets: ``[N, P]`` targets in [0, 1].
        num_masks: normalizer (>= 1).

    Returns:
        Scalar tensor: ``sum_n [1 - (2 sum_p s t + 1) / (sum_p s + sum_p t + 1)] / num_masks``.
    """
    probs = inputs.sigmoid()
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


def mask_uncertainty(logits: Tensor) -> Tensor:
    """PointRend uncertainty of a class-agnostic mask logit: ``-|logit|`` (highest at 0).

    Args:
        logits: ``[N, 1, ...]`` mask logits.
    """
    return -logits.abs()


def uncertain_point_coords_with_randomness(
    coarse_logits: Tensor,
    uncertainty_func: Callable[[Tensor], Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> Tensor:
    """PointRend training-time point selection (Kirillov et al. 2020, Sec. 3.1).

    Draws ``int(num_points * oversample_ratio)`` uniform candidates per mask, keeps the
    ``int(importance_sample_ratio * num_points)`` most uncertain of them (uncertainty evaluated on
    the bilinearly interpolated logits), and fills up to ``num_points`` with fresh uniform points,
    so the loss concentrates on the boundaries while still seeing the whole mask.

    Args:
        coarse_logits: ``[N, 1, h, w]`` mask logits.
        uncertainty_func: maps sampled logits ``[N, 1, P]`` to uncertainties ``[N, 1, P]``.
        num_points: points per mask.
        oversample_ratio: candidates per kept point, >= 1.
        importance_sample_ratio: fraction of the points chosen by uncertainty, in [0, 1].

    Returns:
        ``[N, num_points, 2]`` point coordinates in [0, 1] (``(x, y)``, see
        :func:`pem.matcher.point_sample`); the uncertain points come first.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio: must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio: must be in [0, 1], got {importance_sample_ratio}"
        )
    num_boxes = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    device = coarse_logits.device
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=device)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    uncertainties = uncertainty_func(point_logits)[:, 0, :]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainties, k=num_uncertain, dim=1).indices
    chosen = torch.gather(point_coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        extra = torch.rand(num_boxes, num_random, 2, device=device)
        chosen = torch.cat([chosen, extra], dim=1)
    return chosen


def _distributed_num_masks(count: int, device: torch.device) -> float:
    """The batch's GT mask count averaged over processes, clamped at >= 1."""
    num_masks = torch.as_tensor([float(count)], dtype=torch.float32, device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        # Every process normalizes by the same global average so the gradient of a mask does not
        # depend on how the batch was split across processes.
        dist.all_reduce(num_masks)
        world_size = dist.get_world_size()
    return float(torch.clamp(num_masks / world_size, min=1).item())


class SetCriterion(nn.Module):
    """Mask2Former / PEM training loss (see the module docstring).

    Args:
        num_classes: number of real classes K (the logits have K+1 entries, the last "no object").
        matcher: the matcher; default ``HungarianMatcher(2.0, 5.0, 5.0, 12544)`` (PEM's config).
        class_weight: weight of ``loss_ce`` (and of every ``loss_ce_i``) in :meth:`weighted_total`.
        mask_weight: weight of ``loss_mask`` / ``loss_mask_i``.
        dice_weight: weight of ``loss_dice`` / ``loss_dice_i``.
        eos_coef: cross-entropy weight of the "no object" class (PEM: 0.1).
        num_points: points per matched mask for the mask losses (12544 = 112^2).
        oversample_ratio: PointRend candidate oversampling (3.0).
        importance_sample_ratio: fraction of points picked by uncertainty (0.75).
    """

    empty_weight: Tensor

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        eos_coef: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points: expected a positive int, got {num_points!r}")
        if oversample_ratio < 1:
            raise ValueError(f"oversample_ratio: must be >= 1, got {oversample_ratio}")
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(
                f"importance_sample_ratio: must be in [0, 1], got {importance_sample_ratio}"
            )
        if eos_coef < 0:
            raise ValueError(f"eos_coef: must be >= 0, got {eos_coef}")
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # A buffer so that .to(device) moves it and state_dict matches Mask2Former's.
        self.register_buffer("empty_weight", empty_weight)

    # ---------------------------------------------------------------------------------------

    def loss_labels(
        self,
        pred_logits: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        indices: Sequence[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """Weighted softmax cross-entropy over all ``[B, Q]`` queries.

        ``F.cross_entropy`` with class weights averages as ``sum_i w_{y_i} l_i / sum_i w_{y_i}``,
        so ``eos_coef`` sets the share of the unmatched queries in the mean, not just its scale.
        """
        logits = pred_logits.float()
        batch, queries, _ = logits.shape
        target_classes = torch.full(
            (batch, queries), self.num_classes, dtype=torch.int64, device=logits.device
        )
        for b, (src, tgt) in enumerate(indices):
            labels = targets[b]["labels"].to(logits.device)
            target_classes[b, src.to(logits.device)] = labels[tgt.to(logits.device)]
        return F.cross_entropy(
            logits.transpose(1, 2), target_classes, weight=self.empty_weight.to(logits.device)
        )

    def loss_masks(
        self,
        pred_masks: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        indices: Sequence[tuple[Tensor, Tensor]],
        num_masks: float,
    ) -> tuple[Tensor, Tensor]:
        """``(loss_mask, loss_dice)`` on the matched pairs, at importance-sampled points."""
        device = pred_masks.device
        src_list, tgt_list = [], []
        # Mask2Former pads the batch's target masks to a common size (zeros right/bottom) before
        # sampling, so the [0, 1] point coordinates refer to the padded canvas; do the same.
        pad_h = max(int(t["masks"].shape[-2]) for t in targets)
        pad_w = max(int(t["masks"].shape[-1]) for t in targets)
        for b, (src, tgt) in enumerate(indices):
            if src.numel() == 0:
                continue
            src_list.append(pred_masks[b, src.to(device)])
            tgt_masks = targets[b]["masks"][tgt.to(targets[b]["masks"].device)]
            tgt_masks = tgt_masks.to(device=device, dtype=torch.float32)
            h, w = tgt_masks.shape[-2:]
            tgt_list.append(F.pad(tgt_masks, (0, pad_w - w, 0, pad_h - h)))
        if not src_list:
            # No matched pair in the batch: a zero that still depends on pred_masks keeps every
            # parameter in the graph (DDP errors on parameters without gradient).
            zero = pred_masks.sum() * 0.0
            return zero, zero.clone()
        # fp32 for the losses whatever the model's dtype (autocast would do the same for BCE).
        src_masks = torch.cat(src_list).float()[:, None]
        tgt_masks = torch.cat(tgt_list)[:, None]
        with torch.no_grad():
            # The points depend on the prediction but are not differentiated through.
            coords = uncertain_point_coords_with_randomness(
                src_masks,
                mask_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = point_sample(tgt_masks, coords)[:, 0]
        point_logits = point_sample(src_masks, coords)[:, 0]
        return (
            sigmoid_bce_loss(point_logits, point_labels, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )

    def _losses_for(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        num_masks: float,
        name: str,
    ) -> dict[str, Tensor]:
        logits, masks = check_outputs(outputs, name)
        if logits.shape[2] != self.num_classes + 1:
            raise ValueError(
                f"{name}['pred_logits']: last dim {logits.shape[2]} != num_classes + 1 = "
                f"{self.num_classes + 1}"
            )
        indices = self.matcher(outputs, targets)
        loss_mask, loss_dice = self.loss_masks(masks, targets, indices, num_masks)
        return {
            "loss_ce": self.loss_labels(logits, targets, indices),
            "loss_mask": loss_mask,
            "loss_dice": loss_dice,
        }

    def forward(
        self, outputs: Mapping[str, object], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Compute all (unweighted) losses.

        Args:
            outputs: ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w],
                "aux_outputs": [{"pred_logits", "pred_masks"}, ...]}`` (``aux_outputs`` optional).
            targets: ``B`` dicts ``{"labels": [T_b] int64 in [0, K), "masks": [T_b, H, W]
                bool/float}``; mask sizes may differ between images (they are zero-padded).

        Returns:
            ``{"loss_ce", "loss_mask", "loss_dice"}`` scalars for the final output, plus
            ``loss_ce_i``, ``loss_mask_i``, ``loss_dice_i`` for ``aux_outputs[i]``.
        """
        logits, _ = check_outputs(outputs)  # type: ignore[arg-type]
        check_targets(targets, logits.shape[0], self.num_classes)
        count = sum(int(t["labels"].numel()) for t in targets)
        num_masks = _distributed_num_masks(count, logits.device)

        losses = self._losses_for(outputs, targets, num_masks, "outputs")  # type: ignore[arg-type]
        aux = outputs.get("aux_outputs")
        if aux is None:
            aux = []
        if not isinstance(aux, Sequence):
            raise TypeError(f"outputs['aux_outputs']: expected a list, got {type(aux).__name__}")
        for i, aux_outputs in enumerate(aux):
            aux_losses = self._losses_for(
                aux_outputs, targets, num_masks, f"outputs['aux_outputs'][{i}]"
            )
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def weight_of(self, key: str) -> float:
        """Weight of a loss key: ``loss_ce``/``loss_ce_3`` -> class weight, and so on."""
        base = key
        head, _, tail = key.rpartition("_")
        if tail.isdigit() and head in self.weights:
            base = head
        if base not in self.weights:
            raise KeyError(f"key: unknown loss {key!r} (expected one of {LOSS_NAMES} [+ '_i'])")
        return self.weights[base]

    def weighted_total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``sum_k weight_of(k) * losses[k]``: the scalar to backpropagate.

        Args:
            losses: the dict returned by :meth:`forward`.
        """
        if not losses:
            raise ValueError("losses: empty dict")
        return sum(self.weight_of(k) * v for k, v in losses.items())  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weights={self.weights}, eos_coef={self.eos_coef}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}"
        )
