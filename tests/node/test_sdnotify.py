"""sd_notify over a real datagram socket: path and abstract names, no-op without one."""

from __future__ import annotations

import os
import socket
import uuid

from waggle_trainer.node.sdnotify import Notifier, watchdog_interval_s


def _listen(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(2)
    return s


def test_messages_reach_a_path_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    server = _listen(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    assert n.ready("round 0") and n.watchdog() and n.status("round 1, agreement 0.5")
    assert n.extend_watchdog(90) and n.stopping()
    got = [server.recv(4096).decode() for _ in range(5)]
    assert got == [
        "READY=1\nSTATUS=round 0",
        "WATCHDOG=1",
        "STATUS=round 1, agreement 0.5",
        "WATCHDOG_USEC=90000000",
        "STOPPING=1",
    ]
    server.close()


def test_abstract_socket_name_with_at_sign(monkeypatch):
    name = f"waggle-test-{uuid.uuid4().hex}"
    server = _listen("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert Notifier().status("multi\nline")
    assert server.recv(4096) == b"STATUS=multi line"
    server.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and n.ready() is False and n.watchdog() is False


def test_a_vanished_manager_does_not_raise(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    n = Notifier()
    assert n.watchdog() is False and n.watchdog() is False
    assert sum("sd_notify" in r.message for r in caplog.records) == 1


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # inherited from another process
    assert watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval_s() is None
