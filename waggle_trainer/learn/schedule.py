"""The learning rate of a node's training: one schedule across rounds.

A round is not a training run: a node trains a few steps at a time for as long as
it runs.  The schedule is a function of the number of optimiser steps the node has
*kept* (steps of rolled-back rounds are given back, and the count is saved with the
node's state), so a rollback or a restart continues the same curve:

* linear warm-up from ``base / warmup`` to ``base`` over ``warmup`` steps (Adam's
  early steps on a new camera are large; warm-up measured more stable rounds);
* cosine decay from ``base`` to ``final_fraction * base`` over the next ``decay``
  steps (Loshchilov & Hutter, SGDR, 2017);
* then constant at ``final_fraction * base``: a node keeps learning slowly as its
  scene changes (season, light, a moved camera), never stops.
"""

from __future__ import annotations

import math

__all__ = ["learning_rate"]


def learning_rate(
    step: int, base: float, *, warmup: int, decay: int, final_fraction: float
) -> float:
    """The learning rate of kept step ``step`` (0-based)."""
    if step < 0:
        raise ValueError(f"step {step} is negative")
    if step < warmup:
        return base * (step + 1) / warmup
    t = step - warmup
    floor = base * final_fraction
    if decay <= 0 or t >= decay:
        return floor
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * t / decay))
