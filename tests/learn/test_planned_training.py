"""The memory-planned training run and the plan / bench / run subcommands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from waggle_trainer.cli import main
from waggle_trainer.learn.planned_training import PlannedTraining, RunSpec, measure
from waggle_trainer.remat.planner import Planner

ROOT = Path(__file__).resolve().parents[2]


def test_planned_run_trains_within_a_small_budget(tmp_path):
    spec = RunSpec(
        arch="resnet18", batch=2, image=64, classes=10, budget="auto", cache_dir=tmp_path
    )
    plain = PlannedTraining.build(RunSpec(**{**spec.__dict__, "strategy": "none"}))
    need = plain.chain.plan.predicted_peak_bytes
    lowest = Planner(plain.chain.costs).min_feasible_budget("optimal")
    budget = (need + lowest) // 2
    small = PlannedTraining.build(RunSpec(**{**spec.__dict__, "budget": budget}))
    assert small.chain.plan.predicted_peak_bytes <= budget < need
    before = [p.detach().clone() for p in small.model.parameters()]
    result = measure(small, steps=2)
    assert result.strategy == "optimal" and result.steps == 2
    assert result.budget_bytes == budget
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # it really trained: every parameter that gets a gradient moved
    after = small.model.parameters()
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True)]
    assert all(moved)
    assert result.peak_rss_bytes >= result.baseline_rss_bytes > 0


def test_auto_budget_reads_free_memory(tmp_path):
    t = PlannedTraining.build(
        RunSpec(arch="resnet18", batch=1, image=64, classes=10, cache_dir=tmp_path)
    )
    b = t.budget
    assert b.free_bytes > 0 and b.activation_budget_bytes < b.free_bytes
    assert b.safety_margin_bytes >= 0.1 * b.free_bytes - 1


def test_bad_spec_values_are_refused():
    with pytest.raises(ValueError, match="--batch must be >= 1"):
        RunSpec(batch=0)


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "waggle_trainer", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_plan_json_lists_every_strategy(tmp_path):
    r = cli(
        "plan",
        "--arch",
        "resnet18",
        "--batch",
        "2",
        "--image",
        "64",
        "--budget",
        "11MiB",
        "--cache-dir",
        str(tmp_path),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["strategies"]) == {"none", "sequential", "revolve", "optimal"}
    assert out["budget_bytes"] == 11 * 2**20
    opt = out["strategies"]["optimal"]
    assert opt["feasible"] and opt["predicted_peak_bytes"] <= 11 * 2**20
    assert out["chosen"] == "optimal"
    assert out["min_feasible_bytes"] == opt["min_feasible_bytes"] < 11 * 2**20
    for name, row in out["strategies"].items():
        if row["feasible"]:
            assert opt["time_ratio"] <= row["time_ratio"] + 1e-9, name


def test_bench_json_keys_and_infeasible_budget(tmp_path):
    shape = [
        "--arch",
        "resnet18",
        "--batch",
        "2",
        "--image",
        "64",
        "--steps",
        "1",
        "--cache-dir",
        str(tmp_path),
    ]
    r = cli("bench", *shape, "--budget", "64MiB", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in (
        "strategy",
        "median_step_s",
        "peak_rss_bytes",
        "predicted_peak_bytes",
        "budget_bytes",
        "budget_kept",
        "data",
    ):
        assert key in out
    assert out["budget_bytes"] == 64 * 2**20 and out["predicted_peak_bytes"] <= 64 * 2**20
    assert out["budget_kept"] and out["peak_rss_growth_bytes"] <= out["budget_bytes"]
    r = cli("bench", *shape, "--budget", "100KiB")
    assert r.returncode == 1
    assert "below the minimum feasible" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "lots"], 'is not "auto" or a size'),
        (["--batch", "0"], "is not a whole number >= 1"),
        (["--strategy", "magic"], "invalid choice"),
    ],
)
def test_bench_usage_errors_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_with_a_bad_config_exits_2(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text("[training]\nbatch_size = -1\n")
    r = cli("run", "--config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip() == f"{cfg}: training.batch_size: -1 is out of range (must be >= 1)"


class _FakeRss:
    """Reports each step's peak as the plan's prediction plus a fixed overhead."""

    def __init__(self, training, overhead):
        self.training, self.overhead, self.peak = training, overhead, 0

    def reset(self):
        self.base = 1 << 30
        self.peak = self.base + self.training.chain.plan.predicted_peak_bytes + self.overhead
        return self.base


def test_calibration_replans_within_the_budget_minus_measured_overhead(tmp_path):
    spec = RunSpec(arch="resnet18", batch=2, image=64, classes=10, cache_dir=tmp_path)
    probe = PlannedTraining.build(RunSpec(**{**spec.__dict__, "strategy": "none"}))
    need = probe.chain.plan.predicted_peak_bytes
    lowest = Planner(probe.chain.costs).min_feasible_budget("optimal")
    budget = need - 1
    t = PlannedTraining.build(RunSpec(**{**spec.__dict__, "budget": budget}))
    t.allocator_mode = "mmap"  # what a tight budget selects
    overhead = (budget - lowest) // 2
    assert t.calibrate(_FakeRss(t, overhead)) == overhead
    assert t.chain.plan.predicted_peak_bytes + overhead <= budget
    assert t.calibration == "re-planned"
    # an overhead that leaves nothing feasible runs the smallest plan and says so
    t2 = PlannedTraining.build(RunSpec(**{**spec.__dict__, "budget": budget}))
    t2.allocator_mode = "mmap"
    t2.calibrate(_FakeRss(t2, budget))
    assert t2.chain.plan.predicted_peak_bytes == lowest
    assert t2.calibration == "infeasible"
