"""Node side of the model broadcast: receive, verify and hold the next base.

The server publishes every new global version on ``waggle.train.models``
(routing key ``model.<name>``), chunked like updates and signed with its
Ed25519 key.  :class:`ModelSubscriber` is a thread with its own connection and
its own durable queue (``waggle.train.models.<node_id>``, so versions sent
while the node was offline wait for it).  With ``declare=False`` (a broker that
owns its objects, like Beehive: the node user may configure nothing) the
exchange and the queue are only checked, and the operator's definitions create
the queue and its binding.  It reassembles in memory (bounded),
verifies the signature with the server's *public* key, checks names, shapes,
dtypes and finite values against the node's model, saves the verified blob
atomically in ``save_dir`` and only then acknowledges.

The daemon's training loop calls :meth:`take` between rounds: it returns the
newest verified version not yet taken (older ones are skipped), or None.  The
caller then adopts it as its base and calls :func:`drop_unaccepted` on its
outbox.

Outbox rule after a new base: updates waiting in the outbox stay if their base
version is in the new version's ``accepts`` list (the server still takes them,
down-weighted by staleness); the others are dropped (the server would refuse
them as stale).  Updates are never re-based on the node: a delta re-based onto
another version would no longer be what the node trained.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pika

from .amqp import AmqpSettings, AmqpWorker, missing_object
from .chunks import ChunkError, Reassembler, parse_headers
from .codec import TensorSpec, UpdateRejected
from .model_wire import ModelVersion, decode_model
from .wire import MODEL_EXCHANGE, model_routing_key, node_model_queue

log = logging.getLogger(__name__)


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (-1, v)


def newer_version(a: str, b: str | None) -> bool:
    """Whether server version ``a`` is newer than ``b`` (a node's own base, such as
    ``local-...`` or a file's hash, is older than every server version)."""
    return b is None or _version_key(a) > _version_key(b)


class ModelSubscriber(AmqpWorker):
    purpose = "models"

    def __init__(
        self,
        amqp: AmqpSettings,
        *,
        node_id: str,
        model: str,
        verify_key,
        expected: Mapping[str, TensorSpec] | None = None,
        current_version: str | None = None,
        save_dir: str | os.PathLike | None = None,
        exchange: str = MODEL_EXCHANGE,
        queue: str | None = None,
        max_bytes: int = 1 << 30,
        on_version: Callable[[ModelVersion], Any] | None = None,
        partial_timeout_s: float = 600.0,
        declare: bool = True,
    ):
        super().__init__(amqp)
        self.node_id, self.model = node_id, model
        self.verify_key = verify_key
        self.expected = dict(expected) if expected is not None else None
        self.current_version = current_version
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.exchange = exchange
        self.queue = queue or node_model_queue(node_id)
        self.max_bytes = max_bytes
        self.on_version = on_version
        self.partial_timeout_s = partial_timeout_s
        self.declare = declare
        self._reasm = Reassembler(max_update_bytes=max_bytes)
        self._lock = threading.Lock()
        self._newest: ModelVersion | None = None
        self.received = 0
        self.rejected: dict[str, int] = {}

    # -- called by the daemon -------------------------------------------------
    def take(self) -> ModelVersion | None:
        """The newest verified version newer than the last one taken, or None."""
        with self._lock:
            v, self._newest = self._newest, None
            if v is not None:
                self.current_version = v.version
            return v

    def wait_for(self, version: str, timeout: float) -> bool:
        """Tests: wait until ``version`` (or newer) arrived."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                got = self._newest.version if self._newest is not None else None
            if got is not None and _version_key(got) >= _version_key(version):
                return True
            time.sleep(0.05)
        return False

    # -- the subscriber thread ------------------------------------------------
    def _session(self, conn: pika.BlockingConnection) -> None:
        self._reasm.clear()
        ch = conn.channel()
        what = f"exchange {self.exchange!r}"
        try:
            ch.exchange_declare(
                self.exchange, exchange_type="topic", durable=True, passive=not self.declare
            )
            what = f"the model queue {self.queue!r}"
            ch.queue_declare(self.queue, durable=True, passive=not self.declare)
            if self.declare:
                ch.queue_bind(self.queue, self.exchange, routing_key=model_routing_key(self.model))
        except pika.exceptions.ChannelClosedByBroker as e:
            raise missing_object(e, what, self.declare) from e
        ch.basic_qos(prefetch_count=64)
        self._connected_ok()
        for method, props, body in ch.consume(self.queue, inactivity_timeout=0.5):
            if self._stop.is_set():
                break
            if method is not None:
                self._handle(ch, method.delivery_tag, props, body)
            for _uid, tags in self._reasm.expire(self.partial_timeout_s):
                for t in tags:
                    ch.basic_ack(t)
        ch.cancel()

    def _refuse(self, ch, tags, code: str, reason: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        log.warning("model broadcast refused: %s: %s", code, reason)
        for t in tags:
            ch.basic_ack(t)  # a bad broadcast is not retried: the next version replaces it

    def _handle(self, ch, tag: int, props: pika.BasicProperties, body: bytes) -> None:
        try:
            uid, idx, cnt, sha = parse_headers(props.headers, props.message_id)
            done = self._reasm.add(uid, idx, cnt, sha, body, tag)
        except ChunkError as e:
            self._refuse(ch, getattr(e, "tags", [tag]), e.code, e.reason)
            return
        if done is None:
            return
        try:
            mv = decode_model(
                done.blob, self.verify_key, expected=self.expected, max_bytes=self.max_bytes
            )
            if mv.envelope.model != self.model:
                raise UpdateRejected("model", f"broadcast is for model {mv.envelope.model!r}")
        except UpdateRejected as e:
            self._refuse(ch, done.tags, e.code, e.reason)
            return
        newest = self._newest.version if self._newest is not None else self.current_version
        if newest is not None and _version_key(mv.version) <= _version_key(newest):
            log.info("model %s version %s ignored (have %s)", self.model, mv.version, newest)
        else:
            if self.save_dir is not None:
                self._save(mv.version, done.blob)
            with self._lock:
                self._newest = mv
            self.received += 1
            log.info("model %s version %s received and verified", self.model, mv.version)
            if self.on_version is not None:
                self.on_version(mv)
        for t in done.tags:
            ch.basic_ack(t)

    def _save(self, version: str, blob: bytes) -> None:
        assert self.save_dir is not None
        self.save_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.save_dir / f"{self.model}-{version}.wgm"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def drop_unaccepted(outbox, model: str, accepts: list[str]) -> list[str]:
    """Remove outbox updates of ``model`` whose base the server no longer accepts
    (not in the new version's ``accepts``); returns the dropped update ids."""
    dropped = []
    for e in outbox.pending():
        if e.model == model and e.base_version not in accepts:
            if outbox.remove(e.update_id):
                dropped.append(e.update_id)
                log.warning(
                    "outbox: update %s (base %s) dropped: the server accepts only bases %s now",
                    e.update_id,
                    e.base_version,
                    ", ".join(accepts),
                )
    return dropped
