"""Fixtures for the transport tests that talk to the real RabbitMQ broker."""

from __future__ import annotations

import logging
import uuid
from types import SimpleNamespace

import pika
import pytest
from brokerutil import BROKER, ensure_broker_running


@pytest.fixture(autouse=True)
def _pika_quiet_like_the_cli():
    """The command line's logging set-up (``common.setup_logging``) silences pika's
    own multi-line reports; tests see the log lines a user of the CLI sees."""
    pika_log = logging.getLogger("pika")
    level = pika_log.level
    pika_log.setLevel(logging.CRITICAL)
    yield
    pika_log.setLevel(level)


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
    n = SimpleNamespace(
        exchange=f"test.updates.{s}",
        queue=f"test.server.{s}",
        dlx=f"test.dead.{s}",
        dlq=f"test.dead.{s}",
        telemetry=f"test.msg.{s}",
        tq=f"test.msgq.{s}",
    )
    yield n
    ensure_broker_running()
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    for q in (n.queue, n.dlq, n.tq):
        ch.queue_delete(q)
    for x in (n.exchange, n.dlx, n.telemetry):
        ch.exchange_delete(x)
    conn.close()
