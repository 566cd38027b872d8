"""How much memory the activations of a training step may use (psutil + cgroups).

Free memory is the smaller of two numbers:

* ``psutil.virtual_memory().available``: what the kernel could hand out without
  swapping (free pages plus reclaimable cache);
* for each memory cgroup from this process's own up to the hierarchy's root that
  has a limit: ``limit - (usage - inactive_file)``.  psutil alone ignores a
  container's limit or systemd's ``MemoryMax=``, and a process that trusts it is
  OOM-killed far below what ``free`` shows.

Where the numbers come from:

* cgroup v2: ``memory.max`` (``"max"`` = unlimited) and ``memory.high`` (the
  throttling limit: a step that crosses it stalls in reclaim, so it is treated as a
  limit too), ``memory.current``, ``inactive_file`` of ``memory.stat``.
* cgroup v1: ``memory.limit_in_bytes`` (values near 2**63 = unlimited),
  ``memory.usage_in_bytes``, ``total_inactive_file`` of ``memory.stat``.

**Page cache.**  Both ``usage_in_bytes`` (v1) and ``memory.current`` (v2) include
the page cache charged to the group: files the daemon or its neighbours read.  The
kernel reclaims clean inactive file pages before it OOM-kills, so counting them as
used would make a freshly started node with a warm cache plan a needlessly small
budget.  We subtract ``inactive_file`` (as ``docker stats``, cAdvisor and the
kubelet's eviction manager do) and keep active file pages counted: those are in
use and reclaiming them thrashes.  This errs on the generous side by at most the
group's active file pages, which the safety margin covers.

**Nesting.**  The effective headroom is the minimum over every limited ancestor of
*its* limit minus *its* usage: a parent limited to 1 GiB whose other children use
900 MiB leaves 100 MiB, however large this group's own limit.

The activation budget (:func:`activation_budget`) is

    free - safety margin - training state not yet resident - other reserve

where the training state is parameters, buffers, gradients and optimiser state
(:func:`training_state_bytes`).  :class:`BudgetWatcher` re-reads free memory
between steps and says when it moved by more than a fraction, so the daemon
re-plans; one read costs a few file reads (tens of microseconds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from waggle_trainer.common import format_size, parse_size

from .optim import state_multiple

__all__ = [
    "CgroupLocation",
    "CgroupLevel",
    "CgroupMemory",
    "FreeMemory",
    "TrainingState",
    "BudgetBreakdown",
    "BudgetChange",
    "BudgetWatcher",
    "find_memory_cgroup",
    "read_cgroup_memory",
    "free_memory",
    "free_memory_bytes",
    "training_state_bytes",
    "activation_budget",
    "parse_size",
    "format_size",
]

# v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 on
# x86-64 with 4 KiB pages); anything this large is no limit on any machine.
_V1_UNLIMITED = 2**62


# ------------------------------------------------------------------ locating


@dataclass(frozen=True)
class CgroupLocation:
    """Where this process's memory cgroup lives.

    version      1 or 2
    mount_point  the hierarchy's mount point (e.g. ``/sys/fs/cgroup/memory``)
    directory    this process's cgroup directory under it
    """

    version: int
    mount_point: Path
    directory: Path

    def ancestors(self) -> list[Path]:
        """This group's directory and every ancestor up to the mount point."""
        out = [self.directory]
        d = self.directory
        while d != self.mount_point and self.mount_point in d.parents:
            d = d.parent
            out.append(d)
        return out


def _parse_proc_cgroup(text: str) -> list[tuple[str, list[str], str]]:
    """``/proc/PID/cgroup`` lines ``ID:controllers:path`` -> (id, controllers, path)."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        out.append((hid, [c for c in ctrls.split(",") if c], path))
    return out


def _unescape_mount(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal \040 etc.
    return s.encode().decode("unicode_escape") if "\\" in s else s


@dataclass(frozen=True)
class _Mount:
    root: str
    mount_point: str
    fstype: str
    super_options: tuple[str, ...]


def _parse_mountinfo(text: str) -> list[_Mount]:
    out = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or len(fields) < sep + 3:
            continue
        out.append(
            _Mount(
                root=_unescape_mount(fields[3]),
                mount_point=_unescape_mount(fields[4]),
                fstype=fields[sep + 1],
                super_options=tuple(fields[sep + 3].split(",")),
            )
        )
    return out


def _join_under(mount: _Mount, cgroup_path: str) -> Path | None:
    """The directory of ``cgroup_path`` (relative to the hierarchy) in ``mount``."""
    root = mount.root.rstrip("/") or "/"
    if root != "/":
        if cgroup_path != root and not cgroup_path.startswith(root + "/"):
            return None
        cgroup_path = cgroup_path[len(root) :]
    rel = cgroup_path.lstrip("/")
    return Path(mount.mount_point) / rel if rel else Path(mount.mount_point)


def find_memory_cgroup(
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
    mountinfo: str | os.PathLike = "/proc/self/mountinfo",
) -> CgroupLocation | None:
    """Locate this process's memory cgroup; None where there is none.

    A v1 hierarchy carrying the ``memory`` controller wins; otherwise the v2
    (unified) hierarchy is used if its group has the memory files (a cgroup2 mount
    without the memory controller enabled is not a memory cgroup).
    """
    try:
        groups = _parse_proc_cgroup(Path(proc_cgroup).read_text())
        mounts = _parse_mountinfo(Path(mountinfo).read_text())
    except OSError:
        return None

    for _, ctrls, path in groups:
        if "memory" not in ctrls:
            continue
        for m in mounts:
            if m.fstype == "cgroup" and "memory" in m.super_options:
                d = _join_under(m, path)
                if d is not None and (d / "memory.limit_in_bytes").exists():
                    return CgroupLocation(1, Path(m.mount_point), d)

    for hid, ctrls, path in groups:
        if hid != "0" or ctrls:
            continue
        for m in mounts:
            if m.fstype == "cgroup2":
                d = _join_under(m, path)
                if d is not None and (d / "memory.current").exists():
                    return CgroupLocation(2, Path(m.mount_point), d)
    return None


# ------------------------------------------------------------------ reading


def _read_int_file(p: Path) -> int | None:
    try:
        s = p.read_text().strip()
    except OSError:
        return None
    if s == "max":
        return None
    try:
        return int(s)
    except ValueError:
        return None


def _read_stat(p: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = p.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        try:
            out[k] = int(v)
        except ValueError:
            pass
    return out


@dataclass(frozen=True)
class CgroupLevel:
    """One group on the path to the root: its limit (None = none) and usage."""

    directory: str
    limit_bytes: int | None
    usage_bytes: int | None
    inactive_file_bytes: int

    @property
    def headroom_bytes(self) -> int | None:
        if self.limit_bytes is None or self.usage_bytes is None:
            return None
        used = max(0, self.usage_bytes - self.inactive_file_bytes)
        return max(0, self.limit_bytes - used)


@dataclass(frozen=True)
class CgroupMemory:
    """This process's memory cgroup, read once."""

    version: int
    directory: str
    levels: tuple[CgroupLevel, ...]

    @property
    def limit_bytes(self) -> int | None:
        """The effective limit: the smallest over this group and its ancestors."""
        limits = [lv.limit_bytes for lv in self.levels if lv.limit_bytes is not None]
        return min(limits) if limits else None

    @property
    def usage_bytes(self) -> int | None:
        return self.levels[0].usage_bytes if self.levels else None

    @property
    def available_bytes(self) -> int | None:
        """min over limited levels of limit - (usage - inactive_file); None if no limit."""
        rooms = [lv.headroom_bytes for lv in self.levels if lv.headroom_bytes is not None]
        return min(rooms) if rooms else None


def _read_level(version: int, d: Path) -> CgroupLevel:
    stat = _read_stat(d / "memory.stat")
    if version == 2:
        read = [_read_int_file(d / "memory.max"), _read_int_file(d / "memory.high")]
        limits = [x for x in read if x is not None]
        limit = min(limits) if limits else None
        usage = _read_int_file(d / "memory.current")
        inactive = stat.get("inactive_file", 0)
    else:
        limit = _read_int_file(d / "memory.limit_in_bytes")
        if limit is not None and limit >= _V1_UNLIMITED:
            limit = None
        usage = _read_int_file(d / "memory.usage_in_bytes")
        inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return CgroupLevel(str(d), limit, usage, inactive)


def read_cgroup_memory(location: CgroupLocation | None = None) -> CgroupMemory | None:
    """Read limit and usage of this process's group and its ancestors.

    The v2 root group has no ``memory.max``/``memory.current``; such levels are
    read as unlimited.  Returns None where there is no memory cgroup.
    """
    loc = location if location is not None else find_memory_cgroup()
    if loc is None:
        return None
    levels = tuple(_read_level(loc.version, d) for d in loc.ancestors())
    return CgroupMemory(loc.version, str(loc.directory), levels)


@dataclass(frozen=True)
class FreeMemory:
    """Free memory and where the number came from."""

    system_available_bytes: int
    cgroup_available_bytes: int | None
    cgroup_limit_bytes: int | None
    cgroup_version: int | None

    @property
    def free_bytes(self) -> int:
        if self.cgroup_available_bytes is None:
            return self.system_available_bytes
        return min(self.system_available_bytes, self.cgroup_available_bytes)

    @property
    def limited_by(self) -> str:
        if self.cgroup_available_bytes is not None and (
            self.cgroup_available_bytes < self.system_available_bytes
        ):
            return f"cgroup v{self.cgroup_version}"
        return "system"


_LOCATION_CACHE: dict[str, CgroupLocation | None] = {}


def _cached_location() -> CgroupLocation | None:
    # A process does not change cgroup on its own; locating it parses mountinfo,
    # reading it is a handful of small files.
    if "self" not in _LOCATION_CACHE:
        _LOCATION_CACHE["self"] = find_memory_cgroup()
    return _LOCATION_CACHE["self"]


def free_memory(location: CgroupLocation | None = None) -> FreeMemory:
    """Free memory now: system available and cgroup headroom, both reported."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    loc = location if location is not None else _cached_location()
    cg = read_cgroup_memory(loc) if loc is not None else None
    return FreeMemory(
        system_available_bytes=avail,
        cgroup_available_bytes=cg.available_bytes if cg else None,
        cgroup_limit_bytes=cg.limit_bytes if cg else None,
        cgroup_version=cg.version if cg else None,
    )


def free_memory_bytes(location: CgroupLocation | None = None) -> int:
    """min(psutil available, headroom of every limited cgroup level)."""
    return free_memory(location).free_bytes


# ------------------------------------------------------------------ training state


@dataclass(frozen=True)
class TrainingState:
    """Bytes resident for the whole of training, besides activations."""

    parameter_bytes: int
    buffer_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    optimizer: str
    #: The optimiser step is fused into the backward (:mod:`.fused_step`): no
    #: gradient stays resident (``gradient_bytes`` is 0); each parameter's gradient
    #: is a transient of its stage's backward, counted by the plan.
    fused_step: bool = False

    @property
    def total_bytes(self) -> int:
        return (
            self.parameter_bytes
            + self.buffer_bytes
            + self.gradient_bytes
            + self.optimizer_state_bytes
        )


def training_state_bytes(
    model,
    optimizer: str = "sgd-momentum",
    *,
    momentum: float | None = None,
    fused_step: bool = False,
) -> TrainingState:
    """Parameters, buffers, gradients and optimiser state of ``model``.

    ``model`` is an ``nn.Module`` (only trainable parameters get gradients and
    optimiser state; buffers such as BatchNorm's running statistics are counted
    once) or an int, the bytes of trainable parameters.  ``optimizer`` is one of
    ``sgd``, ``sgd-momentum``, ``adam``, ``adamw``; ``sgd`` with a non-zero
    ``momentum`` is ``sgd-momentum`` (the config's ``optimizer``/``momentum``).
    ``fused_step``: the step runs inside the backward, so gradients are not resident.
    """
    key, mult = state_multiple(optimizer, momentum)
    if isinstance(model, bool) or not (isinstance(model, int) or hasattr(model, "parameters")):
        raise TypeError(f"expected an nn.Module or a byte count, got {type(model).__name__}")
    if isinstance(model, int):
        if model < 0:
            raise ValueError(f"parameter bytes must be >= 0, got {model}")
        trainable, frozen, buffers = model, 0, 0
    else:
        trainable = frozen = 0
        for p in model.parameters():
            n = p.numel() * p.element_size()
            if p.requires_grad:
                trainable += n
            else:
                frozen += n
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return TrainingState(
        parameter_bytes=trainable + frozen,
        buffer_bytes=buffers,
        gradient_bytes=0 if fused_step else trainable,
        optimizer_state_bytes=mult * trainable,
        optimizer=key,
        fused_step=fused_step,
    )


# ------------------------------------------------------------------ the budget


@dataclass(frozen=True)
class BudgetBreakdown:
    """How the activation budget was derived; every field in bytes."""

    free_bytes: int
    safety_margin_bytes: int
    training_state_bytes: int
    training_state_resident_bytes: int
    reserve_bytes: int
    activation_budget_bytes: int
    limited_by: str = "given"

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        to_come = self.training_state_bytes - self.training_state_resident_bytes
        return [
            f"free memory        {format_size(self.free_bytes):>12}  ({self.limited_by})",
            f"- safety margin    {format_size(self.safety_margin_bytes):>12}",
            f"- training state   {format_size(to_come):>12}"
            f"  (of {format_size(self.training_state_bytes)}; the rest already resident)",
            f"- other reserve    {format_size(self.reserve_bytes):>12}",
            f"= activations      {format_size(self.activation_budget_bytes):>12}",
        ]


def activation_budget(
    state: TrainingState | int = 0,
    *,
    free: int | FreeMemory | None = None,
    safety_fraction: float = 0.1,
    min_safety_bytes: int = 32 * 2**20,
    reserve_bytes: int = 0,
    state_resident_bytes: int = 0,
) -> BudgetBreakdown:
    """The memory left for activations, with the breakdown.

    ``free``: bytes, a :class:`FreeMemory`, or None to read it now.  The safety
    margin is ``max(safety_fraction * free, min_safety_bytes)``.  ``state`` is the
    training state (:func:`training_state_bytes`) or its byte count;
    ``state_resident_bytes`` is the part of it already allocated when ``free`` was
    read (parameters exist once the model is built; gradients and optimiser state
    only after the first step), so it is not subtracted twice.  The result is
    clamped at 0: a budget of 0 means nothing fits.
    """
    if not 0 <= safety_fraction < 1:
        raise ValueError(f"safety_fraction must be in [0, 1), got {safety_fraction}")
    for name, v in (
        ("min_safety_bytes", min_safety_bytes),
        ("reserve_bytes", reserve_bytes),
        ("state_resident_bytes", state_resident_bytes),
    ):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if free is None:
        free = free_memory()
    limited_by = "given"
    if isinstance(free, FreeMemory):
        limited_by = free.limited_by
        free_b = free.free_bytes
    else:
        free_b = int(free)
    state_b = state.total_bytes if isinstance(state, TrainingState) else int(state)
    resident = min(state_resident_bytes, state_b)
    margin = max(int(safety_fraction * free_b), min_safety_bytes)
    budget = free_b - margin - (state_b - resident) - reserve_bytes
    return BudgetBreakdown(
        free_bytes=free_b,
        safety_margin_bytes=margin,
        training_state_bytes=state_b,
        training_state_resident_bytes=resident,
        reserve_bytes=reserve_bytes,
        activation_budget_bytes=max(0, budget),
        limited_by=limited_by,
    )


# ------------------------------------------------------------------ watching


@dataclass(frozen=True)
class BudgetChange:
    """Free memory moved by more than the threshold since the last plan."""

    previous_bytes: int
    current_bytes: int

    @property
    def fraction(self) -> float:
        return (self.current_bytes - self.previous_bytes) / max(1, self.previous_bytes)


@dataclass
class BudgetWatcher:
    """Says when free memory moved by more than ``threshold`` (a fraction).

    Poll it between steps (after :func:`waggle_trainer.remat.allocator.trim`, so
    the process's own freed activations are not mistaken for a neighbour's
    growth).  ``poll()`` returns None, or a :class:`BudgetChange` and takes the
    new value as the reference (the caller re-plans for it).  Reads are
    rate-limited to one per ``min_interval_s``.
    """

    threshold: float = 0.1
    reader: Callable[[], int] = free_memory_bytes
    min_interval_s: float = 0.0
    clock: Callable[[], float] = time.monotonic
    reference_bytes: int | None = None
    _last_read: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.reference_bytes is None:
            self.reference_bytes = int(self.reader())
            self._last_read = self.clock()

    def poll(self) -> BudgetChange | None:
        now = self.clock()
        if self._last_read is not None and now - self._last_read < self.min_interval_s:
            return None
        self._last_read = now
        current = int(self.reader())
        ref = self.reference_bytes
        assert ref is not None  # set in __post_init__
        if abs(current - ref) > self.threshold * max(ref, 1):
            self.reference_bytes = current
            return BudgetChange(ref, current)
        return None

    def reset(self, free_bytes: int | None = None) -> None:
        """Take ``free_bytes`` (or a fresh read) as the reference."""
        self.reference_bytes = int(self.reader()) if free_bytes is None else int(free_bytes)
        self._last_read = self.clock()
