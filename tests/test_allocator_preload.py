"""``--allocator``: the command line re-executes itself under the chosen malloc, which is
then really mapped (``/proc/self/maps``); a missing library falls back with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from waggle_trainer.remat import allocator as A

ROOT = Path(__file__).resolve().parents[1]
PRELOADED = [name for name in A.ALLOCATORS if name != "glibc"]


def _bench(cache: Path, name: str, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "waggle_trainer",
        "bench",
        "--arch",
        "resnet18",
        "--batch",
        "1",
        "--image",
        "64",
        "--steps",
        "1",
        "--budget",
        "64MiB",
        "--json",
        "--cache-dir",
        str(cache),
        "--allocator",
        name,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.parametrize("name", PRELOADED)
def test_bench_runs_under_the_chosen_allocator(tmp_path, name):
    if A.find_allocator(name) is None:
        pytest.skip(f"{name} is not installed (see .ci/run)")
    run = _bench(tmp_path, name)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["allocator"] == name  # read from the training process's /proc/self/maps
    assert "not found" not in run.stderr


def test_missing_library_falls_back_to_glibc_with_one_line(monkeypatch):
    monkeypatch.setattr(A, "_LIB_DIRS", ("/nonexistent",))
    plan = A.plan_preload("mimalloc", environ={})
    assert plan.env is None and plan.name == "glibc"
    assert plan.note == (
        "allocator mimalloc: libmimalloc.so.2 not found "
        "(apt-get install libmimalloc2.0); using glibc malloc"
    )


def test_preload_plan_environment(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.setattr(A, "find_allocator", lambda name: f"/lib/{name}.so")
    plan = A.plan_preload("jemalloc", environ={"PATH": "/bin"})
    assert plan.env is not None
    assert plan.env["LD_PRELOAD"] == "/lib/jemalloc.so" and plan.env["PATH"] == "/bin"
    assert plan.env["MALLOC_CONF"] == A.RETENTION["jemalloc"]["MALLOC_CONF"]
    assert plan.env["WAGGLE_PRELOADED"] == "jemalloc"
    # the re-executed process that still lacks it carries on: never a loop
    again = A.plan_preload("jemalloc", environ=plan.env)
    assert again.env is None and "not mapped" in again.note
    assert A.plan_preload("glibc").env is None
    with pytest.raises(ValueError, match="unknown allocator 'hoard'.*allowed: glibc, jemalloc"):
        A.plan_preload("hoard")


def test_loaded_allocator_reads_the_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
    assert A.loaded_allocator(maps) == "tcmalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert A.loaded_allocator(maps) == "glibc"
    assert A.loaded_allocator() == "glibc"  # pytest itself runs on glibc


def test_an_allocator_preloaded_by_the_environment_is_kept(monkeypatch):
    # a systemd unit's Environment=LD_PRELOAD=...libjemalloc.so.2, the config asks for another
    monkeypatch.setattr(A, "loaded_allocator", lambda maps="/proc/self/maps": "jemalloc")
    monkeypatch.setattr(A, "find_allocator", lambda name: f"/lib/{name}.so")
    environ = {"LD_PRELOAD": "/lib/jemalloc.so"}
    plan = A.plan_preload("tcmalloc", environ=environ)
    assert plan.env is None and plan.name == "jemalloc"  # no re-execution, never two stacked
    assert plan.note == (
        "allocator tcmalloc: jemalloc is already preloaded (LD_PRELOAD='/lib/jemalloc.so'); "
        "using jemalloc"
    )
    # the config's default (glibc) under it: carry on, nothing to say; the run reports it
    assert A.plan_preload("glibc", environ=environ) == A.PreloadPlan("jemalloc", None)
    assert A.plan_preload("jemalloc", environ=environ) == A.PreloadPlan("jemalloc", None)
