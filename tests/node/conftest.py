"""Fixtures for the daemon tests: configs in a temp dir, the stand-in loop."""

from __future__ import annotations

import io
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from standin import StandInLoop, StandInSource  # noqa: E402

from waggle_trainer import config as cfgmod  # noqa: E402
from waggle_trainer.config import load_config  # noqa: E402
from waggle_trainer.node.daemon import Daemon, Progress  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No host identity, no systemd sockets; signal handlers restored afterwards."""
    monkeypatch.setattr(cfgmod, "WAGGLE_ETC", tmp_path / "etc-waggle")
    for var in ("WAGGLE_NODE_ID", "WAGGLE_NODE_VSN", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                "WATCHDOG_PID", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v) + '"'


def write_config(path: Path, sections: dict) -> Path:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def node(tmp_path):
    """``node(**sections) -> (config path, Config)`` with a state dir in tmp_path."""

    def make(**sections):
        sections.setdefault("training", {}).setdefault("steps_per_round", 2)
        sections.setdefault("state", {}).setdefault("dir", str(tmp_path / "state"))
        path = write_config(tmp_path / "node.toml", sections)
        return path, load_config(path)

    return make


def make_daemon(cfg, path=None, *, reject_every=4, loops=None, **kw) -> Daemon:
    def loop_factory(c, d):
        loop = StandInLoop(c, d, reject_every=reject_every)
        if loops is not None:
            loops.append(loop)
        return loop

    return Daemon(cfg, config_path=path, loop_factory=loop_factory,
                  source_factory=lambda c: StandInSource(), progress=Progress(io.StringIO()),
                  **kw)
