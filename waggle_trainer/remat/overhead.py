"""What a training step costs beyond the plan's tensors, measured once and cached.

The profile (:mod:`.profiler`) sees tensors.  A real process also pays:

* **step overhead**: each step's resident growth beyond the plan's
  ``predicted_peak_bytes``: the allocator's small-block heap and rounding, oneDNN's
  scratch buffers and per-thread workspaces (15-30 MiB on the 2-core x86-64 test
  machine, more or less elsewhere);
* **first-step residue**: what the first step leaves resident beyond the optimiser
  state it creates (and the gradients, when they stay resident), in anonymous
  memory: oneDNN's primitive cache and JIT code, the allocator's rounding (6-9 MiB
  for resnet50 batch 8 here, once sympy is kept out: ``waggle_trainer.lean_import``).
  Free memory read before the first step does not include it yet, so the budget
  reserves it.

The step overhead depends on where a plan's peak falls (oneDNN's unseen scratch is
larger for some stages than for others: resnet50 batch 8 here, 28-30 MiB for plans
peaking in layer3-4, 5 MiB for the smallest plan, which peaks in layer1), so besides
the largest overhead seen (``step_bytes``, what an unmeasured plan is planned with)
the cache keeps each plan's own measured growth (``plan_growth``, by
:func:`schedule_digest`): a plan measured to fit a budget may run in it even when the
largest overhead says otherwise.

Both depend on the machine (CPU, threads), torch, the allocator and the model's
shapes, so they are measured by the first training run of a configuration
(:func:`waggle_trainer.learn.planned_training.measure`) and cached beside the
profile, keyed by the same facts plus the allocator, its mode and whether the step is
fused.  Later runs plan with them *before* their first step: the budget reserves the
residue and the plan is made for the activation budget minus the step overhead.  The
calibration step stays as the safety net (and updates the cache).  Pure standard
library.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT",
    "Overhead",
    "overhead_path",
    "load_overhead",
    "save_overhead",
    "schedule_digest",
]

FORMAT_VERSION = 2  # 2: plan_growth; the residue in anonymous memory


@dataclass(frozen=True)
class Overhead:
    """Bytes a configuration needs beyond its plan (see the module doc)."""

    step_bytes: int
    first_step_residue_bytes: int
    steps_measured: int = 1
    #: A plan's measured step growth (bytes over the baseline), by schedule digest.
    plan_growth: dict[str, int] = field(default_factory=dict)

    def merged(self, other: Overhead) -> Overhead:
        """The larger of two measurements (a budget must hold the worst seen)."""
        growth = dict(self.plan_growth)
        for digest, g in other.plan_growth.items():
            growth[digest] = max(g, growth.get(digest, 0))
        return Overhead(
            max(self.step_bytes, other.step_bytes),
            max(self.first_step_residue_bytes, other.first_step_residue_bytes),
            self.steps_measured + other.steps_measured,
            growth,
        )


def schedule_digest(schedule) -> str:
    """A short stable name for a schedule (a sequence of ``(op, stage)`` pairs)."""
    text = json.dumps([[op, int(j)] for op, j in schedule])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Until a configuration's own is measured: a first-step residue of 16 MiB (6-9 MiB
#: measured on the 2-core x86-64 machine for resnet50 batch 8, in anonymous memory,
#: with sympy kept out), reserved in automatic budgets so that the very first step does
#: not cross a limit; no step overhead (the calibration step measures it).
DEFAULT = Overhead(step_bytes=0, first_step_residue_bytes=16 * 2**20, steps_measured=0)


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
        growth = o.get("plan_growth", {})
        if not isinstance(growth, dict) or not all(isinstance(k, str) for k in growth):
            return None
        if not all(_size(v) for v in (*values, *growth.values())):
            return None
        return Overhead(*values, dict(growth))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


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
