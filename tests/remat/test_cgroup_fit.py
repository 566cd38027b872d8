"""The point of the product: training fits where plain training is killed.

Inside a memory cgroup limited to 75% of what plain training of resnet50 (batch 8,
224 px) needs — measured in this same test, without a limit — ``waggle-trainer
bench --budget auto`` completes its steps (so the budget reads the cgroup limit),
while plain training is OOM-killed there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.cgroup_util import cgroup_unavailable_reason, run_in_memory_cgroup

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.cgroup, pytest.mark.slow]


def bench(cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "waggle_trainer", "bench", "--arch", "resnet50", "--batch", "8",
            "--image", "224", "--steps", "1", "--json", "--cache-dir", str(cache), *extra]


def test_auto_budget_fits_in_a_cgroup_where_plain_training_is_killed(tmp_path):
    reason = cgroup_unavailable_reason()
    if reason:
        pytest.skip(reason)
    cache = tmp_path / "profiles"

    plain = run_in_memory_cgroup(bench(cache, "--strategy", "none", "--budget", "16GiB"),
                                 None, timeout=900, cwd=ROOT)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.peak_bytes, "the cgroup reported no peak"
    need = plain.peak_bytes
    limit = int(0.75 * need)

    killed = run_in_memory_cgroup(bench(cache, "--strategy", "none", "--budget", "16GiB"),
                                  limit, timeout=900, cwd=ROOT)
    assert killed.returncode != 0 and killed.oom_killed, (
        f"plain training survived {limit >> 20} MiB (needs {need >> 20} MiB): "
        f"rc {killed.returncode}"
    )

    fits = run_in_memory_cgroup(
        bench(cache, "--strategy", "optimal", "--budget", "auto"), limit, timeout=900, cwd=ROOT
    )
    assert fits.returncode == 0 and not fits.oom_killed, (
        f"planned training did not fit {limit >> 20} MiB: "
        f"rc {fits.returncode}\n{fits.stderr[-3000:]}"
    )
    result = json.loads(fits.stdout)
    assert result["strategy"] == "optimal"
    # the budget came from the cgroup, not from the machine's 24 GiB
    assert result["budget_breakdown"]["free_bytes"] < limit
    assert result["budget_bytes"] < need
    assert fits.peak_bytes <= limit
