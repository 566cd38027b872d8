"""What a training step costs beyond the plan's tensors, measured once and cached.

The profile (:mod:`.profiler`) sees tensors.  A real process also pays:

* **step overhead**: each step's resident growth beyond the plan's
  ``predicted_peak_bytes``: the allocator's small-block heap and rounding, oneDNN's
  scratch buffers and per-thread workspaces (15-30 MiB on the 2-core x86-64 test
  machine, more or less elsewhere);
* **first-step residue**: what the first step leaves resident beyond the optimiser
  state it creates (and the gradients, when they stay resident): oneDNN's primitive
  cache and global scratchpad, autograd and Python bookkeeping (about 45 MiB for
  resnet50 batch 8 here).  Free memory read before the first step does not
  include it yet, so the budget reserves it.

Both depend on the machine (CPU, threads), torch, the allocator and the model's
shapes, so they are measured by the training runs of a configuration
(:func:`waggle_trainer.learn.planned_training.measure`; the adaptation loop after
every round) and cached beside the profile, keyed by the same facts plus the
allocator and its mode (not the optimiser or the fused step: the state the first
step creates is subtracted from the residue).  Later runs plan with them *before*
their first step: the budget reserves the residue and the plan is made for the
activation budget minus the step overhead.  The calibration step stays as the safety
net (and updates the cache).  Pure standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["DEFAULT", "Overhead", "overhead_path", "load_overhead", "save_overhead"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Overhead:
    """Bytes a configuration needs beyond its plan (see the module doc)."""

    step_bytes: int
    first_step_residue_bytes: int
    steps_measured: int = 1

    def merged(self, other: Overhead) -> Overhead:
        """The larger of two measurements (a budget must hold the worst seen)."""
        return Overhead(
            max(self.step_bytes, other.step_bytes),
            max(self.first_step_residue_bytes, other.first_step_residue_bytes),
            self.steps_measured + other.steps_measured,
        )


#: Until a configuration's own is measured: the first-step residue seen on the 2-core
#: x86-64 machine (41-45 MiB, from resnet18 batch 1 to resnet50 batch 8: mostly
#: fixed), reserved in automatic budgets so that the very first step does not cross a
#: limit; no step overhead (the calibration step measures it).
DEFAULT = Overhead(step_bytes=0, first_step_residue_bytes=48 * 2**20, steps_measured=0)


def overhead_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """Where the overhead of the configuration ``key`` (JSON-able facts) is cached."""
    digest = hashlib.sha256(
        json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True).encode()
    ).hexdigest()[:24]
    return Path(cache_dir) / f"overhead-{digest}.json"


def load_overhead(cache_dir: str | os.PathLike | None, key: dict) -> Overhead | None:
    """The cached overhead for ``key``, or None (nothing cached, or unreadable)."""
    if cache_dir is None:
        return None
    path = overhead_path(cache_dir, key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != key:
            return None
        o = data["overhead"]
        values = (o["step_bytes"], o["first_step_residue_bytes"], o["steps_measured"])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            return None
        return Overhead(*values)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_overhead(cache_dir: str | os.PathLike | None, key: dict, overhead: Overhead) -> None:
    """Cache ``overhead`` for ``key``, merged with what is cached (atomic write)."""
    if cache_dir is None:
        return
    old = load_overhead(cache_dir, key)
    if old is not None:
        overhead = old.merged(overhead)
    path = overhead_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".overhead-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "overhead": asdict(overhead)}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
