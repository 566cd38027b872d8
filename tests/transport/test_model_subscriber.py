"""The node's model subscriber against the real RabbitMQ broker at 127.0.0.1:5672,
waiting for a queue the operator has not created yet (``declare=False``, as on
Beehive): one WARNING for the wait, quiet retries, one INFO line when it is there."""

from __future__ import annotations

import logging

import pika
import pytest
import torch
from brokerutil import BROKER, fast, wait_until

from waggle_trainer.server.signing import generate_signing_key, load_signing_key
from waggle_trainer.transport.chunks import split
from waggle_trainer.transport.model_subscriber import ModelSubscriber
from waggle_trainer.transport.model_wire import encode_model, load_verify_key
from waggle_trainer.transport.wire import MODEL_MESSAGE_TYPE, model_routing_key

pytestmark = pytest.mark.broker


def lines(caplog, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and text in r.getMessage() and r.name.startswith("waggle_trainer")
    ]


def publish_version(names, key_path, version: str, state) -> None:
    env, blob = encode_model(
        state,
        model="m",
        version=version,
        parent="1",
        accepts=[version, "1"],
        key=load_signing_key(key_path),
    )
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    for c in split(env.broadcast_id, blob, 1000):
        props = pika.BasicProperties(
            delivery_mode=2, message_id=c.message_id, headers=c.headers(), type=MODEL_MESSAGE_TYPE
        )
        ch.basic_publish(names.exchange, model_routing_key("m"), c.body, props)
    conn.close()


def test_missing_queue_is_one_warning_per_episode_then_one_line_when_there(names, tmp_path, caplog):
    key_path = tmp_path / "server.pem"
    generate_signing_key(key_path)
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    ch.exchange_declare(names.exchange, exchange_type="topic", durable=True)  # the operator's
    sub = ModelSubscriber(
        fast(),  # backoff 0.2 s .. 2 s
        node_id="n1",
        model="m",
        verify_key=load_verify_key(tmp_path / "server.pem.pub"),
        current_version="1",
        exchange=names.exchange,
        queue=names.queue,
        declare=False,
    )
    missing = f"the model queue {names.queue!r} does not exist yet"
    try:
        with caplog.at_level(logging.DEBUG, logger="waggle_trainer.transport"):
            sub.start()
            assert wait_until(lambda: sub.connect_attempts >= 5, 15)
            # the first check says what is missing and how often it is checked, once
            assert lines(caplog, logging.WARNING, "") == [
                f"models: {missing}; retrying at most 2 s apart"
            ]
            assert len(lines(caplog, logging.DEBUG, missing)) >= 3  # the retries, quietly
            assert len(lines(caplog, logging.INFO, "connected to")) == 1
            assert sub.last_error == missing and sub.fatal_error is None

            # the operator's definitions create and bind it: one line, and it receives
            ch.queue_declare(names.queue, durable=True)
            ch.queue_bind(names.queue, names.exchange, routing_key=model_routing_key("m"))
            assert wait_until(lambda: lines(caplog, logging.INFO, "is there now"), 10)
            [there] = lines(caplog, logging.INFO, "is there now")
            assert there.startswith(f"models: the model queue {names.queue!r} is there now")
            state = {"w": torch.randn(8, 4)}
            publish_version(names, key_path, "2", state)
            assert sub.wait_for("2", 10), sub.last_error
            assert torch.equal(sub.take().state["w"], state["w"])
            assert sub.last_error is None and len(lines(caplog, logging.WARNING, "")) == 1

            # the queue goes away again: a new episode, a new warning
            ch.queue_delete(names.queue)
            assert wait_until(lambda: len(lines(caplog, logging.WARNING, missing)) == 2, 10)
            assert len(lines(caplog, logging.INFO, "is there now")) == 1
    finally:
        sub.stop()
        conn.close()
    assert sub.fatal_error is None and not sub.running
