"""The memory-cgroup harness: OOM kill beyond the limit, success below, peak, cleanup."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.cgroup_util import CgroupUnavailable, cgroup_unavailable_reason, run_in_memory_cgroup

MiB = 2**20

pytestmark = pytest.mark.cgroup

_REASON = cgroup_unavailable_reason()
needs_cgroup = pytest.mark.skipif(_REASON is not None, reason=f"no memory cgroup: {_REASON}")


def _alloc(mib: int) -> list[str]:
    # b"x" * n touches every page (a bytearray(n) would be lazily zeroed and uncharged)
    return [sys.executable, "-c", f"b = b'x' * ({mib} << 20); print(len(b))"]


def _leftovers() -> set[str]:
    found = set()
    for root in (
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup/unified"),
        Path("/sys/fs/cgroup"),
    ):
        if root.is_dir():
            found |= {str(p) for p in root.rglob("waggle-test-*") if p.is_dir()}
    return found


@needs_cgroup
def test_beyond_the_limit_is_oom_killed():
    before = _leftovers()
    run = run_in_memory_cgroup(_alloc(200), 64 * MiB, timeout=120)
    assert run.oom_killed, run
    assert run.returncode != 0 and run.killed_by_sigkill
    assert run.stdout == ""
    if run.peak_bytes is not None:
        assert run.peak_bytes <= 64 * MiB
        assert run.peak_bytes > 48 * MiB
    assert _leftovers() == before


@needs_cgroup
def test_below_the_limit_completes_and_reports_its_peak():
    before = _leftovers()
    run = run_in_memory_cgroup(_alloc(40), 128 * MiB, timeout=120)
    assert run.returncode == 0, run.stderr
    assert not run.oom_killed
    assert run.stdout.strip() == str(40 * MiB)
    if run.peak_bytes is not None:
        assert 40 * MiB < run.peak_bytes < 128 * MiB
    assert _leftovers() == before


@needs_cgroup
def test_unlimited_measures_the_peak_and_env_and_timeout_work():
    run = run_in_memory_cgroup(
        [sys.executable, "-c", "import os; b = b'x' * (96 << 20); print(os.environ['WT_X'])"],
        None,
        env={"WT_X": "hello", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.strip() == "hello"
    if run.peak_bytes is not None:
        assert run.peak_bytes > 96 * MiB
    slow = run_in_memory_cgroup(
        [sys.executable, "-c", "import time; time.sleep(60)"], 64 * MiB, timeout=1
    )
    assert slow.timed_out and not slow.oom_killed and slow.returncode != 0


def test_bad_limit_is_rejected():
    with pytest.raises(ValueError, match="limit_bytes"):
        run_in_memory_cgroup(["true"], 0)


def test_unavailable_is_reported_with_a_reason(monkeypatch):
    from tests import cgroup_util

    monkeypatch.setattr(cgroup_util.os, "geteuid", lambda: 1000)
    assert "root" in cgroup_util.cgroup_unavailable_reason()
    with pytest.raises(CgroupUnavailable, match="root"):
        run_in_memory_cgroup(["true"], 64 * MiB)
