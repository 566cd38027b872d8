"""Distillation loss for frame-level classification (Hinton et al., 2015)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def distillation_loss(
    logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    temperature: float = 2.0,
    hard_confidence: float = 0.9,
    hard_weight: float = 0.5,
) -> torch.Tensor:
    """``T^2 * KL(p_teacher || softmax(logits / T))`` plus ``hard_weight`` times the
    cross-entropy with the teacher's arg-max on the samples whose teacher probability
    is at least ``hard_confidence`` (none of them: no cross-entropy term).

    ``teacher_probs`` [B, C] are the teacher's soft labels (rows summing to 1), already
    at the temperature the teacher was asked for.
    """
    t = float(temperature)
    log_q = F.log_softmax(logits / t, dim=1)
    kl = F.kl_div(log_q, teacher_probs, reduction="batchmean") * t * t
    if hard_weight <= 0:
        return kl
    conf, hard = teacher_probs.max(dim=1)
    confident = conf >= hard_confidence
    if not bool(confident.any()):
        return kl
    ce = F.cross_entropy(logits[confident], hard[confident])
    return kl + hard_weight * ce
