"""What the nodes report on ``waggle.msg``, kept in memory for the status page.

A thread with its own connection listens on a server-named, exclusive queue
bound to the telemetry exchange (telemetry is transient: nothing to keep when
the server is away).  Per node it keeps the last value of every metric and a
bounded history of ``train.agreement``.  Messages that are not well-formed
wagglemsg are counted and dropped.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from typing import Any

import pika

from waggle_trainer.transport import metrics
from waggle_trainer.transport.amqp import AmqpSettings, AmqpWorker
from waggle_trainer.transport.telemetry import validate_name

MAX_NODES = 10_000


class TelemetryView(AmqpWorker):
    purpose = "telemetry-view"

    def __init__(self, amqp: AmqpSettings, *, exchange: str = "waggle.msg", history: int = 500):
        super().__init__(amqp)
        self.exchange = exchange
        self.history = history
        self._lock = threading.Lock()
        self._last: dict[str, dict[str, tuple[int, Any]]] = {}
        self._agreement: dict[str, deque[tuple[int, float]]] = {}
        self.received = 0
        self.malformed = 0

    def _session(self, conn: pika.BlockingConnection) -> None:
        ch = conn.channel()
        ch.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ch.queue_bind(q, self.exchange, routing_key="#")
        self._connected_ok()
        for method, _props, body in ch.consume(q, auto_ack=True, inactivity_timeout=0.5):
            if self._stop.is_set():
                break
            if method is not None:
                self.record(body)
        ch.cancel()

    def record(self, body: bytes) -> bool:
        """Take one wagglemsg body; False (and counted) when it is malformed."""
        try:
            msg = json.loads(body)
            name, ts, val, node = msg["name"], msg["ts"], msg["val"], msg["meta"]["node"]
            validate_name(name)
            if not isinstance(ts, int) or not isinstance(node, str) or not 0 < len(node) <= 64:
                raise ValueError("bad ts or node")
            if isinstance(val, bool) or not isinstance(val, (int, float, str)):
                raise ValueError("bad val")
            if isinstance(val, float) and not math.isfinite(val):
                raise ValueError("non-finite val")
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return False
        with self._lock:
            if node not in self._last and len(self._last) >= MAX_NODES:
                self.malformed += 1
                return False
            self.received += 1
            self._last.setdefault(node, {})[name] = (ts, val)
            if name == metrics.AGREEMENT.name and isinstance(val, (int, float)):
                self._agreement.setdefault(node, deque(maxlen=self.history)).append(
                    (ts, float(val))
                )
        return True

    def snapshot(
        self,
    ) -> tuple[dict[str, dict[str, tuple[int, Any]]], dict[str, list[tuple[int, float]]]]:
        """(last metrics per node, agreement history per node)."""
        with self._lock:
            return (
                {n: dict(m) for n, m in self._last.items()},
                {n: list(d) for n, d in self._agreement.items()},
            )
