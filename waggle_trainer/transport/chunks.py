"""Splitting an encoded update into AMQP messages and putting it back together.

Each chunk is one message with ``message_id`` ``<update_id>:<index>`` and the
headers ``update_id``, ``chunk_index``, ``chunk_count``, ``payload_sha256``
(SHA-256 of the whole encoded update, so the receiver can check the reassembled
bytes before it even looks at the signature) and ``format`` (the chunk format
version; unknown versions are refused).  Names and limits: :mod:`.wire`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .wire import (
    CHUNK_FORMAT,
    DEFAULT_CHUNK_SIZE,
    HEADER_CHUNK_COUNT,
    HEADER_CHUNK_INDEX,
    HEADER_FORMAT,
    HEADER_PAYLOAD_SHA256,
    HEADER_UPDATE_ID,
)


class ChunkError(Exception):
    """A chunk is malformed or inconsistent with the other chunks of its update.
    ``code``: ``headers``, ``format``, ``size``, ``conflict``, ``sha256``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        update_id: str | None = None,
        tags: list[Hashable] | None = None,
    ):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.reason = message
        self.update_id = update_id
        self.tags: list[Hashable] = tags or []  # every chunk of the failed update so far


@dataclass(frozen=True)
class Chunk:
    update_id: str
    index: int
    count: int
    payload_sha256: str
    body: bytes

    @property
    def message_id(self) -> str:
        return f"{self.update_id}:{self.index}"

    def headers(self) -> dict[str, Any]:
        return {
            HEADER_UPDATE_ID: self.update_id,
            HEADER_CHUNK_INDEX: self.index,
            HEADER_CHUNK_COUNT: self.count,
            HEADER_PAYLOAD_SHA256: self.payload_sha256,
            HEADER_FORMAT: CHUNK_FORMAT,
        }


def split(update_id: str, blob: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[Chunk]:
    """Cut ``blob`` into chunks of at most ``chunk_size`` bytes (any positive size;
    the publisher keeps to ``wire.MIN_CHUNK_SIZE..MAX_CHUNK_SIZE``)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    digest = hashlib.sha256(blob).hexdigest()
    view = memoryview(blob)
    count = max(1, -(-len(blob) // chunk_size))
    return [
        Chunk(update_id, i, count, digest, bytes(view[i * chunk_size : (i + 1) * chunk_size]))
        for i in range(count)
    ]


def _text(value: Any) -> Any:
    """AMQP table strings may arrive as bytes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def parse_headers(
    headers: Mapping[str, Any] | None, message_id: str | None
) -> tuple[str, int, int, str]:
    """(update_id, index, count, payload_sha256) from a message, or ChunkError
    (``format`` for a chunk format other than ``waggle-update-chunk/1``)."""
    h = headers or {}
    fmt = _text(h.get(HEADER_FORMAT))
    if fmt != CHUNK_FORMAT:
        raise ChunkError(
            "format",
            f"chunk format {fmt!r:.80} is not supported (this consumer reads {CHUNK_FORMAT})",
        )
    uid, idx, cnt, sha = (
        _text(h.get(HEADER_UPDATE_ID)),
        h.get(HEADER_CHUNK_INDEX),
        h.get(HEADER_CHUNK_COUNT),
        _text(h.get(HEADER_PAYLOAD_SHA256)),
    )
    if not isinstance(uid, str) or not uid or not isinstance(sha, str) or len(sha) != 64:
        raise ChunkError("headers", "update_id or payload_sha256 header missing or malformed")
    if (
        not isinstance(idx, int)
        or not isinstance(cnt, int)
        or isinstance(idx, bool)
        or isinstance(cnt, bool)
        or not 0 <= idx < cnt
    ):
        raise ChunkError("headers", f"chunk_index {idx!r:.40} / chunk_count {cnt!r:.40} invalid")
    if not message_id:
        raise ChunkError(
            "headers", "message_id property missing (it must be <update_id>:<chunk_index>)"
        )
    if message_id != f"{uid}:{idx}":
        raise ChunkError("headers", f"message_id {message_id!r:.200} does not match headers")
    return uid, idx, cnt, sha


@dataclass
class _Partial:
    count: int
    sha: str
    first_seen: float
    parts: dict[int, bytes] = field(default_factory=dict)
    tags: list[Hashable] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class Assembled:
    update_id: str
    blob: bytes
    tags: list[Hashable]


class Reassembler:
    """Collects chunks until an update is complete.

    ``tags`` are opaque (AMQP delivery tags): every chunk's tag is returned with
    the finished update, or with the failure, so the caller can acknowledge or
    dead-letter all of them, duplicates included.  A duplicate chunk (same index,
    same bytes: a republished update) is absorbed; a duplicate with different
    bytes is an error.
    """

    def __init__(self, *, max_update_bytes: int = 1 << 30, max_chunks: int = 4096):
        self.max_update_bytes = max_update_bytes
        self.max_chunks = max_chunks
        self._partials: dict[str, _Partial] = {}

    def __len__(self) -> int:
        return len(self._partials)

    def add(
        self, update_id: str, index: int, count: int, sha: str, body: bytes, tag: Hashable
    ) -> Assembled | None:
        """Add one chunk.  Returns the whole update when its last chunk arrived;
        raises ChunkError (the update's partial state is dropped and the error's
        ``tags`` attribute lists every tag to dead-letter)."""
        p = self._partials.get(update_id)
        if p is None:
            if count > self.max_chunks:
                raise self._fail(
                    update_id, [tag], "size", f"{count} chunks, limit {self.max_chunks}"
                )
            p = self._partials[update_id] = _Partial(count, sha, time.monotonic())
        p.tags.append(tag)
        if count != p.count or sha != p.sha:
            raise self._fail(
                update_id, p.tags, "headers", "chunk_count or payload_sha256 differs between chunks"
            )
        old = p.parts.get(index)
        if old is not None:
            if old != body:
                raise self._fail(
                    update_id, p.tags, "conflict", f"two different bodies for chunk {index}"
                )
            return None
        p.parts[index] = body
        p.nbytes += len(body)
        if p.nbytes > self.max_update_bytes:
            raise self._fail(
                update_id, p.tags, "size", f"update exceeds {self.max_update_bytes} bytes"
            )
        if len(p.parts) < p.count:
            return None
        del self._partials[update_id]
        blob = b"".join(p.parts[i] for i in range(p.count))
        if hashlib.sha256(blob).hexdigest() != p.sha:
            raise ChunkError(
                "sha256",
                "reassembled update does not match payload_sha256 header",
                update_id=update_id,
                tags=p.tags,
            )
        return Assembled(update_id, blob, p.tags)

    def _fail(self, update_id: str, tags: list[Hashable], code: str, msg: str) -> ChunkError:
        self._partials.pop(update_id, None)
        return ChunkError(code, msg, update_id=update_id, tags=list(tags))

    def expire(self, older_than_s: float) -> list[tuple[str, list[Hashable]]]:
        """Drop partial updates first seen more than ``older_than_s`` ago."""
        now = time.monotonic()
        old = [u for u, p in self._partials.items() if now - p.first_seen > older_than_s]
        return [(u, self._partials.pop(u).tags) for u in old]

    def discard(self, update_id: str) -> list[Hashable]:
        """Drop the partial update ``update_id``; the tags of its chunks so far."""
        p = self._partials.pop(update_id, None)
        return [] if p is None else p.tags

    def clear(self) -> None:
        """Forget everything (after a reconnect the broker redelivers)."""
        self._partials.clear()
