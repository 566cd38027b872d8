"""Health and training metrics in the wagglemsg shape, on one of two routes.

Every message is ``{"name", "ts", "val", "meta"}``: ``name`` dotted
``[a-z0-9_]`` segments of at most 64 characters in all, ``ts`` integer
nanoseconds since the epoch, ``val`` a scalar (int, float or str), ``meta`` a
string-to-string map that always carries ``node`` and ``vsn``.

Where they go is a :class:`TelemetryRoute`:

* ``beehive`` - the topic exchange ``waggle.msg`` (Beehive's central exchange)
  with the metric name as routing key, transient, over the ``[transport]``
  connection (a node that holds Beehive credentials);
* ``node`` - the way a pywaggle plugin publishes (pywaggle 0.56
  ``waggle/plugin/rabbitmq.py``): the node's own broker, exchange
  ``to-validator`` (owned by that broker: only checked), routing key = the
  message's scope (``all``, ``node`` or ``beehive``), persistent, ``user_id`` =
  the broker user and ``app_id`` = the application's id when it has one.  The
  node's data service validates, tags and forwards them to Beehive.

:class:`Telemetry` is the thread-safe collector the daemon records into; it
keeps at most ``max_buffered`` messages in memory (oldest dropped and counted
while the broker is away - metrics are never spooled to disk).  Gauges are
sampled every ``interval_s`` (at most 120 s) by :class:`TelemetryPublisher`,
whose thread owns its own connection.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pika

from .amqp import AmqpSettings, AmqpWorker
from .wire import APP_ID, NODE_EXCHANGE, TELEMETRY_EXCHANGE

log = logging.getLogger(__name__)

ROUTES = ("beehive", "node")
SCOPES = ("all", "node", "beehive")
MAX_INTERVAL_S = 120.0
_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")

Scalar = int | float | str


def validate_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 64 or not _NAME.fullmatch(name):
        raise ValueError(f"metric name {name!r}: dotted [a-z0-9_] segments, at most 64 chars")
    return name


def make_message(name: str, value: Any, ts_ns: int, meta: Mapping[str, str]) -> dict[str, Any]:
    """A validated wagglemsg dict."""
    validate_name(name)
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, (int, float, str)):
        raise ValueError(f"metric {name}: value must be a scalar, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"metric {name}: value {value} is not finite")
    if not isinstance(ts_ns, int) or isinstance(ts_ns, bool) or ts_ns <= 0:
        raise ValueError(f"metric {name}: ts must be positive integer nanoseconds")
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metric {name}: meta must map strings to strings")
    if not meta.get("node") or not meta.get("vsn"):
        raise ValueError(f"metric {name}: meta.node and meta.vsn are required")
    return {"name": name, "ts": ts_ns, "val": value, "meta": dict(meta)}


class Telemetry:
    """Thread-safe metric collector with a bounded in-memory buffer."""

    def __init__(self, node_id: str, vsn: str, *, max_buffered: int = 1000):
        if not node_id or not vsn:
            raise ValueError("node_id and vsn are required for telemetry")
        if max_buffered < 1:
            raise ValueError("max_buffered must be positive")
        self.meta = {"node": node_id, "vsn": vsn}
        self._buf: deque[dict[str, Any]] = deque()
        self._max = max_buffered
        self._lock = threading.Lock()
        self._gauges: dict[str, Callable[[], Scalar | None]] = {}
        self.dropped = 0

    def record(
        self,
        name: str,
        value: Scalar,
        *,
        ts_ns: int | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Queue one measurement (validated now, so a bad name fails at the caller)."""
        msg = make_message(name, value, ts_ns or time.time_ns(), {**self.meta, **(meta or {})})
        with self._lock:
            if len(self._buf) >= self._max:
                self._buf.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning(
                        "telemetry buffer full (%d): %d oldest message(s) dropped so far",
                        self._max,
                        self.dropped,
                    )
            self._buf.append(msg)

    def gauge(self, name: str, fn: Callable[[], Scalar | None]) -> None:
        """Register a value sampled every publishing interval (None: skip)."""
        self._gauges[validate_name(name)] = fn

    def sample_gauges(self) -> None:
        ts = time.time_ns()
        for name, fn in list(self._gauges.items()):
            try:
                v = fn()
            except Exception:  # a broken gauge must not stop the others
                log.exception("telemetry gauge %s failed", name)
                continue
            if v is not None:
                self.record(name, v, ts_ns=ts)

    def peek(self, n: int) -> list[dict[str, Any]]:
        with self._lock:
            return [self._buf[i] for i in range(min(n, len(self._buf)))]

    def discard(self, msgs: list[dict[str, Any]]) -> None:
        """Remove messages that were delivered (they are at the front unless dropped)."""
        with self._lock:
            for m in msgs:
                if self._buf and self._buf[0] is m:
                    self._buf.popleft()

    def __len__(self) -> int:
        with self._lock:
            return len(self._buf)


def encode_message(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class TelemetryRoute:
    """Where and how metrics are published (see the module docstring)."""

    exchange: str = TELEMETRY_EXCHANGE
    #: "name": routing key = metric name (beehive); "scope": routing key = ``scope`` (node)
    routing: Literal["name", "scope"] = "name"
    scope: str = "all"
    app_id: str | None = APP_ID
    persistent: bool = False
    #: declare the exchange (needs configure permission) or only check that it exists
    declare_exchange: bool = True

    def __post_init__(self) -> None:
        if self.routing == "scope" and self.scope not in SCOPES:
            raise ValueError(f"scope {self.scope!r}: one of {', '.join(SCOPES)}")

    @classmethod
    def beehive(
        cls, exchange: str = TELEMETRY_EXCHANGE, *, declare_exchange: bool = True
    ) -> TelemetryRoute:
        return cls(exchange=exchange, declare_exchange=declare_exchange)

    @classmethod
    def node(cls, scope: str = "all", app_id: str | None = None) -> TelemetryRoute:
        """pywaggle's route: ``to-validator``, routing key = scope, persistent."""
        return cls(
            exchange=NODE_EXCHANGE,
            routing="scope",
            scope=scope,
            app_id=app_id or None,
            persistent=True,
            declare_exchange=False,
        )

    def routing_key(self, msg: Mapping[str, Any]) -> str:
        return self.scope if self.routing == "scope" else str(msg["name"])


class TelemetryPublisher(AmqpWorker):
    """Samples gauges every ``interval_s`` and sends everything buffered."""

    purpose = "telemetry"

    def __init__(
        self,
        amqp: AmqpSettings,
        telemetry: Telemetry,
        *,
        route: TelemetryRoute | None = None,
        exchange: str = TELEMETRY_EXCHANGE,
        interval_s: float = 60.0,
        declare_exchange: bool = True,
        batch: int = 200,
    ):
        """``route`` says where messages go; without it, the beehive route to
        ``exchange`` (declared unless ``declare_exchange=False``)."""
        super().__init__(amqp)
        if not 0 < interval_s <= MAX_INTERVAL_S:
            raise ValueError("interval_s must be within (0, 120] s")
        self.telemetry = telemetry
        self.route = route or TelemetryRoute.beehive(exchange, declare_exchange=declare_exchange)
        self.exchange = self.route.exchange
        self.interval_s = interval_s
        self.batch = batch
        self.sent = 0
        self.user_id = amqp.broker_user()
        self._sampler = threading.Thread(
            target=self._sample_loop, name="telemetry-sampler", daemon=True
        )

    def start(self) -> None:
        super().start()
        self._sampler.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        super().stop(timeout)
        self._sampler.join(timeout)

    def _sample_loop(self) -> None:
        # Sampling runs whether or not the broker is there: the buffer bridges gaps.
        self.telemetry.sample_gauges()
        while not self._stop.wait(self.interval_s):
            self.telemetry.sample_gauges()

    def _session(self, conn: pika.BlockingConnection) -> None:
        r = self.route
        ch = self._confirmed_channel(conn, r.exchange, r.declare_exchange)
        delivery = pika.DeliveryMode.Persistent if r.persistent else pika.DeliveryMode.Transient
        while not self._stop.is_set():
            msgs = self.telemetry.peek(self.batch)
            if not msgs:
                conn.process_data_events(time_limit=0.5)
                continue
            for m in msgs:
                props = pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=delivery,
                    timestamp=m["ts"] // 1_000_000_000,
                    user_id=self.user_id,
                    app_id=r.app_id,
                )
                # Confirmed, not mandatory: a metric nobody subscribes to is simply
                # dropped by the broker rather than held on the node.
                ch.basic_publish(r.exchange, r.routing_key(m), encode_message(m), props)
                self.telemetry.discard([m])
                self.sent += 1
