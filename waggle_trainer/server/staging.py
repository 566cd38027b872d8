"""Chunks of incomplete updates, staged on disk until the last one arrives.

Each chunk is written (atomically) before it is acknowledged, so the broker
holds only a few unacknowledged messages (a small prefetch) however large an
update is, and a server crash loses nothing.  Layout::

    staging/<update_id>/meta.json       chunk count, payload SHA-256, first seen
    staging/<update_id>/<i>.chunk       body of chunk i
    staging/<update_id>/<i>.json        its message properties (for dead-lettering)

Bounded by bytes (the oldest partial updates are evicted to make room) and by
age (partial updates older than ``max_age_s`` expire); both are dead-lettered
and counted by the caller.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from waggle_trainer.transport.chunks import ChunkError

from .files import write_atomic

_UID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
MAX_CHUNKS = 4096


@dataclass
class ChunkMessage:
    """One delivered message, as much of it as dead-lettering needs again."""

    routing_key: str
    body: bytes = field(repr=False)
    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    content_type: str | None = None
    type: str | None = None
    app_id: str | None = None
    timestamp: int | None = None
    delivery_count: int = 0  # previous deliveries (quorum queues' x-delivery-count)

    def props(self) -> dict[str, Any]:
        d = asdict(self)
        del d["body"]
        return d


def _plain(v: Any) -> Any:
    """Header values as JSON can hold them (pika gives bytes for some strings)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def valid_update_id(update_id: str) -> bool:
    """Safe as a directory name: 1-64 of A-Z a-z 0-9 and '-' (UUIDs are)."""
    return bool(_UID_RE.match(update_id))


class Staging:
    def __init__(self, root: Path, *, max_bytes: int, max_age_s: float):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s

    def _dir(self, update_id: str) -> Path:
        if not _UID_RE.match(update_id):
            raise ChunkError("headers", f"update_id {update_id[:80]!r} is not an id")
        return self.root / update_id

    def partials(self) -> list[str]:
        """Staged update ids, oldest first."""
        items = []
        for d in self.root.iterdir():
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                shutil.rmtree(d, ignore_errors=True)  # a staging dir cut short by a crash
                continue
            items.append((meta["first_seen_ns"], d.name))
        return [u for _, u in sorted(items)]

    def bytes_total(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*.chunk"))

    def add(
        self, update_id: str, index: int, count: int, sha: str, msg: ChunkMessage
    ) -> tuple[bool, list[str]]:
        """Stage one chunk.  Returns (complete, evicted update ids).  Raises
        ChunkError for a chunk inconsistent with its update (``headers``,
        ``conflict``) or an update that cannot fit (``size``)."""
        d = self._dir(update_id)
        if count > MAX_CHUNKS:
            raise ChunkError("size", f"{count} chunks, limit {MAX_CHUNKS}")
        meta_path = d / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta["count"] != count or meta["sha"] != sha:
                raise ChunkError("headers", "chunk_count or payload_sha256 differs between chunks")
        chunk = d / f"{index}.chunk"
        if (d / f"{index}.json").exists():
            if chunk.read_bytes() != msg.body:
                raise ChunkError("conflict", f"two different bodies for chunk {index}")
            return self._complete(d, count), []
        evicted = self._make_room(len(msg.body), update_id)
        if not meta_path.exists():
            d.mkdir(mode=0o700, exist_ok=True)
            write_atomic(
                meta_path,
                json.dumps({"count": count, "sha": sha, "first_seen_ns": time.time_ns()}).encode(),
            )
        write_atomic(chunk, msg.body)
        write_atomic(d / f"{index}.json", json.dumps(_plain(msg.props())).encode())
        return self._complete(d, count), evicted

    def _complete(self, d: Path, count: int) -> bool:
        return all((d / f"{i}.json").exists() for i in range(count))

    def _make_room(self, size: int, update_id: str) -> list[str]:
        evicted: list[str] = []
        total = self.bytes_total()
        if total + size <= self.max_bytes:
            return evicted
        for uid in self.partials():
            if uid == update_id:
                continue
            total -= sum(p.stat().st_size for p in (self.root / uid).glob("*.chunk"))
            evicted.append(uid)
            if total + size <= self.max_bytes:
                return evicted
        if total + size > self.max_bytes:
            raise ChunkError(
                "size", f"staging is full ({self.max_bytes} bytes) with this update alone"
            )
        return evicted

    def blob(self, update_id: str) -> bytes:
        """The reassembled update; ChunkError ``sha256`` if it does not match."""
        d = self._dir(update_id)
        meta = json.loads((d / "meta.json").read_text())
        blob = b"".join((d / f"{i}.chunk").read_bytes() for i in range(meta["count"]))
        if hashlib.sha256(blob).hexdigest() != meta["sha"]:
            raise ChunkError("sha256", "reassembled update does not match payload_sha256 header")
        return blob

    def messages(self, update_id: str) -> list[ChunkMessage]:
        """Every staged chunk of an update, as delivered (for dead-lettering)."""
        d = self.root / update_id
        out = []
        for p in sorted(d.glob("*.json"), key=lambda p: (len(p.name), p.name)):
            if p.name == "meta.json":
                continue
            props = json.loads(p.read_text())
            body_path = p.with_suffix(".chunk")
            out.append(ChunkMessage(body=body_path.read_bytes(), **props))
        return out

    def expired(self) -> list[str]:
        """Partial updates first seen more than ``max_age_s`` ago."""
        limit = time.time_ns() - int(self.max_age_s * 1e9)
        out = []
        for uid in self.partials():
            meta = json.loads((self.root / uid / "meta.json").read_text())
            if meta["first_seen_ns"] < limit:
                out.append(uid)
        return out

    def discard(self, update_id: str) -> None:
        shutil.rmtree(self.root / update_id, ignore_errors=True)
