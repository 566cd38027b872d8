"""Server side of the update wire: reassemble, verify, de-duplicate, hand over.

The consumer's queue is durable and bound to the update exchange.  Chunks stay
unacknowledged until their whole update is verified and handled, so a consumer
crash loses nothing (the broker redelivers).  Then every chunk is acked -
duplicates too.  An update whose id was already handled is acked and counted
as a duplicate (publishers resend a whole update when a connection drops
before all confirms arrived).

A chunk or update that fails verification is copied to the dead-letter
exchange with ``x-waggle-reject-code`` / ``x-waggle-reject-reason`` headers and
then acked, so it never blocks the queue.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable, Mapping

import pika

from .amqp import AmqpSettings, AmqpWorker
from .chunks import ChunkError, Reassembler, parse_headers
from .codec import DecodedUpdate, Envelope, UpdateDecoder, UpdateRejected
from .publisher import UPDATE_EXCHANGE

DEAD_LETTER_EXCHANGE = "waggle.train.dead"
DEAD_LETTER_QUEUE = "waggle.train.dead"
SERVER_QUEUE = "waggle.train.updates.server"


class SeenUpdates:
    """Bounded memory of handled update ids (least recently seen forgotten).
    A server that must de-duplicate across restarts passes its own object with
    ``__contains__`` and ``add`` backed by its model store."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, update_id: str) -> bool:
        if update_id in self._ids:
            self._ids.move_to_end(update_id)
            return True
        return False

    def add(self, update_id: str) -> None:
        self._ids[update_id] = None
        self._ids.move_to_end(update_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


class UpdateConsumer(AmqpWorker):
    purpose = "update-consumer"

    def __init__(self, amqp: AmqpSettings, *, keys: Any,
                 reference: Mapping[str, Any] | Callable[[Envelope], Mapping[str, Any] | None],
                 on_update: Callable[[DecodedUpdate], None],
                 exchange: str = UPDATE_EXCHANGE, queue: str = SERVER_QUEUE,
                 binding_key: str = "update.*",
                 dead_letter_exchange: str = DEAD_LETTER_EXCHANGE,
                 dead_letter_queue: str = DEAD_LETTER_QUEUE,
                 expected_model: str | None = None, max_update_bytes: int = 1 << 30,
                 prefetch: int = 256, partial_timeout_s: float = 3600.0,
                 seen: Any | None = None):
        super().__init__(amqp)
        self.decoder = UpdateDecoder(keys, max_update_bytes=max_update_bytes)
        self.reference = reference
        self.on_update = on_update
        self.exchange, self.queue, self.binding_key = exchange, queue, binding_key
        self.dlx, self.dlq = dead_letter_exchange, dead_letter_queue
        self.expected_model = expected_model
        self.prefetch = prefetch
        self.partial_timeout_s = partial_timeout_s
        self.seen = seen if seen is not None else SeenUpdates()
        # One update never needs more chunks than prefetch allows, or it could not complete.
        self._reasm = Reassembler(max_update_bytes=max_update_bytes, max_chunks=prefetch)
        self._deliveries: dict[int, tuple[str, pika.BasicProperties, bytes]] = {}
        self.accepted = 0
        self.duplicates = 0
        self.rejected: dict[str, int] = {}
        self.chunks = 0

    def declare(self, ch) -> None:
        """Exchanges, queues and bindings this consumer relies on (idempotent)."""
        ch.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        ch.exchange_declare(self.dlx, exchange_type="fanout", durable=True)
        ch.queue_declare(self.dlq, durable=True)
        ch.queue_bind(self.dlq, self.dlx)
        ch.queue_declare(self.queue, durable=True,
                         arguments={"x-dead-letter-exchange": self.dlx})
        ch.queue_bind(self.queue, self.exchange, routing_key=self.binding_key)

    def stats(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "duplicates": self.duplicates,
                "rejected": dict(self.rejected), "chunks": self.chunks}

    # -- the consumer thread --------------------------------------------------
    def _session(self, conn: pika.BlockingConnection) -> None:
        # Unacked deliveries of a lost connection are redelivered: start afresh.
        self._reasm.clear()
        self._deliveries.clear()
        ch = conn.channel()
        self.declare(ch)
        ch.basic_qos(prefetch_count=self.prefetch)
        self._dl_ch = conn.channel()
        self._dl_ch.confirm_delivery()
        self._connected_ok()
        for method, props, body in ch.consume(self.queue, inactivity_timeout=0.5):
            if self._stop.is_set():
                break
            if method is not None:
                self._handle(ch, method, props, body)
            for uid, tags in self._reasm.expire(self.partial_timeout_s):
                self._reject(ch, tags, "incomplete",
                             f"update {uid} incomplete after {self.partial_timeout_s:.0f} s")
        ch.cancel()

    def _handle(self, ch, method, props: pika.BasicProperties, body: bytes) -> None:
        tag = method.delivery_tag
        self.chunks += 1
        self._deliveries[tag] = (method.routing_key, props, body)
        try:
            uid, idx, cnt, sha = parse_headers(props.headers, props.message_id)
            done = self._reasm.add(uid, idx, cnt, sha, body, tag)
        except ChunkError as e:
            self._reject(ch, getattr(e, "tags", [tag]), e.code, e.reason)
            return
        if done is None:
            return
        try:
            decoded = self.decoder.decode(done.blob, self.reference,
                                          expected_model=self.expected_model)
            if decoded.envelope.update_id != uid:
                raise UpdateRejected("headers", "update_id header differs from the envelope")
        except UpdateRejected as e:
            self._reject(ch, done.tags, e.code, e.reason)
            return
        if uid in self.seen:
            self.duplicates += 1
            self._log.info("duplicate update %s from %s ignored", uid, decoded.envelope.node_id)
            self._ack(ch, done.tags)
            return
        try:
            self.on_update(decoded)
        except Exception as e:  # noqa: BLE001 - a failing handler must not kill the consumer
            self._log.exception("handler failed for update %s", uid)
            self._reject(ch, done.tags, "handler", f"handler failed: {e!r}")
            return
        self.seen.add(uid)
        self.accepted += 1
        self._ack(ch, done.tags)

    def _ack(self, ch, tags) -> None:
        for t in tags:
            ch.basic_ack(t)
            self._deliveries.pop(t, None)

    def _reject(self, ch, tags, code: str, reason: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        self._log.warning("rejected %d message(s) to %s: %s: %s", len(tags), self.dlx, code,
                          reason)
        for t in tags:
            routing_key, props, body = self._deliveries.pop(t)
            headers = dict(props.headers or {})
            headers.update({"x-waggle-reject-code": code, "x-waggle-reject-reason": reason,
                            "x-waggle-original-exchange": self.exchange,
                            "x-waggle-original-routing-key": routing_key,
                            "x-waggle-rejected-ns": time.time_ns()})
            if props.user_id:
                headers["x-waggle-original-user-id"] = props.user_id
            dl_props = pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent, content_type=props.content_type,
                message_id=props.message_id, type=props.type, app_id=props.app_id,
                timestamp=props.timestamp, headers=headers)
            self._dl_ch.basic_publish(self.dlx, routing_key, body, dl_props)
            ch.basic_ack(t)
