"""A small stand-in for the adaptation loop and the frame source, built to the seam
(``learn/adaptation.py``: ``feed``/``export_state``/``load_state``/``adopt_base``;
``vision/frames.py``: an iterator of frames with ``close``), so the daemon's own
logic is tested in seconds.  The integration tests use the real loop."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from waggle_trainer.learn.adaptation import RoundResult

HOLDOUT_LABELS = 8  # what the stand-in's held-out slice "holds" once rounds are judged


@dataclass
class Frame:
    image: np.ndarray
    ts_ns: int
    index: int


class StandInSource:
    """Endless random 16x16 frames; ``frame_sleep`` seconds between frames."""

    def __init__(self, frame_sleep: float = 0.0, seed: int = 0, limit: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.frame_sleep = frame_sleep
        self.limit = limit
        self.closed = False
        self.stats = {"frames_read": 0, "frames_skipped": 0, "reconnects": 0}

    def __iter__(self):
        i = 0
        while not self.closed and (self.limit is None or i < self.limit):
            if self.frame_sleep:
                time.sleep(self.frame_sleep)
            self.stats["frames_read"] += 1
            yield Frame(self.rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), time.time_ns(), i)
            i += 1

    def close(self) -> None:
        self.closed = True


class StandInLoop:
    """One SGD step per frame on a tiny conv net; the first ``not_judged`` rounds are
    not judged (too little held-out evidence: weights kept, no agreement), then every
    ``reject_every``-th round is rolled back (weights and optimiser restored).  Rounds
    are the real loop's :class:`RoundResult`."""

    def __init__(
        self,
        cfg,
        state_dir,
        *,
        reject_every: int = 4,
        step_sleep: float = 0.0,
        not_judged: int = 0,
    ):
        torch.manual_seed(0)
        self.student = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9)
        self.steps_per_round = cfg.training.steps_per_round
        self.reject_every = reject_every
        self.not_judged = not_judged
        self.step_sleep = step_sleep
        self.counts = {"accepted": 0, "rolled_back": 0, "not_judged": 0}
        self.index = 0
        self.frames = 0
        self.steps = 0
        self.adopted: list[str] = []
        self.teacher_calls = 0
        self.frames_run = 0
        self.closed = False
        self._snapshot = self._copy()
        self._round_frames = 0

    def _copy(self):
        return (
            {k: v.clone() for k, v in self.student.state_dict().items()},
            {k: v for k, v in self.opt.state_dict().items()},
        )

    def feed(self, frame) -> RoundResult | None:
        self.frames += 1
        self.frames_run += 1
        self._round_frames += 1
        x = torch.from_numpy(frame.image).permute(2, 0, 1)[None].float() / 255
        y = torch.tensor([int(frame.image.mean() > 127)])
        t0 = time.perf_counter()
        self.student.train()
        self.opt.zero_grad()
        loss = nn.functional.cross_entropy(
            self.student(torch.cat([x, x.flip(3)])), torch.cat([y, y])
        )
        loss.backward()
        self.opt.step()
        if self.step_sleep:
            time.sleep(self.step_sleep)
        self.steps += 1
        if self.steps % self.steps_per_round:
            return None
        self.index += 1
        judged = self.index > self.not_judged
        accepted = judged and not (self.reject_every and self.index % self.reject_every == 0)
        if accepted or not judged:
            self._snapshot = self._copy()
        else:
            weights, opt = self._snapshot
            self.student.load_state_dict(weights)
            self.opt.load_state_dict(opt)
        self.counts["accepted" if accepted else "rolled_back" if judged else "not_judged"] += 1
        frames, self._round_frames = self._round_frames, 0
        # counters are totals since the loop started, as the real loop reports them
        self.teacher_calls += frames // 2
        return RoundResult(
            index=self.index,
            accepted=accepted,
            agreement_before=0.5 if judged else None,
            agreement_after=(0.6 if accepted else 0.4) if judged else None,
            loss=float(loss.detach()),
            samples=frames,
            teacher_calls=self.teacher_calls,
            frames_seen=self.frames_run,
            frames_skipped=0,
            step_time_s=time.perf_counter() - t0,
            strategy="none",
            budget_bytes=64 * 2**20,
            predicted_peak_bytes=2 * 2**20,
            measured_peak_bytes=3 * 2**20,
            rounds_accepted=self.counts["accepted"],
            rounds_rolled_back=self.counts["rolled_back"],
            judged=judged,
            why_not_judged="" if judged else f"held-out has 0 labels, need {HOLDOUT_LABELS}",
            holdout_labels=HOLDOUT_LABELS if judged else 0,
            holdout_labels_needed=HOLDOUT_LABELS,
            rounds_not_judged=self.counts["not_judged"],
        )

    def export_state(self):
        tensors = {f"student/{k}": v for k, v in self.student.state_dict().items()}
        for i, s in self.opt.state_dict()["state"].items():
            tensors[f"opt/{i}"] = s["momentum_buffer"]
        return tensors, {"index": self.index, "frames": self.frames, "steps": self.steps}

    def load_state(self, tensors, meta):
        self.student.load_state_dict(
            {k[8:]: v for k, v in tensors.items() if k.startswith("student/")}
        )
        sd = self.opt.state_dict()
        for k, v in tensors.items():
            if k.startswith("opt/"):
                sd["state"][int(k[4:])] = {"momentum_buffer": v}
        self.opt.load_state_dict(sd)
        self.index, self.frames, self.steps = meta["index"], meta["frames"], meta["steps"]
        self._snapshot = self._copy()

    def adopt_base(self, weights, version):
        self.student.load_state_dict(weights)
        self._snapshot = self._copy()
        self.adopted.append(version)

    def close(self):
        self.closed = True


def factories_from_env() -> dict:
    """For the subprocess tests: STANDIN_FRAME_SLEEP, STANDIN_STEP_SLEEP, STANDIN_REJECT."""
    frame_sleep = float(os.environ.get("STANDIN_FRAME_SLEEP", "0"))
    step_sleep = float(os.environ.get("STANDIN_STEP_SLEEP", "0"))
    reject = int(os.environ.get("STANDIN_REJECT", "4"))
    return {
        "loop_factory": lambda cfg, d: StandInLoop(
            cfg, d, reject_every=reject, step_sleep=step_sleep
        ),
        "source_factory": lambda cfg: StandInSource(frame_sleep, seed=time.time_ns() % 1000),
    }
