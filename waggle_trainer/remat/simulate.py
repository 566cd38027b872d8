"""Check a schedule and predict its peak memory and time from a chain's costs (pure).

The memory model is the one the torch executor implements (see ``costs.py`` and
``schedule.py``):

* ``a[0]`` (``input_bytes``) is always live; ``delta[0]`` (same size) is counted
  once ``BW 0`` produces it.
* ``a[j]`` (j >= 1, ``output_bytes[j-1]``) lives while anything holds it: it is
  *pending* from its production until consumed (``FN j``, ``FC j``, ``FA j`` or
  ``LOSS``); ``FC j`` stores it as a checkpoint until ``BW j``; ``FA j``'s tape
  references it until ``BW j``; if ``FA j-1`` produced it, that tape holds it too.
* Activations are counted by their parts (:meth:`.costs.ChainCosts.parts`): a
  storage several activations share (a tensor passed through unchanged) counts once
  while any of them lives.  Without shared storages, each live ``a[k]`` counts its
  size.
* ``FN/FC j`` transiently add the parts of ``a[j+1]`` not yet live and
  ``forward_peak_bytes[j]``; ``FA j`` adds ``saved_bytes[j] + forward_peak_bytes[j]``
  and keeps the tape, whose ``saved_bytes`` include ``a[j+1]``'s new parts.
* ``LOSS`` produces ``delta[n]`` (``output_bytes[n-1]``), then frees ``a[n]``
  unless something else holds it.  ``delta[n]`` lives until the end: the autograd
  engine holds the gradient it hands to the executor's ``Function`` until that
  ``Function``'s backward, the whole backward phase, returns.
* ``BW j`` peaks at the live set + ``delta[j]`` + ``backward_peak_bytes[j]``, then
  frees tape ``j``, ``a[j]``'s holds, ``a[j+1]`` (the output it differentiates)
  and ``delta[j+1]`` (but ``delta[n]``); ``delta[j]`` stays.

Validity: ops and stage indices exist; ``FN/FC/FA j`` need ``a[j]`` live and must not
produce an ``a[j+1]`` (or a tape ``j``) that is already live; ``LOSS`` exactly once,
with ``a[n]`` live; every stage backwarded exactly once in the order n-1 .. 0, each
``BW j`` with a live tape ``j`` and ``delta[j+1]``; nothing left live but the input
and ``delta[0]`` at the end; never more live checkpoints than ``slots`` (if given).
A checkpoint is an ``a[j]`` stored by ``FC j`` (``a[0]`` too, once ``FC 0`` runs),
live until ``BW j``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .costs import ChainCosts
from .schedule import BW, FA, FC, LOSS, OPS, Schedule

__all__ = ["InvalidSchedule", "SimResult", "simulate", "validate"]


class InvalidSchedule(ValueError):
    """A schedule breaks the rules; ``index`` is the offending action (or None)."""

    def __init__(self, message: str, index: int | None = None, action=None):
        where = f"action {index} {action!r}: " if index is not None else ""
        super().__init__(where + message)
        self.index = index
        self.action = action


@dataclass(frozen=True)
class SimResult:
    """What a schedule costs: peak bytes (input included), time and counts."""

    peak_bytes: int
    time_s: float
    max_checkpoints: int
    forward_steps: int  # FN + FC
    forward_grad_steps: int  # FA


# per-activation holder bits
_PENDING, _STORED, _TAPE_REF, _IN_TAPE = 1, 2, 4, 8


def simulate(schedule: Schedule, costs: ChainCosts, *, slots: int | None = None) -> SimResult:
    """Validate ``schedule`` against ``costs`` and predict its peak bytes and time.

    Raises :class:`InvalidSchedule` naming the action index and the broken rule.
    """
    st = costs.stages
    n = len(st)
    x = costs.sizes()  # size of a[k] and delta[k]
    part_bytes, parts_of = costs.parts()
    users = [0] * len(part_bytes)  # live activations holding each part
    # what tape j holds beyond a[j+1]'s parts not in a[j] (those are inside saved_bytes)
    tape_own = [
        s.saved_bytes - sum(part_bytes[p] for p in parts_of[j + 1] if p not in parts_of[j])
        for j, s in enumerate(st)
    ]
    live: dict[int, int] = {}  # a[k] -> holder bits; a[0] always live
    tapes: set[int] = set()
    deltas: set[int] = set()
    cur = 0
    time = 0.0
    ckpts = 0
    max_ckpts = 0
    n_fwd = n_fa = 0
    loss_done = False
    next_bw = n - 1

    def fresh(k: int) -> int:
        """Bytes a[k] would add if it became live now."""
        return sum(part_bytes[p] for p in parts_of[k] if not users[p])

    def hold(k: int, bits: int) -> int:
        """Add holder bits to a[k]; return the bytes it adds."""
        h = live.get(k)
        if h is not None:
            live[k] = h | bits
            return 0
        live[k] = bits
        added = 0
        for p in parts_of[k]:
            if not users[p]:
                added += part_bytes[p]
            users[p] += 1
        return added

    def drop(k: int, bits: int) -> int:
        """Remove holder bits from a[k]; return the bytes freed (k >= 1)."""
        h = live.get(k)
        if h is None:
            return 0
        if k == 0:  # the input: held by the caller, never freed
            live[0] = (h & ~bits) or _PENDING
            return 0
        nh = h & ~bits
        if nh:
            live[k] = nh
            return 0
        del live[k]
        freed = 0
        for p in parts_of[k]:
            users[p] -= 1
            if not users[p]:
                freed += part_bytes[p]
        return freed

    cur = hold(0, _PENDING)
    peak = cur

    for i, action in enumerate(schedule):
        try:
            op, j = action
        except (TypeError, ValueError):
            raise InvalidSchedule("not an (op, stage) pair", i, action) from None
        if op not in OPS:
            raise InvalidSchedule(f"unknown op {op!r} (allowed: {', '.join(OPS)})", i, action)
        if op == LOSS:
            if j != n:
                raise InvalidSchedule(f"LOSS must name stage n={n}", i, action)
            if loss_done:
                raise InvalidSchedule("LOSS appears more than once", i, action)
            if n not in live:
                raise InvalidSchedule(f"LOSS needs a[{n}] live", i, action)
            peak = max(peak, cur + x[n])
            time += costs.loss_s
            cur -= drop(n, _PENDING) if n else 0
            cur += x[n]
            deltas.add(n)
            loss_done = True
            continue
        if not (isinstance(j, int) and 0 <= j < n):
            raise InvalidSchedule(f"stage index out of range 0..{n - 1}", i, action)
        s = st[j]
        if op == BW:
            if not loss_done:
                raise InvalidSchedule("BW before LOSS", i, action)
            if j != next_bw:
                what = "twice" if j > next_bw else "out of order"
                msg = f"stage {j} backwarded {what} (expected BW {next_bw})"
                raise InvalidSchedule(msg, i, action)
            if j not in tapes:
                raise InvalidSchedule(
                    f"BW {j} needs a live tape of stage {j} (no FA {j} since)", i, action
                )
            if j + 1 not in deltas:
                raise InvalidSchedule(f"BW {j} needs delta[{j + 1}]", i, action)
            peak = max(peak, cur + x[j] + s.backward_peak_bytes)
            time += s.backward_s
            tapes.discard(j)
            cur -= tape_own[j]
            if live.get(j, 0) & _STORED:
                ckpts -= 1
            cur -= drop(j, _STORED | _TAPE_REF)
            cur -= drop(j + 1, _IN_TAPE | _PENDING)  # backward(a[j+1], delta[j+1])
            if j + 1 < n:  # delta[n] is held by autograd until the backward ends
                deltas.discard(j + 1)
                cur -= x[j + 1]
            deltas.add(j)
            cur += x[j]
            next_bw -= 1
            continue
        # forward ops
        h = live.get(j)
        if h is None:
            raise InvalidSchedule(f"{op} {j} needs a[{j}] live", i, action)
        if j + 1 in live:
            raise InvalidSchedule(
                f"{op} {j} recomputes a[{j + 1}], which is already live", i, action
            )
        if op == FA:
            if j in tapes:
                raise InvalidSchedule(f"FA {j}: tape of stage {j} already live", i, action)
            added = tape_own[j] + fresh(j + 1)
            peak = max(peak, cur + added + s.forward_peak_bytes)
            time += s.forward_grad_s
            n_fa += 1
            tapes.add(j)
            cur += tape_own[j] + hold(j + 1, _PENDING | _IN_TAPE)
            live[j] = (h & ~_PENDING) | _TAPE_REF
            continue
        peak = max(peak, cur + fresh(j + 1) + s.forward_peak_bytes)
        time += s.forward_s
        n_fwd += 1
        cur += hold(j + 1, _PENDING)
        if op == FC:
            if not h & _STORED:
                ckpts += 1
                if slots is not None and ckpts > slots:
                    raise InvalidSchedule(
                        f"FC {j}: {ckpts} live checkpoints exceed the {slots} slots", i, action
                    )
                max_ckpts = max(max_ckpts, ckpts)
            live[j] = (h & ~_PENDING) | _STORED
        else:
            cur -= drop(j, _PENDING)
    if not loss_done:
        raise InvalidSchedule("the schedule has no LOSS")
    if next_bw != -1:
        raise InvalidSchedule(f"stages {next_bw}..0 are never backwarded")
    left = sorted(k for k in live if k > 0)
    if left:
        raise InvalidSchedule(
            f"a[{left[0]}] is still live at the end (computed but never consumed)"
        )
    return SimResult(peak, time, max_ckpts, n_fwd, n_fa)


def validate(schedule: Schedule, costs: ChainCosts, *, slots: int | None = None) -> None:
    """Raise :class:`InvalidSchedule` if the schedule is not valid for ``costs``."""
    simulate(schedule, costs, slots=slots)
