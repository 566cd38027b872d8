"""The overhead model: measured by a run, cached beside the profile, planned for by the
next run before its first step; its prediction holds within 10% (or 5 MiB)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_step_model_interpolates_the_worst_seen_and_levels_off():
    from waggle_trainer.remat.overhead import StepModel

    model = StepModel.fit(
        [(40 * MiB, 20 * MiB), (10 * MiB, 4 * MiB), (40 * MiB, 16 * MiB), (100 * MiB, 30 * MiB)]
    )
    assert model.points == ((10 * MiB, 4 * MiB), (40 * MiB, 20 * MiB), (100 * MiB, 30 * MiB))
    assert model.predict(5 * MiB) == 2 * MiB  # proportional below the smallest probe
    assert model.predict(25 * MiB) == 12 * MiB  # halfway between 4 and 20
    assert model.predict(70 * MiB) == 25 * MiB
    assert model.predict(3000 * MiB) == 30 * MiB  # flat beyond the largest
    # a smaller overhead at a larger scale does not pull the curve below the worst seen
    dip = StepModel.fit([(10 * MiB, 8 * MiB), (20 * MiB, 2 * MiB), (40 * MiB, 12 * MiB)])
    assert dip.predict(20 * MiB) == 8 * MiB and dip.predict(30 * MiB) == 10 * MiB
    with pytest.raises(ValueError, match="ascending"):
        StepModel(((40 * MiB, 1), (10 * MiB, 1)))
    with pytest.raises(ValueError, match="at least one"):
        StepModel(())


def test_step_model_cache_is_keyed_by_the_machine(tmp_path):
    from waggle_trainer.remat.overhead import StepModel, load_step_model, save_step_model

    key = {"cpu": "x", "threads": 1, "allocator": "glibc", "allocator_mode": "mmap"}
    assert load_step_model(tmp_path, key) is None and load_step_model(None, key) is None
    model = StepModel(((11 * MiB, 4 * MiB), (33 * MiB, 20 * MiB)))
    path = save_step_model(tmp_path, key, model)
    assert load_step_model(tmp_path, key) == model
    for other in ({"threads": 2}, {"allocator": "tcmalloc"}, {"allocator_mode": "default"}):
        assert load_step_model(tmp_path, {**key, **other}) is None
    path.write_text("{not json")
    assert load_step_model(tmp_path, key) is None


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )


def test_a_first_run_plans_right_from_the_machine_probe_without_calibration(tmp_path):
    """The machine is probed once (two small configurations); a configuration never run
    before, in a fresh process, with no calibration step, grows as predicted."""
    probe = tmp_path / "probe"
    p = _run(
        "waggle_trainer.learn.overhead_probe",
        "--machine",
        "--cache-dir",
        str(probe),
        "--points",
        "resnet18:1:64",
        "resnet18:1:128",
        "--repeats",
        "1",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(json.loads(p.stdout)["points"]) == 2
    # a fresh cache: the machine's model only, no record of any configuration
    cache = tmp_path / "cache"
    cache.mkdir()
    for f in probe.glob("machine-*.json"):
        (cache / f.name).write_bytes(f.read_bytes())
    args = ("--arch", "resnet18", "--batch", "1", "--image", "96", "--json", "--cache-dir")
    plan = json.loads(_run("waggle_trainer", "plan", *args, str(cache)).stdout)
    plain = plan["strategies"]["none"]["predicted_peak_bytes"]
    budget = max(plain // 2, plan["min_feasible_bytes"] + 8 * MiB)
    b = _run(
        "waggle_trainer",
        "bench",
        *args,
        str(cache),
        "--strategy",
        "optimal",
        "--budget",
        str(budget),
        "--steps",
        "2",
        "--no-calibrate",
    )
    assert b.returncode in (0, 1), b.stderr[-3000:]
    r = json.loads(b.stdout)
    assert r["overhead_source"] == "machine" and r["calibration"] == "off"
    assert r["overhead_step_bytes"] > 0
    assert r["plan_budget_bytes"] <= budget - r["overhead_step_bytes"]  # planned for the rest
    predicted, growth = r["predicted_growth_bytes"], r["peak_rss_growth_bytes"]
    # the bar: within 10% of the prediction, or within the budget + 5 MiB
    assert abs(growth - predicted) <= 0.1 * predicted or growth <= budget + 5 * MiB, (
        growth,
        predicted,
        budget,
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
