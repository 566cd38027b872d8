"""The server's AMQP side: one I/O thread receives, one worker thread works.

pika's threaded pattern: the I/O thread owns the consuming connection and does
nothing but move deliveries into a queue and run callbacks; the worker thread
runs :class:`~.pipeline.UpdatePipeline` (disk, verification, aggregation,
seconds of CPU) and hands each acknowledgement back through
``connection.add_callback_threadsafe``.  So heartbeats keep flowing while an
aggregation runs, and pika objects are only ever touched by their own thread.
The worker starts working once the I/O thread's first session has declared the
exchanges and queues, so its first broadcast of stored versions (and any dead
letter) goes to exchanges that exist.

The work queue is a durable **quorum** queue (``docs/protocol.md``):
``x-delivery-limit`` bounds redeliveries, ``x-single-active-consumer`` lets a
standby server wait on the same queue and take over when the active one dies,
and ``x-dead-letter-exchange`` (at-least-once) catches what the broker itself
gives up on.  A message is acknowledged only after its effect is durable (a
chunk staged, an update accepted or refused, dead letters confirmed).

If handling a message raises something unexpected, the message is returned to
the queue (``nack``, requeue) for another try, unless the broker has already
delivered it ``delivery_limit`` times: then it is dead-lettered (code
``poison``) with the error in ``x-waggle-reject-reason`` and acknowledged, and
the messages behind it go through.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import pika

from waggle_trainer.transport.amqp import AmqpSettings, AmqpWorker, connection_parameters
from waggle_trainer.transport.chunks import split
from waggle_trainer.transport.model_wire import encode_model
from waggle_trainer.transport.wire import (
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_ROUTING_KEY,
    HEADER_ORIGINAL_USER_ID,
    HEADER_REJECT_CODE,
    HEADER_REJECT_REASON,
    HEADER_REJECTED_NS,
    MODEL_CONTENT_TYPE,
    MODEL_MESSAGE_TYPE,
    model_routing_key,
)

from .config import ServerConfig
from .pipeline import DeadLetter, UpdatePipeline
from .staging import ChunkMessage
from .store import VersionInfo

log = logging.getLogger(__name__)


def queue_arguments(cfg: ServerConfig) -> dict[str, Any]:
    q = cfg.queue
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": q.delivery_limit,
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": q.dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def declare_topology(ch, cfg: ServerConfig) -> None:
    """Exchanges, queues and bindings the server relies on (idempotent)."""
    q = cfg.queue
    ch.exchange_declare(q.exchange, exchange_type="topic", durable=True)
    ch.exchange_declare(q.dead_letter_exchange, exchange_type="fanout", durable=True)
    ch.queue_declare(q.dead_letter_queue, durable=True)
    ch.queue_bind(q.dead_letter_queue, q.dead_letter_exchange)
    ch.queue_declare(q.queue, durable=True, arguments=queue_arguments(cfg))
    ch.queue_bind(q.queue, q.exchange, routing_key=q.binding_key)
    if cfg.broadcast.enabled:
        ch.exchange_declare(cfg.broadcast.exchange, exchange_type="topic", durable=True)


def amqp_settings(cfg: ServerConfig, name: str = "waggle-trainer-server") -> AmqpSettings:
    b = cfg.broker
    return AmqpSettings(
        host=b.host,
        port=b.port,
        vhost=b.vhost,
        username=b.username,
        password=b.password.get_secret_value(),
        tls=b.tls,
        cacert=str(b.cacert),
        cert=str(b.cert),
        key=str(b.key),
        heartbeat_s=b.heartbeat_s,
        connection_name=name,
    )


@dataclass
class Delivery:
    generation: int
    tag: int
    msg: ChunkMessage


def _message(method, props: pika.BasicProperties, body: bytes) -> ChunkMessage:
    headers = dict(props.headers or {})
    count = headers.get("x-delivery-count", 0)
    return ChunkMessage(
        routing_key=method.routing_key,
        body=body,
        message_id=props.message_id,
        headers=headers,
        user_id=props.user_id,
        content_type=props.content_type,
        type=props.type,
        app_id=props.app_id,
        timestamp=props.timestamp,
        delivery_count=count if isinstance(count, int) else 0,
    )


class Publisher:
    """The worker thread's own connection, for dead letters and model broadcasts,
    with publisher confirms; reconnects once per publish if it was lost."""

    def __init__(self, amqp: AmqpSettings):
        self.amqp = amqp
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None

    def _channel(self) -> Any:
        if self._conn is None or not self._conn.is_open or self._ch is None or not self._ch.is_open:
            self.close()
            self._conn = pika.BlockingConnection(connection_parameters(self.amqp, "publisher"))
            ch = self._conn.channel()
            ch.confirm_delivery()
            self._ch = ch
        return self._ch

    def publish(self, exchange: str, key: str, body: bytes, props: pika.BasicProperties) -> None:
        for attempt in (0, 1):
            try:
                self._channel().basic_publish(exchange, key, body, props)
                return
            except (
                pika.exceptions.AMQPConnectionError,
                pika.exceptions.ChannelClosed,
                pika.exceptions.StreamLostError,
            ):
                self.close()
                if attempt:
                    raise

    def idle(self) -> None:
        """Service heartbeats while the worker waits."""
        if self._conn is not None and self._conn.is_open:
            try:
                self._conn.process_data_events(0)
            except pika.exceptions.AMQPError:
                self.close()

    def close(self) -> None:
        if self._conn is not None and self._conn.is_open:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        self._conn = self._ch = None


class ServerConsumer(AmqpWorker):
    """Consumes the work queue (I/O thread) and drives the pipeline (worker)."""

    purpose = "server-consumer"

    def __init__(
        self,
        cfg: ServerConfig,
        pipeline: UpdatePipeline,
        *,
        signing_key=None,
        tick_s: float = 1.0,
        amqp: AmqpSettings | None = None,
    ):
        super().__init__(amqp or amqp_settings(cfg))
        self.cfg = cfg
        self.pipeline = pipeline
        self.signing_key = signing_key
        self.tick_s = tick_s
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._generation = 0
        self._conn: pika.BlockingConnection | None = None
        self._ch = None
        self._worker: threading.Thread | None = None
        # Set once the I/O thread has declared the exchanges and queues: the worker
        # publishes (dead letters, broadcasts) only to exchanges that exist.
        self._topology = threading.Event()
        self.publisher = Publisher(amqp or amqp_settings(cfg))
        self.handled = 0
        self.dead_lettered = 0
        self.requeued = 0
        self.worker_error: str | None = None

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="server-worker", daemon=True)
        self._worker.start()
        super().start()

    def stop(self, timeout: float | None = 10.0) -> None:
        super().stop(timeout)
        if self._worker is not None:
            self._worker.join(timeout)

    # -- I/O thread -----------------------------------------------------------
    def _session(self, conn: pika.BlockingConnection) -> None:
        self._generation += 1
        gen = self._generation
        ch = conn.channel()
        declare_topology(ch, self.cfg)
        self._topology.set()
        ch.basic_qos(prefetch_count=self.cfg.queue.prefetch)
        self._conn, self._ch = conn, ch

        def on_message(ch, method, props, body) -> None:
            self._inbox.put(Delivery(gen, method.delivery_tag, _message(method, props, body)))

        ch.basic_consume(self.cfg.queue.queue, on_message_callback=on_message, auto_ack=False)
        self._connected_ok()
        try:
            while not self._stop.is_set():
                conn.process_data_events(time_limit=0.5)
        finally:
            self._conn = self._ch = None

    def _settle(self, gen: int, tag: int, ack: bool) -> None:
        """Runs on the I/O thread (add_callback_threadsafe)."""
        ch = self._ch
        if gen != self._generation or ch is None or not ch.is_open:
            return  # the channel it came on is gone: the broker redelivers it
        if ack:
            ch.basic_ack(tag)
        else:
            ch.basic_nack(tag, requeue=True)

    def _hand_back(self, d: Delivery, ack: bool) -> None:
        conn = self._conn
        if conn is None or d.generation != self._generation:
            return
        try:
            conn.add_callback_threadsafe(functools.partial(self._settle, d.generation, d.tag, ack))
        except Exception:  # noqa: BLE001 - connection closed meanwhile: redelivered anyway
            pass

    # -- worker thread --------------------------------------------------------
    def _work(self) -> None:
        pipeline = self.pipeline
        # Nothing to receive before the first session, and dead letters and broadcasts
        # need the exchanges it declares (durable: they stay through reconnects).
        while not self._topology.wait(0.25):
            if self._stop.is_set():
                return
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                d = self._inbox.get(timeout=0.25)
            except queue.Empty:
                d = None
            try:
                if d is not None:
                    self._process(d)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.tick_s
                    with pipeline.lock.held():
                        out = pipeline.tick()
                        self._publish_dead_letters(out.dead_letters)
                        out.finish()
                    self._broadcast(out.new_versions)
                    self._broadcast_missing()
                self.publisher.idle()
            except Exception as e:
                self.worker_error = repr(e)
                log.exception("server worker: unexpected error")
                time.sleep(1.0)
        self.publisher.close()

    def _process(self, d: Delivery) -> None:
        if d.generation != self._generation:
            return  # from a lost connection: the broker redelivers it on the new one
        try:
            with self.pipeline.lock.held():
                out = self.pipeline.handle(d.msg)
                self._publish_dead_letters(out.dead_letters)
                out.finish()
        except Exception as e:  # noqa: BLE001 - a poison message must not stop the queue
            self._failed(d, e)
            return
        self.handled += 1
        self._hand_back(d, ack=True)
        self._broadcast(out.new_versions)

    def _failed(self, d: Delivery, e: Exception) -> None:
        limit = self.cfg.queue.delivery_limit
        if d.msg.delivery_count < limit:
            self.requeued += 1
            log.error(
                "handling message %s failed (delivery %d of at most %d): %r; requeued",
                d.msg.message_id,
                d.msg.delivery_count + 1,
                limit + 1,
                e,
            )
            self._hand_back(d, ack=False)
            return
        try:
            with self.pipeline.lock.held():
                out = self.pipeline.poison(d.msg, repr(e))
                self._publish_dead_letters(out.dead_letters)
                out.finish()
        except Exception:
            log.exception("dead-lettering poison message %s failed", d.msg.message_id)
            self._hand_back(d, ack=False)
            return
        self._hand_back(d, ack=True)

    def _publish_dead_letters(self, letters: list[DeadLetter]) -> None:
        q = self.cfg.queue
        for dl in letters:
            m = dl.msg
            headers = dict(m.headers)
            headers.update(
                {
                    HEADER_REJECT_CODE: dl.code,
                    HEADER_REJECT_REASON: dl.reason,
                    HEADER_ORIGINAL_EXCHANGE: q.exchange,
                    HEADER_ORIGINAL_ROUTING_KEY: m.routing_key,
                    HEADER_REJECTED_NS: time.time_ns(),
                }
            )
            if m.user_id:
                headers[HEADER_ORIGINAL_USER_ID] = m.user_id
            props = pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type=m.content_type,
                message_id=m.message_id,
                type=m.type,
                app_id=m.app_id,
                timestamp=m.timestamp,
                headers=headers,
            )
            self.publisher.publish(q.dead_letter_exchange, m.routing_key, m.body, props)
            self.dead_lettered += 1

    # -- broadcast ------------------------------------------------------------
    def _broadcast(self, versions: list[VersionInfo]) -> None:
        if versions:
            self._broadcast_missing()

    def _broadcast_missing(self) -> None:
        """Publish the newest stored version of each model not yet broadcast."""
        if not self.cfg.broadcast.enabled or self.signing_key is None:
            return
        latest: dict[str, int] = {}
        for model, seq in self.pipeline.db.unbroadcast():
            latest[model] = max(seq, latest.get(model, 0))
        for model, seq in latest.items():
            info = self.pipeline.store.get(model, str(seq))
            if info is None or info.retired:
                continue
            self.publish_version(info)
            with self.pipeline.db.transaction():
                self.pipeline.db.mark_broadcast(model, seq)

    def publish_version(self, info: VersionInfo) -> None:
        b = self.cfg.broadcast
        env, blob = encode_model(
            self.pipeline.store.load_weights(info),
            model=info.model,
            version=info.version,
            parent=info.manifest.get("parent"),
            accepts=self.pipeline.accepted_bases(info.model),
            key=self.signing_key,
            compression=b.compression,
            created_ns=info.manifest.get("created_ns"),
        )
        chunks = split(env.broadcast_id, blob, b.chunk_size)
        for c in chunks:
            props = pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type=MODEL_CONTENT_TYPE,
                message_id=c.message_id,
                headers=c.headers(),
                app_id="waggle-trainer-server",
                type=MODEL_MESSAGE_TYPE,
                timestamp=int(time.time()),
            )
            self.publisher.publish(b.exchange, model_routing_key(info.model), c.body, props)
        log.info(
            "model %s: version %s broadcast on %s (%d bytes, %d chunk(s))",
            info.model,
            info.version,
            b.exchange,
            len(blob),
            len(chunks),
        )
