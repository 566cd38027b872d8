"""Every metric a node sends, defined once: name, unit and meaning.

The node daemon registers its gauges under these names
(``node/daemon.py``, ``Daemon._register_gauges``), the server's status page reads
them under these names (``server/status.py``), and the metrics table of
``docs/deploy.md`` is :func:`markdown_table`'s output, which a test holds it to
(print it with ``python -m waggle_trainer.transport.metrics``).  A name sent or read
anywhere else is a bug.

All are gauges in the wagglemsg shape (``telemetry.py``): sampled every
``[telemetry] interval_s`` (at most 120 s) and once more at a clean stop; a gauge
without a value yet (before the first round, or a feature that is off) is not sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from .telemetry import validate_name


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str  # "count", "bytes", "s", "ratio", "text"
    meaning: str

    def __post_init__(self) -> None:
        validate_name(self.name)


ROUND = Metric("train.round", "count", "rounds completed since the state began")
AGREEMENT = Metric(
    "train.agreement",
    "ratio",
    "agreement with the teacher on held-out frames (last judged round; absent before the first)",
)
LOSS = Metric("train.loss", "ratio", "training loss of the last round (absent when not finite)")
ROUNDS_ACCEPTED = Metric("train.rounds_accepted", "count", "rounds the drift guard accepted")
ROLLBACKS = Metric("train.rollbacks", "count", "rounds the drift guard rolled back")
ROUNDS_NOT_JUDGED = Metric(
    "train.rounds_not_judged", "count", "rounds without enough held-out evidence to judge"
)
HOLDOUT_LABELS = Metric(
    "train.holdout_labels",
    "count",
    "teacher labels on the held-out frames at the last round (the guard's evidence)",
)
TEACHER_CALLS_PER_FRAME = Metric(
    "train.teacher_calls_per_frame", "ratio", "teacher calls / frames in the last round"
)
FRAMES_SEEN = Metric("train.frames_seen", "count", "frames the loop saw in the last round")
FRAMES_SKIPPED = Metric(
    "train.frames_skipped", "count", "frames the loop skipped (teacher stride) in the last round"
)
SAMPLES = Metric("train.samples", "count", "training samples of the last round")
MEMORY_BUDGET = Metric("train.memory.budget_bytes", "bytes", "activation budget of the plan")
MEMORY_ALLOCATOR = Metric(
    "train.memory.allocator",
    "text",
    "the malloc the daemon runs under: `glibc`, `jemalloc`, `tcmalloc` or `mimalloc` "
    "(read from the process's memory map)",
)
PLAN_STRATEGY = Metric(
    "train.plan.strategy", "text", "`optimal`, `revolve`, `sequential` or `none`"
)
PLAN_PREDICTED_PEAK = Metric(
    "train.plan.predicted_peak_bytes", "bytes", "the plan's predicted activation peak"
)
PLAN_MEASURED_PEAK = Metric(
    "train.plan.measured_peak_bytes", "bytes", "the activation peak measured in the last round"
)
STEP_TIME = Metric("train.step_time_s", "s", "training step time in the last round")
OUTBOX_UPDATES = Metric("train.outbox.updates", "count", "updates waiting in the disk outbox")
OUTBOX_BYTES = Metric("train.outbox.bytes", "bytes", "size of the disk outbox")
OUTBOX_DROPPED = Metric(
    "train.outbox.dropped",
    "count",
    "updates the outbox dropped (superseded, full, corrupt) or refused (too large)",
)
OUTBOX_DROPPED_STALE = Metric(
    "train.outbox.dropped_stale",
    "count",
    "updates dropped after a new global model because the server no longer accepts their base",
)
PUBLISH_AGE = Metric(
    "train.publish.last_confirmed_age_s",
    "s",
    "seconds since the broker last confirmed an update",
)
PUBLISH_UNROUTABLE = Metric(
    "train.publish.unroutable",
    "count",
    "update chunks the broker returned as unroutable (nothing bound to the update exchange)",
)
UPDATE_BYTES = Metric("train.update_bytes", "bytes", "size of the last encoded update")
DISK_FULL_EVENTS = Metric("train.disk_full_events", "count", "failed writes of the state or outbox")
BASE_ADOPTIONS = Metric("train.base_adoptions", "count", "global models adopted")
MODELS_RECEIVED = Metric(
    "train.models.received", "count", "server versions verified (`[models] enabled` only)"
)
MODELS_REFUSED = Metric(
    "train.models.refused",
    "count",
    "server versions refused: bad signature, shape, model (`[models] enabled` only)",
)

ALL: tuple[Metric, ...] = (
    ROUND,
    AGREEMENT,
    LOSS,
    ROUNDS_ACCEPTED,
    ROLLBACKS,
    ROUNDS_NOT_JUDGED,
    HOLDOUT_LABELS,
    TEACHER_CALLS_PER_FRAME,
    FRAMES_SEEN,
    FRAMES_SKIPPED,
    SAMPLES,
    MEMORY_BUDGET,
    MEMORY_ALLOCATOR,
    PLAN_STRATEGY,
    PLAN_PREDICTED_PEAK,
    PLAN_MEASURED_PEAK,
    STEP_TIME,
    OUTBOX_UPDATES,
    OUTBOX_BYTES,
    OUTBOX_DROPPED,
    OUTBOX_DROPPED_STALE,
    PUBLISH_AGE,
    PUBLISH_UNROUTABLE,
    UPDATE_BYTES,
    DISK_FULL_EVENTS,
    BASE_ADOPTIONS,
    MODELS_RECEIVED,
    MODELS_REFUSED,
)
NAMES = frozenset(m.name for m in ALL)


def markdown_table() -> str:
    """The metrics table of ``docs/deploy.md``."""
    rows = ["| name | unit | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{m.name}` | {m.unit} | {m.meaning} |" for m in ALL]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
