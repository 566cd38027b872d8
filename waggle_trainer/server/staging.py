"""Chunks of incomplete updates, staged on disk until the last one arrives.

Each chunk is written (atomically) before it is acknowledged, so the broker
holds only a few unacknowledged messages (a small prefetch) however large an
update is, and a server crash loses nothing.  Layout::

    staging/<update_id>/meta.json       chunk count, payload SHA-256, first seen
    staging/<update_id>/<i>.chunk       body of chunk i
    staging/<update_id>/<i>.json        its message properties (for dead-lettering)

Bounded by what is really on disk: every file staging writes (bodies, header
sidecars, ``meta.json``) and every directory counts, each at least one 4 KiB block,
so an empty body with large headers is not free.  Headers are bounded too
(:data:`~waggle_trainer.transport.wire.MAX_HEADERS_BYTES`, code ``headers``).

Each node - the broker-vouched ``user_id`` of its chunks, else the node named by
the routing key - gets a share: at most ``max_partials_per_node`` incomplete
updates (a further one evicts that node's oldest), and when the bytes would go
over ``max_bytes`` room is made at the expense of the node that holds the most,
oldest partial update first.  A node can push out another's partial update only
while that node holds more than it does: one that floods evicts its own.  If the
node holding the most is the sender and what it holds is this very update, the
update is refused (``staging_full``).  Partial updates older than ``max_age_s``
expire.  Evictions and expiries are dead-lettered and counted by the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from waggle_trainer.transport.chunks import ChunkError
from waggle_trainer.transport.wire import MAX_HEADERS_BYTES, UPDATE_ID_MAX

from .files import write_atomic

_UID_RE = re.compile(rf"^[A-Za-z0-9_-]{{1,{UPDATE_ID_MAX}}}$")
MAX_CHUNKS = 4096
BLOCK = 4096  # what a file or directory costs at least, on the file systems we run on


def on_disk(st: os.stat_result) -> int:
    """Bytes a file or directory takes: its allocated blocks, its size rounded up to
    whole blocks, and at least one block (an empty file costs an inode and a
    directory entry, not nothing)."""
    return max(BLOCK, st.st_blocks * 512, -(-st.st_size // BLOCK) * BLOCK)


def cost(n: int) -> int:
    """What writing a file of ``n`` bytes adds (before it exists to be measured)."""
    return max(BLOCK, -(-n // BLOCK) * BLOCK)


@dataclass
class _Usage:
    """One partial update's footprint, valid while its directory is unchanged."""

    key: tuple[int, int]  # the directory's (mtime_ns, size)
    node: str
    first_seen_ns: int
    disk: int  # bytes on disk, directory and every file in it
    body: int  # bytes of chunk bodies (bounded by the update's size limit)


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
    """Safe as a directory name: 1-128 of A-Z a-z 0-9 _ - (UUIDs and a daemon's
    ``<node_id>-<epoch>-r<round>`` are)."""
    return bool(_UID_RE.match(update_id))


def sender(msg: ChunkMessage) -> str:
    """Whose share a chunk counts against: the broker-vouched ``user_id``, else the
    node the routing key names (``update.<node_id>``)."""
    if msg.user_id:
        return f"user:{msg.user_id}"
    return "key:" + msg.routing_key.rpartition(".")[2][:64]


class Staging:
    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        max_partials_per_node: int = 4,
        max_update_bytes: int | None = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_partials_per_node = max_partials_per_node
        self.max_update_bytes = max_update_bytes
        self._usage: dict[str, _Usage] = {}

    def _dir(self, update_id: str) -> Path:
        if not _UID_RE.match(update_id):
            raise ChunkError("headers", f"update_id {update_id[:80]!r} is not an id")
        return self.root / update_id

    def usage(self) -> dict[str, _Usage]:
        """Every partial update's footprint (cached per directory; a directory that
        changed since, by this process or another server on the same state
        directory, is measured again).  A directory cut short by a crash (no
        ``meta.json``) is removed."""
        seen: dict[str, _Usage] = {}
        for entry in os.scandir(self.root):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            key = (st.st_mtime_ns, st.st_size)
            cached = self._usage.get(entry.name)
            if cached is not None and cached.key == key:
                seen[entry.name] = cached
                continue
            u = self._measure(Path(entry.path), key, st)
            if u is not None:
                seen[entry.name] = u
        self._usage = seen
        return seen

    def _measure(self, d: Path, key: tuple[int, int], st: os.stat_result) -> _Usage | None:
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)  # a staging dir cut short by a crash
            return None
        disk, body = on_disk(st), 0
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:  # discarded meanwhile (another server, same state dir)
            return None
        for f in entries:
            try:
                fst = f.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            disk += on_disk(fst)
            if f.name.endswith(".chunk"):
                body += fst.st_size
        return _Usage(key, str(meta.get("node", "")), int(meta["first_seen_ns"]), disk, body)

    def partials(self) -> list[str]:
        """Staged update ids, oldest first."""
        return [u for _, u in sorted((v.first_seen_ns, k) for k, v in self.usage().items())]

    def bytes_total(self) -> int:
        """Bytes on disk: every staged file and directory (and staging's own)."""
        return on_disk(self.root.stat()) + sum(u.disk for u in self.usage().values())

    def node_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for u in self.usage().values():
            out[u.node] = out.get(u.node, 0) + u.disk
        return out

    def add(
        self, update_id: str, index: int, count: int, sha: str, msg: ChunkMessage
    ) -> tuple[bool, list[str]]:
        """Stage one chunk.  Returns (complete, update ids to evict: the caller
        dead-letters and discards them).  Raises ChunkError for a chunk inconsistent
        with its update (``headers``, ``conflict``), headers too large
        (``headers``), an update too large (``size``) or one that must give way
        (``staging_full``)."""
        d = self._dir(update_id)
        if count > MAX_CHUNKS:
            raise ChunkError("size", f"{count} chunks, limit {MAX_CHUNKS}")
        sidecar = json.dumps(_plain(msg.props())).encode()
        if len(sidecar) > MAX_HEADERS_BYTES:
            raise ChunkError(
                "headers",
                f"message properties and headers take {len(sidecar)} bytes, "
                f"limit {MAX_HEADERS_BYTES}",
            )
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
        node = sender(msg)
        usage = self.usage()
        mine = usage.get(update_id)
        if (
            self.max_update_bytes is not None
            and (mine.body if mine else 0) + len(msg.body) > self.max_update_bytes
        ):
            raise ChunkError("size", f"chunks add up to more than {self.max_update_bytes} bytes")
        new = cost(len(msg.body)) + cost(len(sidecar))
        if mine is None:
            new += BLOCK + cost(256)  # the update's directory and its meta.json
        evicted = self._make_room(update_id, node, new, usage)
        if not meta_path.exists():
            d.mkdir(mode=0o700, exist_ok=True)
            write_atomic(
                meta_path,
                json.dumps(
                    {"count": count, "sha": sha, "first_seen_ns": time.time_ns(), "node": node}
                ).encode(),
            )
        write_atomic(chunk, msg.body)
        write_atomic(d / f"{index}.json", sidecar)
        return self._complete(d, count), evicted

    def _complete(self, d: Path, count: int) -> bool:
        return all((d / f"{i}.json").exists() for i in range(count))

    def _make_room(
        self, update_id: str, node: str, size: int, usage: dict[str, _Usage]
    ) -> list[str]:
        """Which partial updates go so that ``size`` more bytes for ``update_id`` of
        ``node`` fit: first the node's own beyond its count share, then, while the
        bytes are over the bound, those of whoever holds the most."""
        left = {k: v for k, v in usage.items()}
        evicted: list[str] = []

        def oldest(of: str) -> str | None:
            mine = [(v.first_seen_ns, k) for k, v in left.items() if v.node == of]
            mine = [x for x in mine if x[1] != update_id]
            return min(mine)[1] if mine else None

        if update_id not in usage:
            while sum(1 for v in left.values() if v.node == node) >= self.max_partials_per_node:
                uid = oldest(node)
                assert uid is not None
                evicted.append(uid)
                del left[uid]
        total = on_disk(self.root.stat()) + sum(v.disk for v in left.values())
        while total + size > self.max_bytes:
            held: dict[str, int] = {node: size}
            for v in left.values():
                held[v.node] = held.get(v.node, 0) + v.disk
            # the largest holder, the sender first among equals (it pays for its own)
            top = max(held, key=lambda n: (held[n], n == node))
            uid = oldest(top)
            if uid is None:  # the sender holds the most, all of it this very update
                raise ChunkError(
                    "staging_full",
                    f"staging is full (verify.staging_max_bytes = {self.max_bytes}) and this "
                    f"node holds the most of it ({held[top]} bytes with this chunk)",
                )
            evicted.append(uid)
            total -= left.pop(uid).disk
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
        return [uid for uid in self.partials() if self._usage[uid].first_seen_ns < limit]

    def discard(self, update_id: str) -> None:
        shutil.rmtree(self.root / update_id, ignore_errors=True)
        self._usage.pop(update_id, None)
