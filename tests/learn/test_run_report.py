"""What ``run`` and ``bench`` print is true: the plan that ran (marked in the table),
what calibration did, a broken budget promise or a diverged loss (exit 1), that the
data is synthetic; progress only on a terminal; no stray log lines."""

from __future__ import annotations

import math
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from waggle_trainer.cli import main
from waggle_trainer.learn import planned_training as pt
from waggle_trainer.learn.cli import _failures
from waggle_trainer.remat.planner import Planner

ROOT = Path(__file__).resolve().parents[2]
SHAPE = ["--arch", "resnet18", "--batch", "2", "--image", "32"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One profile cache for the module: the shape is profiled once."""
    return tmp_path_factory.mktemp("profiles")


class FakeRss:
    """Each step's peak: the running plan's prediction plus a fixed overhead."""

    overhead = 0
    training = None

    def __init__(self) -> None:
        self.peak = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def reset(self) -> int:
        base = 1 << 30
        plan = FakeRss.training.chain.plan
        self.peak = base + plan.predicted_peak_bytes + FakeRss.overhead
        return base


@pytest.fixture
def fake_rss(monkeypatch):
    build = pt.PlannedTraining.build

    def capture(spec, **kw):
        t = build(spec, **kw)
        t.allocator_mode = "mmap"  # calibrate as a tight budget does
        FakeRss.training = t
        return t

    monkeypatch.setattr(pt, "RssSampler", FakeRss)
    monkeypatch.setattr(pt.PlannedTraining, "build", staticmethod(capture))
    return FakeRss


def _budgets(cache: Path) -> tuple[int, int]:
    spec = pt.RunSpec(arch="resnet18", batch=2, image=32, strategy="none", cache_dir=cache)
    probe = pt.PlannedTraining.build(spec)
    need = probe.chain.plan.predicted_peak_bytes
    return need, Planner(probe.chain.costs).min_feasible_budget("optimal")


def _bench(capsys, cache: Path, budget: int) -> tuple[int, str, str]:
    rc = main(["bench", *SHAPE, "--budget", str(budget), "--steps", "1", "--cache-dir", str(cache)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _marked_row_and_summary(out: str) -> tuple[str, str]:
    [row] = [line for line in out.splitlines() if line.startswith("* ")]
    [summary] = [line for line in out.splitlines() if line.startswith("plan that ran: ")]
    return row, summary


def test_calibrated_run_prints_the_plan_that_ran(cache, capsys, fake_rss):
    need, lowest = _budgets(cache)
    budget = need - 1
    fake_rss.overhead = (budget - lowest) // 2
    rc, out, err = _bench(capsys, cache, budget)
    assert rc == 0, out + err
    assert "data: synthetic" in out
    row, summary = _marked_row_and_summary(out)
    assert row.split()[1] == "optimal" and "plan that ran: optimal" in summary
    peak = re.search(r"predicted peak (\S+),", summary).group(1)
    assert row.split()[3] == peak  # the marked row is the plan in the summary
    assert "re-planned for the budget minus that" in out
    assert "within the budget" in out


def test_overhead_nothing_absorbs_is_said_and_exits_1(cache, capsys, fake_rss):
    need, lowest = _budgets(cache)
    fake_rss.overhead = need  # leaves no feasible plan
    rc, out, err = _bench(capsys, cache, need - 1)
    assert rc == 1
    assert "re-planned" not in out
    assert "no plan fits the budget minus that, so the smallest plan ran" in out
    assert "OVER the budget" in out
    assert "the budget was not kept" in err.strip().splitlines()[-1]


def test_divergence_and_a_broken_budget_are_failures():
    r = pt.RunResult(
        arch="resnet18",
        batch=2,
        image=64,
        strategy="optimal",
        budget_bytes=100,
        plan_budget_bytes=100,
        predicted_peak_bytes=90,
        predicted_time_ratio=1.0,
        min_feasible_bytes=50,
        steps=3,
        median_step_s=0.1,
        step_times_s=[0.1] * 3,
        baseline_rss_bytes=1000,
        peak_rss_bytes=1150,
        peak_rss_growth_bytes=150,
        losses=[2.3, math.inf, math.nan],
        replans=0,
        allocator_mode="mmap",
        calibration_bytes=0,
        calibration="",
        budget_breakdown={},
    )
    assert not r.budget_kept and r.diverged_at == 2
    budget_line, loss_line = _failures(r)
    assert "150 bytes" in budget_line and "100 bytes" in budget_line
    assert "diverged" in loss_line and "step 2" in loss_line
    d = r.to_dict()
    assert d["budget_kept"] is False and d["diverged_at"] == 2 and d["data"] == "synthetic"


def test_profiling_progress_on_a_terminal(tmp_path):
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "waggle_trainer",
                "plan",
                *SHAPE,
                "--cache-dir",
                str(tmp_path),
                "--budget",
                "50MiB",
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
            cwd=ROOT,
            env={
                k: v
                for k, v in {**os.environ, "OMP_NUM_THREADS": "1"}.items()
                if k != "JOURNAL_STREAM"
            },
        )
        os.close(slave)
        out, _ = p.communicate(timeout=300)
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
    assert p.returncode == 0
    assert b"profiling resnet18 (batch 2, 32 px): 0/" in drawn
    assert b"stages" in drawn and b"\x1b[K" in drawn
    assert b"profiling" not in out
