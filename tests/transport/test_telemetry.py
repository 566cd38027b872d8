"""wagglemsg telemetry: validation, the bounded buffer, and delivery via the broker."""

from __future__ import annotations

import json
import logging

import pika
import pytest
from brokerutil import BROKER, wait_until

from waggle_trainer.transport import (
    AmqpSettings,
    Telemetry,
    TelemetryPublisher,
    make_message,
)


@pytest.mark.parametrize(
    "name", ["train.loss", "sys.edge_training.up", "mem.peak_bytes", "a" * 64, "x1.y_2.z3"]
)
def test_valid_names(name):
    assert make_message(name, 1, 1, {"node": "n", "vsn": "W1"})["name"] == name


@pytest.mark.parametrize(
    "name",
    ["Train.loss", "train..loss", ".train", "train.", "a" * 65, "train-loss", "train loss", ""],
)
def test_invalid_names(name):
    with pytest.raises(ValueError):
        make_message(name, 1, 1, {"node": "n", "vsn": "W1"})


@pytest.mark.parametrize(
    "value,ts,meta",
    [
        ([1], 1, {"node": "n", "vsn": "v"}),  # not a scalar
        (float("nan"), 1, {"node": "n", "vsn": "v"}),
        (1, 1.5, {"node": "n", "vsn": "v"}),  # ts must be integer ns
        (1, 1, {"node": "n"}),  # vsn missing
        (1, 1, {"node": "n", "vsn": "v", "x": 3}),  # meta values are strings
    ],
)
def test_invalid_messages(value, ts, meta):
    with pytest.raises(ValueError):
        make_message("a.b", value, ts, meta)


def test_record_shape_and_bounded_buffer(caplog):
    t = Telemetry("NODE1", "W01", max_buffered=3)
    t.record("train.round", 1)
    t.record("train.loss", 0.25, meta={"model": "resnet18"})
    m = t.peek(2)
    assert m[0]["meta"] == {"node": "NODE1", "vsn": "W01"}
    assert m[1] == {
        "name": "train.loss",
        "ts": m[1]["ts"],
        "val": 0.25,
        "meta": {"node": "NODE1", "vsn": "W01", "model": "resnet18"},
    }
    assert isinstance(m[1]["ts"], int) and m[1]["ts"] > 1_600_000_000 * 10**9
    with caplog.at_level(logging.WARNING):
        for i in range(5):
            t.record("train.round", i + 2)
    assert len(t) == 3 and t.dropped == 4 and "telemetry buffer full" in caplog.text
    assert [x["val"] for x in t.peek(10)] == [4, 5, 6]  # the newest kept
    t.gauge("outbox.bytes", lambda: 123)
    t.gauge("broken.gauge", lambda: 1 / 0)
    t.gauge("skipped.gauge", lambda: None)
    t.sample_gauges()
    assert t.peek(10)[-1]["name"] == "outbox.bytes" and t.peek(10)[-1]["val"] == 123
    with pytest.raises(ValueError):
        t.gauge("Bad Name", lambda: 1)


def test_interval_must_be_at_most_120_s():
    with pytest.raises(ValueError):
        TelemetryPublisher(AmqpSettings(), Telemetry("n", "v"), interval_s=121)


@pytest.mark.broker
def test_buffered_while_away_then_delivered_as_wagglemsg(names):
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    ch.exchange_declare(names.telemetry, "topic", durable=True)
    ch.queue_declare(names.tq, durable=False, auto_delete=False)
    ch.queue_bind(names.tq, names.telemetry, "#")
    t = Telemetry("NODE1", "W01", max_buffered=50)
    # the broker is "away": nothing runs, 60 records land in a 50-message buffer
    for i in range(60):
        t.record("train.round", i)
    assert len(t) == 50 and t.dropped == 10
    t.gauge("sys.edge_training.up", lambda: 1)
    pub = TelemetryPublisher(
        AmqpSettings(backoff_initial_s=0.2, connection_name="test"),
        t,
        exchange=names.telemetry,
        interval_s=0.5,
    )
    try:
        pub.start()
        assert wait_until(lambda: pub.sent >= 52, 10)  # 50 buffered + gauge samples
    finally:
        pub.stop()
    msgs = []
    while True:
        m, props, body = ch.basic_get(names.tq, auto_ack=True)
        if m is None:
            break
        msgs.append((m.routing_key, json.loads(body)))
    conn.close()
    rounds = [b["val"] for k, b in msgs if k == "train.round"]
    # the newest survive; gauge samples taken before the connection is up (one per
    # 0.5 s: more than one on a loaded machine) push out as many of the oldest rounds
    assert 10 <= t.dropped < 50 and rounds == list(range(t.dropped, 60))
    ups = [b for k, b in msgs if k == "sys.edge_training.up"]
    assert len(ups) >= 2  # sampled every interval
    for k, b in msgs:
        assert set(b) == {"name", "ts", "val", "meta"} and b["name"] == k
        assert b["meta"]["node"] == "NODE1" and b["meta"]["vsn"] == "W01"
        assert isinstance(b["ts"], int)
    assert len(t) == 0
