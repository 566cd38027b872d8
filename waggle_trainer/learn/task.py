"""What the student learns: the task's kind and class names, read from the config.

One accessor, so the student, the loop and the command line agree on where the
task comes from (the config's ``[task]`` section, owned by the sources/teachers
side of issue 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["detect", "classify"]
TASK_KINDS: tuple[str, ...] = ("detect", "classify")


@dataclass(frozen=True)
class Task:
    """``kind``: "detect" (boxes per class) or "classify" (one label per frame)."""

    kind: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        if not self.classes:
            raise ValueError("a task needs at least one class")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def task_from_config(cfg) -> Task:
    """The task of a node config (``[task] kind`` and ``classes``)."""
    return Task(str(cfg.task.kind), tuple(str(c) for c in cfg.task.classes))
