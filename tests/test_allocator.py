"""glibc allocator settings: validation, environment, and that they give memory back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from waggle_trainer.remat import allocator as A

ROOT = Path(__file__).resolve().parents[1]

glibc_only = pytest.mark.skipif(A._libc() is None, reason="not glibc: mallopt unavailable")


def test_modes_and_validation():
    assert A.DEFAULT_MODE in A.MODES
    with pytest.raises(ValueError, match="unknown allocator mode 'tcmalloc'.*allowed"):
        A.configure_allocator("tcmalloc")
    with pytest.raises(ValueError, match="mmap_threshold"):
        A.configure_allocator("mmap", mmap_threshold=-1)
    with pytest.raises(ValueError, match="at most"):
        A.configure_allocator("mmap", mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match="arena_max"):
        A.configure_allocator("default", arena_max=0)
    s = A.configure_allocator("default")
    assert s.mode == "default" and s.mmap_threshold is None


def test_environment_for_children():
    env = A.allocator_env("mmap", mmap_threshold=1 << 20, trim_threshold=1 << 24, arena_max=2)
    assert env == {
        "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(1 << 24),
        "MALLOC_ARENA_MAX": "2",
    }
    assert A.allocator_env("default") == {}
    if A.find_jemalloc():
        env = A.allocator_env(jemalloc=True, jemalloc_conf="dirty_decay_ms:0")
        assert env["LD_PRELOAD"].endswith("libjemalloc.so.2")
        assert env["MALLOC_CONF"] == "dirty_decay_ms:0"


# A heap that cannot shrink: after glibc's dynamic threshold has risen (one large
# mmapped block freed), 4 MiB blocks come from the heap; freeing all but the top
# one leaves ~200 MiB of holes that stay resident under the default settings.
_FRAGMENT = r"""
import ctypes, json, sys
sys.path.insert(0, %(root)r)
from waggle_trainer.remat import allocator as A
mode = sys.argv[1]
if mode != "none":
    A.configure_allocator(mode)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
n = 4 << 20
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)   # raises the dynamic threshold
blocks = []
for _ in range(50):
    p = libc.malloc(n); ctypes.memset(p, 1, n); blocks.append(p)
top = blocks.pop()
before = rss()
for p in blocks:
    libc.free(p)
after = rss()
trimmed = A.trim() if mode == "trim" else False
print(json.dumps({"held": before, "after_free": after, "after_trim": rss()}))
"""


def _run(mode: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", _FRAGMENT % {"root": str(ROOT)}, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")},
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@glibc_only
def test_default_glibc_keeps_freed_memory_and_the_settings_return_it():
    MiB = 2**20
    plain = _run("none")
    assert plain["held"] - plain["after_free"] < 50 * MiB  # glibc kept the holes
    mmap = _run("mmap")
    assert mmap["held"] - mmap["after_free"] > 150 * MiB  # each block its own mapping
    trimmed = _run("trim")
    assert trimmed["held"] - trimmed["after_free"] < 50 * MiB
    assert trimmed["held"] - trimmed["after_trim"] > 150 * MiB  # malloc_trim gave them back


def test_jemalloc_is_detected_and_purged():
    path = A.find_jemalloc()
    if path is None:
        pytest.skip("libjemalloc2 is not installed")
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r});"
        "from waggle_trainer.remat import allocator as A;"
        "s = A.configure_allocator();"
        "print(A.jemalloc_loaded(), s.allocator, s.applied, A.trim())"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **A.allocator_env(jemalloc=True)},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "jemalloc", "False", "True"]
    assert not A.jemalloc_loaded()  # this test process runs on glibc
