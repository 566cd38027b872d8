"""``[memory] allocator`` for the node daemon and ``adapt``: the command re-executes
itself under the configured malloc before torch is loaded (the process really maps
it: ``/proc/<pid>/maps``), reports the allocator it runs under in its start line,
``status`` and the summary, and under an allocator the environment preloaded
already (a systemd unit's ``LD_PRELOAD``) it stays with that one and says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.node.nodeutil import write_config
from waggle_trainer.remat import allocator as A

ROOT = Path(__file__).resolve().parents[2]
CLIP = ROOT / "deploy" / "clips" / "vtest-excerpt.avi"
MAPS_NAME = {"jemalloc": "libjemalloc", "tcmalloc": "libtcmalloc", "mimalloc": "libmimalloc"}

pytestmark = pytest.mark.slow


def needs(name: str) -> str:
    path = A.find_allocator(name)
    if path is None:
        pytest.skip(f"{name} is not installed (see .ci/run)")
    return path


def tiny_config(tmp_path: Path, allocator: str) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            # not looped: `adapt --frames 8` ends after 8 frames
            "camera": {"source": str(CLIP), "fps": 0, "loop": False},
            "student": {"input_width": 96, "input_height": 64},
            "training": {"batch_size": 2, "steps_per_round": 1},
            "teacher": {"tiles": 1},
            "adaptation": {
                "buffer_size": 16,
                "holdout_fraction": 0.25,
                "new_samples_per_round": 2,
                "teacher_stride_min": 1,
                "teacher_budget": 1.0,  # every frame labelled, one look each
            },
            "memory": {"allocator": allocator},
            "state": {"dir": str(tmp_path / "state")},
        },
    )


def environment(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LD_PRELOAD", "WAGGLE_PRELOADED", "NOTIFY_SOCKET", "WAGGLE_NODE_ID")
        and not k.startswith(("MALLOC_", "TCMALLOC_", "MIMALLOC_"))
    }
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def waggle(*args: str) -> list[str]:
    # one core, as the heavy tests here do (the machine is shared)
    return ["taskset", "-c", "1", sys.executable, "-m", "waggle_trainer", *args]


def run_until_ready(tmp_path: Path, cfg: Path, env: dict[str, str]) -> tuple[str, str]:
    """Start ``run``; once it is ready, read its maps, then stop it with SIGTERM:
    (its /proc/<pid>/maps, its stderr)."""
    log = tmp_path / "run.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            waggle("run", "--config", str(cfg), "--duration", "120"),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 300
        while "ready:" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()[-3000:]
        # the re-executed program is the same process (execve): its maps, while it trains
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return maps, log.read_text()


def test_run_maps_the_configured_allocator_and_reports_it(tmp_path):
    needs("jemalloc")
    cfg = tiny_config(tmp_path, "jemalloc")
    maps, err = run_until_ready(tmp_path, cfg, environment())
    assert "libjemalloc" in maps
    assert not any(MAPS_NAME[n] in maps for n in ("tcmalloc", "mimalloc"))
    assert "allocator jemalloc" in next(line for line in err.splitlines() if "ready:" in line)
    assert "Traceback" not in err and "not found" not in err
    status = subprocess.run(
        waggle("status", "--config", str(cfg), "--json"),
        capture_output=True,
        text=True,
        env=environment(),
        cwd=ROOT,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"]["allocator"] == "jemalloc"
    text = subprocess.run(
        waggle("status", "--config", str(cfg)),
        capture_output=True,
        text=True,
        env=environment(),
        cwd=ROOT,
        timeout=120,
    ).stdout
    assert "allocator jemalloc" in text


def test_an_allocator_preloaded_by_the_unit_is_kept_and_reported(tmp_path):
    jemalloc = needs("jemalloc")
    needs("tcmalloc")
    # as a systemd unit's Environment=LD_PRELOAD=... would; the config asks for another
    cfg = tiny_config(tmp_path, "tcmalloc")
    maps, err = run_until_ready(tmp_path, cfg, environment(LD_PRELOAD=jemalloc))
    assert "libjemalloc" in maps and "libtcmalloc" not in maps  # never two stacked
    said = [line for line in err.splitlines() if "already preloaded" in line]
    assert len(said) == 1 and "allocator tcmalloc: jemalloc is already preloaded" in said[0]
    assert "allocator jemalloc" in next(line for line in err.splitlines() if "ready:" in line)


def test_adapt_runs_under_the_configured_allocator(tmp_path):
    needs("mimalloc")
    cfg = tiny_config(tmp_path, "mimalloc")
    r = subprocess.run(
        waggle("adapt", "--config", str(cfg), "--frames", "8", "--json"),
        capture_output=True,
        text=True,
        env=environment(),
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["allocator"] == "mimalloc"  # read from the process's /proc/self/maps
    assert summary["rounds"] >= 1
