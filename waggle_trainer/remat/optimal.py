"""Optimal checkpointing of heterogeneous chains (pure Python, no torch).

The dynamic program of Beaumont, Eyraud-Dubois, Herrmann, Joly and Shilova (2019),
"Optimal checkpointing for heterogeneous chains", written for this project's memory
model (see :mod:`waggle_trainer.remat.simulate`).  Positions ``0 .. n``: stage ``n``
is the loss.  The sub-problem ``(s, t)`` starts with ``a[s]`` held by the caller and
``delta[t+1]`` live (nothing for ``t = n``) and ends with ``delta[s]``; ``m`` is the
memory it may use on top of what the caller holds, ``delta[t+1]`` included, and
``delta[n]`` too for ``t < n`` (it lives until the whole backward ends, see
:mod:`.simulate`).  Two options:

1. ``FC s, FN s+1 .. s'-1`` (no autograd), keep ``a[s']``, solve ``(s', t)`` with
   ``m - |a[s']|``, then ``(s, s'-1)`` with ``m`` (``s < s' <= t``);
2. ``FA s`` (keep the whole tape), solve ``(s+1, t)`` with ``m - |tape s|``, ``BW s``.

Leaves: ``(s, s)`` is ``FA s, BW s``; ``(n, n)`` is ``LOSS``.  Every op's transient
peak (``forward_peak_bytes``, ``backward_peak_bytes``) is a feasibility condition.

**Shared storages.**  The recurrence assumes that what a kept checkpoint costs is
independent of the rest, which is false when activations share storages (a skip
tensor carried beside the main one, :mod:`.costs`): ``a[s]`` and ``a[s']`` holding
the same skip tensor cost it once.  Charging every ``a[s']`` its full size would be
safe but would count a carried skip once per checkpoint that holds it.  Instead,
``|a[s']|`` above is ``kept(s, s')``: what ``a[s']`` adds to ``a[s]``, which the
caller of ``(s, t)`` holds throughout.  Since shared storages span intervals of
activations, whatever a checkpoint shares with anything else the caller holds it
shares with ``a[s]``, so this is exact for every schedule of the recurrence (and the
recomputation steps of option 1 are charged likewise: ``FN k`` adds
``kept(s, k) + kept(k, k+1)``).  Tapes already exclude their input, and deltas are
new tensors of full size.

Memory is discretised in units of ``unit_bytes``.  Feasibility thresholds are the
ceiling of the exact byte sums; the amounts reserved for a child (``|a[s']|`` and
``|tape s|``) are rounded *up*.  So a schedule the DP finds at ``m`` units is never
above ``input_bytes + m * unit_bytes`` in the simulator.  Times are integer
nanoseconds, so the DP's arithmetic is exact and the argmin is recovered from the
table without storing it.  The table is built once for every ``m`` up to the point
where no checkpointing fits, with vectors over ``m`` (list slicing and ``map``) and
only over each sub-problem's useful range ``[lowest feasible m, m where plain
F-all fits]``; a new budget is then a lookup and a reconstruction.

:func:`min_memory_schedule` solves the same recurrences exactly in bytes for the
smallest peak (ties broken by time), which gives the exact minimum feasible budget.
"""

from __future__ import annotations

from operator import add
from typing import Any

from .costs import ChainCosts
from .schedule import BW, FA, FC, FN, LOSS, Action, Schedule

__all__ = ["OptimalSolver", "min_memory_schedule", "DEFAULT_RESOLUTION"]

INF = 1 << 62
DEFAULT_RESOLUTION = 200
"""Memory units between zero and the activation memory of plain training."""


def _ns(t: float) -> int:
    return int(round(t * 1e9))


def _ceil(v: int, u: int) -> int:
    return -(-v // u)


class _Chain:
    """Per-position sizes and integer times; position n is the loss."""

    def __init__(self, costs: ChainCosts):
        st = costs.stages
        self.n = len(st)
        self.x = costs.sizes() + [0]  # x[n+1] = 0
        self.shared = costs.shared_bytes()
        n = self.n
        # gradients live during (s, t): delta[t+1], and delta[n] after the LOSS
        self.d = [self.x[t + 1] + (self.x[n] if t + 1 < n else 0) for t in range(n + 1)]
        self.T = [s.saved_bytes for s in st]
        self.fp = [s.forward_peak_bytes for s in st]
        self.bp = [s.backward_peak_bytes for s in st]
        self.f = [_ns(s.forward_s) for s in st]
        self.fa = [_ns(s.forward_grad_s) for s in st]
        self.b = [_ns(s.backward_s) for s in st]
        self.loss = _ns(costs.loss_s)
        P = [0]
        for v in self.f:
            P.append(P[-1] + v)
        self.P = P

    # exact byte requirements (memory on top of what the caller of (s, t) holds)
    def req_fa(self, s: int, t: int) -> int:
        return self.d[t] + self.T[s] + self.fp[s]

    def req_bw(self, s: int) -> int:
        return self.T[s] + self.d[s] + self.x[s] + self.bp[s]

    def kept(self, s: int, k: int) -> int:
        """What a[k] adds to a live a[s] (s < k)."""
        return self.x[k] - self.shared.get((s, k), 0)

    def kept_rows(self) -> list[list[int] | None]:
        """``rows[s][k] = kept(s, k)`` for ``k > s`` (``x[k]`` elsewhere); None for
        an ``a[s]`` that shares nothing with a later activation (the row is ``x``)."""
        rows: list[list[int] | None] = [None] * (self.n + 1)
        for (s, k), nbytes in self.shared.items():
            row = rows[s]
            if row is None:
                row = rows[s] = self.x[: self.n + 1]
            row[k] -= nbytes
        return rows

    def req_fwd_step(self, s: int, k: int, t: int) -> int:
        """Transient of ``FN/FC k`` inside option 1 of ``(s, t)``; a[s] is the caller's."""
        held = self.kept(s, k) if k > s else 0
        return self.d[t] + held + self.kept(k, k + 1) + self.fp[k]


def _emit_option1(out: list, s: int, sp: int) -> None:
    out.append((FC, s))
    out.extend((FN, k) for k in range(s + 1, sp))


class OptimalSolver:
    """The DP table for one chain, for every budget up to plain training's.

    ``schedule(budget_bytes)`` returns the optimal schedule found by the discretised
    DP at that budget, or ``None`` if the DP finds none (see :attr:`min_budget_bytes`;
    the exact minimum is :func:`min_memory_schedule`'s).  Building the table is the
    expensive part; a ``ChainCosts`` of 58 stages takes a fraction of a second.
    """

    def __init__(self, costs: ChainCosts, *, resolution: int = DEFAULT_RESOLUTION):
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.costs = costs
        c = self.chain = _Chain(costs)
        n = c.n
        # plain training's need above the input, exactly: FA all then LOSS then BW all
        allfa = [0] * (n + 1)
        allfa[n] = c.x[n]
        for s in range(n - 1, -1, -1):
            allfa[s] = max(c.req_fa(s, n), c.T[s] + allfa[s + 1], c.req_bw(s))
        self.unit_bytes = u = max(1, _ceil(allfa[0], resolution))
        self._build(u)

    # ------------------------------------------------------------------ table
    def _build(self, u: int) -> None:
        c = self.chain
        n, x, T, P = c.n, c.x, c.T, c.P
        X = [_ceil(v, u) for v in x]
        # K[s][sp]: units reserved for a[sp] kept on top of a[s]
        K = [X if row is None else [_ceil(v, u) for v in row] for row in c.kept_rows()]
        TT = [_ceil(v, u) for v in T]
        lo: list[list[Any]] = [[None] * (n + 1) for _ in range(n + 1)]
        # C(s, t, m) + P[s] for m in lo..
        V: list[list[Any]] = [[None] * (n + 1) for _ in range(n + 1)]
        hifa = [[0] * (n + 1) for _ in range(n + 1)]
        lo2 = [[INF] * (n + 1) for _ in range(n + 1)]
        lo1: list[list[list[int] | None]] = [[None] * (n + 1) for _ in range(n + 1)]

        def window(s: int, t: int, a: int, b: int) -> list[int]:
            L = lo[s][t]
            if L is None or b < L:
                return [INF] * (b - a + 1)
            vals = V[s][t]
            h = L + len(vals) - 1
            head = [INF] * (L - a) if a < L else []
            a = max(a, L)
            if a > h:
                return head + [vals[-1]] * (b - a + 1)
            mid = vals[a - L : min(b, h) - L + 1]
            if b > h:
                mid += [vals[-1]] * (b - h)
            return head + mid if head else mid

        # leaves
        lo[n][n] = _ceil(x[n], u)
        V[n][n] = [c.loss + P[n]]
        hifa[n][n] = lo[n][n]
        for s in range(n):
            need = max(_ceil(c.req_fa(s, s), u), _ceil(c.req_bw(s), u))
            lo[s][s] = lo2[s][s] = need
            V[s][s] = [c.fa[s] + c.b[s] + P[s]]
            hifa[s][s] = need
        top = None
        for length in range(1, n + 1):
            for s in range(0, n - length + 1):
                t = s + length
                cfa = _ceil(c.req_fa(s, t), u)
                cbw = _ceil(c.req_bw(s), u)
                hf = max(cfa, cbw, TT[s] + hifa[s + 1][t])
                hifa[s][t] = hf
                if s == 0 and t == n:
                    top = hf
                hi = hf
                child = lo[s + 1][t]
                l2 = INF if child is None else max(cfa, cbw, TT[s] + child)
                lo2[s][t] = l2
                l1s = []
                Ks = K[s]
                fr = _ceil(c.req_fwd_step(s, s, t), u)
                for sp in range(s + 1, t + 1):
                    if sp > s + 1:
                        fr = max(fr, _ceil(c.req_fwd_step(s, sp - 1, t), u))
                    r, left = lo[sp][t], lo[s][sp - 1]
                    l1s.append(INF if r is None or left is None else max(fr, Ks[sp] + r, left))
                lo1[s][t] = l1s
                L = min(l2, min(l1s))
                if L > hi:  # cannot happen unless a child is infeasible
                    continue
                # every candidate as a full-width vector of C + 2 P[s]; one n-ary
                # min per element is much cheaper than a chain of binary mins
                cands = []
                if l2 <= hi:
                    c2 = c.fa[s] + c.b[s] + 2 * P[s] - P[s + 1]
                    part = window(s + 1, t, l2 - TT[s], hi - TT[s])
                    cands.append([INF] * (l2 - L) + list(map(c2.__add__, part)))
                for i, l1 in enumerate(l1s):
                    if l1 > hi:
                        continue
                    sp = s + 1 + i
                    right = window(sp, t, l1 - Ks[sp], hi - Ks[sp])
                    v = list(map(add, right, window(s, sp - 1, l1, hi)))
                    cands.append([INF] * (l1 - L) + v if l1 > L else v)
                lo[s][t] = L
                best = list(map(min, *cands)) if len(cands) > 1 else cands[0]
                V[s][t] = list(map((-P[s]).__add__, best))
        if n == 0:
            top = lo[0][0]
        self._K, self._TT = K, TT
        self._lo, self._V, self._lo1, self._lo2 = lo, V, lo1, lo2
        self.max_units = top
        """Units from which plain training fits in the DP (the table's upper end)."""

    # ------------------------------------------------------------------ queries
    def _get(self, s: int, t: int, m: int) -> int:
        L = self._lo[s][t]
        if L is None or m < L:
            return INF
        vals = self._V[s][t]
        return vals[min(m - L, len(vals) - 1)]

    @property
    def min_units(self) -> int | None:
        return self._lo[0][self.chain.n]

    @property
    def min_budget_bytes(self) -> int | None:
        """Smallest budget (input included) at which the discretised DP finds a schedule."""
        m = self.min_units
        return None if m is None else self.costs.input_bytes + m * self.unit_bytes

    def units_for(self, budget_bytes: int) -> int:
        """Memory units available to the DP at ``budget_bytes`` (clipped to the table)."""
        m = (int(budget_bytes) - self.costs.input_bytes) // self.unit_bytes
        return min(m, self.max_units) if self.max_units is not None else m

    def cost_ns(self, m: int) -> int | None:
        """The DP's time in nanoseconds with ``m`` units, or None if infeasible."""
        if self.max_units is None:  # no schedule fits any budget
            return None
        v = self._get(0, self.chain.n, min(m, self.max_units))
        return None if v >= INF else v

    def schedule(self, budget_bytes: int) -> Schedule | None:
        """The DP's schedule at ``budget_bytes`` or None."""
        return self.schedule_units(self.units_for(budget_bytes))

    def schedule_units(self, m: int) -> Schedule | None:
        c = self.chain
        n, P = c.n, c.P
        if self.max_units is not None:
            m = min(m, self.max_units)
        if self._get(0, n, m) >= INF:
            return None
        K, TT, get = self._K, self._TT, self._get
        out: list[Action] = []
        stack: list[tuple] = [(0, n, m)]
        while stack:
            item = stack.pop()
            if len(item) == 2:
                out.append(item)
                continue
            s, t, m = item
            if s == t:
                out.extend([(LOSS, n)] if s == n else [(FA, s), (BW, s)])
                continue
            target = get(s, t, m)
            if m >= self._lo2[s][t]:
                c2 = c.fa[s] + c.b[s] + P[s] - P[s + 1]
                if get(s + 1, t, m - TT[s]) + c2 == target:
                    out.append((FA, s))
                    stack.append((BW, s))
                    stack.append((s + 1, t, m - TT[s]))
                    continue
            for i, l1 in enumerate(self._lo1[s][t]):
                sp = s + 1 + i
                if m >= l1 and get(sp, t, m - K[s][sp]) + get(s, sp - 1, m) - P[s] == target:
                    _emit_option1(out, s, sp)
                    stack.append((s, sp - 1, m))
                    stack.append((sp, t, m - K[s][sp]))
                    break
            else:  # pragma: no cover - the table and the reconstruction disagree
                raise AssertionError(f"no option reproduces C({s},{t},{m})")
        return tuple(out)

    def breakpoints(self, lo_units: int, hi_units: int) -> list[int]:
        """Units in ``(lo_units, hi_units]`` where the DP's time drops (ascending)."""
        n = self.chain.n
        if self.max_units is None:
            return []
        hi_units = min(hi_units, self.max_units)
        res = []
        prev = self._get(0, n, lo_units)
        for m in range(lo_units + 1, hi_units + 1):
            v = self._get(0, n, m)
            if v < prev:
                res.append(m)
                prev = v
        return res


def min_memory_schedule(costs: ChainCosts) -> tuple[Schedule, int]:
    """The schedule with the smallest peak (exact, in bytes; ties by time) and that
    peak, ``input_bytes`` included."""
    c = _Chain(costs)
    n, x, T, P = c.n, c.x, c.T, c.P
    mem = [[0] * (n + 1) for _ in range(n + 1)]
    tim = [[0] * (n + 1) for _ in range(n + 1)]
    ch = [[0] * (n + 1) for _ in range(n + 1)]  # 0: option 2 / leaf, sp: option 1
    mem[n][n], tim[n][n] = x[n], c.loss
    for s in range(n):
        mem[s][s] = max(c.req_fa(s, s), c.req_bw(s))
        tim[s][s] = c.fa[s] + c.b[s]
    for length in range(1, n + 1):
        for s in range(0, n - length + 1):
            t = s + length
            best = (
                max(c.req_fa(s, t), T[s] + mem[s + 1][t], c.req_bw(s)),
                c.fa[s] + c.b[s] + tim[s + 1][t],
            )
            choice = 0
            fr = c.req_fwd_step(s, s, t)
            for sp in range(s + 1, t + 1):
                if sp > s + 1:
                    fr = max(fr, c.req_fwd_step(s, sp - 1, t))
                cand = (
                    max(fr, c.kept(s, sp) + mem[sp][t], mem[s][sp - 1]),
                    P[sp] - P[s] + tim[sp][t] + tim[s][sp - 1],
                )
                if cand < best:
                    best, choice = cand, sp
            mem[s][t], tim[s][t] = best
            ch[s][t] = choice
    out: list[Action] = []
    stack: list[tuple] = [(0, n)]
    while stack:
        item = stack.pop()
        if isinstance(item[0], str):
            out.append(item)
            continue
        s, t = item
        if s == t:
            out.extend([(LOSS, n)] if s == n else [(FA, s), (BW, s)])
        elif ch[s][t] == 0:
            out.append((FA, s))
            stack.append((BW, s))
            stack.append((s + 1, t))
        else:
            sp = ch[s][t]
            _emit_option1(out, s, sp)
            stack.append((s, sp - 1))
            stack.append((sp, t))
    return tuple(out), costs.input_bytes + mem[0][n]
