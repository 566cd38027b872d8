"""Helpers for the transport tests that talk to the real RabbitMQ broker."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from types import SimpleNamespace

import pika

from waggle_trainer.transport.amqp import AmqpSettings

BROKER = pika.ConnectionParameters(
    "127.0.0.1",
    5672,
    "/",
    pika.PlainCredentials("guest", "guest"),
    connection_attempts=1,
    socket_timeout=5,
)


def rabbitmqctl(*args: str, timeout: float = 120) -> str:
    r = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def broker_up() -> bool:
    try:
        pika.BlockingConnection(BROKER).close()
        return True
    except Exception:  # noqa: BLE001
        return False


def ensure_broker_running(timeout: float = 90) -> None:
    """Wait for the shared broker at 127.0.0.1:5672 (``.ci/run`` starts it).  It is
    never started, stopped or reconfigured from a test: a test that needs a broker to
    die or to change its settings starts a private node (``tlsbroker.py``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if broker_up():
            return
        time.sleep(0.5)
    raise RuntimeError("RabbitMQ does not answer at 127.0.0.1:5672")


def wait_until(pred, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def consumer_count(queue: str, params: pika.ConnectionParameters = BROKER) -> int | None:
    """How many consumers ``queue`` has; None while it does not exist yet."""
    conn = pika.BlockingConnection(params)
    try:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return None
        raise
    finally:
        if conn.is_open:
            conn.close()


def wait_consuming(queue: str, timeout: float, params: pika.ConnectionParameters = BROKER) -> bool:
    """Wait until ``queue`` has a consumer.  A worker's ``connected`` flag is set as soon
    as its connection opens, *before* its session declares and binds its queue and
    starts consuming; a message published in between is not routed to that queue (it
    is dropped, or only reaches a test's own copy queue).  A consumer on the queue
    means the session has got that far: the server's ``declare_topology`` binds its
    queue before ``basic_consume``."""
    return wait_until(lambda: (consumer_count(queue, params) or 0) >= 1, timeout, 0.1)


def fast(**kw) -> AmqpSettings:
    """Local guest settings with quick reconnects (connection name 'test ...')."""
    return AmqpSettings(backoff_initial_s=0.2, backoff_max_s=2.0, connection_name="test", **kw)


def dead_letters(names) -> list[tuple[pika.BasicProperties, bytes]]:
    """Everything in the test's dead-letter queue (consumed)."""
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    out = []
    while True:
        m, props, body = ch.basic_get(names.dlq, auto_ack=True)
        if m is None:
            break
        out.append((props, body))
    conn.close()
    return out


def queue_depth(name: str) -> int:
    conn = pika.BlockingConnection(BROKER)
    n = conn.channel().queue_declare(name, passive=True).method.message_count
    conn.close()
    return n


@contextlib.contextmanager
def unique_names():
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
