"""Node HMAC keys from a directory, re-read when a file changes.

``keys_dir/<node_id>.key`` holds one node's secret (mode 0600, at least 16
bytes, see :func:`waggle_trainer.transport.codec.load_key`).  A key is looked
up on every update; the file is re-read when its inode, size or mtime changed,
so adding, rotating or revoking (deleting) a key needs no restart.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

from waggle_trainer.transport.codec import load_key

log = logging.getLogger(__name__)

_NODE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class NodeKeys:
    """Callable ``node_id -> key | None`` for :class:`UpdateDecoder`."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._cache: dict[str, tuple[tuple[int, int, int], bytes | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, node_id: str) -> bytes | None:
        if not _NODE_RE.match(node_id):
            return None
        path = self.dir / f"{node_id}.key"
        try:
            st = path.stat()
        except OSError:
            with self._lock:
                self._cache.pop(node_id, None)
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(node_id)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        try:
            key: bytes | None = load_key(path)
        except (OSError, ValueError) as e:
            log.error("node key %s unusable: %s", path, e)
            key = None
        with self._lock:
            self._cache[node_id] = (stamp, key)
        return key

    def nodes(self) -> list[str]:
        """Node ids that have a key file now."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return sorted(n[:-4] for n in names if n.endswith(".key") and _NODE_RE.match(n[:-4]))
