"""Fixtures for the server tests: broker names, a user that may publish as any node."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pika
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transport"))

from brokerutil import BROKER, ensure_broker_running, rabbitmqctl

SIM_USER, SIM_PASSWORD = "wt-server-sim", "wt-server-sim-pw"


@pytest.fixture(scope="session")
def sim_user():
    """A broker user with the ``impersonator`` tag: the broker lets it set any
    ``user_id``, so one connection can stand for many nodes (each real node has
    its own broker user, whose id the broker checks)."""
    try:
        ensure_broker_running(60)
    except RuntimeError as e:
        pytest.fail(f"these tests need RabbitMQ at 127.0.0.1:5672 ({e})")
    try:
        rabbitmqctl("add_user", SIM_USER, SIM_PASSWORD)
    except RuntimeError as e:
        if "already exists" not in str(e):
            raise
    rabbitmqctl("set_user_tags", SIM_USER, "impersonator")
    rabbitmqctl("set_permissions", "-p", "/", SIM_USER, ".*", ".*", ".*")
    yield pika.ConnectionParameters(
        "127.0.0.1", 5672, "/", pika.PlainCredentials(SIM_USER, SIM_PASSWORD)
    )
    ensure_broker_running()
    rabbitmqctl("delete_user", SIM_USER)


@pytest.fixture
def names(sim_user):
    """Unique exchange and queue names for one test; deleted afterwards."""
    s = uuid.uuid4().hex[:10]
    n = SimpleNamespace(
        exchange=f"test.updates.{s}",
        queue=f"test.server.{s}",
        dlx=f"test.dead.{s}",
        dlq=f"test.dead.{s}",
        models=f"test.models.{s}",
        telemetry=f"test.msg.{s}",
        node_queues=[],
    )
    yield n
    ensure_broker_running()
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    for q in (n.queue, n.dlq, *n.node_queues):
        ch.queue_delete(q)
    for x in (n.exchange, n.dlx, n.models, n.telemetry):
        ch.exchange_delete(x)
    conn.close()
