"""Fixtures for the daemon tests: configs in a temp dir, the stand-in loop."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.node.nodeutil import write_config
from waggle_trainer import config as cfgmod
from waggle_trainer.config import load_config


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No host identity, no systemd sockets; signal handlers restored afterwards."""
    monkeypatch.setattr(cfgmod, "WAGGLE_ETC", tmp_path / "etc-waggle")
    for var in (
        "WAGGLE_NODE_ID",
        "WAGGLE_NODE_VSN",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "STATE_DIRECTORY",
    ):
        monkeypatch.delenv(var, raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture
def node(tmp_path):
    """``node(**sections) -> (config path, Config)`` with a state dir in tmp_path."""

    def make(**sections):
        sections.setdefault("training", {}).setdefault("steps_per_round", 2)
        sections.setdefault("state", {}).setdefault("dir", str(tmp_path / "state"))
        path = write_config(tmp_path / "node.toml", sections)
        return path, load_config(path)

    return make


sys.path.insert(0, str(Path(__file__).parents[1] / "transport"))


@pytest.fixture
def names():
    """Unique exchange/queue names on the real broker; deleted afterwards."""
    from brokerutil import ensure_broker_running, unique_names

    try:
        ensure_broker_running(60)
    except RuntimeError as e:
        pytest.fail(f"this test needs RabbitMQ at 127.0.0.1:5672 ({e})")
    with unique_names() as n:
        yield n
