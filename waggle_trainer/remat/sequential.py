"""Schedules equivalent to ``torch.utils.checkpoint.checkpoint_sequential`` (pure).

``checkpoint_sequential(functions, segments, input)`` splits ``n`` functions into
segments of ``n // segments`` functions; the first ``segments - 1`` segments run
checkpointed (only their input is kept; they are recomputed with autograd just
before their backward) and the last segment, which gets the remainder, runs
un-checkpointed.  ``segments == 1`` is plain training (strategy ``none``).
"""

from __future__ import annotations

from .schedule import BW, FA, FC, FN, LOSS, Action, Schedule

__all__ = ["segment_starts", "sequential_schedule", "no_checkpoint_schedule"]


def segment_starts(n: int, segments: int) -> tuple[int, ...]:
    """First stage of each segment, split as torch splits them (1 <= segments <= n)."""
    if n < 1:
        raise ValueError(f"a chain needs at least one stage, got n={n}")
    if not 1 <= segments <= n:
        raise ValueError(f"segments must be between 1 and the chain length {n}, got {segments}")
    size = n // segments
    return tuple(range(0, size * segments, size)) if segments > 1 else (0,)


def no_checkpoint_schedule(n: int) -> Schedule:
    """Plain training: ``FA 0..n-1, LOSS, BW n-1..0``."""
    return tuple(
        [(FA, j) for j in range(n)] + [(LOSS, n)] + [(BW, j) for j in range(n - 1, -1, -1)]
    )


def sequential_schedule(n: int, segments: int) -> Schedule:
    """The action sequence ``checkpoint_sequential`` performs with ``segments`` segments."""
    starts = segment_starts(n, segments)
    bounds = list(starts) + [n]
    out: list[Action] = []
    for k in range(len(starts) - 1):  # checkpointed segments, no autograd
        a, b = bounds[k], bounds[k + 1]
        out.append((FC, a))
        out.extend((FN, j) for j in range(a + 1, b))
    last = starts[-1]
    out.extend((FA, j) for j in range(last, n))
    out.append((LOSS, n))
    out.extend((BW, j) for j in range(n - 1, last - 1, -1))
    for k in range(len(starts) - 2, -1, -1):  # recompute each segment, then its backward
        a, b = bounds[k], bounds[k + 1]
        out.extend((FA, j) for j in range(a, b))
        out.extend((BW, j) for j in range(b - 1, a - 1, -1))
    return tuple(out)
