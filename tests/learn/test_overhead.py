"""The overhead model: measured by a run, cached beside the profile, planned for by the
next run before its first step; its prediction holds within 10% (or 5 MiB)."""

from __future__ import annotations

import json

from waggle_trainer.learn.planned_training import PlannedTraining, RunSpec, measure
from waggle_trainer.remat.overhead import Overhead, load_overhead, overhead_path, save_overhead
from waggle_trainer.remat.planner import Planner

MiB = 2**20


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


def test_a_second_run_plans_with_the_measured_overhead(tmp_path):
    probe = PlannedTraining.build(
        RunSpec(
            arch="resnet18",
            batch=1,
            image=160,
            classes=10,
            cache_dir=tmp_path,
            strategy="none",
            budget=2**30,
        )
    )
    costs_planner = Planner(probe.chain.costs)
    lowest = costs_planner.min_feasible_budget("optimal")
    plain = probe.chain.plan.predicted_peak_bytes
    del probe
    spec = RunSpec(
        arch="resnet18",
        batch=1,
        image=160,
        classes=10,
        cache_dir=tmp_path,
        strategy="optimal",
        budget=plain - MiB,
        fused_step=True,
    )
    first = PlannedTraining.build(spec)
    assert first.overhead_source == "default" and first.allocator_mode == "mmap"
    r1 = measure(first, steps=2)
    assert r1.overhead_source == "default" and r1.first_step_residue_bytes is not None
    cached = load_overhead(tmp_path, first.overhead_key())
    assert cached is not None and cached.step_bytes == max(
        0, r1.peak_rss_growth_bytes - r1.predicted_peak_bytes
    )

    second = PlannedTraining.build(spec)
    assert second.overhead == cached and second.overhead_source == "cache"  # before step 1
    assert second.overshoot_bytes == cached.step_bytes
    if spec.budget - cached.step_bytes >= lowest:  # the plan is made for the rest
        assert second.chain.plan.budget_bytes == spec.budget - cached.step_bytes
    r2 = measure(second, steps=2)
    assert r2.overhead_source == "cache"
    assert r2.predicted_growth_bytes == r2.predicted_peak_bytes + cached.step_bytes
    error = abs(r2.peak_rss_growth_bytes - r2.predicted_growth_bytes)
    assert error <= max(0.1 * r2.predicted_growth_bytes, 5 * MiB), (
        r2.peak_rss_growth_bytes,
        r2.predicted_growth_bytes,
    )
