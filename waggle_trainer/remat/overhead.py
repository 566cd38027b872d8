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
shapes, so they are measured by the training runs of a configuration
(:func:`waggle_trainer.learn.planned_training.measure`; the adaptation loop after
every round) and cached beside the profile, keyed by the same facts plus the
allocator and its mode (not the optimiser or the fused step: the state the first
step creates is subtracted from the residue).  Later runs plan with them *before*
their first step: the budget reserves the residue and the plan is made for the
activation budget minus the step overhead.  The calibration step stays as the safety
net (and updates the cache).

The first run of a configuration has no record of its own: :class:`StepModel`
predicts its step overhead from the machine's probe (a few small planned runs,
:mod:`waggle_trainer.learn.overhead_probe`, cached once per machine, threads, torch,
allocator and mode).  What it measures (``bench/results/predictions.md``): under
glibc with the fixed mmap threshold the step overhead is the *heap*: blocks below the
threshold (small activations, gradients of small parameters, oneDNN's and autograd's
small buffers) and big blocks served from free heap chunks stay resident after
``free`` until the next trim, so a step's resident peak is the heap's high-water
mark, not its live bytes (``bench/results/step_overhead_anatomy.md``).  It grows with
the size of the activations to 20-40 MiB and falls again once they are large enough
to get their own mappings (under 8 MiB for resnet50 batch 8); transparent huge pages
add nothing measurable (a tensor's mapping ends where the tensor ends); one
configuration's overhead varies by up to 20 MiB from process to process.  The model
is that curve, measured: overhead as a function of the activation scale (plain
training's predicted peak), the upper envelope of the probe's points, flat beyond the
largest.  Pure standard library.
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
    "StepModel",
    "load_step_model",
    "save_step_model",
    "schedule_digest",
]

FORMAT_VERSION = 2  # 2: plan_growth; the residue in anonymous memory
STEP_MODEL_VERSION = 1


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


@dataclass(frozen=True)
class StepModel:
    """A machine's step overhead as a function of a configuration's activation scale.

    ``points`` are ``(scale_bytes, overhead_bytes)`` measured by the probe (scale:
    plain training's predicted peak of the probed configuration; overhead: its step's
    measured growth beyond its plan's prediction).  :meth:`predict` interpolates
    linearly between them after taking, at each scale, the largest overhead seen at
    that scale or below; below the smallest scale it is proportional to the scale,
    beyond the largest it stays flat.  The envelope is deliberate: one configuration's
    overhead varies by up to 8 MiB from process to process (heap layout), which
    matters for small plans, where the budget must hold the worst; the overhead falls
    again for large activations, where over-predicting it costs a few percent.
    """

    points: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a step model needs at least one measured point")
        if any(s <= 0 or o < 0 for s, o in self.points):
            raise ValueError(f"scales must be > 0 and overheads >= 0, got {self.points}")
        if list(self.points) != sorted(self.points) or len({s for s, _ in self.points}) != len(
            self.points
        ):
            raise ValueError(f"scales must be distinct and ascending, got {self.points}")

    @classmethod
    def fit(cls, measured: list[tuple[int, int]]) -> StepModel:
        """The model of ``(scale, overhead)`` measurements (repeats at one scale: the
        largest counts, as a budget must hold the worst seen)."""
        best: dict[int, int] = {}
        for scale, over in measured:
            best[int(scale)] = max(best.get(int(scale), 0), max(0, int(over)))
        return cls(tuple(sorted(best.items())))

    def _envelope(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for scale, over in self.points:
            out.append((scale, max(over, out[-1][1] if out else 0)))
        return out

    def predict(self, scale_bytes: int) -> int:
        """The step overhead of a configuration whose plain training predicts
        ``scale_bytes`` of activations."""
        pts = self._envelope()
        s = max(0, int(scale_bytes))
        if s <= pts[0][0]:
            return round(pts[0][1] * s / pts[0][0])
        for (s0, o0), (s1, o1) in zip(pts, pts[1:], strict=False):
            if s <= s1:
                return round(o0 + (o1 - o0) * (s - s0) / (s1 - s0))
        return pts[-1][1]


def _model_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.sha256(
        json.dumps({"format": STEP_MODEL_VERSION, **key}, sort_keys=True).encode()
    ).hexdigest()[:24]
    return Path(cache_dir) / f"machine-{digest}.json"


def load_step_model(cache_dir: str | os.PathLike | None, key: dict) -> StepModel | None:
    """The machine's cached :class:`StepModel` for ``key`` (machine, threads, torch,
    allocator and mode), or None (not probed yet, or unreadable)."""
    if cache_dir is None:
        return None
    try:
        data = json.loads(_model_path(cache_dir, key).read_text(encoding="utf-8"))
        if data.get("key") != key:
            return None
        points = tuple((int(s), int(o)) for s, o in data["points"])
        if not all(
            isinstance(v, int) and not isinstance(v, bool) for p in data["points"] for v in p
        ):
            return None
        return StepModel(points)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_step_model(cache_dir: str | os.PathLike, key: dict, model: StepModel) -> Path:
    """Cache ``model`` for ``key`` (atomic write); returns the file."""
    path = _model_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".machine-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "points": [list(p) for p in model.points]}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
