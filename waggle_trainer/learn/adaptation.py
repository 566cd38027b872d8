"""The distillation loop: frames in, the teacher labels some, the student trains in
rounds under the memory plan, a drift guard keeps only rounds that do not hurt.

:class:`AdaptationLoop` is what the daemon drives (one ``feed(frame)`` per camera
frame) and what ``waggle-trainer adapt`` runs on a video.  It knows nothing of
systemd, AMQP or the outbox.

* **Teacher calls.**  The teacher labels every k-th frame.  A labelled frame costs
  ``teacher.calls_per_label`` full-frame calls (5 for a tiled look), counted in
  ``teacher_calls``; k never falls below what ``[adaptation] teacher_budget`` (calls
  per camera frame) allows, nor ``teacher_stride_min``.  After each round k doubles
  when the round was accepted with held-out agreement of at least
  ``stride_agreement`` and the training buffer is full, and on a plateau; it halves
  otherwise, within those bounds and ``teacher_stride_max``.  Frames between
  teacher calls are not used (``frames_skipped``).
* **Samples.**  A labelled frame becomes a sample: the frame resized to the
  student's input (uint8, in RAM) and the teacher's labels (with its uncertain boxes
  as ignore regions).  Every ``1 / holdout_fraction``-th sample goes to the held-out
  slice, which is never trained on; the rest to the training buffer.  Both are
  bounded (together ``buffer_size``); the oldest samples are evicted.  Nothing is
  written to disk; ``close()`` drops every sample.
* **Rounds.**  When ``new_samples_per_round`` (times the plateau's slowdown) new
  training samples have arrived, a round runs ``steps_per_round`` optimiser steps,
  each through the student's
  :class:`~waggle_trainer.remat.executor.CheckpointedSequential` under the plan for
  the activation budget.  A batch takes ``new_sample_share`` of its samples from
  those new since the last round and the rest from the whole buffer; each sample is
  seen through a random view (zoom in ``scale_range``, shift, mirror:
  :mod:`waggle_trainer.learn.augment`).  The learning rate follows one schedule over
  the steps kept (:mod:`waggle_trainer.learn.schedule`; a rolled-back round gives
  its steps back; the count is saved with the state).  After the steps, BatchNorm
  statistics are recomputed over the newest training samples with the round's
  weights (precise BatchNorm: no lag behind the weights at small batches).  Free
  memory is re-read before every round and the chain re-planned when it moved
  (``[memory] replan_threshold``).  With ``[memory] fused_step`` each parameter is
  stepped inside the backward (:mod:`waggle_trainer.remat.fused_step`).  What a step
  needed beyond the plan (and, in the first round of a fresh optimiser, what training
  left resident) is cached beside the profile after every round, so that the next
  start plans with it (:mod:`waggle_trainer.remat.overhead`).
* **Drift guard.**  Agreement on the held-out slice before and after the round; when
  it falls by more than ``rollback_margin`` (or the loss is not finite) the round is
  rolled back: weights, BatchNorm statistics, optimiser state and the schedule's
  step count as before it (the fused step keeps its state in the same optimiser).
  Agreement is AP50 of the student's boxes against the teacher's, per class weighted
  by the class's share of the labels, the teacher's uncertain boxes counting
  neither way (:func:`waggle_trainer.learn.agreement.weighted_ap50`) for ``detect``,
  top-1 agreement for ``classify``.  The best student seen is kept in RAM: when the
  student falls more than ``rollback_margin`` below it over accepted rounds, the best
  is re-measured on today's slice and restored if it is still better by the margin.  After
  ``patience`` judged rounds without a new best (a plateau) rounds wait for twice
  the new samples (up to 8x) and the teacher stride doubles, until a new best.
  The guard judges only on evidence.  A round is *not judged* while the held-out
  slice holds fewer than ``min_holdout_labels`` teacher labels (boxes for ``detect``,
  samples for ``classify``: no agreement is measured, the teacher stride halves), or
  when agreement before and after are both within ``rollback_margin`` of zero (a
  student that matches almost none of the teacher's labels cannot show a regression:
  0.000 -> 0.000 says nothing).  A round not judged keeps its weights (a non-finite
  loss still rolls it back) and is not accepted: the daemon sends no update for it;
  the next accepted round's update, weights minus base, carries its change.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from waggle_trainer.common import CLASSES_MIN
from waggle_trainer.learn.agreement import mean_kl, top1_agreement, weighted_ap50
from waggle_trainer.learn.augment import apply_view, draw_view
from waggle_trainer.learn.classify import distillation_loss
from waggle_trainer.learn.detection import (
    Detections,
    decode,
    detection_loss,
    encode_targets,
    scale_detections,
)
from waggle_trainer.learn.planned_training import PlannedTraining, RssSampler, RunSpec
from waggle_trainer.learn.schedule import learning_rate
from waggle_trainer.learn.student import (
    StudentError,
    StudentSpec,
    apply_weights,
    build_student,
    check_metadata,
    normalize,
    read_student_file,
    recompute_batchnorm,
    spec_from_config,
    to_input,
)
from waggle_trainer.learn.task import Task
from waggle_trainer.remat import allocator

log = logging.getLogger(__name__)

STATE_FORMAT = "waggle-adaptation-1"
#: Scores down to this count towards AP (the whole precision/recall curve).
AP_SCORE_THRESHOLD = 0.05
EVAL_BATCH = 8
#: Training samples whose BatchNorm statistics are recomputed after every round.
BATCHNORM_SAMPLES = 64
#: The most a plateau slows training down (rounds need this many times the new samples).
MAX_SLOWDOWN = 8
#: Counters a state saved before they existed may lack (their value then).
_LATER_COUNTERS = {"rounds_not_judged": 0, "steps_done": 0, "slowdown": 1, "labelled_frames": 0}


@dataclass
class RoundResult:
    """One round of ``steps_per_round`` optimiser steps: accepted, rolled back, or not
    judged (``judged`` False: the held-out slice had ``holdout_labels`` teacher labels,
    fewer than ``holdout_labels_needed``, and the loss was finite; weights kept,
    agreements None).

    Counters (``teacher_calls``, ``frames_seen``, ``frames_skipped``, ``rounds_*``) are
    totals since the loop started; ``samples`` is the number of training samples the
    round drew its batches from; ``step_time_s`` the median step; memory in bytes
    (``measured_peak_bytes``: peak RSS growth over the round's baseline while it
    stepped, the quantity the plan's ``predicted_peak_bytes`` predicts).
    """

    index: int
    accepted: bool
    agreement_before: float | None
    agreement_after: float | None
    loss: float
    samples: int
    teacher_calls: int
    frames_seen: int
    frames_skipped: int
    step_time_s: float
    strategy: str
    budget_bytes: int
    predicted_peak_bytes: int
    measured_peak_bytes: int
    teacher_stride: int = 1
    holdout_samples: int = 0
    rounds_accepted: int = 0
    rounds_rolled_back: int = 0
    mean_kl: float | None = None
    time_s: float = 0.0
    judged: bool = True
    holdout_labels: int = 0
    holdout_labels_needed: int = 0
    rounds_not_judged: int = 0
    steps_done: int = 0
    learning_rate: float = 0.0
    best_agreement: float | None = None
    restored_best: bool = False
    restored_agreement: float | None = None
    slowdown: int = 1

    why_not_judged: str = ""

    @property
    def agreement(self) -> float | None:
        """The kept model's held-out agreement (before a rolled-back round, after any
        other, the best student's when it was restored); None when it was not
        measured (too few held-out labels)."""
        if self.restored_best:
            return self.restored_agreement
        return self.agreement_before if self.rolled_back else self.agreement_after

    @property
    def rolled_back(self) -> bool:
        return self.judged and not self.accepted

    @property
    def verdict(self) -> str:
        """What the drift guard did, in words for a log line."""
        if not self.judged:
            return f"not judged ({self.why_not_judged})"
        what = "accepted" if self.accepted else "rolled back"
        if self.agreement_before is None or self.agreement_after is None:
            return f"{what} (loss not finite)"
        text = f"{what}: agreement {self.agreement_before:.3f} -> {self.agreement_after:.3f}"
        if self.restored_best and self.restored_agreement is not None:
            text += f"; best student restored ({self.restored_agreement:.3f})"
        return text

    def metrics(self) -> dict[str, float]:
        """Every numeric field that has a value (``accepted``, ``judged`` as 0/1;
        ``strategy`` left out), ``agreement`` (the kept model's, when judged) and
        ``teacher_calls_per_frame``: finite numbers, as an update's metrics must be."""
        out: dict[str, float] = {}
        for key, value in asdict(self).items():
            if isinstance(value, bool | int | float) and math.isfinite(value):
                out[key] = float(value)
        if self.agreement is not None:
            out["agreement"] = float(self.agreement)
        out["teacher_calls_per_frame"] = self.teacher_calls / max(1, self.frames_seen)
        return out


@dataclass
class _Sample:
    image: torch.Tensor  # uint8 [3, h, w], the student's input size
    labels: Any  # Detections in input pixels, or probabilities [C]
    seq: int = 0  # arrival order: samples with seq >= the round's mark are new
    pred: Any = None  # the student's prediction, valid for weights version ``pred_version``
    pred_version: int = -1


@dataclass
class LoopTimes:
    """Seconds spent in each part of :meth:`AdaptationLoop.feed`: ``teacher``
    (inference), ``train`` (optimiser steps, forward and backward included),
    ``evaluate`` (the drift guard's held-out predictions); ``other`` is the loop's own
    overhead (preprocessing, batches and targets, snapshots, bookkeeping)."""

    total: float = 0.0
    teacher: float = 0.0
    train: float = 0.0
    evaluate: float = 0.0

    @property
    def other(self) -> float:
        return max(0.0, self.total - self.teacher - self.train - self.evaluate)


def _run_spec(cfg, spec: StudentSpec, state_dir: Path) -> RunSpec:
    t, m = cfg.training, cfg.memory
    return RunSpec(
        arch=spec.arch,
        batch=t.batch_size,
        image=spec.input_height,
        width=spec.input_width,
        # only RunSpec's random batches use ``classes``; the loop brings its own
        classes=max(CLASSES_MIN, spec.task.num_classes),
        strategy=m.strategy,
        budget=m.budget,
        safety_margin=m.safety_margin,
        optimizer=t.optimizer,
        learning_rate=t.learning_rate,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        replan_threshold=m.replan_threshold,
        cache_dir=state_dir / "profiles",
        seed=t.seed,
        fused_step=m.fused_step,
    )


class AdaptationLoop:
    """The student learning from ``teacher`` on the frames given to :meth:`feed`.

    ``cfg`` is the node config (``[student]``, ``[training]``, ``[adaptation]``,
    ``[memory]``); ``teacher`` has ``kind``, ``classes`` and ``label(images)``; the
    task is the teacher's.  The student starts from ``[student] weights`` (a
    safetensors file) or random initialisation (seeded by ``[training] seed``).
    ``state_dir`` holds the profile cache (``profiles/``); nothing else is written.
    Raises :class:`~waggle_trainer.learn.student.StudentError` for unusable weights
    and the planner's ``InfeasibleBudget`` when no plan fits the memory budget.
    """

    def __init__(self, cfg, teacher, *, state_dir: str | Path) -> None:
        self.cfg = cfg
        self.teacher = teacher
        self.state_dir = Path(state_dir)
        self.task = Task(str(teacher.kind), tuple(str(c) for c in teacher.classes))
        self.spec = spec_from_config(cfg, self.task)
        a = cfg.adaptation
        torch.manual_seed(cfg.training.seed)
        self.student: nn.Module = build_student(self.spec)
        if cfg.student.weights is not None:
            tensors, meta = read_student_file(cfg.student.weights)
            check_metadata(meta, self.spec, str(cfg.student.weights))
            apply_weights(self.student, tensors, str(cfg.student.weights))
        if self.task.kind == "detect":
            loss_fn = detection_loss
        else:
            loss_fn = partial(
                distillation_loss,
                temperature=a.temperature,
                hard_confidence=a.hard_label_confidence,
                hard_weight=a.hard_label_weight,
            )
        # A cached overhead that leaves no plan within the budget: the smallest plan
        # runs (one warning), as in the start that measured it; never a refusal to start.
        self.training = PlannedTraining.for_model(
            self.student,
            _run_spec(cfg, self.spec, self.state_dir),
            loss_fn,
            smallest_plan_when_tight=True,
        )
        # resident when the budget was read: the first round's residue is counted from here
        allocator.trim()
        self._rss_planned = psutil.Process().memory_info().rss
        holdout_cap = a.holdout_capacity
        self._holdout: deque[_Sample] = deque(maxlen=holdout_cap)
        self._train: deque[_Sample] = deque(maxlen=max(1, a.buffer_size - holdout_cap))
        self._holdout_credit = 1.0 - a.holdout_fraction  # the first sample is held out
        self._rng = torch.Generator().manual_seed(cfg.training.seed)
        self._version = 0  # bumped whenever the weights change
        self._calibrated = False
        self._overhead_warned = False
        #: full-frame teacher calls per labelled frame (a tiled look makes several)
        self.calls_per_label = max(1, int(getattr(teacher, "calls_per_label", 1)))
        #: the smallest stride that keeps the teacher within ``teacher_budget``
        self.stride_floor = min(
            a.teacher_stride_max,
            max(a.teacher_stride_min, math.ceil(self.calls_per_label / a.teacher_budget - 1e-9)),
        )
        self.teacher_stride = self.stride_floor
        self._since_teacher = self.teacher_stride - 1  # the first frame is labelled
        self._new_train = 0
        self._seq = 0
        self._fresh_from = 0  # samples with seq >= this arrived since the last round
        self.steps_done = 0  # optimiser steps kept (the schedule's clock)
        self.slowdown = 1  # a plateau multiplies the new samples a round waits for
        self._since_best = 0
        self.best_agreement: float | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None
        self.labelled_frames = 0
        self.rounds = 0
        self.rounds_accepted = 0
        self.rounds_rolled_back = 0
        self.rounds_not_judged = 0
        self.frames_seen = 0
        self.frames_skipped = 0
        self.teacher_calls = 0
        self.base_version: str | None = None
        self.last_agreement: float | None = None
        self.times = LoopTimes()
        self.closed = False

    # ----------------------------------------------------------------- frames

    def feed(self, frame) -> RoundResult | None:
        """Take one frame (``frame.image``: RGB uint8 HxWx3); returns a
        :class:`RoundResult` when this frame completed a round, else None."""
        if self.closed:
            raise RuntimeError("the adaptation loop is closed")
        t0 = time.perf_counter()
        try:
            return self._feed(frame)
        finally:
            self.times.total += time.perf_counter() - t0

    def _feed(self, frame) -> RoundResult | None:
        self.frames_seen += 1
        image = getattr(frame, "image", None)
        if not (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.ndim == 3
            and image.shape[2] == 3
            and image.shape[0] > 0
            and image.shape[1] > 0
        ):
            self.frames_skipped += 1
            return None
        self._since_teacher += 1
        if self._since_teacher < self.teacher_stride:
            self.frames_skipped += 1
            return None
        self._since_teacher = 0
        t0 = time.perf_counter()
        labels = self.teacher.label([image])[0]
        self.times.teacher += time.perf_counter() - t0
        self.teacher_calls += self.calls_per_label
        self.labelled_frames += 1
        self._add(self._sample(image, labels))
        a = self.cfg.adaptation
        due = a.new_samples_per_round * self.slowdown
        if self._new_train >= due and self._train and self._holdout:
            self._new_train = 0
            return self._round()
        return None

    def _sample(self, image: np.ndarray, labels) -> _Sample:
        s = self.spec
        x = to_input(image, s.input_width, s.input_height)
        if self.task.kind == "detect":
            sx, sy = s.input_width / image.shape[1], s.input_height / image.shape[0]
            return _Sample(x, scale_detections(labels, sx, sy))
        probs = torch.as_tensor(np.asarray(labels.probs, np.float32)).reshape(-1)
        if probs.numel() != self.task.num_classes:
            raise ValueError(
                f"teacher gave {probs.numel()} probabilities for {self.task.num_classes} classes"
            )
        return _Sample(x, probs)

    def _add(self, sample: _Sample) -> None:
        sample.seq = self._seq
        self._seq += 1
        self._holdout_credit += self.cfg.adaptation.holdout_fraction
        if self._holdout_credit >= 1.0 - 1e-9:
            self._holdout_credit -= 1.0
            self._holdout.append(sample)
        else:
            self._train.append(sample)
            self._new_train += 1

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _predict(self, images: torch.Tensor) -> list:
        was_training = self.student.training
        self.student.eval()
        try:
            out = self.student(normalize(images))
        finally:
            self.student.train(was_training)
        if self.task.kind == "detect":
            return decode(
                out,
                self.spec.head_stride,
                score_threshold=AP_SCORE_THRESHOLD,
                max_detections=self.cfg.student.max_detections,
            )
        return list(out)

    def _holdout_predictions(self) -> list:
        stale = [s for s in self._holdout if s.pred_version != self._version]
        for i in range(0, len(stale), EVAL_BATCH):
            chunk = stale[i : i + EVAL_BATCH]
            for s, p in zip(
                chunk, self._predict(torch.stack([s.image for s in chunk])), strict=True
            ):
                s.pred, s.pred_version = p, self._version
        return [s.pred for s in self._holdout]

    def holdout_labels(self) -> int:
        """The teacher's labels on the held-out slice, the drift guard's evidence:
        boxes (``detect``) or samples (``classify``)."""
        if self.task.kind == "detect":
            return sum(len(s.labels) for s in self._holdout)
        return len(self._holdout)

    def agreement(self) -> tuple[float, float | None]:
        """(agreement, mean KL or None) of the student with the teacher on the
        held-out slice (1.0 when the slice is empty)."""
        if not self._holdout:
            return 1.0, None
        t0 = time.perf_counter()
        try:
            preds = self._holdout_predictions()
            truths = [s.labels for s in self._holdout]
            if self.task.kind == "detect":
                return weighted_ap50(preds, truths, self.task.num_classes)[0], None
            logits, probs = torch.stack(preds), torch.stack(truths)
            return top1_agreement(logits, probs), mean_kl(logits, probs)
        finally:
            self.times.evaluate += time.perf_counter() - t0

    # ---------------------------------------------------------------- rounds

    def _pick(self) -> list[int]:
        """Indices into the training buffer for one batch: ``new_sample_share`` of it
        from the samples new since the last round, the rest from the whole buffer."""
        t, n = self.cfg.training, len(self._train)
        fresh = [i for i in range(n) if self._train[i].seq >= self._fresh_from]
        k = round(t.batch_size * t.new_sample_share) if fresh else 0
        picks = torch.randint(0, len(fresh), (k,), generator=self._rng).tolist() if k else []
        idx = [fresh[j] for j in picks]
        idx += torch.randint(0, n, (t.batch_size - k,), generator=self._rng).tolist()
        return idx

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.spec, self.cfg.training
        images, targets = [], []
        for i in self._pick():
            sample = self._train[i]
            if self.task.kind == "detect":
                view = draw_view(
                    self._rng,
                    s.input_width,
                    s.input_height,
                    scale_range=(t.scale_range[0], t.scale_range[1]),
                    hflip=t.hflip,
                )
                image, dets = apply_view(sample.image, sample.labels, view)
                images.append(image)
                targets.append(
                    encode_targets(dets, self.task.num_classes, s.output_size, s.head_stride)
                )
            else:
                flip = t.hflip and float(torch.rand(1, generator=self._rng)) < 0.5
                images.append(sample.image.flip(-1) if flip else sample.image)
                targets.append(sample.labels)
        return normalize(torch.stack(images)), torch.stack(targets)

    def _recompute_batchnorm(self) -> None:
        """Precise BatchNorm statistics over (up to) the newest ``BATCHNORM_SAMPLES``
        training samples, as the student sees them at inference (no augmentation)."""
        samples = list(self._train)[-BATCHNORM_SAMPLES:]
        batches = [
            normalize(torch.stack([s.image for s in samples[i : i + EVAL_BATCH]]))
            for i in range(0, len(samples), EVAL_BATCH)
        ]
        recompute_batchnorm(self.student, batches)

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def _snapshot(self) -> tuple[dict, dict, int, int]:
        optim = copy.deepcopy(self.training.optimizer.state_dict()["state"])
        return self._weights(), optim, self._version, self.steps_done

    def _restore(self, snap: tuple[dict, dict, int, int]) -> None:
        weights, optim, version, steps_done = snap
        self.student.load_state_dict(weights)
        opt = self.training.optimizer
        opt.load_state_dict({"state": optim, "param_groups": opt.state_dict()["param_groups"]})
        self._version = version
        self.steps_done = steps_done

    def _set_learning_rate(self) -> float:
        t = self.cfg.training
        lr = learning_rate(
            self.steps_done,
            t.learning_rate,
            warmup=t.warmup_steps,
            decay=t.decay_steps,
            final_fraction=t.final_lr_fraction,
        )
        for group in self.training.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _round(self) -> RoundResult:
        t = self.training
        t.maybe_replan()
        labels, needed = self.holdout_labels(), self.cfg.adaptation.min_holdout_labels
        evidence = labels >= needed
        before: float | None = self.agreement()[0] if evidence else None
        snap = self._snapshot()
        # the first round of a fresh optimiser measures what the process keeps resident
        # beyond what it held when the budget was read (see _first_round_residue)
        first = not self._calibrated and not t.optimizer.state
        losses, times = [], []
        t0 = time.perf_counter()
        with RssSampler(interval_s=0.005) as rss:
            if not self._calibrated:
                self._calibrated = True
                c0 = time.perf_counter()
                t.calibrate(rss, batch=self._batch)
                self.times.train += time.perf_counter() - c0
                self._version += 1
            allocator.trim()
            base = rss.reset()
            lr = 0.0
            for _ in range(self.cfg.training.steps_per_round):
                x, y = self._batch()
                lr = self._set_learning_rate()
                s0 = time.perf_counter()
                losses.append(t.step(x, y))
                times.append(time.perf_counter() - s0)
                self._version += 1
                self.steps_done += 1
                del x, y
            peak = rss.peak - base
            residue = self._first_round_residue(rss.current) if first else None
        self._fresh_from = self._seq
        self.times.train += sum(times)
        self._record_overhead(peak, residue)
        loss = statistics.fmean(losses)
        finite = all(math.isfinite(v) for v in losses)
        after: float | None = None
        kl = None
        if finite:
            b0 = time.perf_counter()
            self._recompute_batchnorm()
            self.times.train += time.perf_counter() - b0
            self._version += 1
        if finite and before is not None:
            after, kl = self.agreement()
        margin = self.cfg.adaptation.rollback_margin
        why = "" if evidence else f"held-out has {labels} labels, need {needed}"
        if before is not None and after is not None and max(before, after) <= margin:
            why = (
                f"agreement {before:.3f} -> {after:.3f}, both within the rollback margin "
                f"{margin:g} of zero: a regression could not show"
            )
        judged = not why or not finite  # a non-finite loss is evidence enough
        accepted = judged and before is not None and after is not None and after >= before - margin
        if accepted:
            self.rounds_accepted += 1
        elif not judged:
            self.rounds_not_judged += 1  # no evidence either way: the weights stay
        else:
            self._restore(snap)
            self.rounds_rolled_back += 1
        del snap
        kept = before if judged and not accepted else after
        restored: float | None = None
        plateau = False
        if judged and kept is not None:
            restored, plateau = self._keep_best(kept)
            if restored is not None:
                kept = restored
        if kept is not None:
            self.last_agreement = kept
        self._adapt_stride(accepted, kept, plateau)
        plan = t.chain.plan
        result = RoundResult(
            index=self.rounds,
            accepted=accepted,
            agreement_before=before,
            agreement_after=after,
            loss=loss,
            samples=len(self._train),
            teacher_calls=self.teacher_calls,
            frames_seen=self.frames_seen,
            frames_skipped=self.frames_skipped,
            step_time_s=statistics.median(times),
            strategy=plan.strategy if plan is not None else t.spec.strategy,
            budget_bytes=t.budget.activation_budget_bytes,
            predicted_peak_bytes=plan.predicted_peak_bytes if plan is not None else 0,
            measured_peak_bytes=max(0, peak),
            teacher_stride=self.teacher_stride,
            holdout_samples=len(self._holdout),
            rounds_accepted=self.rounds_accepted,
            rounds_rolled_back=self.rounds_rolled_back,
            mean_kl=kl,
            time_s=time.perf_counter() - t0,
            judged=judged,
            why_not_judged="" if judged else why,
            holdout_labels=labels,
            holdout_labels_needed=needed,
            rounds_not_judged=self.rounds_not_judged,
            steps_done=self.steps_done,
            learning_rate=lr,
            best_agreement=self.best_agreement,
            restored_best=restored is not None,
            restored_agreement=restored,
            slowdown=self.slowdown,
        )
        log.debug("round %d %s (loss %.4g)", self.rounds, result.verdict, loss)  # callers say it
        self.rounds += 1
        return result

    def _first_round_residue(self, rss_now) -> int:
        """What the process keeps resident after its first training round beyond what it
        held when the budget was read, less the optimiser state (and resident gradients)
        the round created and the samples buffered since: the teacher's and the held-out
        evaluation's buffers, oneDNN's caches, the heap.  Free memory read at the start
        does not include it, so the next start's budget reserves it."""
        allocator.trim()
        samples = sum(s.image.numel() * s.image.element_size() for s in self._train)
        samples += sum(s.image.numel() * s.image.element_size() for s in self._holdout)
        created = self.training.state_bytes_created_by_first_step()
        return rss_now() - self._rss_planned - created - samples

    def _record_overhead(self, step_growth: int, residue: int | None) -> None:
        """Cache what this round measured beside the profile, so that the next start
        plans with it (:mod:`waggle_trainer.remat.overhead`); a cache that cannot be
        written costs only that (one warning)."""
        try:
            # the round's steps ran one plan (re-planning happens between rounds)
            self.training.record_overhead(
                step_growths=[(self.training._plan, step_growth)],
                first_step_residue_bytes=residue,
            )
        except OSError as exc:
            if not self._overhead_warned:
                self._overhead_warned = True
                log.warning(
                    "measured overhead not cached (%s); the next start plans without it", exc
                )

    def _keep_best(self, kept: float) -> tuple[float | None, bool]:
        """Keep the best student seen (by held-out agreement); restore it when the
        student has fallen more than ``rollback_margin`` below it (slow drift over
        accepted rounds) and, re-measured on today's held-out slice, it is still better
        by more than the margin (the slice changes as samples arrive).  Returns (the
        restored student's agreement or None, whether a plateau was reached: then
        rounds wait for twice the new samples, up to ``MAX_SLOWDOWN`` times)."""
        a = self.cfg.adaptation
        restored: float | None = None
        if self.best_agreement is None or kept > self.best_agreement:
            self.best_agreement, self._best_weights = kept, self._weights()
            self._since_best, self.slowdown = 0, 1
            return None, False
        if kept < self.best_agreement - a.rollback_margin and self._best_weights is not None:
            current = self._weights()
            self.student.load_state_dict(self._best_weights)
            self._version += 1
            best_now = self.agreement()[0]
            if best_now > kept + a.rollback_margin:
                restored = self.best_agreement = best_now
            else:  # on today's slice the best is not clearly better: keep the student
                self.student.load_state_dict(current)
                self._version += 1
                self.best_agreement, self._best_weights = kept, current
        self._since_best += 1
        if self._since_best < a.patience:
            return restored, False
        self._since_best = 0
        self.slowdown = min(MAX_SLOWDOWN, self.slowdown * 2)
        return restored, True

    def _adapt_stride(self, accepted: bool, agreement: float | None, plateau: bool) -> None:
        """Ask the teacher half as often after an accepted round whose agreement is at
        least ``stride_agreement`` once the training buffer is full (the student has
        caught up and the buffer would only churn), and on a plateau; twice as often
        otherwise; never more often than ``teacher_budget`` allows."""
        a = self.cfg.adaptation
        full = len(self._train) >= (self._train.maxlen or 0)
        good = accepted and agreement is not None and agreement >= a.stride_agreement
        if plateau or (good and full):
            self.teacher_stride = min(a.teacher_stride_max, self.teacher_stride * 2)
        else:
            self.teacher_stride = max(self.stride_floor, self.teacher_stride // 2)

    # ----------------------------------------------------------------- models

    @torch.no_grad()
    def predict(self, images: Iterable[np.ndarray], score_threshold: float | None = None) -> list:
        """The student on RGB uint8 frames: :class:`Detections` in each frame's
        pixels (``detect``) or class probabilities (``classify``)."""
        s = self.spec
        return predict_frames(
            self.student,
            s,
            list(images),
            score_threshold if score_threshold is not None else self.cfg.student.score_threshold,
            self.cfg.student.max_detections,
        )

    def adopt_base(self, weights: dict[str, torch.Tensor], version) -> None:
        """Take a new global model (between rounds): its weights; the optimiser's state
        and the schedule's step carry over (the global model is a near neighbour of
        the local one; fresh Adam moments at the schedule's rate made every round after
        an adoption a large random step); raises StudentError (the weights do not
        fit) leaving the student as is."""
        apply_weights(self.student, weights, f"global model {version}")
        self._version += 1
        self.base_version = str(version)
        # the best student seen was a local one: the new base starts a new contest
        self.best_agreement, self._best_weights = None, None
        self._since_best, self.slowdown = 0, 1

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (``student/<key>``: weights and buffers; ``optim/<i>/<name>``:
        optimiser state) and JSON-able meta (counters, teacher stride, held-out
        statistics; never an image)."""
        tensors = {
            f"student/{k}": v.detach().clone().contiguous()
            for k, v in self.student.state_dict().items()
        }
        scalars: dict[str, dict[str, float]] = {}
        for i, st in self.training.optimizer.state_dict()["state"].items():
            for name, value in st.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{i}/{name}"] = value.detach().clone().contiguous()
                elif isinstance(value, int | float):
                    scalars.setdefault(str(i), {})[name] = float(value)
        meta = {
            "format": STATE_FORMAT,
            "student": self.spec.metadata(),
            "optimizer": self.cfg.training.optimizer,
            "optimizer_scalars": scalars,
            "rounds": self.rounds,
            "rounds_accepted": self.rounds_accepted,
            "rounds_rolled_back": self.rounds_rolled_back,
            "rounds_not_judged": self.rounds_not_judged,
            "frames_seen": self.frames_seen,
            "frames_skipped": self.frames_skipped,
            "teacher_calls": self.teacher_calls,
            "teacher_stride": self.teacher_stride,
            "steps_done": self.steps_done,
            "slowdown": self.slowdown,
            "labelled_frames": self.labelled_frames,
            "base_version": self.base_version,
            "holdout": {
                "samples": len(self._holdout),
                "labels": self.holdout_labels(),
                "agreement": self.last_agreement,
            },
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Resume from :meth:`export_state`'s output; ValueError (one line) when it
        belongs to another student or optimiser, leaving the loop as it was."""
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise ValueError(f"saved state: not a {STATE_FORMAT} state")
        want = self.spec.metadata()
        if meta.get("student") != want:
            raise ValueError(
                f"saved state: made for another student ({meta.get('student')} != {want})"
            )
        if meta.get("optimizer") != self.cfg.training.optimizer:
            raise ValueError(
                f"saved state: optimiser {meta.get('optimizer')!r}, the config "
                f"asks for {self.cfg.training.optimizer!r}"
            )
        weights = {
            k.removeprefix("student/"): v for k, v in tensors.items() if k.startswith("student/")
        }
        optim: dict[int, dict[str, Any]] = {}
        params = [p for g in self.training.optimizer.param_groups for p in g["params"]]
        for key, value in tensors.items():
            if not key.startswith("optim/"):
                continue
            parts = key.split("/")
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(params):
                raise ValueError(f"saved state: bad optimiser tensor {key!r}")
            i = int(parts[1])
            if value.dim() and tuple(value.shape) != tuple(params[i].shape):
                raise ValueError(
                    f"saved state: {key} has shape {list(value.shape)}, "
                    f"parameter {i} has {list(params[i].shape)}"
                )
            optim.setdefault(i, {})[parts[2]] = value
        for i, names in (meta.get("optimizer_scalars") or {}).items():
            for name, value in names.items():
                optim.setdefault(int(i), {})[name] = value
        counters: dict[str, int] = {}
        for key in (
            "rounds",
            "rounds_accepted",
            "rounds_rolled_back",
            "frames_seen",
            "frames_skipped",
            "teacher_calls",
            "teacher_stride",
            *_LATER_COUNTERS,  # absent from states saved before they were counted
        ):
            count = meta.get(key, _LATER_COUNTERS.get(key))
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"saved state: {key} = {count!r} is not a count")
            counters[key] = count
        try:
            apply_weights(self.student, weights, "saved state")
        except StudentError as exc:
            raise ValueError(str(exc)) from None
        opt = self.training.optimizer
        opt.load_state_dict({"state": optim, "param_groups": opt.state_dict()["param_groups"]})
        a = self.cfg.adaptation
        counters["teacher_stride"] = min(
            a.teacher_stride_max, max(self.stride_floor, counters["teacher_stride"])
        )
        counters["slowdown"] = min(MAX_SLOWDOWN, max(1, counters["slowdown"]))
        for key, count in counters.items():
            setattr(self, key, count)
        self._since_teacher = self.teacher_stride - 1
        self.base_version = meta.get("base_version")
        self._version += 1

    def close(self) -> None:
        """Drop every sample (frames and labels) and release the teacher's reference."""
        self._holdout.clear()
        self._train.clear()
        self.closed = True

    def stats(self) -> dict[str, float]:
        """Totals for a summary: frames, teacher calls, rounds, time split."""
        tm = self.times
        return {
            "frames_seen": self.frames_seen,
            "frames_skipped": self.frames_skipped,
            "teacher_calls": self.teacher_calls,
            "teacher_calls_per_frame": self.teacher_calls / max(1, self.frames_seen),
            "labelled_frames": self.labelled_frames,
            "steps_done": self.steps_done,
            "rounds": self.rounds,
            "rounds_accepted": self.rounds_accepted,
            "rounds_rolled_back": self.rounds_rolled_back,
            "rounds_not_judged": self.rounds_not_judged,
            "teacher_stride": self.teacher_stride,
            "time_s": tm.total,
            "teacher_s": tm.teacher,
            "train_s": tm.train,
            "evaluate_s": tm.evaluate,
            "other_s": tm.other,
            "overhead_fraction": tm.other / tm.total if tm.total else 0.0,
        }


@torch.no_grad()
def predict_frames(
    model: nn.Module,
    spec: StudentSpec,
    images: list[np.ndarray],
    score_threshold: float,
    max_detections: int,
) -> list:
    """A student on RGB uint8 frames (eval mode, restored afterwards): Detections in
    each frame's own pixels, or class probabilities."""
    if not images:
        return []
    was_training = model.training
    model.eval()
    try:
        x = normalize(
            torch.stack([to_input(im, spec.input_width, spec.input_height) for im in images])
        )
        out = model(x)
    finally:
        model.train(was_training)
    if spec.task.kind == "classify":
        return list(torch.softmax(out, dim=1))
    results: list[Detections] = []
    for im, o in zip(images, out, strict=True):
        scale = (im.shape[1] / spec.input_width, im.shape[0] / spec.input_height)
        results += decode(
            o[None],
            spec.head_stride,
            score_threshold=score_threshold,
            max_detections=max_detections,
            scale=scale,
        )
    return results


__all__ = ["AdaptationLoop", "LoopTimes", "RoundResult", "predict_frames"]
