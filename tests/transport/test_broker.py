"""The node's publisher against the real RabbitMQ broker at 127.0.0.1:5672.

The tests that need the receiving end (the server's consumer) are in
``tests/server/test_node_to_server.py``.

Every test uses its own exchange and queues (uuid suffix) and leaves the broker
running even when it fails.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pika
import pytest
import torch
from brokerutil import (
    BROKER,
    fast,
    wait_until,
)

from waggle_trainer.transport import (
    CodecSettings,
    Outbox,
    UpdateEncoder,
    UpdatePublisher,
)

pytestmark = pytest.mark.broker

KEY = b"integration-test-key-0123456789ab"
ROOT = Path(__file__).resolve().parents[2]


def encoder(node="n1") -> UpdateEncoder:
    return UpdateEncoder(
        node_id=node, vsn="W0T", model="m", key=KEY, settings=CodecSettings("fp32", "none")
    )


def make_update(n: int, round: int = 1, node="n1", enc=None):
    delta = {"w": torch.randn(n)}
    u = (enc or encoder(node)).encode_delta(delta, base_version="1", round=round, samples=8)
    return u, delta


# ---------------------------------------------------------------------- (e)


def test_unroutable_update_stays_in_the_outbox_and_is_logged_once(names, tmp_path, caplog):
    outbox = Outbox(tmp_path, 1 << 30)
    pub = UpdatePublisher(
        fast(), outbox, node_id="n1", exchange=names.exchange, unroutable_retry_s=0.2
    )
    enc = encoder()
    u, _ = make_update(1000, round=1, enc=enc)
    u2 = enc.encode_delta({"w": torch.randn(10)}, base_version="2", round=2, samples=8)
    try:
        with caplog.at_level(logging.INFO, logger="waggle_trainer.transport"):
            pub.start()
            pub.submit(u)
            pub.submit(u2)
            assert wait_until(lambda: pub.unroutable >= 6, 10)  # retried, not dropped
            assert u.update_id in outbox and len(outbox) == 2
            assert pub.published_updates == 0 and pub.fatal_error is None
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            # one line for the episode, not one per update and retry
            assert len(errors) == 1 and "unroutable" in errors[0] and u.update_id in errors[0]
            assert pub.unroutable_episodes == 1
            # once something is bound, the kept updates go out
            conn = pika.BlockingConnection(BROKER)
            ch = conn.channel()
            ch.queue_declare(names.queue, durable=True)
            ch.queue_bind(names.queue, names.exchange, "update.*")
            assert pub.wait_idle(10)
        m, props, body = ch.basic_get(names.queue, auto_ack=True)
        conn.close()
        assert props.message_id == f"{u.update_id}:0" and body == u.blob
        assert props.user_id == "guest" and props.delivery_mode == 2
        again = [r.getMessage() for r in caplog.records if "routable again" in r.getMessage()]
        assert len(again) == 1 and f"after {pub.unroutable} unroutable" in again[0]
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    finally:
        pub.stop()


# ---------------------------------------------------------------------- (f)


def test_wrong_credentials_give_a_clear_error_and_no_busy_loop(names, tmp_path, caplog):
    outbox = Outbox(tmp_path, 1 << 30)
    pub = UpdatePublisher(
        fast(password="not-the-password"), outbox, node_id="n1", exchange=names.exchange
    )
    u, _ = make_update(1000)
    pub.submit(u)
    with caplog.at_level(logging.ERROR):
        pub.start()
        time.sleep(4.0)  # with 0.2 s backoff a retry loop would have tried ~10 times
    assert pub.connect_attempts == 1
    assert not pub.running
    assert pub.fatal_error is not None and "authentication refused" in str(pub.fatal_error)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "username/password" in errors[0]
    assert u.update_id in outbox  # kept for when the configuration is fixed
    pub.stop()
