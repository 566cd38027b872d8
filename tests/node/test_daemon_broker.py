"""The daemon against the real broker (stand-in loop): updates delivered and removed
from the outbox, and the Beehive metrics under train.* with meta node/vsn."""

from __future__ import annotations

import json
import time

import pika
import pytest
from brokerutil import BROKER

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
