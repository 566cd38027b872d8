"""Make checkpointing's memory savings real on CPU: glibc malloc settings.

Why
---
PyTorch's CPU tensors come from ``malloc``.  glibc serves blocks above its mmap
threshold with their own mapping (returned to the kernel by ``free``), the rest from
heaps that can only shrink from the top.  The threshold starts at 128 KiB but is
*dynamic*: the first free of an mmapped block raises it to that block's size (up to
32 MiB), so after the first step almost every activation lives in the heap, and a
plan that frees activations early leaves holes that stay resident.  Checkpointing
then barely lowers the process's peak, and the peak is what the OOM killer sees.

What it costs and saves on this project's test machine (tables, commands, commit,
CPU) is in ``bench/results/allocator.md``; in short: a fixed 1 MiB threshold makes
the RSS growth of a step follow the tensor-level need (so checkpointing's saving is
real), at the price of page faults (every large block is a fresh, zeroed mapping),
which makes CPU steps slower; a 128 KiB threshold also maps oneDNN's scratch
buffers and costs far more.  ``MALLOC_ARENA_MAX`` does nothing for activations, and
``malloc_trim`` after a step cannot lower the peak inside it.

Choice: ``configure_allocator()`` defaults to ``mode="mmap"`` with a 1 MiB
threshold and a 16 MiB trim threshold.  The training run picks the mode from its
plan (``waggle_trainer.learn.planned_training.allocator_mode_for``): ``"mmap"``
when the plan recomputes anything or memory is tight, glibc's defaults when nothing
is recomputed and the budget has room.  jemalloc (``LD_PRELOAD``, Debian
``libjemalloc2``) gives about the same memory at a similar cost; where it is
preloaded, ``configure_allocator`` detects it and leaves glibc alone, and
:func:`trim` purges jemalloc's arenas instead.

Huge pages: with ``THP_MEM_ALLOC_ENABLE=1`` in the environment *before torch is
imported* (the command line sets it), PyTorch 2 MiB-aligns tensors of 2 MiB or
more and ``madvise``-s them ``MADV_HUGEPAGE``, so fresh mappings take 512x fewer
page faults.

API
---
``configure_allocator(mode="mmap", *, mmap_threshold=..., trim_threshold=...,
arena_max=None) -> AllocatorSettings``
    Applies glibc ``mallopt`` settings to the running process (call it once at
    start-up, before the model is built; later calls replace the settings).
    Modes: ``"default"`` (touch nothing), ``"mmap"`` (fixed mmap threshold: every
    block of at least ``mmap_threshold`` bytes is its own mapping, returned to the
    kernel on ``free``), ``"trim"`` (no settings; the caller calls :func:`trim`
    after each step).  Setting ``M_MMAP_THRESHOLD`` explicitly also switches off
    glibc's *dynamic* threshold, which otherwise rises to 32 MiB after the first
    large free and lets big tensors pile up in the heap, where a free in the middle
    cannot be given back.
``trim() -> bool``
    ``malloc_trim(0)``: return free heap pages of every arena to the kernel.
``allocator_env(mode, ...) -> dict``
    The same settings as environment variables (``MALLOC_MMAP_THRESHOLD_`` etc.) or
    ``LD_PRELOAD`` of jemalloc, for a child process (benchmarks, re-exec).

On a C library other than glibc the functions are no-ops that say so
(``AllocatorSettings.applied`` is False).

Preloaded allocators
--------------------
``waggle-trainer bench --allocator NAME`` and ``[memory] allocator`` choose among
:data:`ALLOCATORS`: glibc (the settings above) or jemalloc, tcmalloc (minimal) and
mimalloc from the distribution (Debian ``libjemalloc2``, ``libtcmalloc-minimal4``,
``libmimalloc2.0``).  A preloaded allocator must be loaded before anything else, so
the command line re-executes itself (:func:`reexec_under`)
with ``LD_PRELOAD`` and the retention settings of :data:`RETENTION`, or the systemd
unit sets them with ``Environment=``.  :func:`plan_preload` decides, without
side effects; :func:`loaded_allocator` reads ``/proc/self/maps``;
:func:`configure_allocator` leaves glibc alone under a preloaded allocator and
:func:`trim` calls that allocator's own release.

The default (:data:`DEFAULT_ALLOCATOR`) is tcmalloc with a release hook
(:func:`release_hook`, called by the executor after every operation of a
recomputing schedule).  tcmalloc keeps what a step frees and hands it to the next
allocation of a similar size: no fresh mappings, no page faults, no zeroing.  Left
alone it also keeps what fragmentation strands (resnet18 batch 8 at 500 px: a step
grew 930 MiB under a 511 MiB plan); the hook gives back whatever its page heap holds
free beyond what the plan leaves unused of the budget, so the process follows the
plan while most blocks are still reused.  Measured side by side, end to end, with
CPU time and page faults per step: ``bench/results/end_to_end.md``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

__all__ = [
    "MODES",
    "DEFAULT_MODE",
    "DEFAULT_MMAP_THRESHOLD",
    "DEFAULT_TRIM_THRESHOLD",
    "AllocatorSettings",
    "configure_allocator",
    "trim",
    "allocator_env",
    "find_jemalloc",
    "jemalloc_loaded",
    "ALLOCATORS",
    "DEFAULT_ALLOCATOR",
    "PRELOADED",
    "PreloadPlan",
    "find_allocator",
    "loaded_allocator",
    "preload_env",
    "plan_preload",
    "reexec_under",
    "release_hook",
    "release_slack_bytes",
]

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MODES = ("default", "mmap", "trim")
DEFAULT_MODE = "mmap"
DEFAULT_MMAP_THRESHOLD = 1 << 20
DEFAULT_TRIM_THRESHOLD = 16 << 20
# glibc caps M_MMAP_THRESHOLD at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
_MAX_MMAP_THRESHOLD = 32 << 20


@dataclass(frozen=True)
class AllocatorSettings:
    mode: str
    applied: bool
    mmap_threshold: int | None = None
    trim_threshold: int | None = None
    arena_max: int | None = None
    note: str = ""
    allocator: str = "glibc"


def jemalloc_loaded() -> bool:
    """True if jemalloc is mapped into this process (e.g. via ``LD_PRELOAD``)."""
    try:
        with open("/proc/self/maps") as f:
            return any("libjemalloc" in line for line in f)
    except OSError:
        return "jemalloc" in os.environ.get("LD_PRELOAD", "")


@lru_cache(maxsize=1)
def _jemalloc_mallctl():
    if not jemalloc_loaded():
        return None
    try:
        fn = ctypes.CDLL(None).mallctl
    except AttributeError:
        return None
    fn.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    fn.restype = ctypes.c_int
    return fn


@lru_cache(maxsize=1)
def _libc():
    """The process's C library if it is glibc (has mallopt and malloc_trim)."""
    try:
        lib = ctypes.CDLL(None)
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.mallopt.restype = ctypes.c_int
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.malloc_trim.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown allocator mode {mode!r} (allowed: {', '.join(MODES)})")


def _check_threshold(name: str, value: int, upper: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer of bytes, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper} bytes (glibc's cap), got {value}")


def configure_allocator(
    mode: str = DEFAULT_MODE,
    *,
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
    arena_max: int | None = None,
) -> AllocatorSettings:
    """Apply allocator settings to this process (see the module docstring)."""
    _check_mode(mode)
    _check_threshold("mmap_threshold", mmap_threshold, _MAX_MMAP_THRESHOLD)
    _check_threshold("trim_threshold", trim_threshold)
    if arena_max is not None and (
        isinstance(arena_max, bool) or not isinstance(arena_max, int) or arena_max < 1
    ):
        raise ValueError(f"arena_max must be a positive integer or None, got {arena_max!r}")
    preloaded = loaded_allocator()
    if preloaded != "glibc":
        return AllocatorSettings(
            mode,
            applied=False,
            allocator=preloaded,
            note=f"{preloaded} is preloaded: glibc's settings do not apply",
        )
    if mode in ("default", "trim") and arena_max is None:
        return AllocatorSettings(mode, applied=True, note="no mallopt settings")
    lib = _libc()
    if lib is None:
        return AllocatorSettings(mode, applied=False, note="not glibc: mallopt unavailable")
    ok = True
    if mode == "mmap":
        ok &= lib.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok &= lib.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    if arena_max is not None:
        ok &= lib.mallopt(M_ARENA_MAX, arena_max) == 1
    return AllocatorSettings(
        mode,
        applied=bool(ok),
        mmap_threshold=mmap_threshold if mode == "mmap" else None,
        trim_threshold=trim_threshold if mode == "mmap" else None,
        arena_max=arena_max,
        note="" if ok else "mallopt refused a setting",
    )


def trim() -> bool:
    """Give free memory back to the kernel; True if the call succeeded / released some.

    glibc: ``malloc_trim(0)``.  jemalloc (preloaded): purge the dirty pages of all
    arenas (``mallctl("arena.4096.purge")``).  tcmalloc: ``ReleaseFreeMemory``.
    mimalloc: ``mi_collect(true)``.
    """
    mallctl = _jemalloc_mallctl()
    if mallctl is not None:
        return mallctl(b"arena.4096.purge", None, None, None, 0) == 0
    release = _preloaded_release()
    if release is not None:
        release()
        return True
    lib = _libc()
    if lib is None:
        return False
    return lib.malloc_trim(0) == 1


def find_jemalloc() -> str | None:
    """Path of libjemalloc.so.2 (Debian: ``apt-get install libjemalloc2``) or None."""
    for d in (
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib/arm-linux-gnueabihf",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ):
        p = Path(d) / "libjemalloc.so.2"
        if p.exists():
            return str(p)
    name = ctypes.util.find_library("jemalloc")
    return name if name and os.path.isabs(name) else None


def allocator_env(
    mode: str = DEFAULT_MODE,
    *,
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
    arena_max: int | None = None,
    jemalloc: bool = False,
    jemalloc_conf: str | None = None,
) -> dict[str, str]:
    """Environment variables that apply the same settings to a child process."""
    _check_mode(mode)
    _check_threshold("mmap_threshold", mmap_threshold, _MAX_MMAP_THRESHOLD)
    _check_threshold("trim_threshold", trim_threshold)
    env: dict[str, str] = {}
    if jemalloc:
        path = find_jemalloc()
        if path is None:
            raise FileNotFoundError("libjemalloc.so.2 not found (apt-get install libjemalloc2)")
        env["LD_PRELOAD"] = path
        if jemalloc_conf:
            env["MALLOC_CONF"] = jemalloc_conf
        return env
    if mode == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        env["MALLOC_TRIM_THRESHOLD_"] = str(trim_threshold)
    if arena_max is not None:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    return env


# ------------------------------------------------------------------ preloaded allocators

#: Allocators the command line can run under: glibc's own malloc, or one of the
#: distribution's reusing allocators loaded with ``LD_PRELOAD``.
AllocatorName = Literal["glibc", "jemalloc", "tcmalloc", "mimalloc"]
ALLOCATORS: tuple[str, ...] = get_args(AllocatorName)
#: What ``bench``, ``run`` and the daemon use unless told otherwise: tcmalloc with
#: the executor's release hook (:func:`release_hook`) gave the lowest step time at a
#: peak no higher than glibc's fixed-mmap mode (``bench/results/end_to_end.md``);
#: where it is not installed the command line says so and runs under glibc.
DEFAULT_ALLOCATOR: AllocatorName = "tcmalloc"

#: Library file names (Debian: libjemalloc2, libtcmalloc-minimal4, libmimalloc2.0).
PRELOADED: dict[str, tuple[str, ...]] = {
    "jemalloc": ("libjemalloc.so.2",),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "mimalloc": ("libmimalloc.so.2", "libmimalloc.so.2.0"),
}
_PACKAGES = {
    "jemalloc": "libjemalloc2",
    "tcmalloc": "libtcmalloc-minimal4",
    "mimalloc": "libmimalloc2.0",
}
_MAPS_NAMES = {"jemalloc": "libjemalloc", "tcmalloc": "libtcmalloc", "mimalloc": "libmimalloc"}

#: Retention settings: a checkpointing plan frees an activation and allocates one of
#: a similar size moments later, so freed memory must stay with the allocator for the
#: length of a step (reused, no page faults) and go back between steps
#: (:func:`trim`, called by the training run before each re-plan and measurement).
#:
#: * jemalloc: no separate arena with eager purging for large blocks
#:   (``oversize_threshold:0``; by default blocks of 8 MiB and more, i.e. every
#:   activation, are returned at once), dirty pages kept 10 s, muzzy pages not kept.
#: * tcmalloc: free spans are not released gradually (``TCMALLOC_RELEASE_RATE=0``),
#:   only by :func:`trim`.
#: * mimalloc 2.0: freed segments and pages are kept 10 s before decommit/reset.
RETENTION: dict[str, dict[str, str]] = {
    "jemalloc": {"MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:10000,muzzy_decay_ms:0"},
    "tcmalloc": {"TCMALLOC_RELEASE_RATE": "0"},
    "mimalloc": {"MIMALLOC_DECOMMIT_DELAY": "10000", "MIMALLOC_RESET_DELAY": "10000"},
}

_LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def _check_allocator(name: str) -> None:
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r} (allowed: {', '.join(ALLOCATORS)})")


def find_allocator(name: str) -> str | None:
    """Path of the preloadable library of allocator ``name``; None if not installed
    (and for ``"glibc"``, which needs none)."""
    _check_allocator(name)
    for filename in PRELOADED.get(name, ()):
        for d in _LIB_DIRS:
            p = Path(d) / filename
            if p.exists():
                return str(p)
    return None


def loaded_allocator(maps: str | os.PathLike = "/proc/self/maps") -> str:
    """The allocator mapped into this process (``/proc/self/maps``): one of
    :data:`ALLOCATORS`; ``"glibc"`` when none of the others is."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "glibc"
    for name, needle in _MAPS_NAMES.items():
        if needle in text:
            return name
    return "glibc"


@lru_cache(maxsize=1)
def _preloaded_release():
    """tcmalloc's or mimalloc's "give free memory back" call, if one is loaded."""
    which = loaded_allocator()
    try:
        lib = ctypes.CDLL(None)
        if which == "tcmalloc":
            fn = lib.MallocExtension_ReleaseFreeMemory
            fn.argtypes, fn.restype = [], None
            return fn
        if which == "mimalloc":
            collect = lib.mi_collect
            collect.argtypes, collect.restype = [ctypes.c_bool], None
            return lambda: collect(True)
    except AttributeError:
        return None
    return None


def preload_env(name: str, path: str) -> dict[str, str]:
    """Environment for a process running under allocator ``name`` loaded from ``path``:
    ``LD_PRELOAD`` and :data:`RETENTION` (settings already in the environment win)."""
    _check_allocator(name)
    env = {k: v for k, v in RETENTION.get(name, {}).items() if k not in os.environ}
    current = os.environ.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{path}:{current}" if current else path
    return env


@dataclass(frozen=True)
class PreloadPlan:
    """What the command line does about ``--allocator``: ``env`` to re-execute with
    (None: carry on in this process) and ``note`` to log (empty: nothing to say)."""

    name: str
    env: dict[str, str] | None
    note: str = ""


def plan_preload(name: str, environ: dict[str, str] | None = None) -> PreloadPlan:
    """Decide how to run under allocator ``name`` (``waggle-trainer`` re-executes itself).

    Already loaded (or glibc asked for): carry on.  Another one preloaded by the
    environment (a systemd unit's ``Environment=LD_PRELOAD=...``): carry on under it,
    with one line saying so (two allocators are never stacked).  Installed:
    re-execute with :func:`preload_env`.  Missing: carry on under glibc, with one line
    saying so.  A re-executed process that still lacks it (``WAGGLE_PRELOADED`` set)
    carries on too, so there is never a loop.
    """
    _check_allocator(name)
    environ = dict(os.environ) if environ is None else environ
    loaded = loaded_allocator()
    if name == loaded:
        return PreloadPlan(name, None)
    if name == "glibc":
        return PreloadPlan(loaded, None)
    if loaded != "glibc":
        return PreloadPlan(
            loaded,
            None,
            f"allocator {name}: {loaded} is already preloaded (LD_PRELOAD="
            f"{environ.get('LD_PRELOAD', '')!r}); using {loaded}",
        )
    path = find_allocator(name)
    if path is None:
        return PreloadPlan(
            "glibc",
            None,
            f"allocator {name}: {PRELOADED[name][0]} not found "
            f"(apt-get install {_PACKAGES[name]}); using glibc malloc",
        )
    if environ.get("WAGGLE_PRELOADED") == name:
        return PreloadPlan(
            loaded,
            None,
            f"allocator {name}: {path} was preloaded but is not "
            f"mapped (LD_PRELOAD refused?); using {loaded}",
        )
    return PreloadPlan(name, {**environ, **preload_env(name, path), "WAGGLE_PRELOADED": name})


def reexec_under(name: str, argv: list[str] | None, module: str = "waggle_trainer") -> str:
    """Run the rest of this command line under allocator ``name``: re-execute
    ``python -m MODULE *argv`` with :func:`plan_preload`'s environment when the
    library is installed and not yet loaded (does not return then); otherwise return
    the allocator this process runs under, after one log line if the wish cannot be
    met.  ``argv`` None: an in-process call, which never re-executes.  Call it before
    torch is imported."""
    import logging
    import sys

    log = logging.getLogger("waggle_trainer.allocator")
    plan = plan_preload(name)
    if plan.note:
        log.warning("%s", plan.note)
    if plan.env is None:
        return loaded_allocator()
    if argv is None:
        log.warning(
            "allocator %s: called in-process, cannot re-execute; using %s", name, loaded_allocator()
        )
        return loaded_allocator()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], plan.env)
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------ release hook

#: Environment override of :func:`release_slack_bytes` (bytes, or ``off``: no hook),
#: for measuring the trade-off (``bench/end_to_end.py``).
SLACK_ENV = "WAGGLE_ALLOCATOR_SLACK"
_SLACK_MAX = 128 << 20


def release_slack_bytes(unused_budget_bytes: int) -> int | None:
    """How much freed memory a reusing allocator may keep between operations of a
    step: what the plan leaves unused of its budget (budget minus predicted peak and
    step overhead), at most 128 MiB; :data:`SLACK_ENV` overrides, ``off`` gives None."""
    value = os.environ.get(SLACK_ENV, "").strip().lower()
    if value == "off":
        return None
    if value:
        try:
            return max(0, int(value))
        except ValueError:
            import logging

            logging.getLogger("waggle_trainer.allocator").warning(
                "%s=%r is not a number of bytes or 'off'; using the default", SLACK_ENV, value
            )
    return min(_SLACK_MAX, max(0, unused_budget_bytes))


@lru_cache(maxsize=1)
def _tcmalloc_calls():
    """(free page-heap bytes, release n bytes) of a loaded tcmalloc, else None."""
    if loaded_allocator() != "tcmalloc":
        return None
    try:
        lib = ctypes.CDLL(None)
        get, release = lib.MallocExtension_GetNumericProperty, lib.MallocExtension_ReleaseToSystem
    except AttributeError:
        return None
    get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
    get.restype = ctypes.c_int
    release.argtypes, release.restype = [ctypes.c_size_t], None
    value = ctypes.c_size_t()

    def free_bytes() -> int:
        return value.value if get(b"tcmalloc.pageheap_free_bytes", ctypes.byref(value)) else 0

    return free_bytes, release


def release_hook(slack_bytes: int | None):
    """A callable for :attr:`.executor.CheckpointedSequential.after_op`: under
    tcmalloc, give back to the kernel what its page heap keeps free beyond
    ``slack_bytes`` (tcmalloc reuses freed activations without page faults, but
    left alone it keeps every block it ever freed: fragmentation outgrows the plan).
    None where it does not apply: glibc's fixed mmap threshold already returns
    large blocks on ``free``; ``slack_bytes`` None turns it off."""
    calls = _tcmalloc_calls()
    if calls is None or slack_bytes is None:
        return None
    free_bytes, release = calls

    def after_op() -> None:
        excess = free_bytes() - slack_bytes
        if excess > 0:
            release(excess)

    return after_op
