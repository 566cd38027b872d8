"""The daemon with the real adaptation loop, frame source and reference teacher on the
demo clip (small student so it stays quick): rounds spooled and saved, SIGTERM exits 0
mid-run, and a restart resumes the loop's own state at the saved round."""

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
from waggle_trainer.node.state import StateStore
from waggle_trainer.transport import Outbox

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip(
    "waggle_trainer.learn.adaptation",
    reason="the adaptation loop (issue 8) is not on this branch yet",
)


def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "camera": {
                "source": str(ROOT / "deploy" / "clips" / "vtest-excerpt.avi"),
                "fps": 0,
                "loop": True,
            },
            "student": {"input_width": 128, "input_height": 96},
            "training": {"batch_size": 2, "steps_per_round": 1},
            "teacher": {"tiles": 1},
            "adaptation": {
                "buffer_size": 16,
                "holdout_fraction": 0.25,
                "new_samples_per_round": 2,
                "teacher_stride_min": 1,
                "teacher_budget": 1.0,  # every frame labelled, one look each
            },
            "state": {"dir": str(tmp_path / "state")},
        },
    )


def run(cfg: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "waggle_trainer", "run", "--config", str(cfg), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        **kw,
    )


@pytest.mark.slow
def test_real_loop_rounds_resume_after_sigterm(tmp_path):
    cfg = config(tmp_path)
    first = run(cfg, "--max-rounds", "2", "--json")
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["rounds_this_run"] == 2 and summary["round"] == 2
    state = StateStore(tmp_path / "state" / "node")
    meta = state.read_meta()
    assert meta["round"] == 2 and meta["loop"], "the loop's own state is saved"
    spooled = [e.round for e in Outbox(tmp_path / "state" / "outbox", 2**30).pending()]
    accepted = [h["round"] for h in meta["history"] if h["accepted"]]
    assert spooled == accepted

    second = run(cfg)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and state.read_meta()["round"] < 3:
        time.sleep(0.5)
    assert state.read_meta()["round"] >= 3, "no round after the restart"
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-3000:]
    assert "resumed at round 2" in err and "Traceback" not in err
    final = state.read_meta()
    assert final["round"] >= 3 and final["loop"]
