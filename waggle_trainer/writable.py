"""Every path a command writes, checked once, before the command does any work.

The paths a command creates or writes all come from its config or the environment
(``[state] dir`` and the directories under it, ``[server] state_dir``, ``--save``).
Each command lists them here (:func:`node_state_targets`, :func:`server_state_targets`)
and calls :func:`prepare` first: a directory is created if missing (mode 0700) and
proven writable by creating and removing a file in it, which is what catches a
read-only file system, a full one or a directory owned by another user (``os.access``
does not for root); a file's directory is checked the same way, and an existing file
must be a regular file.

A problem is a :class:`PathProblem`: one line naming the config key or flag, the
path, what is wrong and what is needed, which the command prints before exiting
non-zero.  Standard library only: every layer may use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: The node's state directory layout (``docs/architecture.md``, "State and I/O").
NODE_SUBDIRS = ("node", "outbox", "profiles", "models")
#: The server's (``docs/deploy.md``): staged chunks, verified updates, versions.
SERVER_SUBDIRS = ("staging", "pending", "models")


@dataclass(frozen=True)
class Target:
    """A path a command writes: ``what`` is the config key or flag it comes from."""

    what: str
    path: Path
    kind: Literal["dir", "file"] = "dir"
    need: str = "a directory this user can create files in"


class PathProblem(ValueError):
    """A path from the config or the command line that cannot be written (one line)."""

    def __init__(self, target: Target, why: str):
        self.target = target
        self.why = why
        super().__init__(f"{target.what}: {target.path}: {why} ({target.need})")


def prepare(targets: Iterable[Target]) -> None:
    """Create and probe every target, in order; raises :class:`PathProblem` for the
    first that cannot be written."""
    for t in targets:
        if t.kind == "dir":
            _directory(t, Path(t.path))
        else:
            _file(t)


def problems(targets: Iterable[Target]) -> list[PathProblem]:
    """Every target's problem (for a config check that reports all at once)."""
    out = []
    for t in targets:
        try:
            prepare([t])
        except PathProblem as exc:
            out.append(exc)
    return out


def _directory(t: Target, path: Path) -> None:
    if not str(path).strip():
        raise PathProblem(t, "the path is empty")
    if path.exists() and not path.is_dir():
        raise PathProblem(t, "exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (FileExistsError, NotADirectoryError):
        raise PathProblem(t, "a part of the path is a file, not a directory") from None
    except OSError as exc:
        raise PathProblem(t, f"cannot be created: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    except OSError as exc:
        raise PathProblem(t, f"cannot be written: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def _file(t: Target) -> None:
    path = Path(t.path)
    if path.exists() and not path.is_file():
        raise PathProblem(t, "exists and is not a regular file")
    parent = Target(t.what, path.absolute().parent, "dir", t.need)
    try:
        _directory(parent, parent.path)
    except PathProblem as exc:
        raise PathProblem(t, f"its directory {parent.path}: {exc.why}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise PathProblem(t, "exists and is not writable by this user")


# ------------------------------------------------------------------ per command


def node_state_targets(state_dir: Path, *, subdirs: Iterable[str] = NODE_SUBDIRS) -> list[Target]:
    """``[state] dir`` and the directories the node writes under it."""
    need = (
        "a directory this user can write: set [state] dir, or run under systemd with "
        "StateDirectory="
    )
    root = Path(state_dir)
    return [Target("state.dir", root, "dir", need)] + [
        Target("state.dir", root / sub, "dir", need) for sub in subdirs
    ]


def server_state_targets(state_dir: Path) -> list[Target]:
    """``[server] state_dir`` and the directories the server writes under it."""
    need = "a directory the server's user can write: set server.state_dir"
    root = Path(state_dir)
    return [Target("server.state_dir", root, "dir", need)] + [
        Target("server.state_dir", root / sub, "dir", need) for sub in SERVER_SUBDIRS
    ]
