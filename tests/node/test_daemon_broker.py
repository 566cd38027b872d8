"""The daemon against the real broker (stand-in loop): updates delivered and removed
from the outbox, and the Beehive metrics under train.* with meta node/vsn."""

from __future__ import annotations

import json
import time

import pika
import pytest
from brokerutil import BROKER, wait_consuming

from tests.node.nodeutil import make_daemon

pytestmark = pytest.mark.broker

REQUIRED = {
    "train.round",
    "train.agreement",
    "train.rollbacks",
    "train.teacher_calls_per_frame",
    "train.frames_seen",
    "train.frames_skipped",
    "train.samples",
    "train.memory.budget_bytes",
    "train.memory.allocator",
    "train.plan.strategy",
    "train.plan.predicted_peak_bytes",
    "train.plan.measured_peak_bytes",
    "train.step_time_s",
    "train.outbox.updates",
    "train.outbox.bytes",
    "train.publish.last_confirmed_age_s",
    "train.update_bytes",
}


def test_updates_delivered_and_metrics_reported(node, names, tmp_path):
    key = tmp_path / "hmac.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    for x in (names.exchange, names.telemetry):
        ch.exchange_declare(x, exchange_type="topic", durable=True)
    ch.queue_declare(names.queue, durable=True)  # survives another test restarting the broker
    ch.queue_bind(names.queue, names.exchange, routing_key="update.*")
    ch.queue_declare(names.tq, durable=True)
    ch.queue_bind(names.tq, names.telemetry, routing_key="train.#")
    path, cfg = node(
        node={"id": "nodeb", "vsn": "W0B"},
        transport={"enabled": True, "exchange": names.exchange, "hmac_key_file": str(key)},
        telemetry={"enabled": True, "exchange": names.telemetry, "interval_s": 0.5},
        daemon={"stop_flush_s": 30.0},
    )
    d = make_daemon(cfg, path, reject_every=3, max_rounds=4)
    assert d.run() == 0
    assert len(d.outbox) == 0 and d.publisher.published_updates == 3  # rounds 1, 2, 4
    chunks = []
    for _ in range(50):
        method, props, body = ch.basic_get(names.queue, auto_ack=True)
        if method is None:
            break
        chunks.append(props.headers["update_id"])
    assert sorted(chunks) == sorted(f"nodeb-{d.epoch}-r{r}" for r in (1, 2, 4))
    msgs = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        method, props, body = ch.basic_get(names.tq, auto_ack=True)
        if method is None:
            if REQUIRED <= {m["name"] for m in msgs}:
                break
            time.sleep(0.1)
            continue
        msgs.append(json.loads(body))
    conn.close()
    assert REQUIRED <= {m["name"] for m in msgs}, REQUIRED - {m["name"] for m in msgs}
    for m in msgs:
        assert m["meta"] == {"node": "nodeb", "vsn": "W0B"}
        assert isinstance(m["ts"], int) and m["ts"] > 1_600_000_000 * 10**9
        assert isinstance(m["val"], (int, float, str))
    last = {m["name"]: m["val"] for m in msgs}
    assert last["train.round"] == 4 and last["train.rollbacks"] == 1
    assert last["train.outbox.updates"] == 0 and last["train.plan.strategy"] == "none"
    assert 0 <= last["train.publish.last_confirmed_age_s"] < 30


def test_run_takes_the_node_route_and_only_checks_exchanges(node, names, tmp_path):
    """[telemetry] route = "node" and [transport] declare_exchanges = false reach the
    daemon's connections: metrics to the node broker's to-validator (routing key =
    scope, app_id), updates to an exchange the daemon did not declare."""
    import uuid

    key = tmp_path / "hmac.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    node_id = f"n{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    # the operator's exchange, declared unlike the daemon would (not durable): a declare
    # from the daemon would be refused (406), a passive check is not
    ch.exchange_declare(names.exchange, exchange_type="topic", durable=False)
    ch.queue_declare(names.queue, durable=True)
    ch.queue_bind(names.queue, names.exchange, routing_key="update.*")
    ch.exchange_declare("to-validator", "fanout", durable=True)  # the node broker's
    tq = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(tq, "to-validator")
    path, cfg = node(
        node={"id": node_id, "vsn": "W0N"},
        transport={
            "enabled": True,
            "exchange": names.exchange,
            "hmac_key_file": str(key),
            "declare_exchanges": False,
        },
        telemetry={
            "enabled": True,
            "route": "node",
            "host": "127.0.0.1",
            "username": "guest",
            "password": "guest",
            "scope": "node",
            "app_id": "pod-1",
            "interval_s": 0.5,
        },
        daemon={"stop_flush_s": 30.0},
    )
    try:
        d = make_daemon(cfg, path, reject_every=0, max_rounds=2)
        assert d.run() == 0
        assert d.publisher.published_updates == 2 and len(d.outbox) == 0
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "train.round" not in {m["name"] for _, m in got}:
            method, props, body = ch.basic_get(tq, auto_ack=True)
            if method is None:
                time.sleep(0.1)
                continue
            msg = json.loads(body)
            if msg["meta"].get("node") == node_id:  # other tests may share to-validator
                got.append((method.routing_key, msg))
                assert props.app_id == "pod-1" and props.delivery_mode == 2
        assert "train.round" in {m["name"] for _, m in got}
        assert {rk for rk, _ in got} == {"node"}
        assert ch.queue_declare(names.queue, passive=True).method.message_count == 2
    finally:
        ch.queue_delete(tq)
        try:
            ch.exchange_delete("to-validator", if_unused=True)  # unless another run uses it
        except pika.exceptions.ChannelClosedByBroker:
            pass
        if conn.is_open:
            conn.close()


def test_a_node_that_lost_its_state_is_heard_again_at_once(node, names, tmp_path):
    """The real daemon publishes through the real broker to the server's consumer and
    pipeline.  Its state file is lost; the next start (a new epoch, round 1 again) is
    accepted at once.  A replay of an update already accepted is not counted again,
    and a late update of the epoch the node left is refused (``replay``)."""
    import os

    import torch
    from safetensors.torch import save_file

    from tests.node.standin import StandInLoop
    from waggle_trainer.server.config import server_config_from_dict
    from waggle_trainer.server.consumer import ServerConsumer
    from waggle_trainer.server.pipeline import UpdatePipeline
    from waggle_trainer.server.state import StateDB
    from waggle_trainer.transport import CodecSettings, UpdateEncoder
    from waggle_trainer.transport.chunks import split
    from waggle_trainer.transport.wire import update_id_for

    key = tmp_path / "hmac.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    weights = tmp_path / "student.safetensors"
    path, cfg = node(
        node={"id": "node_lost", "vsn": "W0L"},
        transport={"enabled": True, "exchange": names.exchange, "hmac_key_file": str(key)},
        student={"weights": str(weights)},
        daemon={"stop_flush_s": 30.0},
    )
    initial = {k: v.clone() for k, v in StandInLoop(cfg, tmp_path).student.state_dict().items()}
    save_file(initial, str(weights), metadata={"version": "1"})
    keys = tmp_path / "server-keys"
    keys.mkdir()
    (keys / "node_lost.key").write_bytes(b"k" * 32)
    os.chmod(keys / "node_lost.key", 0o600)
    scfg = server_config_from_dict(
        {
            "server": {"state_dir": str(tmp_path / "server")},
            "verify": {"keys_dir": str(keys), "require_user_id": False},
            "aggregation": {"min_updates": 10**6, "window_s": 1e9},
            "broadcast": {"enabled": False},
            "telemetry": {"enabled": False},
            "status": {"enabled": False},
            "models": {cfg.student.arch: {"initial_weights": str(weights)}},
            "queue": {
                "exchange": names.exchange,
                "queue": names.queue,
                "dead_letter_exchange": names.dlx,
                "dead_letter_queue": names.dlq,
            },
        }
    )
    pipeline = UpdatePipeline(scfg)
    pipeline.startup()
    server = ServerConsumer(scfg, pipeline)
    server.start()

    def rows() -> dict[str, str]:
        db = StateDB(tmp_path / "server" / "state.sqlite", readonly=True)
        try:
            return dict(db.conn.execute("SELECT update_id, status FROM updates").fetchall())
        finally:
            db.close()

    def refusals() -> list[tuple[str, str]]:
        db = StateDB(tmp_path / "server" / "state.sqlite", readonly=True)
        try:
            return db.conn.execute("SELECT code, reason FROM rejections").fetchall()
        finally:
            db.close()

    def wait(pred, timeout=30.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not pred():
            time.sleep(0.1)
        return pred()

    try:
        # consuming, so its queue is declared and bound: the copy queue below would
        # otherwise take a chunk the server's queue missed, without an unroutable return
        assert wait_consuming(names.queue, 60), server.last_error
        conn = pika.BlockingConnection(BROKER)
        ch = conn.channel()  # a copy of every chunk, to replay later
        ch.queue_declare(names.tq, durable=True)
        ch.queue_bind(names.tq, names.exchange, routing_key="update.*")
        first = make_daemon(cfg, path, reject_every=100, max_rounds=3)
        assert first.run() == 0 and first.publisher.published_updates == 3
        old_ids = [update_id_for("node_lost", first.epoch, r) for r in (1, 2, 3)]
        assert wait(lambda: set(old_ids) <= set(rows())), rows()
        # the node loses its state (a new SD card, a wiped state directory)
        (tmp_path / "state" / "node" / "state.safetensors").unlink()
        second = make_daemon(cfg, path, reject_every=100, max_rounds=2)
        assert second.run() == 0 and second.epoch != first.epoch
        new_ids = [update_id_for("node_lost", second.epoch, r) for r in (1, 2)]
        assert wait(lambda: set(new_ids) <= set(rows())), (rows(), refusals())
        assert refusals() == []
        assert rows()[new_ids[-1]] == "pending"  # heard at once: it is the node's pool entry
        # a true replay: every chunk of the first run again, byte for byte
        copies = []
        while True:
            m, props, body = ch.basic_get(names.tq, auto_ack=True)
            if m is None:
                break
            copies.append((props, body))
        assert {p.headers["update_id"] for p, _ in copies} == set(old_ids + new_ids)
        # Confirmed and mandatory, as a node publishes.  The work queue is a quorum
        # queue: a burst published without confirms on a channel that is closed at once
        # can lose its tail there for good (RabbitMQ 3.10.8: the first 2-4 of 6 kept in
        # about 1 burst of 20, while a classic queue bound beside it got all 6).  The
        # late update's chunks come last, so the server never saw them and refused
        # nothing.  A quorum queue confirms a message once it holds it.
        ch.confirm_delivery()
        for props, body in copies:
            if props.headers["update_id"] in old_ids:
                ch.basic_publish(names.exchange, "update.node_lost", body, props, mandatory=True)
        # a late update of the epoch the node left, properly signed
        late = UpdateEncoder(
            node_id="node_lost",
            vsn="W0L",
            model=cfg.student.arch,
            key=b"k" * 32,
            settings=CodecSettings("fp32", "none"),
        ).encode_delta(
            {k: torch.zeros_like(v) for k, v in initial.items() if v.is_floating_point()},
            base_version="1",
            round=4,
            samples=1,
            update_id=update_id_for("node_lost", first.epoch, 4),
        )
        for c in split(late.update_id, late.blob):
            ch.basic_publish(
                names.exchange,
                "update.node_lost",
                c.body,
                pika.BasicProperties(delivery_mode=2, message_id=c.message_id, headers=c.headers()),
                mandatory=True,
            )
        conn.close()
        assert wait(lambda: [c for c, _ in refusals()] == ["replay"]), refusals()
        assert wait(lambda: pipeline.db.counters().get("duplicate_chunks", 0) >= 3)
    finally:
        server.stop()
    final = rows()  # nothing counted twice; the late update recorded as refused
    assert sorted(u for u, st in final.items() if st != "rejected") == sorted(old_ids + new_ids)
    assert final[late.update_id] == "rejected"
    assert first.epoch in refusals()[0][1] and second.epoch in refusals()[0][1]
