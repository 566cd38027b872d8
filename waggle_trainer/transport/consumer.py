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

No message stops the consumer.  An unexpected error while handling one update
(a bug, a failing ``reference`` or ``on_update``) is logged with its traceback
and dead-letters that update (code ``internal``, or ``handler`` when
``on_update`` raised).  Only a broker error (``pika.exceptions.AMQPError``,
also from ``on_update``) ends the session: the consumer reconnects and the
broker redelivers.  An update whose handling ended the session ``max_attempts``
times is dead-lettered (``redelivered``) instead of being tried forever; if even
that ends the session, it is dropped (acked, logged as an ERROR, counted as
``dropped``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as px

from .amqp import AmqpSettings, AmqpWorker
from .chunks import ChunkError, Reassembler, parse_headers
from .codec import DecodedUpdate, Envelope, UpdateDecoder, UpdateRejected
from .wire import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_ROUTING_KEY,
    HEADER_ORIGINAL_USER_ID,
    HEADER_REJECT_CODE,
    HEADER_REJECT_REASON,
    HEADER_REJECTED_NS,
    SERVER_QUEUE,
    UPDATE_BINDING_KEY,
    UPDATE_EXCHANGE,
)

MAX_REASON_CHARS = 1000


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


class _Strikes:
    """How often handling an update (or message) ended the consumer's session;
    bounded (least recently struck forgotten)."""

    def __init__(self, capacity: int = 10_000):
        self.capacity = capacity
        self._n: OrderedDict[str, int] = OrderedDict()

    def __getitem__(self, key: str | None) -> int:
        return self._n.get(key, 0) if key else 0

    def add(self, key: str) -> None:
        self._n[key] = self._n.get(key, 0) + 1
        self._n.move_to_end(key)
        while len(self._n) > self.capacity:
            self._n.popitem(last=False)

    def forget(self, key: str) -> None:
        self._n.pop(key, None)


@dataclass
class _InFlight:
    """What handling one delivery has touched so far, for the catch-all."""

    tags: list[Hashable]
    key: str | None  # what a strike counts: the update id once known, else the message id
    update_id: str | None = None
    in_handler: bool = False


class UpdateConsumer(AmqpWorker):
    """Consumes update chunks on its own thread (``start``/``stop``).

    ``reference``: the tensor spec updates must match, or a callable returning it
    for an envelope (None: unknown base version).  ``on_update`` is called on the
    consumer thread with each verified, new update; the chunks are acked after
    it returns.  ``max_attempts``: how many sessions handling one update may end
    before it is dead-lettered (``redelivered``).
    """

    purpose = "update-consumer"

    def __init__(self, amqp: AmqpSettings, *, keys: Any,
                 reference: Mapping[str, Any] | Callable[[Envelope], Mapping[str, Any] | None],
                 on_update: Callable[[DecodedUpdate], None],
                 exchange: str = UPDATE_EXCHANGE, queue: str = SERVER_QUEUE,
                 binding_key: str = UPDATE_BINDING_KEY,
                 dead_letter_exchange: str = DEAD_LETTER_EXCHANGE,
                 dead_letter_queue: str = DEAD_LETTER_QUEUE,
                 expected_model: str | None = None, max_update_bytes: int = 1 << 30,
                 prefetch: int = 256, partial_timeout_s: float = 3600.0,
                 seen: Any | None = None, max_attempts: int = 5):
        super().__init__(amqp)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        self.decoder = UpdateDecoder(keys, max_update_bytes=max_update_bytes)
        self.reference = reference
        self.on_update = on_update
        self.exchange, self.queue, self.binding_key = exchange, queue, binding_key
        self.dlx, self.dlq = dead_letter_exchange, dead_letter_queue
        self.expected_model = expected_model
        self.prefetch = prefetch
        self.partial_timeout_s = partial_timeout_s
        self.max_attempts = max_attempts
        self.seen = seen if seen is not None else SeenUpdates()
        # One update never needs more chunks than prefetch allows, or it could not complete.
        self._reasm = Reassembler(max_update_bytes=max_update_bytes, max_chunks=prefetch)
        self._deliveries: dict[Hashable, tuple[str, pika.BasicProperties, bytes]] = {}
        self._strikes = _Strikes()
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
        """One delivery.  Raises only broker errors (and BaseException), which end the
        session; those count a strike against the update being handled."""
        tag = method.delivery_tag
        self.chunks += 1
        self._deliveries[tag] = (method.routing_key, props, body)
        job = _InFlight([tag], props.message_id or None)
        try:
            try:
                self._process(ch, job, props, body)
            except px.AMQPError:
                raise  # the connection or a channel failed: reconnect, the broker redelivers
            except Exception as e:  # noqa: BLE001 - deliberate: no update may stop the consumer
                code = "handler" if job.in_handler else "internal"
                self._log.exception("%s error while handling %s; dead-lettering it", code,
                                    f"update {job.update_id}" if job.update_id else
                                    f"message {props.message_id!r}")
                self._refuse(ch, job, code, f"{type(e).__name__}: {e}")
        except BaseException:
            # The session ends with this delivery unsettled: the broker redelivers it.
            if job.key:
                self._strikes.add(job.key)
            raise

    def _process(self, ch, job: _InFlight, props: pika.BasicProperties, body: bytes) -> None:
        if self._given_up(ch, job):
            return
        try:
            uid, idx, cnt, sha = parse_headers(props.headers, props.message_id)
        except ChunkError as e:
            self._reject(ch, job.tags, e.code, e.reason)
            return
        job.key = job.update_id = uid
        if self._given_up(ch, job):
            return
        try:
            done = self._reasm.add(uid, idx, cnt, sha, body, job.tags[0])
        except ChunkError as e:
            self._reject(ch, e.tags, e.code, e.reason)
            return
        if done is None:
            return
        job.tags = done.tags
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
        job.in_handler = True
        self.on_update(decoded)
        job.in_handler = False
        self.seen.add(uid)
        self._strikes.forget(uid)
        self.accepted += 1
        self._ack(ch, done.tags)

    def _given_up(self, ch, job: _InFlight) -> bool:
        """Dead-letter a delivery whose handling ended the session ``max_attempts``
        times; drop it (ack, ERROR line) when even dead-lettering it ended the session."""
        n = self._strikes[job.key]
        if n < self.max_attempts:
            return False
        what = f"update {job.update_id}" if job.update_id else f"message {job.key!r}"
        if n == self.max_attempts:
            self._refuse(ch, job, "redelivered", f"handling {what} ended the consumer's "
                                                 f"session {n} times; not tried again")
        else:
            tags = self._unsettled(job)
            self.rejected["dropped"] = self.rejected.get("dropped", 0) + 1
            self._log.error("dead-lettering %s ended the session too; dropped %d message(s)",
                            what, len(tags))
            self._ack(ch, tags)
        return True

    def _unsettled(self, job: _InFlight) -> list[Hashable]:
        """Every unsettled chunk of the update ``job`` was handling (its partial dropped)."""
        tags = list(job.tags)
        if job.update_id is not None:
            tags += self._reasm.discard(job.update_id)
        return [t for t in dict.fromkeys(tags) if t in self._deliveries]

    def _refuse(self, ch, job: _InFlight, code: str, reason: str) -> None:
        """Dead-letter every unsettled chunk of the update ``job`` was handling."""
        self._reject(ch, self._unsettled(job), code, reason)

    def _ack(self, ch, tags) -> None:
        for t in tags:
            ch.basic_ack(t)
            self._deliveries.pop(t, None)

    def _reject(self, ch, tags, code: str, reason: str) -> None:
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS - 3] + "..."
        self.rejected[code] = self.rejected.get(code, 0) + 1
        self._log.warning("rejected %d message(s) to %s: %s: %s", len(tags), self.dlx, code,
                          reason)
        for t in tags:
            routing_key, props, body = self._deliveries.pop(t)
            headers = dict(props.headers or {})
            headers.update({HEADER_REJECT_CODE: code, HEADER_REJECT_REASON: reason,
                            HEADER_ORIGINAL_EXCHANGE: self.exchange,
                            HEADER_ORIGINAL_ROUTING_KEY: routing_key,
                            HEADER_REJECTED_NS: time.time_ns()})
            if props.user_id:
                headers[HEADER_ORIGINAL_USER_ID] = props.user_id
            dl_props = pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent, content_type=props.content_type,
                message_id=props.message_id, type=props.type, app_id=props.app_id,
                timestamp=props.timestamp, headers=headers)
            self._dl_ch.basic_publish(self.dlx, routing_key, body, dl_props)
            ch.basic_ack(t)
