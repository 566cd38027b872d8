"""The overhead model: measured by a run, cached beside the profile, planned for by the
next run before its first step; its prediction holds within 10% (or 5 MiB)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from waggle_trainer.remat.overhead import Overhead, load_overhead, overhead_path, save_overhead

MiB = 2**20
ROOT = Path(__file__).resolve().parents[2]


def test_cache_round_trip_merges_and_refuses_what_it_cannot_trust(tmp_path):
    key = {"arch": "resnet18", "input_shape": [1, 3, 64, 64]}
    assert load_overhead(tmp_path, key) is None and load_overhead(None, key) is None
    save_overhead(tmp_path, key, Overhead(3 * MiB, 40 * MiB))
    save_overhead(tmp_path, key, Overhead(5 * MiB, 2 * MiB))
    assert load_overhead(tmp_path, key) == Overhead(5 * MiB, 40 * MiB, steps_measured=2)
    assert load_overhead(tmp_path, {**key, "arch": "resnet50"}) is None
    path = overhead_path(tmp_path, key)
    data = json.loads(path.read_text())
    data["overhead"]["step_bytes"] = -1
    path.write_text(json.dumps(data))
    assert load_overhead(tmp_path, key) is None  # a negative size is not trusted
    path.write_text("{not json")
    assert load_overhead(tmp_path, key) is None


def _cli(cache, *args: str, ok=(0,)) -> dict:
    argv = [
        sys.executable,
        "-m",
        "waggle_trainer",
        *args,
        "--arch",
        "resnet18",
        "--batch",
        "1",
        "--image",
        "160",
        "--classes",
        "10",
        "--json",
        "--cache-dir",
        str(cache),
    ]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode in ok, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_a_second_run_plans_with_the_measured_overhead(tmp_path):
    """Fresh processes, as a node runs them: the first measures, the second plans with it."""
    plan = _cli(tmp_path, "plan", "--budget", "1GiB")
    plain = plan["strategies"]["none"]["predicted_peak_bytes"]
    lowest = plan["min_feasible_bytes"]
    run = (
        "bench",
        "--strategy",
        "optimal",
        "--fused-step",
        "--steps",
        "2",
        "--budget",
        str(plain - MiB),
    )
    # without a measured overhead a step may outgrow the budget a little (exit 1)
    first = _cli(tmp_path, *run, ok=(0, 1))
    assert first["overhead_source"] == "default" and first["allocator_mode"] == "mmap"
    assert first["first_step_residue_bytes"] is not None
    step = max(0, first["peak_rss_growth_bytes"] - first["predicted_peak_bytes"])

    second = _cli(tmp_path, *run, ok=(0, 1))
    assert second["overhead_source"] == "cache"  # known before its first step
    assert second["overhead_step_bytes"] >= step
    assert second["overhead_residue_bytes"] >= first["first_step_residue_bytes"]
    if plain - MiB - second["overhead_step_bytes"] >= lowest:  # planned for the rest
        assert second["plan_budget_bytes"] <= plain - MiB - second["overhead_step_bytes"]
    predicted = second["predicted_growth_bytes"]
    assert predicted == second["predicted_peak_bytes"] + second["overhead_step_bytes"]
    # the bar: within 10% of the prediction, or within the budget + 5 MiB
    growth = second["peak_rss_growth_bytes"]
    assert abs(growth - predicted) <= 0.1 * predicted or growth <= plain - MiB + 5 * MiB, (
        growth,
        predicted,
    )


def test_plan_growth_is_kept_per_plan_and_merged_by_maximum(tmp_path):
    key = {"arch": "resnet18"}
    save_overhead(tmp_path, key, Overhead(3 * MiB, 0, 1, {"a": 10 * MiB}))
    save_overhead(tmp_path, key, Overhead(1 * MiB, 0, 1, {"a": 8 * MiB, "b": 20 * MiB}))
    got = load_overhead(tmp_path, key)
    assert got is not None and got.plan_growth == {"a": 10 * MiB, "b": 20 * MiB}
    assert got.step_bytes == 3 * MiB


def test_the_smallest_plan_runs_where_it_was_measured_to_fit(tmp_path):
    """The largest step overhead seen leaves less than the minimum, but the smallest
    plan's own growth, measured before, fits the budget: it runs; measured over the
    budget (or not measured), the run is refused before its first step."""
    import pytest

    from waggle_trainer.learn.planned_training import PlannedTraining, RunSpec
    from waggle_trainer.remat.overhead import schedule_digest
    from waggle_trainer.remat.planner import InfeasibleBudget, Planner

    spec = RunSpec(arch="resnet18", batch=2, image=32, budget=1 << 30, cache_dir=tmp_path)
    probe = PlannedTraining.build(spec)
    lowest = Planner(probe.chain.costs).min_feasible_budget("optimal")
    at_min = PlannedTraining.build(dataclasses.replace(spec, budget=lowest))
    smallest = at_min.chain.plan
    key = at_min.overhead_key()
    budget = lowest + 2 * MiB
    tight = dataclasses.replace(spec, budget=budget)

    save_overhead(tmp_path, key, Overhead(50 * MiB, 0))  # no plan measured: refused
    with pytest.raises(InfeasibleBudget):
        PlannedTraining.build(tight)

    over = {schedule_digest(smallest.schedule): budget + 1}
    save_overhead(tmp_path, key, Overhead(50 * MiB, 0, 1, over))
    with pytest.raises(InfeasibleBudget):
        PlannedTraining.build(tight)

    # a later measurement of the same plan merged by maximum: rewrite the cache
    overhead_path(tmp_path, key).unlink()
    fits = {schedule_digest(smallest.schedule): smallest.predicted_peak_bytes + MiB}
    save_overhead(tmp_path, key, Overhead(50 * MiB, 0, 1, fits))
    t = PlannedTraining.build(tight)
    assert t.overhead_source == "cache"
    assert t.chain.plan.schedule == smallest.schedule
