"""Fixtures for the transport tests that talk to the real RabbitMQ broker."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pika
import pytest
from brokerutil import BROKER, ensure_broker_running


@pytest.fixture(scope="session")
def broker():
    try:
        ensure_broker_running(60)
    except RuntimeError as e:
        pytest.fail(f"these tests need RabbitMQ at 127.0.0.1:5672 ({e})")
    yield
    ensure_broker_running()


@pytest.fixture
def names(broker):
    """Unique exchange and queue names for one test; deleted afterwards."""
    s = uuid.uuid4().hex[:10]
    n = SimpleNamespace(exchange=f"test.updates.{s}", queue=f"test.server.{s}",
                        dlx=f"test.dead.{s}", dlq=f"test.dead.{s}", telemetry=f"test.msg.{s}",
                        tq=f"test.msgq.{s}")
    yield n
    ensure_broker_running()
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    for q in (n.queue, n.dlq, n.tq):
        ch.queue_delete(q)
    for x in (n.exchange, n.dlx, n.telemetry):
        ch.exchange_delete(x)
    conn.close()
