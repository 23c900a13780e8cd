"""Training losses: soft Dice + cross-entropy, deep supervision, and attention supervision.

Shapes: logits ``(B, C, D, H, W)`` (C classes including background), targets ``(B, D, H, W)`` int64 class
indices (0..C-1), attention maps ``(B, 1, D_k, H_k, W_k)``.

Coarse labels (region-based training, as nnU-Net's regions): a case labelled in a coarser space than the
network's classes has a ``LabelSpace`` (per class of the case, the channels it merges) and targets that index
its own classes; its Dice and CE are computed on the merged probabilities (the members' softmax summed).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..model.network import NetworkOutput


#: A case's label space: for each of its classes (index 0 = background), the network channels it merges, e.g.
#: ``((0,), (1, 2))`` for "hippocampus = anterior + posterior". ``None`` stands for the network's own classes.
LabelSpace = Tuple[Tuple[int, ...], ...]


def merged_log_probabilities(logits: torch.Tensor, space: LabelSpace) -> torch.Tensor:
    """``(B, K, D, H, W)`` log of the softmax probabilities of ``(B, C, D, H, W)`` logits summed within each of
    the ``K`` classes of ``space`` (log-sum-exp of the members' log-probabilities: exact, and stable)."""
    log_probabilities = torch.log_softmax(logits.float(), dim=1)
    return torch.stack([torch.logsumexp(log_probabilities[:, list(members)], dim=1) for members in space], dim=1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """``1 - mean`` soft Dice over the foreground classes, pooled over the batch (stable for small structures
    that are absent from some patches)."""
    return _soft_dice(torch.softmax(logits.float(), dim=1), target, smooth)


def _soft_dice(probabilities: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Pooled soft Dice loss of ``(B, K, ...)`` class probabilities against ``(B, ...)`` indices 0..K-1."""
    one_hot = F.one_hot(target, probabilities.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
    probabilities = probabilities[:, 1:]
    axes = (0, 2, 3, 4)
    intersection = (probabilities * one_hot).sum(axes)
    denominator = probabilities.sum(axes) + one_hot.sum(axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice.mean()


class DiceCELoss(nn.Module):
    """``dice_weight * soft Dice loss + ce_weight * cross-entropy`` of ``(B, C, D, H, W)`` logits."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, space: Optional[LabelSpace] = None) -> torch.Tensor:
        """``target`` indexes the network's classes, or the classes of ``space`` (the whole batch's)."""
        if space is None:
            return (self.dice_weight * soft_dice_loss(logits, target)
                    + self.ce_weight * F.cross_entropy(logits.float(), target))
        merged = merged_log_probabilities(logits, space)
        return self.dice_weight * _soft_dice(merged.exp(), target) + self.ce_weight * F.nll_loss(merged, target)


def downsample_labels(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour (voxel-centre aligned) resize of ``(B, D, H, W)`` class indices to ``size``."""
    if tuple(target.shape[1:]) == tuple(size):
        return target
    resized = F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest-exact")
    return resized[:, 0].long()


def deep_supervision_weights(levels: int) -> List[float]:
    """Weights ``1, 1/2, 1/4, ...`` for the full-resolution output and each coarser head, normalised to sum 1."""
    raw = [0.5 ** k for k in range(levels)]
    total = sum(raw)
    return [w / total for w in raw]


def attention_supervision_loss(attention: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean BCE between every gate's ``alpha`` and the ground-truth foreground averaged onto that gate's grid
    (the fraction of foreground in each coarse cell, so coarse gates get soft targets)."""
    foreground = (target > 0).float()[:, None]
    losses = []
    with torch.autocast(target.device.type, enabled=False):  # BCE on probabilities is refused under fp16 autocast
        for alpha in attention:
            expected = F.adaptive_avg_pool3d(foreground, alpha.shape[2:])
            losses.append(F.binary_cross_entropy(alpha.float().clamp(1e-6, 1 - 1e-6), expected))
    return torch.stack(losses).mean()


class SegmentationLoss(nn.Module):
    """Dice + CE on the final logits and (weighted) on every deep-supervision head, plus optionally the
    attention-supervision BCE scaled by ``attention_weight``.

    ``forward(output, target)`` returns the total loss and ``last_terms`` keeps the parts for logging.
    """

    def __init__(self, attention_weight: float = 0.0) -> None:
        super().__init__()
        self.dice_ce = DiceCELoss()
        self.attention_weight = attention_weight
        self.last_terms: Dict[str, float] = {}

    def forward(self, output: NetworkOutput, target: torch.Tensor,
                spaces: Optional[Sequence[Optional[LabelSpace]]] = None) -> torch.Tensor:
        """``spaces``: per sample its ``LabelSpace`` (``None``: the network's classes); samples sharing a space
        are scored together (pooled Dice), each group weighted by its share of the batch."""
        outputs = [output.logits, *output.deep_supervision]
        weights = deep_supervision_weights(len(outputs))
        groups: Dict[Optional[LabelSpace], List[int]] = {}
        for index, space in enumerate(spaces if spaces is not None else [None] * target.shape[0]):
            groups.setdefault(space, []).append(index)
        segmentation = 0.0
        for space, members in groups.items():
            share = len(members) / target.shape[0]
            rows = members if len(groups) > 1 else slice(None)
            segmentation = segmentation + share * sum(
                weight * self.dice_ce(logits[rows], downsample_labels(target[rows], logits.shape[2:]), space)
                for weight, logits in zip(weights, outputs))
        total = segmentation
        self.last_terms = {"segmentation": float(segmentation.detach())}
        if self.attention_weight > 0 and output.attention:
            attention = attention_supervision_loss(output.attention, target)
            total = total + self.attention_weight * attention
            self.last_terms["attention"] = float(attention.detach())
        return total


def dice_per_label(prediction: torch.Tensor, target: torch.Tensor, labels: Sequence[int]) -> Dict[int, Optional[float]]:
    """Hard Dice of integer maps for each label value (``None`` when the label is absent from both)."""
    scores: Dict[int, Optional[float]] = {}
    for value in labels:
        predicted, expected = prediction == value, target == value
        denominator = int(predicted.sum()) + int(expected.sum())
        scores[value] = None if denominator == 0 else 2.0 * int((predicted & expected).sum()) / denominator
    return scores
