"""Run a command inside a fresh memory cgroup with a limit (tests and benchmarks).

    run = run_in_memory_cgroup([sys.executable, "-c", "..."], 512 * 2**20, timeout=120)
    run.returncode, run.oom_killed, run.peak_bytes, run.stdout, run.stderr

Works on cgroup v1 (a hierarchy with the ``memory`` controller) and v2 (the unified
hierarchy, where the root must offer ``memory`` in ``cgroup.controllers``; it is
enabled in the parent's ``cgroup.subtree_control``).  The child is moved into the
group by a ``preexec_fn`` before it execs, so everything it allocates is charged
there.  ``limit_bytes=None`` runs without a limit (to measure a command's peak).

Where no group can be created (not root, no memory controller, read-only
cgroupfs), :func:`cgroup_unavailable_reason` says why and :func:`run_in_memory_cgroup`
raises :class:`CgroupUnavailable`; tests skip with that reason.

Peak: v1 ``memory.max_usage_in_bytes``, v2 ``memory.peak`` (kernel >= 5.19; None
before).  OOM kill: the group's ``oom_kill`` counter (v1 ``memory.oom_control``,
v2 ``memory.events``); where the counter is missing, a SIGKILL exit after the
limit was hit (``memory.failcnt`` / ``max`` events) counts as one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from waggle_trainer.remat.budget import (
    CgroupLocation,
    _parse_mountinfo,
    _read_stat,
    find_memory_cgroup,
)

__all__ = [
    "CgroupRun",
    "CgroupUnavailable",
    "cgroup_unavailable_reason",
    "run_in_memory_cgroup",
]


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be created here; the message says why."""


@dataclass(frozen=True)
class CgroupRun:
    returncode: int
    oom_killed: bool
    peak_bytes: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    cgroup_version: int = 0

    @property
    def killed_by_sigkill(self) -> bool:
        return self.returncode == -signal.SIGKILL


def _mount_root(matches) -> Path | None:
    """Mount point of the first whole-hierarchy cgroup mount that ``matches``."""
    try:
        mounts = _parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None
    for m in mounts:
        if m.root == "/" and matches(m):
            return Path(m.mount_point)
    return None


def _v2_root() -> Path | None:
    return _mount_root(lambda m: m.fstype == "cgroup2")


def _v1_root() -> Path | None:
    return _mount_root(lambda m: m.fstype == "cgroup" and "memory" in m.super_options)


def _parent_candidates() -> list[tuple[int, Path]]:
    """Where a new group may go, best first: under our own group, else the root."""
    out: list[tuple[int, Path]] = []
    own: CgroupLocation | None = find_memory_cgroup()
    if own is not None and own.version == 1:
        out.append((1, own.directory))
    root1 = _v1_root()
    if root1 is not None:
        out.append((1, root1))
    root2 = _v2_root()
    if root2 is not None:
        try:
            ctrls = (root2 / "cgroup.controllers").read_text().split()
        except OSError:
            ctrls = []
        if "memory" in ctrls:
            out.append((2, root2))
    return out


def _make_group(limit_bytes: int | None) -> tuple[int, Path]:
    if os.geteuid() != 0:
        raise CgroupUnavailable("creating a memory cgroup needs root")
    cands = _parent_candidates()
    if not cands:
        raise CgroupUnavailable(
            "no memory cgroup controller: no v1 'memory' hierarchy and no cgroup2 "
            "mount offering 'memory' in cgroup.controllers"
        )
    errors = []
    for version, parent in cands:
        name = f"waggle-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d = parent / name
        try:
            if version == 2:
                sub = parent / "cgroup.subtree_control"
                if "memory" not in sub.read_text().split():
                    sub.write_text("+memory")
            d.mkdir()
        except OSError as exc:
            errors.append(f"{parent}: {exc.strerror or exc}")
            continue
        try:
            if version == 1:
                if limit_bytes is not None:
                    (d / "memory.limit_in_bytes").write_text(str(limit_bytes))
                    memsw = d / "memory.memsw.limit_in_bytes"
                    if memsw.exists():
                        memsw.write_text(str(limit_bytes))
                oom = d / "memory.oom_control"
                if oom.exists():
                    oom.write_text("0")  # make sure the OOM killer is enabled
            else:
                if limit_bytes is not None:
                    (d / "memory.max").write_text(str(limit_bytes))
                    swap = d / "memory.swap.max"
                    if swap.exists():
                        swap.write_text("0")
        except OSError as exc:
            _remove_group(d)
            errors.append(f"{d}: setting the limit failed: {exc.strerror or exc}")
            continue
        return version, d
    raise CgroupUnavailable("cannot create a memory cgroup: " + "; ".join(errors))


def cgroup_unavailable_reason() -> str | None:
    """None if a memory cgroup can be created here, else why not."""
    try:
        _, d = _make_group(None)
    except CgroupUnavailable as exc:
        return str(exc)
    _remove_group(d)
    return None


def _procs(d: Path) -> list[int]:
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _remove_group(d: Path) -> None:
    for _ in range(100):
        for pid in _procs(d):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"could not remove cgroup {d}")


def _read_int(p: Path) -> int | None:
    try:
        return int(p.read_text().strip())
    except (OSError, ValueError):
        return None


def run_in_memory_cgroup(
    argv: Sequence[str],
    limit_bytes: int | None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    cwd: str | os.PathLike | None = None,
) -> CgroupRun:
    """Run ``argv`` in a new memory cgroup limited to ``limit_bytes`` and remove it.

    ``env`` replaces the environment (None: inherit).  On timeout every process
    in the group is killed and ``timed_out`` is set.
    """
    if limit_bytes is not None and limit_bytes <= 0:
        raise ValueError(f"limit_bytes must be positive or None, got {limit_bytes}")
    version, d = _make_group(limit_bytes)
    procs_file = str(d / "cgroup.procs")

    def _enter() -> None:  # runs in the child between fork and exec
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))

    timed_out = False
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=_enter,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for pid in _procs(d):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out, err = proc.communicate()
        if version == 1:
            peak = _read_int(d / "memory.max_usage_in_bytes")
            oom_kills = _read_stat(d / "memory.oom_control").get("oom_kill")
            hit_limit = (_read_int(d / "memory.failcnt") or 0) > 0
        else:
            peak = _read_int(d / "memory.peak")
            events = _read_stat(d / "memory.events")
            oom_kills = events.get("oom_kill")
            hit_limit = events.get("max", 0) > 0
        if oom_kills is not None:
            oom_killed = oom_kills > 0
        else:
            oom_killed = proc.returncode == -signal.SIGKILL and hit_limit and not timed_out
        return CgroupRun(
            returncode=proc.returncode,
            oom_killed=oom_killed,
            peak_bytes=peak,
            stdout=out,
            stderr=err,
            timed_out=timed_out,
            cgroup_version=version,
        )
    finally:
        _remove_group(d)
