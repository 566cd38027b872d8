"""Planner: strategies, infeasible budgets, and optimal <= revolve, sequential everywhere."""

import random
import re
import time

import pytest

from waggle_trainer.remat.costs import ChainCosts, StageCost
from waggle_trainer.remat.planner import (
    STRATEGIES,
    InfeasibleBudget,
    Plan,
    Planner,
    min_feasible_budget,
    plan,
)
from waggle_trainer.remat.simulate import simulate


def random_chain(rng, n):
    st = []
    for i in range(n):
        f = rng.uniform(0.1, 5.0)
        ob = rng.randint(1, 100) * 1000
        st.append(
            StageCost(
                f"s{i}",
                f,
                f * rng.uniform(1.0, 1.5),
                f * rng.uniform(1.0, 3.0),
                ob,
                ob + rng.randint(0, 300) * 1000,
                rng.choice([0, rng.randint(0, 50) * 1000]),
                rng.choice([0, rng.randint(0, 50) * 1000]),
            )
        )
    return ChainCosts(rng.randint(1, 100) * 1000, tuple(st), loss_s=rng.uniform(0, 1))


def resnet_like(blocks=(3, 8, 36, 3), batch=8, image=224):
    """ResNet-152-shaped profile: large early activations, compute-heavy later blocks."""
    st, hw = [], image // 2

    def add(name, elems, saved, flops, fp=0.0, bp=0.0):
        ob, t = elems * 4, flops * 1e-11
        st.append(
            StageCost(name, t, 1.1 * t, 2 * t, ob, int(ob * saved), int(ob * fp), int(ob * bp))
        )

    add("conv1", batch * 64 * hw * hw, 1.0, batch * 118e6)
    add("bn1", batch * 64 * hw * hw, 2.0, batch * 3e6)
    add("relu", batch * 64 * hw * hw, 1.0, batch * 1e6)
    hw //= 2
    add("maxpool", batch * 64 * hw * hw, 1.5, batch * 2e6, 0.0, 4.0)
    for li, (nb, w) in enumerate(zip(blocks, (256, 512, 1024, 2048), strict=True)):
        for bi in range(nb):
            if li and not bi:
                hw //= 2
            add(
                f"layer{li + 1}.{bi}",
                batch * w * hw * hw,
                4.5,
                batch * (230e6 + li * 1e7),
                1.0,
                2.0,
            )
    add("avgpool", batch * 2048, 1.0, batch * 1e5)
    add("flatten", batch * 2048, 1.0, 1e3)
    add("fc", batch * 1000, 1.0, batch * 4e6)
    return ChainCosts(batch * 3 * image * image * 4, tuple(st), loss_s=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_optimal_dominates_on_random_chains(seed):
    rng = random.Random(seed)
    for _ in range(20):
        costs = random_chain(rng, rng.randint(1, 14))
        p = Planner(costs, resolution=rng.choice([8, 32, 200]))
        low = {s: p.min_feasible_budget(s) for s in STRATEGIES}
        assert low["optimal"] == min(low.values())
        budgets = [low[s] for s in STRATEGIES] + [
            rng.randint(low["optimal"], int(low["none"] * 1.1)) for _ in range(5)
        ]
        for b in budgets:
            best = p.plan(b)
            assert best.predicted_peak_bytes <= b
            simulate(best.schedule, costs)
            for s in ("revolve", "sequential", "none"):
                if b >= low[s]:
                    other = p.plan(b, s)
                    assert other.predicted_peak_bytes <= b
                    assert best.predicted_time_s <= other.predicted_time_s


def test_plan_fields_and_ratio():
    costs = random_chain(random.Random(5), 10)
    p = Planner(costs)
    none = p.plan(10**12, "none")
    assert isinstance(none, Plan) and none.strategy == "none"
    assert none.time_ratio == 1.0 and none.predicted_time_s == none.baseline_time_s
    opt = p.plan(10**12)
    assert opt.predicted_time_s == pytest.approx(none.predicted_time_s)
    b = (none.predicted_peak_bytes + p.min_feasible_budget()) // 2
    opt = p.plan(b)
    assert opt.budget_bytes == b and opt.min_feasible_bytes == p.min_feasible_budget("optimal")
    assert (
        opt.time_ratio == pytest.approx(opt.predicted_time_s / none.predicted_time_s)
        and opt.time_ratio >= 1.0
    )
    assert "source" in opt.detail and "unit_bytes" in opt.detail
    rev = p.plan(p.min_feasible_budget("revolve"), "revolve")
    assert 1 <= rev.detail["slots"] <= 11
    simulate(rev.schedule, costs, slots=rev.detail["slots"])
    seq = p.plan(b, "sequential") if b >= p.min_feasible_budget("sequential") else None
    if seq:
        assert 1 <= seq.detail["segments"] <= 10


def test_sequential_picks_fastest_fitting_segment_count():
    costs = random_chain(random.Random(11), 12)
    p = Planner(costs)
    cands = p.sequential_candidates()
    for b in sorted({c.sim.peak_bytes for c in cands}):
        chosen = p.plan(b, "sequential")
        assert chosen.predicted_time_s == min(c.sim.time_s for c in cands if c.sim.peak_bytes <= b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_infeasible_budget_message(strategy):
    costs = random_chain(random.Random(3), 8)
    low = min_feasible_budget(costs, strategy)
    assert plan(costs, low, strategy).predicted_peak_bytes <= low
    with pytest.raises(InfeasibleBudget) as e:
        plan(costs, low - 1, strategy)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    # one byte short: the two sizes are printed with enough digits to differ
    m = re.match(
        rf"strategy {strategy!r}: budget (.+?) is below the minimum feasible "
        rf"(.+?)(?: \({low} bytes\))?$",
        msg,
    )
    assert m and m.group(1) != m.group(2), msg
    assert str(low) in msg
    assert e.value.min_bytes == low
    with pytest.raises(InfeasibleBudget, match=r"budget [\d.]+[KM]iB is below .* \(\d+ bytes\)"):
        plan(costs, low // 2, strategy)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        plan(random_chain(random.Random(1), 3), 10**9, "fastest")


def test_resnet152_like_replanning_is_cheap():
    costs = resnet_like()
    assert len(costs) == 57
    t0 = time.process_time()
    p = Planner(costs)
    none = p.plan(10**13, "none")
    first = p.plan(none.predicted_peak_bytes // 2)
    t1 = time.process_time()
    assert t1 - t0 < 2.0, t1 - t0  # table, Revolve and sequential candidates, once
    for frac in (0.2, 0.35, 0.5, 0.7, 0.9):
        t0 = time.process_time()
        o = p.plan(int(none.predicted_peak_bytes * frac))
        assert time.process_time() - t0 < 0.2
        r = p.plan(int(none.predicted_peak_bytes * frac), "revolve")
        assert o.predicted_time_s <= r.predicted_time_s
    assert first.time_ratio < 1.25
    assert p.min_feasible_budget("optimal") < p.min_feasible_budget("sequential")
