"""The server process against the real broker: 20 nodes, broadcast to a node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from brokerutil import wait_consuming
from safetensors.torch import load_file
from simnodes import (
    MODEL,
    broker_sections,
    encoder,
    publish,
    random_delta,
    setup_server_files,
    tiny_state,
    write_toml,
)

from waggle_trainer.transport import AmqpSettings, reference_spec
from waggle_trainer.transport.model_subscriber import ModelSubscriber
from waggle_trainer.transport.model_wire import load_verify_key

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


def start_server(cfg_path: Path, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "waggle_trainer",
            "--log-level",
            "info",
            "server",
            "--config",
            str(cfg_path),
        ],
        stdout=subprocess.PIPE,
        stderr=open(log_path, "wb"),
        env=env,
    )


def wait_for(pred, timeout: float, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def wait_log(path: Path, text: str, timeout: float) -> bool:
    return wait_for(lambda: text in path.read_text(errors="replace"), timeout, 0.02)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_twenty_nodes_give_the_weighted_average_and_nodes_receive_it(tmp_path, names, sim_user):
    nodes = [f"node{i:02d}" for i in range(20)]
    cfg = setup_server_files(
        tmp_path, nodes, aggregation={"min_updates": 20}, **broker_sections(names)
    )
    cfg["status"]["enabled"] = False
    log = tmp_path / "server.log"
    server = start_server(write_toml(tmp_path / "server.toml", cfg), log)
    names.node_queues.append(f"{names.models}.node00")
    sub = ModelSubscriber(
        AmqpSettings(connection_name="test"),
        node_id="node00",
        model=MODEL,
        verify_key=load_verify_key(tmp_path / "signing.pem.pub"),
        expected=reference_spec(tiny_state()),
        current_version="1",
        exchange=names.models,
        queue=f"{names.models}.node00",
        save_dir=tmp_path / "node00-models",
    )
    try:
        assert wait_log(log, "server running", 60), log.read_text()
        sub.start()
        # consuming: its queue is declared and bound (``connected`` is set before that)
        assert wait_consuming(f"{names.models}.node00", 60), sub.last_error
        base = tiny_state()
        num = {
            k: torch.zeros(v.shape, dtype=torch.float64)
            for k, v in base.items()
            if v.is_floating_point()
        }
        total = 0
        for i, n in enumerate(nodes):
            d = random_delta(i)
            samples = 5 + 3 * i
            u = encoder(n).encode_delta(
                d, base_version="1", round=1, samples=samples, metrics={"agreement": 0.6}
            )
            publish(sim_user, names.exchange, u.blob, u.update_id, n, chunk_size=400)
            total += samples
            for k in num:
                num[k] += d[k].double() * samples
        weights = tmp_path / "state" / "models" / MODEL / "v000002.json"
        assert wait_for(weights.exists, 60), log.read_text()
        got = load_file(str(weights.with_suffix(".safetensors")))
        for k in num:
            want = (base[k].double() + num[k] / total).float()
            assert torch.allclose(got[k], want, atol=1e-6), k
        # the node receives version 2, verified with the server's public key
        assert sub.wait_for("2", 30)
        mv = sub.take()
        assert mv.version == "2" and mv.envelope.accepts == ["2", "1"]
        assert all(torch.equal(mv.state[k], got[k]) for k in got)
        assert (tmp_path / "node00-models" / f"{MODEL}-2.wgm").exists()
        # models list / show / export from the command line
        cli = [
            sys.executable,
            "-m",
            "waggle_trainer",
            "models",
            "--config",
            str(tmp_path / "server.toml"),
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        out = subprocess.run(cli + ["list"], capture_output=True, text=True, env=env)
        rows = [line.split() for line in out.stdout.splitlines()]
        assert out.returncode == 0, out.stdout
        v2 = next(r for r in rows if r[:3] == [MODEL, "2", "1"])
        assert v2[-5:] == ["20", "20", str(total), "fedavg", "kept"], out.stdout
        out = subprocess.run(cli + ["show", MODEL, "2"], capture_output=True, text=True, env=env)
        manifest = json.loads(out.stdout)
        assert manifest["parent"] == "1" and manifest["samples"] == total
        assert sorted(c["node"] for c in manifest["contributors"]) == nodes
        assert {c["samples"] for c in manifest["contributors"]} == {5 + 3 * i for i in range(20)}
        out = subprocess.run(
            cli + ["export", MODEL, "2", str(tmp_path / "v2.safetensors")],
            capture_output=True,
            text=True,
            env=env,
        )
        assert out.returncode == 0, out.stdout
        assert torch.equal(load_file(str(tmp_path / "v2.safetensors"))["fc.bias"], got["fc.bias"])
    finally:
        sub.stop()
        stop(server)
    assert server.returncode == 0, log.read_text()


def reference_version(tmp: Path, nodes, big: int, rounds, **aggregation):
    """The versions one server computes from the same updates, in process."""
    from simnodes import make_config, messages

    from waggle_trainer.server.pipeline import UpdatePipeline

    p = UpdatePipeline(make_config(tmp, nodes, big=big, aggregation=aggregation))
    p.startup()
    with p.lock.held():
        for updates in rounds:
            for n, u in updates:
                for m in messages(u.blob, u.update_id, n):
                    p.handle(m).finish()
    return p.store


def test_failover_and_restart_after_sigkill_mid_aggregation(tmp_path, names, sim_user):
    nodes, big = ["a", "b", "c", "d"], 2_000_000
    agg = {"min_updates": 4, "window_s": 3600.0}
    cfg = setup_server_files(tmp_path, nodes, big=big, aggregation=agg, **broker_sections(names))
    cfg["status"]["enabled"] = False
    cfg["telemetry"] = dict(cfg["telemetry"], enabled=False)
    cfg_path = write_toml(tmp_path / "server.toml", cfg)
    store_dir = tmp_path / "state" / "models" / MODEL
    rounds = [
        [
            (
                n,
                encoder(n).encode_delta(
                    random_delta(10 * r + i, big=big),
                    base_version=str(r + 1),
                    round=r + 1,
                    samples=3 + i + r,
                ),
            )
            for i, n in enumerate(nodes)
        ]
        for r in range(2)
    ]
    procs = []
    try:
        logs = [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "c.log"]
        procs.append(start_server(cfg_path, logs[0]))
        assert wait_log(logs[0], "server running", 60), logs[0].read_text()
        time.sleep(0.5)  # the first consumer on a single-active-consumer queue is the active one
        procs.append(start_server(cfg_path, logs[1]))
        assert wait_log(logs[1], "server running", 60), logs[1].read_text()
        for n, u in rounds[0]:
            publish(sim_user, names.exchange, u.blob, u.update_id, n, chunk_size=4 << 20)
        # the active one (the broker's choice: normally the first) aggregates and is killed
        line = "aggregating 4 updates into version 2"
        assert wait_for(lambda: any(line in p.read_text() for p in logs[:2]), 60, 0.02), logs[
            0
        ].read_text()
        k = 0 if line in logs[0].read_text() else 1
        victim, survivor, survivor_log = procs[k], procs[1 - k], logs[1 - k]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert not (store_dir / "v000002.json").exists(), "the kill came after the aggregation"
        # the standby takes over and finishes the round
        assert wait_for((store_dir / "v000002.json").exists, 60), survivor_log.read_text()
        assert line in survivor_log.read_text()
        # round 2: the (now only) server is killed mid-aggregation and restarted
        for n, u in rounds[1]:
            publish(sim_user, names.exchange, u.blob, u.update_id, n, chunk_size=4 << 20)
        assert wait_log(survivor_log, "aggregating 4 updates into version 3", 60), (
            survivor_log.read_text()
        )
        survivor.send_signal(signal.SIGKILL)
        survivor.wait()
        assert not (store_dir / "v000003.json").exists(), "the kill came after the aggregation"
        restarted = start_server(cfg_path, logs[2])
        procs.append(restarted)
        assert wait_for((store_dir / "v000003.json").exists, 60), logs[2].read_text()
    finally:
        for p in procs:
            stop(p)
    ref = reference_version(tmp_path / "ref", nodes, big, rounds, **agg)
    from waggle_trainer.server.store import ModelStore

    got = ModelStore(tmp_path / "state" / "models")
    for v in ("2", "3"):
        a, b = got.get(MODEL, v), ref.get(MODEL, v)
        wa, wb = got.load_weights(a), ref.load_weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wb), f"version {v} differs"
        ids = [c["update_id"] for c in a.manifest["contributors"]]
        assert sorted(ids) == sorted(u.update_id for _, u in rounds[int(v) - 2])
    assert got.latest(MODEL).version == "3"  # nothing aggregated twice into a further version
    import sqlite3

    db = sqlite3.connect(tmp_path / "state" / "state.sqlite")
    assert db.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall() == [
        ("aggregated", 8)
    ]


def test_standby_takes_over_between_manifest_and_database_commit(tmp_path, names, sim_user):
    """The issue's reproduction with two real servers: the SQLite write lock is held
    (as a slow disk would) from the moment the active server starts aggregating until
    the new version's manifest is on disk; the active one is SIGKILLed, the lock
    released.  The standby counts every update once; the versions are bit-identical
    to one server's alone and none holds an update twice."""
    import sqlite3

    nodes, big = ["a", "b", "c", "d"], 500_000
    agg = {"min_updates": 4, "window_s": 3600.0}
    cfg = setup_server_files(tmp_path, nodes, big=big, aggregation=agg, **broker_sections(names))
    cfg["status"]["enabled"] = False
    cfg["telemetry"] = dict(cfg["telemetry"], enabled=False)
    cfg_path = write_toml(tmp_path / "server.toml", cfg)
    store_dir = tmp_path / "state" / "models" / MODEL
    rounds = [
        [
            (
                n,
                encoder(n).encode_delta(
                    random_delta(10 * r + i, big=big),
                    base_version=str(r + 1),
                    round=r + 1,
                    samples=3 + i + r,
                ),
            )
            for i, n in enumerate(nodes)
        ]
        for r in range(2)
    ]
    procs = []
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    lock = None
    try:
        procs.append(start_server(cfg_path, logs[0]))
        assert wait_log(logs[0], "server running", 60), logs[0].read_text()
        time.sleep(0.5)  # the first consumer on a single-active-consumer queue is the active one
        procs.append(start_server(cfg_path, logs[1]))
        assert wait_log(logs[1], "server running", 60), logs[1].read_text()
        for n, u in rounds[0]:
            publish(sim_user, names.exchange, u.blob, u.update_id, n, chunk_size=1 << 20)
        line = "aggregating 4 updates into version 2"
        assert wait_for(lambda: any(line in p.read_text() for p in logs), 60, 0.01)
        lock = sqlite3.connect(tmp_path / "state" / "state.sqlite", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the database commit of version 2 must wait
        k = 0 if line in logs[0].read_text() else 1
        assert wait_for((store_dir / "v000002.json").exists, 60, 0.01)
        procs[k].send_signal(signal.SIGKILL)
        procs[k].wait()
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        survivor_log = logs[1 - k]
        for n, u in rounds[1]:
            publish(sim_user, names.exchange, u.blob, u.update_id, n, chunk_size=1 << 20)
        assert wait_for((store_dir / "v000003.json").exists, 60), survivor_log.read_text()
        time.sleep(3)  # a further (wrong) version would appear now
    finally:
        if lock is not None:
            lock.close()
        for p in procs:
            stop(p)
    ref = reference_version(tmp_path / "ref", nodes, big, rounds, **agg)
    from waggle_trainer.server.store import ModelStore

    got = ModelStore(tmp_path / "state" / "models")
    assert got.latest(MODEL).version == "3", "a pool was aggregated twice"
    seen = []
    for v in ("2", "3"):
        a, b = got.get(MODEL, v), ref.get(MODEL, v)
        wa, wb = got.load_weights(a), ref.load_weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wb), f"version {v} differs"
        seen += [c["update_id"] for c in a.manifest["contributors"]]
    assert len(seen) == len(set(seen)) == 8
    db = sqlite3.connect(tmp_path / "state" / "state.sqlite")
    assert db.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall() == [
        ("aggregated", 8)
    ]
