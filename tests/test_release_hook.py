"""The release hook: tcmalloc keeps what a step frees (no page faults) but gives back,
between the schedule's operations, what it holds free beyond the plan's unused budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from waggle_trainer.remat import allocator as A
from waggle_trainer.remat.executor import CheckpointedSequential

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def test_slack_is_the_unused_budget_capped(monkeypatch):
    monkeypatch.delenv(A.SLACK_ENV, raising=False)
    assert A.release_slack_bytes(-5 * MiB) == 0  # the plan uses more than its budget
    assert A.release_slack_bytes(40 * MiB) == 40 * MiB
    assert A.release_slack_bytes(4000 * MiB) == 128 * MiB
    monkeypatch.setenv(A.SLACK_ENV, "off")
    assert A.release_slack_bytes(40 * MiB) is None
    monkeypatch.setenv(A.SLACK_ENV, str(7 * MiB))
    assert A.release_slack_bytes(40 * MiB) == 7 * MiB


def test_a_bad_slack_setting_is_one_warning_and_the_default(monkeypatch, caplog):
    monkeypatch.setenv(A.SLACK_ENV, "lots")
    assert A.release_slack_bytes(40 * MiB) == 40 * MiB
    assert [r.getMessage() for r in caplog.records] == [
        f"{A.SLACK_ENV}='lots' is not a number of bytes or 'off'; using the default"
    ]


@pytest.mark.skipif(A.loaded_allocator() != "glibc", reason="the suite runs under glibc")
def test_no_hook_where_it_does_not_apply():
    assert A.release_hook(0) is None  # glibc's mmap mode gives large blocks back on free


def test_the_executor_calls_the_hook_after_every_operation():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(6)])
    chain = CheckpointedSequential(model, budget_bytes=10**12, strategy="revolve")
    x = torch.randn(4, 16)
    chain.profile(x)
    chain.replan(chain.plan.min_feasible_bytes)
    assert any(op == "FN" for op, _ in chain.plan.schedule)  # it recomputes
    calls = []
    chain.after_op = lambda: calls.append(1)
    chain(x).sum().backward()
    assert len(calls) == len(chain.plan.schedule) - 1  # every operation but the loss


_PROBE = """
import json, psutil, torch
from waggle_trainer.remat import allocator as A
free, _ = A._tcmalloc_calls()
rss = psutil.Process().memory_info().rss
blocks = [torch.ones(2 * 2**20) for _ in range(40)]  # 40 x 8 MiB, touched
del blocks
kept, rss_kept = free(), psutil.Process().memory_info().rss
A.release_hook(16 * 2**20)()
print(json.dumps({"allocator": A.loaded_allocator(), "kept": kept, "after": free(),
                  "rss_kept": rss_kept, "rss_after": psutil.Process().memory_info().rss}))
"""


def test_the_hook_gives_back_what_tcmalloc_keeps_beyond_the_slack():
    path = A.find_allocator("tcmalloc")
    if path is None:
        pytest.skip("tcmalloc is not installed (see .ci/run)")
    env = {**os.environ, "LD_PRELOAD": path, "TCMALLOC_RELEASE_RATE": "0"}
    run = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout)
    assert r["allocator"] == "tcmalloc"
    assert r["kept"] >= 300 * MiB  # tcmalloc kept the freed blocks for reuse
    assert r["after"] <= 16 * MiB  # the hook gave back all but the slack
    assert r["rss_kept"] - r["rss_after"] >= 280 * MiB  # and the process really shrank
