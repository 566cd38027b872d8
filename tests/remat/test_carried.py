"""Storages shared by several activations (skip tensors passed through unchanged):
the cost model, the simulator and the dynamic programs (pure, no torch)."""

import random
import time

import pytest

from waggle_trainer.remat.costs import ChainCosts, StageCost
from waggle_trainer.remat.optimal import OptimalSolver, min_memory_schedule
from waggle_trainer.remat.planner import InfeasibleBudget, Planner
from waggle_trainer.remat.revolve import revolve_schedule
from waggle_trainer.remat.schedule import BW, FA, FC, LOSS
from waggle_trainer.remat.sequential import no_checkpoint_schedule, sequential_schedule
from waggle_trainer.remat.simulate import simulate

from .test_optimal import all_schedules


def skip_chain(carried=True):
    """x -> (h, x) -> (h2, x) -> y: a residual block in three stages.

    a[0] = x (1000); a[1] = (h 100, x); a[2] = (h2 200, x); a[3] = y (300).
    Tapes: 150 (h + 50 inside), 260 (h2 + 60), 400 (y + 100).  Without ``carried``:
    what a profile that takes x for a new tensor each time measures (x in the tapes).
    """
    x = 0 if carried else 1000
    st = (
        StageCost("conv1", 1.0, 1.0, 1.0, 1100, 150 + x),
        StageCost("conv2", 1.0, 1.0, 1.0, 1200, 260 + x),
        StageCost("conv3", 1.0, 1.0, 1.0, 300, 400),
    )
    return ChainCosts(1000, st, 0.0, carried=((0, 2, 1000),) if carried else ())


def test_sizes_parts_and_kept_bytes():
    c = skip_chain()
    assert c.sizes() == [1000, 1100, 1200, 300]
    assert c.shared_bytes() == {(0, 1): 1000, (0, 2): 1000, (1, 2): 1000}
    assert c.kept_bytes(0, 2) == 200 and c.kept_bytes(1, 2) == 200 and c.kept_bytes(2, 3) == 300
    part_bytes, parts_of = c.parts()
    assert part_bytes == [0, 100, 200, 300, 1000]  # x is part 4, in a[0] .. a[2]
    assert parts_of == [[0, 4], [1, 4], [2, 4], [3]]
    same = ChainCosts.from_dict(c.to_dict())
    assert same == c and same.carried == ((0, 2, 1000),)
    fused = c.with_step_bytes([1, 2, 3])
    assert fused.carried == c.carried and fused.stages[2].backward_peak_bytes == 3
    assert "carried" not in skip_chain(carried=False).to_dict()  # the old cache format


@pytest.mark.parametrize(
    "carried, match",
    [
        (((0, 0, 10),), "first < last"),
        (((2, 4, 10),), "first < last"),
        (((1, 2, -1),), "bytes >= 0"),
        (((0, 2, 1001),), r"a\[0\] \(1001 bytes\) exceed its size \(1000"),
        (((1, 2, 600), (0, 2, 600)), r"a\[1\] \(1200 bytes\) exceed its size \(1100"),
    ],
)
def test_carried_storages_are_checked(carried, match):
    with pytest.raises(ValueError, match=match):
        ChainCosts(1000, skip_chain().stages, carried=carried)


def test_simulator_counts_a_shared_storage_once():
    sched = no_checkpoint_schedule(3)
    # FA0 1000+150; FA1 +260 = 1410; FA2 +400 = 1810; LOSS +300 = 2110;
    # BW2: 2110 + delta[2] 1200 = 3310; then -400 tape +1200 -> 2910 (delta[3] stays);
    # BW1: 2910 + delta[1] 1100 = 4010; -260 -1200 +1100 -> 2550; BW0: + 1000 = 3550.
    assert simulate(sched, skip_chain()).peak_bytes == 4010
    # keep a[1] and a[2] as checkpoints, recompute each stage before its backward
    sched = (
        (FC, 0), (FC, 1), (FA, 2), (LOSS, 3), (BW, 2),
        (FA, 1), (BW, 1), (FA, 0), (BW, 0),
    )  # fmt: skip
    # FC0: x + h = 1100; FC1: + h2 = 1300; FA2: + 400 = 1700; LOSS 2000 (-300 + 300);
    # BW2: 2000 + 1200 = 3200; frees tape 400, a[2] 200, + delta[2] -> 2600 (delta[3] stays);
    # FA1: + 260 = 2860 (h2 again, x still held by a[0] and a[1]); BW1: + 1100 = 3960
    r = simulate(sched, skip_chain())
    assert r.peak_bytes == 3960 and r.max_checkpoints == 2
    # counted as separate tensors, x is paid once per activation holding it:
    # FC0 2100, FC1 3300, FA2 3700, LOSS 4000, BW2 5200 -> 3600, FA1 4860, BW1 5960
    apart = simulate(sched, skip_chain(carried=False))
    assert apart.peak_bytes == 3960 + 2000
    # FA0..2 3810, LOSS 4110, BW2 5310 -> 4910, BW1 6010
    assert simulate(no_checkpoint_schedule(3), skip_chain(carried=False)).peak_bytes == 6010


def random_carried_chain(rng, n, scale=1):
    """A random chain with random skip tensors (intervals of shared storage)."""
    out = [rng.randint(2, 9) * scale for _ in range(n + 1)]  # sizes a[0] .. a[n]
    covered = [0] * (n + 1)
    carried = []
    for _ in range(rng.randint(1, 3)):
        first = rng.randint(0, n - 1)
        last = rng.randint(first + 1, min(n, first + 4))
        room = min(out[k] - covered[k] for k in range(first, last + 1))
        if room <= 0:
            continue
        b = rng.randint(1, room)
        carried.append((first, last, b))
        for k in range(first, last + 1):
            covered[k] += b
    st = []
    for i in range(n):
        f = rng.randint(1, 9) / 8
        new = out[i + 1] - sum(b for a, z, b in carried if a <= i < i + 1 <= z)
        st.append(
            StageCost(
                f"s{i}",
                f,
                f + rng.randint(0, 4) / 8,
                rng.randint(1, 16) / 8,
                out[i + 1],
                new + rng.randint(0, 8) * scale,
                rng.randint(0, 3) * scale,
                rng.randint(0, 3) * scale,
            )
        )
    return ChainCosts(out[0], tuple(st), rng.randint(0, 4) / 8, carried=tuple(carried))


def reference_peak(schedule, costs):
    """An independent storage-level account: every live thing is a set of named
    storages, the peak is the largest sum over their union plus the deltas."""
    n = len(costs)
    sizes = costs.sizes()
    owner = {}  # storage -> bytes
    acts = {}  # k -> set of storages
    for k in range(n + 1):
        mine = {("own", k)}
        owner[("own", k)] = sizes[k] - sum(b for f, l, b in costs.carried if f <= k <= l)
        for i, (f, l, b) in enumerate(costs.carried):
            if f <= k <= l:
                mine.add(("carried", i))
                owner[("carried", i)] = b
        acts[k] = mine
    holders = {0: {"input"}}
    tapes = {}  # j -> set of storages it holds
    deltas = 0
    peak = 0

    def live_bytes(extra=frozenset()):
        names = set(extra)
        for k in holders:
            names |= acts[k]
        for held in tapes.values():
            names |= held
        return sum(owner[s] for s in names)

    def drop(k, who):
        holders.get(k, set()).discard(who)
        if k and not holders.get(k):
            holders.pop(k, None)

    for op, j in schedule:
        if op == LOSS:
            peak = max(peak, live_bytes() + deltas + sizes[n])
            drop(n, "pending")
            deltas += sizes[n]
        elif op == BW:
            peak = max(peak, live_bytes() + deltas + sizes[j] + costs.stages[j].backward_peak_bytes)
            del tapes[j]
            for who in ("stored", "tape"):
                drop(j, who)
            drop(j + 1, "pending")
            deltas += sizes[j] - (sizes[j + 1] if j + 1 < n else 0)  # autograd holds delta[n]
        else:
            s = costs.stages[j]
            if op == FA:
                new = acts[j + 1] - acts[j]
                inside = ("tape", j)
                owner[inside] = s.saved_bytes - sum(owner[x] for x in new)
                tapes[j] = {inside} | acts[j] | acts[j + 1]
                peak = max(peak, live_bytes() + deltas + s.forward_peak_bytes)
                holders[j].add("tape")
            else:
                peak = max(peak, live_bytes(acts[j + 1]) + deltas + s.forward_peak_bytes)
                if op == FC:
                    holders[j].add("stored")
            holders.setdefault(j + 1, set()).add("pending")
            drop(j, "pending")
    return peak


@pytest.mark.parametrize("seed", range(10))
def test_simulator_agrees_with_a_storage_level_account(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    costs = random_carried_chain(rng, n, scale=1000)
    schedules = [no_checkpoint_schedule(n)]
    schedules += [sequential_schedule(n, k) for k in range(1, n + 1)]
    schedules += [revolve_schedule(n, c) for c in range(1, n + 2)]
    schedules += rng.sample(all_schedules(n), min(30, len(all_schedules(n))))
    for sched in schedules:
        assert simulate(sched, costs).peak_bytes == reference_peak(sched, costs), sched


@pytest.mark.parametrize("seed", range(12))
def test_exact_dp_with_shared_storages_matches_enumeration(seed):
    """The DP charges a kept a[s'] only what it adds to a[s]: with one-byte units it
    finds the fastest schedule of its space at every budget, down to the exact least
    peak, as the simulator (storage by storage) measures them."""
    rng = random.Random(1000 + seed)
    n = rng.randint(2, 5)
    costs = random_carried_chain(rng, n)
    sims = [(simulate(s, costs), s) for s in all_schedules(n)]
    peaks = sorted({r.peak_bytes for r, _ in sims})
    plain = simulate(no_checkpoint_schedule(n), costs).peak_bytes
    solver = OptimalSolver(costs, resolution=plain - costs.input_bytes)
    assert solver.unit_bytes == 1
    sched, lowest = min_memory_schedule(costs)
    assert lowest == peaks[0] == solver.min_budget_bytes == simulate(sched, costs).peak_bytes
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
def test_discretised_dp_with_shared_storages_is_safe(seed):
    rng = random.Random(2000 + seed)
    n = rng.randint(6, 20)
    costs = random_carried_chain(rng, n, scale=rng.randint(1, 10_000))
    solver = OptimalSolver(costs, resolution=rng.choice([16, 64, 256]))
    for m in range(solver.min_units, solver.max_units + 1):
        r = simulate(solver.schedule_units(m), costs)
        assert r.peak_bytes <= costs.input_bytes + m * solver.unit_bytes
        assert abs(r.time_s * 1e9 - solver.cost_ns(m)) <= 4 * n * n
    planner = Planner(costs)
    low = planner.min_feasible_budget()
    for budget in (low, (low + plain_peak(costs)) // 2):
        p = planner.plan(budget)
        assert p.predicted_peak_bytes == simulate(p.schedule, costs).peak_bytes <= budget
    with pytest.raises(InfeasibleBudget, match=f"minimum feasible .*{low} bytes"):
        planner.plan(low - 1)


def plain_peak(costs):
    return simulate(no_checkpoint_schedule(len(costs)), costs).peak_bytes


def conv_split_resnet(blocks=(3, 4, 6, 3), batch=8, image=224, carried=True, stem=True):
    """ResNet-50-shaped profile split at the convolutions of each bottleneck: the block
    input x rides beside the inner tensors (a quarter of its channels) as a skip.
    Without ``carried``: what a profile that takes x for a new tensor each time
    measures (x in the tapes too).  Without the stem, the chain starts at layer1."""
    st, skips, hw = [], [], image // 2

    def add(name, elems, saved_elems, flops, skip=0):
        ob, t = (elems + skip) * 4, flops * 1e-11
        saved = (saved_elems + (0 if carried else skip)) * 4
        st.append(StageCost(name, t, 1.1 * t, 2 * t, ob, saved, saved // 4, saved // 2))

    for name, ch, f in (("conv1", 64, 118e6), ("bn1", 64, 3e6), ("relu", 64, 1e6)):
        add(name, batch * ch * hw * hw, batch * ch * hw * hw * 2, batch * f)
    hw //= 2
    add("maxpool", batch * 64 * hw * hw, batch * 64 * hw * hw * 2, batch * 2e6)
    input_bytes = batch * 3 * image * image * 4
    if not stem:
        st.clear()
        input_bytes = batch * 64 * hw * hw * 4
    ch_in = 64
    for li, (nb, w) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
        for bi in range(nb):
            stride_hw = hw // 2 if li and not bi else hw
            x = batch * ch_in * hw * hw
            inner = batch * w * stride_hw * stride_hw
            j = len(st)
            add(f"l{li}.{bi}.conv1", batch * w * hw * hw, 3 * batch * w * hw * hw, 5e7, x)
            add(f"l{li}.{bi}.conv2", inner, 3 * inner, 1e8, x)
            hw = stride_hw
            add(f"l{li}.{bi}.conv3", 4 * inner, 12 * inner, 5e7)
            skips.append((j, j + 2, x * 4))
            ch_in = 4 * w
    add("avgpool", batch * 2048, batch * 2048, batch * 1e5)
    add("flatten", batch * 2048, batch * 2048, 1e3)
    add("fc", batch * 1000, batch * 1000, batch * 4e6)
    return ChainCosts(input_bytes, tuple(st), 1e-4, carried=tuple(skips) if carried else ())


def test_resnet50_like_conv_split_plans_fast():
    costs = conv_split_resnet()
    assert len(costs) == 55
    t0 = time.process_time()  # CPU time: the machine is shared
    planner = Planner(costs)
    low = planner.min_feasible_budget()
    half = planner.plan((low + plain_peak(costs)) // 2)
    assert time.process_time() - t0 < 3.0, time.process_time() - t0
    assert half.detail["source"] == "dp"
    t0 = time.process_time()
    planner.plan((low + 3 * plain_peak(costs)) // 4)
    assert time.process_time() - t0 < 0.2


def test_a_skip_is_paid_once_however_many_checkpoints_hold_it():
    """Every schedule costs at most what it costs with the skip counted per holder,
    so at every budget the plan is at least as fast, here strictly faster."""
    shared, apart = conv_split_resnet(), conv_split_resnet(carried=False)
    assert plain_peak(apart) > 1.3 * plain_peak(shared)
    mine, theirs = Planner(shared), Planner(apart)
    low = mine.min_feasible_budget()
    assert theirs.min_feasible_budget() >= low
    for factor in (1.0, 1.5, 2.0):
        budget = int(low * factor)
        assert mine.plan(budget).predicted_time_s < theirs.plan(budget).predicted_time_s
