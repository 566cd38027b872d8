"""The update publisher: one thread drains the disk outbox to RabbitMQ.

The training loop calls :meth:`UpdatePublisher.submit`, which writes the
encoded update to the outbox (local disk, fsync'd) and returns; it never waits
for the network.  The publisher thread owns the only connection it uses,
publishes each waiting update as chunks (persistent, ``mandatory``, with
publisher confirms) and deletes the update from the outbox once every chunk is
confirmed.  Updates waiting from before a restart are published first.

If the broker returns a chunk as unroutable (nothing bound to the exchange),
the update stays in the outbox and is retried after ``unroutable_retry_s``.  One
ERROR line opens such an episode (later returns are counted in ``unroutable``
and logged at DEBUG); the first update delivered after it closes the episode with
one INFO line.  A connection that drops mid-update means the whole
update is sent again later: the consumer absorbs duplicate chunks and
de-duplicates whole updates by their id.

``releasable`` (optional) is asked for every waiting entry; False keeps it in
the outbox unsent for now (the node daemon holds an update until the training
state that produced it is on disk, so a crash never sends an update whose
round the node will train again).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pika
import pika.exceptions as px

from .amqp import AmqpSettings, AmqpWorker, FatalAmqpError
from .chunks import split
from .codec import EncodedUpdate
from .outbox import Outbox, OutboxEntry
from .wire import (
    APP_ID,
    CONTENT_TYPE,
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MESSAGE_TYPE,
    MIN_CHUNK_SIZE,
    UPDATE_EXCHANGE,
    update_routing_key,
)


class UpdatePublisher(AmqpWorker):
    purpose = "updates"

    def __init__(
        self,
        amqp: AmqpSettings,
        outbox: Outbox,
        *,
        node_id: str,
        exchange: str = UPDATE_EXCHANGE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        declare_exchange: bool = True,
        unroutable_retry_s: float = 30.0,
        nack_retry_s: float = 5.0,
        poll_s: float = 0.2,
        releasable: Callable[[OutboxEntry], bool] | None = None,
    ):
        super().__init__(amqp)
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(
                f"chunk_size {chunk_size} is out of range ({MIN_CHUNK_SIZE}.."
                f"{MAX_CHUNK_SIZE} bytes: RabbitMQ refuses messages over 16 MiB)"
            )
        self.outbox = outbox
        self.node_id = node_id
        self.exchange = exchange
        self.routing_key = update_routing_key(node_id)
        self.chunk_size = chunk_size
        self.declare_exchange = declare_exchange
        self.unroutable_retry_s = unroutable_retry_s
        self.nack_retry_s = nack_retry_s
        self.poll_s = poll_s
        self.releasable = releasable
        self.user_id = amqp.broker_user()
        self._hold: dict[str, float] = {}  # update id -> monotonic time before which to skip
        self.published_updates = 0
        self.published_chunks = 0
        self.published_bytes = 0
        self.unroutable = 0  # chunks the broker returned as unroutable
        self.unroutable_episodes = 0
        self._unroutable_since: int | None = None  # count when the episode began
        self.nacked = 0

    # -- called from the training thread -------------------------------------
    def submit(self, update: EncodedUpdate | bytes) -> OutboxEntry:
        """Put an encoded update in the outbox; returns once it is on disk.
        Raises :class:`~.outbox.OutboxFull` if it can never fit."""
        blob = update.blob if isinstance(update, EncodedUpdate) else update
        return self.outbox.put(blob)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the outbox is empty (tests, orderly shutdown)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.outbox) == 0:
                return True
            if self.fatal_error is not None:
                return False
            time.sleep(0.05)
        return len(self.outbox) == 0

    def stats(self) -> dict[str, int]:
        return {
            "published_updates": self.published_updates,
            "published_chunks": self.published_chunks,
            "published_bytes": self.published_bytes,
            "unroutable": self.unroutable,
            "nacked": self.nacked,
            "connect_attempts": self.connect_attempts,
            "connected": int(self.connected),
            "fatal": int(self.fatal_error is not None),
        }

    # -- the publisher thread -------------------------------------------------
    def _session(self, conn: pika.BlockingConnection) -> None:
        ch = self._confirmed_channel(conn, self.exchange, self.declare_exchange)
        while not self._stop.is_set():
            entry = self._next_entry()
            if entry is None:
                conn.process_data_events(time_limit=self.poll_s)  # heartbeats, broker events
                continue
            self._publish(ch, entry)

    def _next_entry(self) -> OutboxEntry | None:
        now = time.monotonic()
        pending = self.outbox.pending()
        if len(self._hold) > len(pending):  # forget holds of updates dropped meanwhile
            ids = {e.update_id for e in pending}
            self._hold = {k: v for k, v in self._hold.items() if k in ids}
        for e in pending:
            if self.releasable is not None and not self.releasable(e):
                continue
            if self._hold.get(e.update_id, 0.0) <= now:
                return e
        return None

    def _publish(self, ch, entry: OutboxEntry) -> None:
        blob = self.outbox.read(entry)
        if blob is None:  # superseded while we were busy
            return
        chunks = split(entry.update_id, blob, self.chunk_size)
        for c in chunks:
            if self._stop.is_set():
                return
            props = pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type=CONTENT_TYPE,
                message_id=c.message_id,
                headers=c.headers(),
                user_id=self.user_id,
                app_id=APP_ID,
                type=MESSAGE_TYPE,
                timestamp=int(time.time()),
            )
            try:
                ch.basic_publish(self.exchange, self.routing_key, c.body, props, mandatory=True)
            except px.UnroutableError:
                self.unroutable += 1
                self._hold[entry.update_id] = time.monotonic() + self.unroutable_retry_s
                self._note_unroutable(entry)
                return
            except px.NackError:
                self.nacked += 1
                self._hold[entry.update_id] = time.monotonic() + self.nack_retry_s
                self._log.warning(
                    "broker refused (nack) chunk %d of update %s; retry in %.0f s",
                    c.index,
                    entry.update_id,
                    self.nack_retry_s,
                )
                return
            except px.ChannelClosedByBroker as e:
                if e.reply_code == 406 and "user_id" in str(e.reply_text):
                    raise FatalAmqpError(
                        f"broker refused user_id {self.user_id!r}: it must equal the broker "
                        f"user this connection authenticated as ({e.reply_text})"
                    ) from e
                raise
            self.published_chunks += 1
            self._log.debug(
                "update %s: chunk %d/%d confirmed", entry.update_id, c.index + 1, c.count
            )
        self.outbox.remove(entry.update_id)
        self._hold.pop(entry.update_id, None)
        if self._unroutable_since is not None:
            self._log.info(
                "updates are routable again (exchange %r, routing key %r) after %d "
                "unroutable attempt(s)",
                self.exchange,
                self.routing_key,
                self.unroutable - self._unroutable_since,
            )
            self._unroutable_since = None
        self.published_updates += 1
        self.published_bytes += len(blob)
        self._log.info(
            "update %s (round %d, base %s, %d bytes, %d chunk(s)) delivered",
            entry.update_id,
            entry.round,
            entry.base_version,
            len(blob),
            len(chunks),
        )

    def _note_unroutable(self, entry: OutboxEntry) -> None:
        """One ERROR per episode (until an update is delivered again), DEBUG after."""
        if self._unroutable_since is None:
            self._unroutable_since = self.unroutable - 1
            self.unroutable_episodes += 1
            self._log.error(
                "update %s is unroutable: nothing is bound to exchange %r for routing key "
                "%r; updates stay in the outbox and are retried every %.0f s (logged once "
                "until one is delivered)",
                entry.update_id,
                self.exchange,
                self.routing_key,
                self.unroutable_retry_s,
            )
        else:
            self._log.debug(
                "update %s still unroutable (%d returns so far)",
                entry.update_id,
                self.unroutable - self._unroutable_since,
            )
