"""Aggregation rules: how the deltas of one round become one step of the model.

Every rule works one tensor at a time (so memory is one tensor per
contributor, never whole models), in float64, over contributors in a fixed
order (sorted by update id), so the same updates always give bit-identical
results, whichever server process computes them.

* ``fedavg``: sum_i w_i d_i / sum_i w_i, with w_i = samples_i * decay^staleness_i.
* ``median``: coordinate-wise median of the d_i (mean of the two middle values
  for an even count); weights are ignored (a robust rule for misbehaving nodes).
* ``trimmed_mean``: per coordinate, drop the floor(trim * n) largest and
  smallest values and average the rest, unweighted.
* server momentum (FedAvgM): m <- beta * m + step; the model moves by lr * m.
  With beta = 0 and lr = 1 this is plain FedAvg.

Top-k sparse updates arrive decoded as dense deltas whose unsent entries are
zero: a node that did not send a coordinate votes "no change" there with its
full weight.  That is what the node meant: the unsent part stays in its error
feedback and comes in a later update.  (Averaging only over the nodes that
sent a coordinate would let one small node move a coordinate on its own.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

RULES = ("fedavg", "median", "trimmed_mean")


def combine(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], rule: str, trim_fraction: float = 0.1
) -> torch.Tensor:
    """One tensor's aggregated delta (float64) from the contributors' deltas."""
    if not deltas:
        raise ValueError("no deltas to combine")
    if len(deltas) != len(weights):
        raise ValueError("one weight per delta")
    if rule == "fedavg":
        total = math.fsum(weights)
        if total <= 0:
            raise ValueError("weights must sum to a positive number")
        acc = torch.zeros(deltas[0].shape, dtype=torch.float64)
        for d, w in zip(deltas, weights, strict=True):
            acc.add_(d.to(torch.float64), alpha=w)
        return acc.div_(total)
    stacked = torch.stack([d.to(torch.float64) for d in deltas])
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if rule == "median":
        lo, hi = (n - 1) // 2, n // 2
        return (ordered[lo] + ordered[hi]) / 2
    if rule == "trimmed_mean":
        t = int(math.floor(trim_fraction * n))
        if n - 2 * t < 1:
            t = (n - 1) // 2
        return ordered[t : n - t].mean(dim=0)
    raise ValueError(f"unknown rule {rule!r} (one of {', '.join(RULES)})")


def staleness_weight(samples: int, staleness: int, decay: float) -> float:
    """The FedAvg weight of an update ``staleness`` versions behind the newest."""
    return float(samples) * decay**staleness
