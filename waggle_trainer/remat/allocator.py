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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_size_t]
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
    if arena_max is not None and (isinstance(arena_max, bool) or not isinstance(arena_max, int)
                                  or arena_max < 1):
        raise ValueError(f"arena_max must be a positive integer or None, got {arena_max!r}")
    if jemalloc_loaded():
        return AllocatorSettings(mode, applied=False, allocator="jemalloc",
                                 note="jemalloc is preloaded: glibc's settings do not apply")
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
    arenas (``mallctl("arena.4096.purge")``).
    """
    mallctl = _jemalloc_mallctl()
    if mallctl is not None:
        return mallctl(b"arena.4096.purge", None, None, None, 0) == 0
    lib = _libc()
    if lib is None:
        return False
    return lib.malloc_trim(0) == 1


def find_jemalloc() -> str | None:
    """Path of libjemalloc.so.2 (Debian: ``apt-get install libjemalloc2``) or None."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
              "/usr/lib/arm-linux-gnueabihf", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
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
