"""Revolve DP: known values, an independent search of the checkpointing game, schedules."""

import heapq
import time
from functools import cache

import pytest

from waggle_trainer.remat.costs import ChainCosts, StageCost
from waggle_trainer.remat.revolve import RevolveTable, forward_steps, revolve_cost, revolve_schedule
from waggle_trainer.remat.simulate import simulate


def recursive_opt(l, c, uf=1.0, ub=1.0):
    """The recurrence, top-down and memoised (written independently of the table)."""

    @cache
    def opt(l, c):
        if l == 0:
            return ub
        if l == 1:
            return uf + 2 * ub
        if c == 1:
            return l * (l + 1) / 2 * uf + (l + 1) * ub
        return min(i * uf + opt(l - i, c - 1) + opt(i - 1, c) for i in range(1, l))

    return opt(l, c)


def game_opt(l, c, uf, ub):
    """Cheapest play of the checkpointing game, by Dijkstra over its states.

    State: current position (None after an adjoint), stored positions (at most c, the
    input's included), next adjoint due.  Moves: advance (uf), store the current
    state, restore a stored one (free), adjoint of the due step when there (ub)."""
    start = (0, frozenset(), l)
    dist = {start: 0.0}
    heap = [(0.0, 0, start)]
    tick = 1
    while heap:
        d, _, (pos, stored, nxt) = heapq.heappop(heap)
        if d > dist[(pos, stored, nxt)]:
            continue
        if nxt == -1:
            return d
        moves = []
        if pos is not None and pos < nxt:
            moves.append((uf, (pos + 1, stored, nxt)))
        if pos is not None and pos not in stored and len(stored) < c:
            moves.append((0.0, (pos, stored | {pos}, nxt)))
        for p in stored:
            moves.append((0.0, (p, stored, nxt)))
        if pos == nxt:
            moves.append((ub, (None, frozenset(p for p in stored if p < nxt), nxt - 1)))
        for w, state in moves:
            nd = d + w
            if nd < dist.get(state, float("inf")):
                dist[state] = nd
                heapq.heappush(heap, (nd, tick, state))
                tick += 1
    raise AssertionError("unreachable")


@pytest.mark.parametrize("l,c,expected", [(10, 2, 35), (20, 3, 70), (50, 5, 176)])
def test_known_values(l, c, expected):
    assert revolve_cost(l, c) == expected
    assert recursive_opt(l, c) == expected


@pytest.mark.parametrize("l", [0, 1, 2, 7, 30])
def test_one_slot_closed_form(l):
    for uf, ub in [(1.0, 1.0), (2.0, 0.5), (3.0, 7.0)]:
        assert RevolveTable(l, 1, uf, ub).cost() == l * (l + 1) / 2 * uf + (l + 1) * ub


def test_table_matches_recursion_everywhere():
    t = RevolveTable(40, 6, 1.5, 2.25)
    for l in range(41):
        for c in range(1, 7):
            assert t.cost(l, c) == recursive_opt(l, c, 1.5, 2.25), (l, c)


@pytest.mark.parametrize("uf,ub", [(1.0, 1.0), (2.0, 1.0), (1.0, 3.0)])
def test_dp_equals_exhaustive_game_search(uf, ub):
    for l in range(0, 8):
        for c in range(1, 4):
            assert RevolveTable(l, c, uf, ub).cost() == game_opt(l, c, uf, ub), (l, c)


def uniform_chain(n, uf, ub):
    """Costs under which the simulator's time is Revolve's cost (FA free, BW = ub)."""
    st = tuple(StageCost(f"s{i}", uf, 0.0, ub, 10, 10) for i in range(n))
    return ChainCosts(10, st, loss_s=ub)


@pytest.mark.parametrize(
    "l,c", [(1, 1), (2, 1), (5, 2), (10, 2), (20, 3), (33, 4), (50, 5), (12, 13)]
)
def test_schedule_valid_and_costs_opt(l, c):
    uf, ub = 1.25, 0.5
    table = RevolveTable(l, c, uf, ub)
    sched = table.schedule()
    steps = forward_steps(sched)
    assert steps * uf + (l + 1) * ub == pytest.approx(table.cost(), abs=1e-9)
    r = simulate(sched, uniform_chain(l, uf, ub), slots=c)  # raises if invalid or > c slots
    assert r.time_s == pytest.approx(table.cost())
    assert r.max_checkpoints <= c
    assert sum(1 for op, _ in sched if op == "LOSS") == 1


def test_zero_length():
    assert revolve_schedule(0, 1) == (("LOSS", 0),)
    assert revolve_cost(0, 3, 2.0, 5.0) == 5.0


def test_subproblem_schedules_and_argmin():
    t = RevolveTable(20, 3)
    assert 1 <= t.argmin(20, 3) <= 19
    assert t.argmin(1, 3) == 0 and t.argmin(20, 1) == 0
    s = t.schedule(10, 2)
    assert forward_steps(s) + 11 == t.cost(10, 2) == 35
    with pytest.raises(ValueError):
        t.cost(21, 3)


@pytest.mark.parametrize(
    "bad",
    [
        dict(length=-1, slots=1),
        dict(length=3, slots=0),
        dict(length=3, slots=1, uf=-1.0),
        dict(length=2.5, slots=1),
    ],
)
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        RevolveTable(**bad)


def test_l200_c20_fast():
    t0 = time.perf_counter()
    t = RevolveTable(200, 20)
    sched = t.schedule()
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    assert forward_steps(sched) + 201 == t.cost()
