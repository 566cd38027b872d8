"""Heterogeneous-chain DP against exhaustive enumeration of its schedule space."""

import random
import time

import pytest

from waggle_trainer.remat.costs import ChainCosts, StageCost
from waggle_trainer.remat.optimal import OptimalSolver, min_memory_schedule
from waggle_trainer.remat.revolve import revolve_schedule
from waggle_trainer.remat.sequential import no_checkpoint_schedule, sequential_schedule
from waggle_trainer.remat.simulate import simulate


def small_chain(rng, n, scale=1):
    st = []
    for i in range(n):
        f = rng.randint(1, 9) / 8
        ob = rng.randint(1, 6) * scale
        st.append(
            StageCost(
                f"s{i}",
                f,
                f + rng.randint(0, 4) / 8,
                rng.randint(1, 16) / 8,
                ob,
                ob + rng.randint(0, 8) * scale,
                rng.randint(0, 3) * scale,
                rng.randint(0, 3) * scale,
            )
        )
    return ChainCosts(rng.randint(1, 6) * scale, tuple(st), loss_s=rng.randint(0, 4) / 8)


def all_schedules(n):
    """Every schedule of the two-option recursion (independent of the DP's code)."""
    memo = {}

    def trees(s, t):
        if (s, t) in memo:
            return memo[(s, t)]
        if s == t:
            res = [[("LOSS", n)]] if s == n else [[("FA", s), ("BW", s)]]
        else:
            res = [[("FA", s)] + sub + [("BW", s)] for sub in trees(s + 1, t)]
            for sp in range(s + 1, t + 1):
                prefix = [("FC", s)] + [("FN", k) for k in range(s + 1, sp)]
                res += [prefix + r + l for r in trees(sp, t) for l in trees(s, sp - 1)]
        memo[(s, t)] = res
        return res

    return [tuple(x) for x in trees(0, n)]


@pytest.mark.parametrize("seed", range(12))
def test_exact_dp_matches_enumeration(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    costs = small_chain(rng, n)
    sims = [(simulate(s, costs), s) for s in all_schedules(n)]
    peaks = sorted({r.peak_bytes for r, _ in sims})
    plain = simulate(no_checkpoint_schedule(n), costs).peak_bytes
    # a resolution that makes the memory unit one byte: the DP is exact
    solver = OptimalSolver(costs, resolution=plain - costs.input_bytes)
    assert solver.unit_bytes == 1
    _, lowest = min_memory_schedule(costs)
    assert lowest == peaks[0] == solver.min_budget_bytes
    for budget in range(peaks[0] - 2, peaks[-1] + 2):
        fitting = [r.time_s for r, _ in sims if r.peak_bytes <= budget]
        sched = solver.schedule(budget)
        if not fitting:
            assert sched is None
            continue
        r = simulate(sched, costs)
        assert r.peak_bytes <= budget
        assert r.time_s == pytest.approx(min(fitting)), budget


@pytest.mark.parametrize("seed", range(6))
def test_min_memory_schedule_is_exact(seed):
    rng = random.Random(100 + seed)
    costs = small_chain(rng, rng.randint(1, 4), scale=1000)
    sched, peak = min_memory_schedule(costs)
    assert simulate(sched, costs).peak_bytes == peak
    assert peak == min(simulate(s, costs).peak_bytes for s in all_schedules(len(costs)))


@pytest.mark.parametrize("seed", range(8))
def test_discretised_dp_is_safe_and_consistent(seed):
    rng = random.Random(200 + seed)
    n = rng.randint(5, 25)
    costs = small_chain(rng, n, scale=rng.randint(1, 10_000))
    solver = OptimalSolver(costs, resolution=rng.choice([16, 64, 256]))
    for m in range(solver.min_units, solver.max_units + 1):
        sched = solver.schedule_units(m)
        r = simulate(sched, costs)
        # sizes rounded up: never above what the DP was given
        assert r.peak_bytes <= costs.input_bytes + m * solver.unit_bytes
        # integer-nanosecond DP time is the simulator's time
        assert abs(r.time_s * 1e9 - solver.cost_ns(m)) <= len(sched)
    assert solver.schedule_units(solver.min_units - 1) is None
    # with plain training's memory the DP finds plain training's time
    top = simulate(solver.schedule_units(solver.max_units), costs)
    assert top.time_s == pytest.approx(simulate(no_checkpoint_schedule(n), costs).time_s)


@pytest.mark.parametrize("seed", range(6))
def test_exact_dp_beats_revolve_and_sequential(seed):
    rng = random.Random(300 + seed)
    n = rng.randint(3, 12)
    costs = small_chain(rng, n)
    plain = simulate(no_checkpoint_schedule(n), costs).peak_bytes
    solver = OptimalSolver(costs, resolution=plain - costs.input_bytes)
    others = [sequential_schedule(n, k) for k in range(1, n + 1)]
    others += [revolve_schedule(n, c, 1.0, 2.0) for c in range(1, n + 2)]
    for s in others:
        r = simulate(s, costs)
        mine = simulate(solver.schedule(r.peak_bytes), costs)
        assert mine.peak_bytes <= r.peak_bytes
        assert mine.time_s <= r.time_s + 1e-9


def test_long_chain_builds_fast():
    st = []
    for i in range(58):
        ob = int(25e6 / (1 + i // 10))
        st.append(StageCost(f"s{i}", 0.01 + 0.001 * i, 0.012, 0.02, ob, 4 * ob, ob // 2, ob))
    costs = ChainCosts(5_000_000, tuple(st), 1e-4)
    t0 = time.process_time()  # CPU time: the machine is shared
    solver = OptimalSolver(costs)
    build = time.process_time() - t0
    assert build < 1.0, build
    plain = simulate(no_checkpoint_schedule(58), costs)
    t0 = time.process_time()
    sched = solver.schedule(plain.peak_bytes // 2)
    assert time.process_time() - t0 < 0.05
    r = simulate(sched, costs)
    assert r.peak_bytes <= plain.peak_bytes // 2
    assert r.time_s < 1.3 * plain.time_s
