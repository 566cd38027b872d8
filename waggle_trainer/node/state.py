"""The node's training state on disk: one safetensors file, replaced atomically.

``<state dir>/node/state.safetensors`` holds every tensor the daemon needs to
resume (student weights and optimiser state as the adaptation loop exports
them, the base weights updates are computed against, the codec's error-feedback
residual) and, in the safetensors header's metadata, one JSON document: round
counter, base version, the loop's own metadata (teacher stride, held-out
*statistics*: never images), recent round history.  One file means one rename:
the state on disk is always one complete, consistent version.

Writing: a temporary file in the same directory, ``fsync``, ``rename`` over the
old file, ``fsync`` of the directory.  A crash or power loss at any moment
leaves either the old or the new file; a full disk leaves the old one (the
temporary file is removed and the error raised to the caller, who keeps running
and retries later).

``read_meta`` reads only the header (a few KiB), for ``waggle-trainer status``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

STATE_FORMAT = "waggle-node-state/1"
META_KEY = "waggle_state"
FILE_NAME = "state.safetensors"
MAX_HEADER_BYTES = 64 * 2**20


class StateError(Exception):
    """The state file exists but cannot be used (one line: which file, why)."""


@dataclass
class NodeState:
    """Tensors by namespaced name (``loop/...``, ``base/...``, ``ef/...``) and JSON meta."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix/``, with the prefix removed."""
        p = prefix + "/"
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def put_section(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        p = prefix + "/"
        for k in [k for k in self.tensors if k.startswith(p)]:
            del self.tensors[k]
        for k, v in tensors.items():
            self.tensors[p + k] = v


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached, no two names sharing memory (safetensors refuses that)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise TypeError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if t.numel() and key in seen:
            t = t.clone()
        elif t.numel():
            seen.add(key)
        out[name] = t
    return out


def _as_oserror(exc: Exception, path: Path) -> OSError:
    """``SafetensorError("... (os error 28)")`` -> ``OSError(ENOSPC, ...)``."""
    m = re.search(r"os error (\d+)", str(exc))
    code = int(m.group(1)) if m else errno.EIO
    return OSError(code, os.strerror(code), str(path))


class StateStore:
    """Load and atomically save the node state in ``directory``."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.path = self.dir / FILE_NAME

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: NodeState) -> int:
        """Write ``state`` durably; returns the file's size.  On any error (a full
        disk: ``OSError`` ENOSPC) the previous file is untouched and the error raised."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        meta = dict(state.meta, format=STATE_FORMAT, saved_ns=time.time_ns())
        text = json.dumps(meta, sort_keys=True, allow_nan=False)
        tmp = self.dir / f".{FILE_NAME}.{os.getpid()}.tmp"
        try:
            try:
                save_file(_storable(state.tensors), str(tmp), metadata={META_KEY: text})
            except SafetensorError as exc:  # its I/O errors are not OSError: make them so
                raise _as_oserror(exc, tmp) from None
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.dir)
        return self.path.stat().st_size

    def load(self) -> NodeState | None:
        """The saved state, None when there is none; StateError when it is unusable."""
        self._remove_stale_temporaries()
        if not self.path.exists():
            return None
        meta = self.read_meta()
        try:
            tensors = load_file(str(self.path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise StateError(f"{self.path}: cannot be read ({exc})") from None
        return NodeState(tensors=tensors, meta=meta or {})

    def read_meta(self) -> dict[str, Any] | None:
        """Only the JSON metadata (header), or None without a state file."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise StateError(f"{self.path}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise StateError(f"{self.path}: header of {n} bytes is not plausible")
                header = f.read(n)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot be read ({exc.strerror})") from None
        try:
            text = json.loads(header)["__metadata__"][META_KEY]
            meta = json.loads(text)
        except (ValueError, KeyError, TypeError):
            raise StateError(f"{self.path}: not a waggle-trainer state file") from None
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise StateError(
                f"{self.path}: unknown state format {meta.get('format')!r}"
                if isinstance(meta, dict)
                else f"{self.path}: bad metadata"
            )
        return meta

    def set_aside(self) -> Path | None:
        """Rename an unusable state file out of the way (kept for a human to look at)."""
        if not self.path.exists():
            return None
        dest = self.dir / f"{FILE_NAME}.unusable-{time.strftime('%Y%m%dT%H%M%S')}"
        os.replace(self.path, dest)
        fsync_dir(self.dir)
        return dest

    def _remove_stale_temporaries(self) -> None:
        if not self.dir.is_dir():
            return
        for p in self.dir.glob(f".{FILE_NAME}.*.tmp"):
            p.unlink(missing_ok=True)  # an interrupted save: never renamed, never valid
