"""Revolve (Griewank & Walther): optimal checkpointing of a chain of equal steps.

Pure Python, no torch.  ``l`` forward steps of cost ``u_f`` each, ``c`` checkpoint
slots (the input's slot included) and ``l + 1`` adjoint steps of cost ``u_b`` (the
adjoints of the ``l`` steps plus the terminal step, the loss)::

    Opt[0, c] = u_b
    Opt[1, c] = u_f + 2 u_b
    Opt[l, 1] = l (l + 1) / 2 u_f + (l + 1) u_b
    Opt[l, c] = min_{1 <= i <= l-1} ( i u_f + Opt[l - i, c - 1] + Opt[i - 1, c] )

The schedule is built from the argmin table, in the shared action language
(:mod:`waggle_trainer.remat.schedule`): an *advance* step is ``FC j`` when it starts
from a stored state (which stores ``a[j]`` in a slot until ``BW j``) and ``FN j``
otherwise; the adjoint of step ``j`` is ``FA j, BW j``; the terminal step at
``j = n`` is ``LOSS``.  Hence ``cost == forward_steps * u_f + (l + 1) * u_b``, and the
simulator never sees more than ``c`` live checkpoints.
"""

from __future__ import annotations

import math

from .schedule import BW, FA, FC, FN, LOSS, Action, Schedule

__all__ = ["RevolveTable", "revolve_cost", "revolve_schedule", "forward_steps"]


def _check_args(length: int, slots: int, uf: float, ub: float) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an integer >= 0, got {length!r}")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
    for name, v in (("uf", uf), ("ub", ub)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


class RevolveTable:
    """``Opt[l, c]`` and its argmin for every ``l <= length`` and ``1 <= c <= slots``.

    Building it costs O(length^2 * slots) additions (l=200, c=20: a few hundredths of
    a second); any sub-problem's cost and schedule is then a lookup.
    """

    def __init__(self, length: int, slots: int, uf: float = 1.0, ub: float = 1.0):
        _check_args(length, slots, uf, ub)
        self.length, self.slots, self.uf, self.ub = length, slots, uf, ub
        L = length
        # opt[c][l], arg[c][l]; row 0 unused.  arg is 0 where no choice is made.
        first = [l * (l + 1) / 2 * uf + (l + 1) * ub for l in range(L + 1)]
        if L >= 1:
            first[1] = uf + 2 * ub  # identical value, spelled as the recurrence says
        self._opt: list[list[float]] = [[], first]
        self._arg: list[list[int]] = [[], [0] * (L + 1)]
        # i*uf for i = 1..L-1, shared by every row
        steps = [i * uf for i in range(L + 1)]
        for c in range(2, slots + 1):
            prev = self._opt[c - 1]
            row = [ub] * (L + 1)
            arg = [0] * (L + 1)
            if L >= 1:
                row[1] = uf + 2 * ub
            for l in range(2, L + 1):
                # candidates for i = 1 .. l-1: i*uf + prev[l-i] + row[i-1]
                terms = zip(steps[1:l], prev[l - 1 : 0 : -1], row[0 : l - 1], strict=True)
                cand = [s + p + r for s, p, r in terms]
                best = min(cand)
                row[l] = best
                arg[l] = cand.index(best) + 1
            self._opt.append(row)
            self._arg.append(arg)

    def cost(self, l: int | None = None, c: int | None = None) -> float:
        """Opt[l, c] (defaults: the table's length and slots)."""
        l, c = self._lc(l, c)
        return self._opt[c][l]

    def argmin(self, l: int, c: int) -> int:
        """The first step count ``i`` that attains Opt[l, c] (0 where no choice exists:
        l <= 1 or c == 1)."""
        l, c = self._lc(l, c)
        return self._arg[c][l]

    def _lc(self, l, c) -> tuple[int, int]:
        l = self.length if l is None else l
        c = self.slots if c is None else c
        if not (0 <= l <= self.length and 1 <= c <= self.slots):
            raise ValueError(
                f"(l={l}, c={c}) is outside the table (l <= {self.length}, 1 <= c <= {self.slots})"
            )
        return l, c

    def schedule(self, l: int | None = None, c: int | None = None) -> Schedule:
        """The optimal schedule for a chain of ``l`` stages with ``c`` slots (input's
        slot included); the chain's last action is ``BW 0`` and ``LOSS`` is ``(LOSS, l)``."""
        l, c = self._lc(l, c)
        n = l
        out: list[Action] = []
        # explicit stack: ("rev", s, l, c) or ("act", op, j); processed LIFO
        stack: list[tuple] = [("rev", 0, l, c)]

        def terminal(j: int) -> list[tuple]:
            return [("act", LOSS, n)] if j == n else [("act", FA, j), ("act", BW, j)]

        def advance(s: int, k: int) -> list[tuple]:
            # k advance steps from the stored state a[s]
            return [("act", FC, s)] + [("act", FN, j) for j in range(s + 1, s + k)]

        while stack:
            item = stack.pop()
            if item[0] == "act":
                out.append((item[1], item[2]))
                continue
            _, s, ll, cc = item
            if ll == 0:
                todo = terminal(s)
            elif cc == 1:
                todo = advance(s, ll) + terminal(s + ll)
                for k in range(ll - 1, -1, -1):
                    todo += advance(s, k) if k else []
                    todo += terminal(s + k)
            elif ll == 1:
                todo = advance(s, 1) + terminal(s + 1) + terminal(s)
            else:
                i = self._arg[cc][ll]
                todo = advance(s, i) + [("rev", s + i, ll - i, cc - 1), ("rev", s, i - 1, cc)]
            stack.extend(reversed(todo))
        return tuple(out)


def revolve_cost(length: int, slots: int, uf: float = 1.0, ub: float = 1.0) -> float:
    """Opt[length, slots]."""
    return RevolveTable(length, slots, uf, ub).cost()


def revolve_schedule(length: int, slots: int, uf: float = 1.0, ub: float = 1.0) -> Schedule:
    """The Revolve schedule for ``length`` stages and ``slots`` checkpoint slots."""
    return RevolveTable(length, slots, uf, ub).schedule()


def forward_steps(schedule: Schedule) -> int:
    """Number of advance steps (``FN`` + ``FC``) in a schedule."""
    return sum(1 for op, _ in schedule if op == FN or op == FC)
