"""Disk outbox: encoded updates wait here until every chunk is confirmed.

Each update is one file ``<created_ns>-<update_id>.wgu`` holding the encoded
blob, written atomically (temp file, fsync, rename, fsync of the directory), so
after a crash or power loss a file is either complete or absent.  The publisher
removes a file only after the broker confirmed every chunk.

The outbox is bounded in bytes.  When a new update does not fit, older updates
for the same model and base version go first (an update is a cumulative delta
from its base, so the newest supersedes them), then the oldest updates of other
base versions (stale by now).  An update larger than the whole bound is refused.
Every drop is logged at WARNING and counted.  Thread-safe.
"""

from __future__ import annotations

import builtins  # the property Outbox.bytes hides the type inside the class
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .codec import UpdateRejected, peek_envelope

log = logging.getLogger(__name__)

SUFFIX = ".wgu"


class OutboxFull(Exception):
    """The update alone is larger than the outbox bound."""


@dataclass(frozen=True)
class OutboxEntry:
    update_id: str
    model: str
    base_version: str
    round: int
    created_ns: int
    size: int
    path: Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.dir = Path(directory)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._entries: dict[str, OutboxEntry] = {}
        self.dropped_superseded = 0
        self.dropped_full = 0
        self.dropped_corrupt = 0
        self.refused_too_large = 0
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._load()

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        for p in sorted(self.dir.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)  # an interrupted write: never renamed, never valid
                continue
            if p.suffix != SUFFIX:
                continue
            try:
                with open(p, "rb") as f:
                    head = f.read(70_000)
                env = peek_envelope(head)
            except (OSError, UpdateRejected) as e:
                log.error("outbox: dropping unreadable file %s: %s", p.name, e)
                self.dropped_corrupt += 1
                p.unlink(missing_ok=True)
                continue
            self._entries[env.update_id] = OutboxEntry(
                env.update_id,
                env.model,
                env.base_version,
                env.round,
                env.created_ns,
                p.stat().st_size,
                p,
            )
        if self._entries:
            log.info(
                "outbox: %d update(s), %d bytes waiting from before", len(self._entries), self.bytes
            )

    # ------------------------------------------------------------------ queries
    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def pending(self) -> list[OutboxEntry]:
        """Waiting updates, oldest first."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (e.created_ns, e.update_id))

    def __contains__(self, update_id: str) -> bool:
        with self._lock:
            return update_id in self._entries

    def read(self, entry: OutboxEntry) -> builtins.bytes | None:
        """The blob, or None when the entry was dropped meanwhile."""
        try:
            return entry.path.read_bytes()
        except FileNotFoundError:
            return None

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "updates": len(self._entries),
                "bytes": sum(e.size for e in self._entries.values()),
                "dropped_superseded": self.dropped_superseded,
                "dropped_full": self.dropped_full,
                "dropped_corrupt": self.dropped_corrupt,
                "refused_too_large": self.refused_too_large,
            }

    # ------------------------------------------------------------------ changes
    def put(self, blob: builtins.bytes) -> OutboxEntry:
        """Store an encoded update durably; returns once it is on disk."""
        env = peek_envelope(blob)
        size = len(blob)
        with self._lock:
            if size > self.max_bytes:
                self.refused_too_large += 1
                log.error(
                    "outbox: refusing update %s: %d bytes exceed the outbox bound of %d",
                    env.update_id,
                    size,
                    self.max_bytes,
                )
                raise OutboxFull(f"update of {size} bytes exceeds outbox bound {self.max_bytes}")
            self._make_room(size, env.model, env.base_version, env.update_id)
            name = f"{env.created_ns:020d}-{env.update_id}{SUFFIX}"
            path = self.dir / name
            tmp = self.dir / f".{name}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:  # a full disk: leave no partial file behind
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.dir)
            entry = OutboxEntry(
                env.update_id, env.model, env.base_version, env.round, env.created_ns, size, path
            )
            old = self._entries.get(env.update_id)
            if old is not None and old.path != path:  # the same update written again
                old.path.unlink(missing_ok=True)
            self._entries[env.update_id] = entry
            return entry

    def remove(self, update_id: str) -> bool:
        """Delete an update (all its chunks confirmed).  False if already gone."""
        with self._lock:
            entry = self._entries.pop(update_id, None)
            if entry is None:
                return False
            entry.path.unlink(missing_ok=True)
            _fsync_dir(self.dir)
            return True

    def _make_room(self, size: int, model: str, base_version: str, new_id: str) -> None:
        used = sum(e.size for e in self._entries.values())
        if used + size <= self.max_bytes:
            return
        by_age = sorted(self._entries.values(), key=lambda e: (e.created_ns, e.update_id))
        same = [e for e in by_age if e.model == model and e.base_version == base_version]
        others = [e for e in by_age if e not in same]
        for e in same + others:
            if used + size <= self.max_bytes:
                break
            del self._entries[e.update_id]
            e.path.unlink(missing_ok=True)
            used -= e.size
            if e in same:
                self.dropped_superseded += 1
                log.warning(
                    "outbox full: update %s (round %d, base %s) superseded by newer "
                    "cumulative update %s; dropped",
                    e.update_id,
                    e.round,
                    e.base_version,
                    new_id,
                )
            else:
                self.dropped_full += 1
                log.warning(
                    "outbox full: dropped oldest update %s (base %s, %d bytes) to make room for %s",
                    e.update_id,
                    e.base_version,
                    e.size,
                    new_id,
                )
