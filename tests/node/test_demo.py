"""``waggle-trainer demo`` (``make run``): the node and the server through the real broker.

The orchestration is the product's (``waggle_trainer.demo.run_demo``: the real daemon
in-process, the real ``waggle-trainer server`` in a process of its own); the
adaptation loop and the frame source are the stand-ins, so a run takes seconds.  Every
test has its own exchanges and queues on the shared broker, deleted afterwards; the
run without a broker points the node at a port nobody listens on.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pika
import pytest

from tests.node.demo_main import factories
from tests.node.nodeutil import write_config
from waggle_trainer.demo import run_demo
from waggle_trainer.node.state import StateStore

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """Tests before these that ran the command line in-process left its stderr handler
    (``common.setup_logging``) on the root logger, bound to a capture since closed;
    the command line here adds its own: both are gone afterwards."""
    root = logging.getLogger()
    saved = list(root.handlers)
    root.handlers[:] = [h for h in saved if type(h) is not logging.StreamHandler]
    yield
    root.handlers[:] = saved


@pytest.fixture
def demo_names(names):
    """The broker names of ``names`` plus the demo's model exchange and node queue."""
    from brokerutil import BROKER

    names.models = names.exchange.replace("updates", "models")
    names.node_queue = names.models + ".node"
    yield names
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    ch.queue_delete(names.node_queue)
    ch.exchange_delete(names.models)
    conn.close()


def configs(tmp_path: Path, names=None, port: int = 5672) -> tuple[Path, Path]:
    """A node and a server config like deploy/demo*.toml, everything under tmp_path."""
    d = tmp_path / "demo"
    unique = names is not None
    node = write_config(
        tmp_path / "demo.toml",
        {
            "node": {"id": "demo-test", "vsn": "T0D"},
            "training": {"steps_per_round": 2},
            "memory": {"allocator": "glibc"},  # in-process: no re-execution to ask for
            "transport": {
                "enabled": True,
                "port": port,
                "exchange": names.exchange if unique else "test.demo.none",
                "hmac_key_file": str(d / "hmac.key"),
            },
            "telemetry": {
                "enabled": True,
                "exchange": names.telemetry if unique else "test.demo.none",
                "interval_s": 1.0,
            },
            "models": {
                "enabled": True,
                "server_public_key": str(d / "signing.pem.pub"),
                "exchange": names.models if unique else "test.demo.none",
                "queue": names.node_queue if unique else "test.demo.none",
            },
            "daemon": {"stop_flush_s": 2.0},
            "state": {"dir": str(d / "state")},
        },
    )
    server = write_config(
        tmp_path / "demo-server.toml",
        {
            "server": {"state_dir": str(d / "server")},
            "queue": {
                "exchange": names.exchange,
                "queue": names.queue,
                "dead_letter_exchange": names.dlx,
                "dead_letter_queue": names.dlq,
            }
            if unique
            else {},
            "verify": {"keys_dir": str(d / "server-keys"), "require_user_id": False},
            "aggregation": {"min_updates": 1},
            "broadcast": {
                "exchange": names.models if unique else "test.demo.none",
                "signing_key_file": str(d / "signing.pem"),
            },
            "telemetry": {"exchange": names.telemetry if unique else "test.demo.none"},
            "status": {"port": 0},
            "models.resnet18": {"initial_weights": str(d / "initial.safetensors")},
        },
    )
    return node, server


def processes_with(arg: str) -> list[int]:
    """Pids whose command line has ``arg`` as one argument (the demo's server)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if arg.encode() in (p / "cmdline").read_bytes().split(b"\0"):
                    out.append(int(p.name))
            except OSError:
                continue
    return out


@pytest.mark.broker
def test_a_run_with_the_broker_ends_with_a_version_adopted_by_the_node(
    tmp_path, demo_names, capsys, caplog
):
    node, server = configs(tmp_path, demo_names)
    with caplog.at_level(logging.INFO):
        # the loop may close from the first round on (make run waits for MIN_ROUNDS)
        code = run_demo(node, server, duration_s=120, min_rounds=1, **factories(0.25))
    out = capsys.readouterr().out
    assert code == 0, out
    d = tmp_path / "demo"
    # the node: the loop closed, versions adopted, updates delivered (its summary says so)
    assert re.search(
        r"^stopped: the loop is closed \(round \d+ trained on global version 2\)", out, re.M
    ), out
    m = re.search(r"^updates: (\d+) made.*, (\d+) delivered to the broker", out, re.M)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) >= 1, out
    assert re.search(r"^global models: versions 1, 2\b", out, re.M), out
    meta = StateStore(d / "state" / "node").read_meta()
    assert meta["counters"]["adopted"] >= 2
    assert [h["base_version"] for h in meta["history"]][0] == "1"
    assert meta["history"][-1]["base_version"] == "2"
    # the server: version 2 aggregated from this node's update; nothing refused
    from waggle_trainer.server.store import ModelStore

    versions = ModelStore(d / "server" / "models", create=False).versions("resnet18")
    v2 = versions[1].manifest
    assert versions[0].version == "1" and v2["nodes"] == ["demo-test"] and v2["contributors"]
    assert re.search(r"^server: \d+ version\(s\) of resnet18, .*; stopped \(its log", out, re.M)
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], log
    # K = 1: every update makes a version, so one sent before the node adopted the
    # newest may be too stale; nothing else is refused (the first on base 1 is not)
    refused = [line for line in log.splitlines() if "refused" in line]
    assert all("demo-test: stale:" in line for line in refused), refused
    assert re.search(r"server status page: http://127\.0\.0\.1:\d+/", log), log
    assert "server: model resnet18: version 2 stored from 1 updates" in log
    # the picture, next to the state; the server is gone
    svg = ET.parse(d / "learning-curve.svg").getroot()
    assert len(svg.findall(f"{SVG}line[@class='adopted']")) >= 1
    assert len(svg.findall(f"{SVG}circle[@class='accepted']")) == len(meta["history"])
    assert f"learning curve: {d / 'learning-curve.svg'} (rounds 1-" in out
    assert processes_with(str(server)) == []
    assert oct((d / "server-keys" / "demo-test.key").stat().st_mode & 0o777) == "0o600"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_broker_the_node_runs_alone_and_one_line_says_why(tmp_path, capsys, caplog):
    port = _free_port()
    node, server = configs(tmp_path, port=port)
    d = tmp_path / "demo"
    runs = []
    for _ in range(2):  # the second run starts clean and keeps the keys
        with caplog.at_level(logging.INFO):
            code = run_demo(node, server, max_rounds=3, **factories(0.0))
        out = capsys.readouterr().out
        assert code == 0, out
        meta = StateStore(d / "state" / "node").read_meta()
        keys = (d / "hmac.key").read_bytes(), (d / "signing.pem").read_bytes()
        runs.append((out, meta, keys))
        (d / "state" / "profiles" / "kept").write_text("a cache entry")
    out = runs[0][0]
    why = [line for line in out.splitlines() if "broker answers" in line or "alone" in line]
    assert why == [
        f"no broker answers at 127.0.0.1:{port} (connection refused), so the node ran alone "
        f"and delivered nothing (3 update(s) left in {d / 'state' / 'outbox'}); with a broker "
        "there the demo also runs the server and shows the whole loop"
    ], out
    assert "updates: 3 made" in out and "0 delivered to the broker" in out
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text and "server started" not in caplog.text
    assert not (d / "server.log").exists() and not (d / "server").exists()
    assert (d / "learning-curve.svg").is_file()
    # second run: round 1 of a new epoch, same keys, the profile cache kept
    (_, first, keys1), (_, second, keys2) = runs
    assert second["round"] == 3 and second["epoch"] != first["epoch"] and keys1 == keys2
    assert (d / "state" / "profiles" / "kept").is_file()


def _start(node: Path, server: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "WAGGLE_NODE_ID"}
    return subprocess.Popen(
        [sys.executable, str(HERE / "demo_main.py"), str(node), str(server), *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


def _wait_for(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """stderr lines up to the first that holds ``text`` (fails after ``timeout``)."""
    seen: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if text in line:
                return seen
    finally:
        timer.cancel()
    pytest.fail(f"no {text!r} from the demo:\n" + "".join(seen[-30:]))


@pytest.mark.broker
def test_ctrl_c_stops_the_node_and_then_the_server(tmp_path, demo_names):
    node, server = configs(tmp_path, demo_names)
    proc = _start(node, server, "--full-duration")
    try:
        _wait_for(proc, "adopted global model 2", 90)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's foreground group
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        for pid in processes_with(str(server)):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped: stop requested (signal)" in out
    assert re.search(r"^server: .*; stopped \(its log", out, re.M), out
    assert "Traceback" not in err and " ERROR " not in err, err[-3000:]
    assert processes_with(str(server)) == []


@pytest.mark.broker
def test_the_server_ends_with_the_demo_when_the_demo_is_killed(tmp_path, demo_names):
    node, server = configs(tmp_path, demo_names)
    proc = _start(node, server, "--full-duration")
    try:
        _wait_for(proc, "server status page", 90)
        assert processes_with(str(server)) != []
        proc.kill()  # a second Ctrl-C ends the node at once, the same way
        proc.communicate(timeout=30)
        end = time.monotonic() + 30
        while processes_with(str(server)) and time.monotonic() < end:
            time.sleep(0.2)
        left = processes_with(str(server))
    finally:
        for pid in processes_with(str(server)):
            os.kill(pid, signal.SIGKILL)
    assert left == [], "the demo's server outlived it"


@pytest.mark.broker
def test_a_server_that_cannot_start_is_one_line_and_the_node_stops(tmp_path, demo_names, capsys):
    node, server = configs(tmp_path, demo_names)
    with socket.socket() as busy:  # the status page's port is taken
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server.write_text(server.read_text().replace("port = 0", f"port = {port}"))
        code = run_demo(node, server, duration_s=60, **factories(0.05))
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip().splitlines() == [
        f"waggle-trainer demo: the demo's server stopped (exit 2): {server}: status.port: "
        f"cannot listen on 127.0.0.1:{port}: Address already in use (choose another port, "
        f"or 0 for any free one) (log: {tmp_path / 'demo' / 'server.log'})"
    ], err
    assert out == "" and processes_with(str(server)) == []
    assert StateStore(tmp_path / "demo" / "state" / "node").read_meta()["round"] == 0


def test_outside_the_repository_the_command_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    from waggle_trainer.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--max-rounds", "1"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == (
        "",
        "waggle-trainer demo: deploy/demo.toml: not found (run the demo from the "
        "repository's root, as `make run` does)\n",
    )
    assert list(tmp_path.iterdir()) == []  # nothing made


@pytest.mark.broker
def test_a_run_that_ends_before_the_loop_closes_says_so(tmp_path, demo_names, capsys):
    node, server = configs(tmp_path, demo_names)
    assert run_demo(node, server, max_rounds=1, **factories(0.05)) == 0
    out = capsys.readouterr().out
    assert "stopped: --max-rounds 1 reached" in out
    assert "global models: version 1 adopted this run" in out
    [line] = [x for x in out.splitlines() if x.startswith("the loop did not close")]
    assert line.startswith(
        "the loop did not close: the run ended before a round trained on a version "
        "aggregated from the node's "
    ), out


def test_the_loop_closes_only_after_the_rounds_that_show_learning():
    """make run keeps training until MIN_ROUNDS rounds are done, even when an early
    round already trained on an aggregated version: a curve of two rounds shows
    nothing."""
    from types import SimpleNamespace

    from waggle_trainer.demo import MIN_ROUNDS, LoopHooks

    hooks = LoopHooks(SimpleNamespace(), SimpleNamespace(exit_code=None), stop_at_loop=True)
    closing = {"round": 3, "base_version": "2"}
    early = SimpleNamespace(history=[{"round": 1, "base_version": "1"}] * 2 + [closing])
    assert hooks.stop_when(early) is None
    late = SimpleNamespace(
        history=[{"round": 1, "base_version": "1"}] * (MIN_ROUNDS - 1) + [closing]
    )
    assert hooks.stop_when(late) == "the loop is closed (round 3 trained on global version 2)"
