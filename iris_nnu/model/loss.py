"""Iris's episodic loss: soft Dice + sigmoid BCE per class, equal weights, over the valid (reference, class) pairs.

It lives with the model because two stages use it: training, and in-context tuning at inference.

nnU-Net's DC_and_BCE_loss has no per-(sample, class) mask; Iris needs one because a reference crop may miss a
class of the episode, and then that class's query target says nothing about the task.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedDiceBCELoss(nn.Module):
    """Mean over valid (b, k) of [BCE(b,k) + 1 - softDice(b,k)] (nnU-Net's smoothing, per sample and class)."""

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float().flatten(2), target.float().flatten(2)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(2)
        probabilities = torch.sigmoid(logits)
        intersection = (probabilities * target).sum(2)
        denominator = probabilities.sum(2) + target.sum(2)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        weight = valid.float()
        return ((bce + 1 - dice) * weight).sum() / weight.sum().clamp_min(1.0)
