"""The adaptation loop: rounds, drift guard (rollback), adaptive teacher stride,
state export/import, and a short adaptation that must improve agreement."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from waggle_trainer.learn.adaptation import AdaptationLoop, RoundResult
from waggle_trainer.learn.agreement import iou_matrix
from waggle_trainer.learn.student import StudentError, save_student
from waggle_trainer.learn.teachers import Detections, SoftLabels

from .adapt_util import ClipTeacher, Frame, clip, tiny_config


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """One state directory for the module: the chain is profiled once per shape."""
    return tmp_path_factory.mktemp("state")


@pytest.fixture
def small_loop(state):
    def make(tmp_path, frames, **sections):
        sections.setdefault("training", {})
        sections["training"] = {"batch_size": 1, "steps_per_round": 1, **sections["training"]}
        sections.setdefault("student", {})
        sections["student"] = {"input_width": 64, "input_height": 64, **sections["student"]}
        return AdaptationLoop(
            tiny_config(tmp_path, **sections), ClipTeacher(frames), state_dir=state
        )

    return make


def feed_all(loop, frames) -> list[RoundResult]:
    return [r for f, _ in frames if (r := loop.feed(f)) is not None]


def test_rounds_come_after_enough_new_samples_with_a_held_out_slice(tmp_path, small_loop):
    frames = clip(12)
    loop = small_loop(
        tmp_path,
        frames,
        adaptation={
            "teacher_stride_min": 1,
            "teacher_stride_max": 1,
            "new_samples_per_round": 4,
            "holdout_fraction": 0.2,
            "buffer_size": 10,
        },
    )
    rounds = feed_all(loop, frames)
    # samples 1, 6, 11 are held out (1 in 5); rounds after training samples 4 and 8
    assert [r.frames_seen for r in rounds] == [5, 10]
    assert len(loop._holdout) == 2 and len(loop._train) == 8
    r = rounds[-1]
    assert r.teacher_calls == 10 and r.frames_skipped == 0 and r.samples == 8
    assert r.strategy in ("optimal", "none") and r.predicted_peak_bytes > 0
    assert r.budget_bytes > 0 and r.step_time_s > 0 and r.measured_peak_bytes >= 0
    m = r.metrics()
    assert m["accepted"] in (0.0, 1.0) and m["teacher_calls_per_frame"] == 1.0
    assert all(isinstance(v, float) for v in m.values())
    # held-out samples never train: no training sample is one of them
    held = {id(s.image) for s in loop._holdout}
    assert not held & {id(s.image) for s in loop._train}
    loop.close()
    assert not loop._holdout and not loop._train
    with pytest.raises(RuntimeError, match="closed"):
        loop.feed(frames[0][0])


def test_buffers_are_bounded_and_evict_the_oldest(tmp_path, small_loop):
    frames = clip(30)
    loop = small_loop(
        tmp_path,
        frames,
        adaptation={
            "teacher_stride_min": 1,
            "teacher_stride_max": 1,
            "new_samples_per_round": 1000,
            "holdout_fraction": 0.25,
            "buffer_size": 8,
        },
    )
    feed_all(loop, frames)
    assert len(loop._holdout) == 2 and len(loop._train) == 6
    assert loop._train[-1].image.shape == (3, 64, 64)  # resized to the student's input
    assert loop.rounds == 0


def test_unusable_frames_are_skipped_and_counted(tmp_path, small_loop):
    frames = clip(4)
    loop = small_loop(tmp_path, frames, adaptation={"teacher_stride_min": 1})
    for bad in (
        Frame(np.zeros((0, 5, 3), np.uint8), 0),
        Frame(np.zeros((4, 4), np.uint8), 1),
        Frame(np.zeros((4, 4, 3), np.float32), 2),
        object(),
    ):
        assert loop.feed(bad) is None
    assert loop.frames_seen == 4 and loop.frames_skipped == 4 and loop.teacher_calls == 0


def _guarded_round(small_loop, tmp_path, monkeypatch, before, after, margin):
    frames = clip(8)
    loop = small_loop(
        tmp_path,
        frames,
        adaptation={
            "teacher_stride_min": 1,
            "teacher_stride_max": 8,
            "new_samples_per_round": 3,
            "holdout_fraction": 0.25,
            "rollback_margin": margin,
            "stride_agreement": 0.5,
            "min_holdout_labels": 1,  # judged from the first round
        },
        training={"optimizer": "sgd", "momentum": 0.9},
    )
    values = iter([(before, None), (after, None)])
    monkeypatch.setattr(loop, "agreement", lambda: next(values))
    # one earlier step, so that the optimiser has momentum to restore
    loop._add(loop._sample(frames[0][0].image, frames[0][1]))
    loop._add(loop._sample(frames[1][0].image, frames[1][1]))
    loop.training.step(*loop._batch())
    weights = {k: v.clone() for k, v in loop.student.state_dict().items()}
    momentum = {
        i: s["momentum_buffer"].clone()
        for i, s in loop.training.optimizer.state_dict()["state"].items()
    }
    result = None
    for f, _ in frames[2:]:
        if (result := loop.feed(f)) is not None:
            break
    assert result is not None and loop.rounds == 1
    return loop, result, weights, momentum


def test_a_round_that_lowers_agreement_beyond_the_margin_is_rolled_back(
    tmp_path, monkeypatch, small_loop
):
    loop, r, weights, momentum = _guarded_round(small_loop, tmp_path, monkeypatch, 0.8, 0.7, 0.05)
    assert not r.accepted and (r.agreement_before, r.agreement_after) == (0.8, 0.7)
    assert (
        (loop.rounds_accepted, loop.rounds_rolled_back)
        == (0, 1)
        == (r.rounds_accepted, r.rounds_rolled_back)
    )
    state = loop.student.state_dict()
    for k, v in weights.items():  # weights and BatchNorm statistics as before the round
        assert torch.equal(state[k], v), k
    for i, s in loop.training.optimizer.state_dict()["state"].items():
        assert torch.equal(s["momentum_buffer"], momentum[i])
    assert loop.last_agreement == 0.8 == r.agreement  # the kept model's agreement
    assert r.verdict == "rolled back: agreement 0.800 -> 0.700"
    assert r.metrics()["agreement"] == 0.8 and r.metrics()["judged"] == 1.0
    assert loop.teacher_stride == 1  # a rolled-back round: the teacher is needed more


def test_a_round_within_the_margin_is_kept(tmp_path, monkeypatch, small_loop):
    loop, r, weights, _ = _guarded_round(small_loop, tmp_path, monkeypatch, 0.8, 0.76, 0.05)
    assert r.accepted and (loop.rounds_accepted, loop.rounds_rolled_back) == (1, 0)
    assert r.verdict == "accepted: agreement 0.800 -> 0.760" and r.metrics()["agreement"] == 0.76
    state = loop.student.state_dict()
    assert any(not torch.equal(state[k], v) for k, v in weights.items())


class BlindTeacher(ClipTeacher):
    """Finds nothing in any frame (a street at night): no evidence for the guard."""

    def label(self, images):
        self.calls += len(images)
        return [Detections.empty() for _ in images]


def test_without_held_out_labels_a_round_is_not_judged_until_they_exist(tmp_path, small_loop):
    """1 in 4 samples is held out (samples 1, 5, 9, ...), each with 2 teacher boxes;
    rounds after 3 new training samples.  Round 0 sees 2 held-out labels, round 1 sees
    4 = min_holdout_labels."""
    frames = clip(12)
    loop = small_loop(
        tmp_path,
        frames,
        adaptation={
            "teacher_stride_min": 1,
            "teacher_stride_max": 4,
            "new_samples_per_round": 3,
            "holdout_fraction": 0.25,
            "min_holdout_labels": 4,
            "rollback_margin": 0.05,
        },
    )
    rounds, changed = [], []
    for f, _ in frames:
        weights = {k: v.clone() for k, v in loop.student.state_dict().items()}
        if (r := loop.feed(f)) is not None:
            rounds.append(r)
            state = loop.student.state_dict()
            changed.append(any(not torch.equal(state[k], v) for k, v in weights.items()))
    first, second = rounds[:2]
    # no evidence: not judged, not called accepted, no agreement to show, weights kept
    assert not first.judged and not first.accepted and not first.rolled_back
    assert (first.agreement_before, first.agreement_after, first.agreement) == (None,) * 3
    assert first.verdict == "not judged (held-out has 2 labels, need 4)"
    assert changed[0] and first.rounds_not_judged == 1 and first.rounds_accepted == 0
    m = first.metrics()
    assert m["judged"] == 0.0 and m["accepted"] == 0.0 and m["holdout_labels"] == 2.0
    assert not {"agreement", "agreement_before", "agreement_after"} & m.keys()
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    # enough labels: agreement measured before and after, the verdict says what it showed
    assert second.holdout_labels == 4
    assert second.agreement_before is not None and second.agreement_after is not None
    assert second.verdict.startswith(
        ("accepted: agreement ", "rolled back: agreement ", "not judged (agreement ")
    )
    assert second.metrics()["agreement"] == second.agreement
    assert second.rounds_not_judged == first.rounds_not_judged + (not second.judged)
    assert loop.export_state()[1]["rounds_not_judged"] == loop.rounds_not_judged


def test_a_student_that_matches_nothing_yet_is_not_judged_on_0_to_0(
    tmp_path, monkeypatch, small_loop
):
    """Labels enough, but agreement 0.000 -> 0.000: within the margin of zero a
    regression cannot show, so the round is not judged (weights kept, no update)."""
    loop, r, weights, _ = _guarded_round(small_loop, tmp_path, monkeypatch, 0.0, 0.0, 0.05)
    assert not r.judged and not r.accepted and not r.rolled_back
    assert r.verdict == (
        "not judged (agreement 0.000 -> 0.000, both within the rollback margin 0.05 of "
        "zero: a regression could not show)"
    )
    state = loop.student.state_dict()
    assert any(not torch.equal(state[k], v) for k, v in weights.items())  # kept
    m = r.metrics()
    assert m["judged"] == 0.0 and m["agreement_before"] == m["agreement_after"] == 0.0
    assert loop.rounds_not_judged == 1 and loop.last_agreement == 0.0


def test_a_student_that_starts_to_match_is_accepted_from_0(tmp_path, monkeypatch, small_loop):
    _, r, _, _ = _guarded_round(small_loop, tmp_path, monkeypatch, 0.0, 0.3, 0.05)
    assert r.judged and r.accepted and r.verdict == "accepted: agreement 0.000 -> 0.300"


def test_a_teacher_that_finds_nothing_never_gets_a_round_accepted(tmp_path, small_loop):
    """The '0.000 -> 0.000, accepted' case: no teacher box anywhere is no evidence."""
    frames = clip(16)
    loop = AdaptationLoop(
        tiny_config(
            tmp_path,
            training={"batch_size": 1, "steps_per_round": 1},
            student={"input_width": 64, "input_height": 64},
            adaptation={"new_samples_per_round": 3, "teacher_stride_max": 8},
        ),
        BlindTeacher(frames),
        state_dir=tmp_path / "state",
    )
    rounds = feed_all(loop, frames)
    assert len(rounds) >= 3
    assert all(not r.judged and not r.accepted and r.agreement is None for r in rounds)
    assert {r.verdict for r in rounds} == {"not judged (held-out has 0 labels, need 8)"}
    assert loop.last_agreement is None and loop.rounds_accepted == 0
    assert loop.teacher_stride == 1  # no evidence of agreement: the teacher is not skipped


def test_teacher_stride_grows_while_the_student_agrees_and_shrinks_when_not(tmp_path, small_loop):
    frames = clip(2)
    loop = small_loop(
        tmp_path,
        frames,
        adaptation={
            "teacher_stride_min": 2,
            "teacher_stride_max": 16,
            "stride_agreement": 0.6,
            "buffer_size": 4,
        },
    )
    loop._train.extend([None] * loop._train.maxlen)  # a full buffer
    seen = []
    for agreement in (0.7, 0.9, 0.6, 0.65, 0.61, 0.3, 0.1, 0.2, 0.1, 0.95):
        loop._adapt_stride(True, agreement, False)
        seen.append(loop.teacher_stride)
    assert seen == [4, 8, 16, 16, 16, 8, 4, 2, 2, 4]
    # a rolled-back round, or one without evidence, asks the teacher more often
    loop._adapt_stride(False, 0.9, False)
    loop._adapt_stride(True, None, False)
    assert loop.teacher_stride == 2
    # while the buffer fills, every label is worth its cost: no doubling but on a plateau
    loop._train.clear()
    loop._adapt_stride(True, 0.9, False)
    assert loop.teacher_stride == 2
    loop._adapt_stride(True, 0.9, True)
    assert loop.teacher_stride == 4


def test_the_teacher_labels_every_kth_frame(tmp_path, small_loop):
    frames = clip(20)
    loop = small_loop(
        tmp_path,
        frames,
        adaptation={
            "teacher_stride_min": 3,
            "teacher_stride_max": 3,
            "new_samples_per_round": 1000,
        },
    )
    feed_all(loop, frames)
    assert loop.teacher.calls == loop.teacher_calls == 7  # frames 0, 3, ..., 18
    assert loop.frames_skipped == 13


def test_export_and_load_state_round_trip(tmp_path, small_loop):
    frames = clip(10)
    sections = {
        "adaptation": {"teacher_stride_min": 1, "new_samples_per_round": 3},
        "training": {"optimizer": "adam"},
    }
    loop = small_loop(tmp_path, frames, **sections)
    assert feed_all(loop, frames)
    tensors, meta = loop.export_state()
    json.dumps(meta)  # JSON-able
    assert meta["rounds"] == loop.rounds and meta["teacher_calls"] == 10
    assert any(k.startswith("optim/") for k in tensors)
    assert all(t.numel() < 3 * 64 * 64 or not k.startswith("sample") for k, t in tensors.items())
    other = small_loop(tmp_path / "b", frames, **sections)
    other.load_state(tensors, meta)
    for k, v in loop.student.state_dict().items():
        assert torch.equal(other.student.state_dict()[k], v)
    a, b = (
        loop.training.optimizer.state_dict()["state"],
        other.training.optimizer.state_dict()["state"],
    )
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    assert (other.rounds, other.teacher_calls, other.frames_seen) == (loop.rounds, 10, 10)
    # a state from another student is refused, the loop left as it was
    bad = dict(meta, student={**meta["student"], "arch": "resnet34"})
    with pytest.raises(ValueError, match="another student"):
        other.load_state(tensors, bad)
    broken = dict(tensors)
    key = next(k for k in broken if k.startswith("student/") and broken[k].dim() == 4)
    broken[key] = torch.zeros(1)
    with pytest.raises(ValueError, match="has shape"):
        other.load_state(broken, meta)


def test_adopt_base_takes_new_weights_and_keeps_the_optimiser_and_schedule(tmp_path, small_loop):
    """A global model is a near neighbour of the local one (the fleet's average, or the
    node's own step in a fleet of one): Adam's moments and the schedule's step carry
    over.  Fresh moments at the schedule's learning rate made every round after an
    adoption a large random step (make run: 8 of 10 rounds rolled back)."""
    frames = clip(10)
    loop = small_loop(
        tmp_path, frames, adaptation={"teacher_stride_min": 1, "new_samples_per_round": 3}
    )
    feed_all(loop, frames)
    state = {
        i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in loop.training.optimizer.state.items()
    }
    steps = loop.steps_done
    assert state and steps > 0
    fresh = {
        k: torch.zeros_like(v) if v.is_floating_point() else v
        for k, v in loop.student.state_dict().items()
    }
    loop.adopt_base(fresh, "v7")
    assert loop.base_version == "v7" and loop.steps_done == steps
    kept = loop.training.optimizer.state
    assert set(kept) == set(state)
    assert all(torch.equal(kept[i]["exp_avg"], s["exp_avg"]) for i, s in state.items())
    assert loop.best_agreement is None  # the best seen was a local student
    assert all(
        float(v.abs().sum()) == 0
        for k, v in loop.student.state_dict().items()
        if v.is_floating_point()
    )
    with pytest.raises(StudentError, match="global model v8"):
        loop.adopt_base({"nope": torch.zeros(1)}, "v8")


def test_student_weights_from_the_config_file(tmp_path, small_loop):
    frames = clip(2)
    first = small_loop(tmp_path, frames)
    path = tmp_path / "s.safetensors"
    save_student(first.student, first.spec, path)
    second = small_loop(tmp_path, frames, student={"weights": str(path)})
    for k, v in first.student.state_dict().items():
        assert torch.equal(second.student.state_dict()[k], v)
    with pytest.raises(StudentError, match="head_stride 4 .the config asks for 8"):
        small_loop(tmp_path, frames, student={"weights": str(path), "head_stride": 8})
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(StudentError, match="junk.safetensors: not a safetensors file"):
        small_loop(tmp_path, frames, student={"weights": str(tmp_path / "junk.safetensors")})


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, state):
    """The tiny student after 48 frames of the tiny clip (run once for the module)."""
    tmp_path = tmp_path_factory.mktemp("adapted")
    frames = clip(48)
    loop = AdaptationLoop(tiny_config(tmp_path), ClipTeacher(frames), state_dir=state)
    return loop, feed_all(loop, frames), frames


def test_a_short_adaptation_on_a_tiny_clip_improves_agreement(adapted):
    loop, rounds, frames = adapted
    measured = [r for r in rounds if r.agreement_before is not None]
    assert len(measured) >= 3
    first, last = measured[0].agreement_before, loop.last_agreement
    assert first < 0.1
    # the adapted student on a frame twice as large: its best box in that frame's pixels
    frame, truth = frames[-1]
    big = cv2.resize(frame.image, (192, 128), interpolation=cv2.INTER_NEAREST)
    [found] = loop.predict([big], score_threshold=0.2)
    assert len(found.scores) >= 1
    assert iou_matrix(found.boxes[:1], truth.boxes * 2).max() >= 0.3, (found, truth)
    assert last > first + 0.25, [(r.agreement_before, r.agreement_after) for r in rounds]


def test_the_drift_guard_rolls_back_a_real_regression(adapted, monkeypatch):
    """A round whose steps wreck the adapted student: the guard measures the drop on
    the held-out slice and restores the weights."""
    loop, _, frames = adapted
    guard = loop.cfg.adaptation.model_copy(update={"rollback_margin": 0.05})
    monkeypatch.setattr(loop, "cfg", loop.cfg.model_copy(update={"adaptation": guard}))
    good = {k: v.clone() for k, v in loop.student.state_dict().items()}
    before = loop.last_agreement
    assert before is not None and before > 0.2

    def wrecking_step(x, y):
        with torch.no_grad():
            for p in loop.student.parameters():
                p.zero_()
        return 1.0  # a finite loss: only the held-out agreement can tell

    monkeypatch.setattr(loop.training, "step", wrecking_step)
    r = None
    for f, _ in frames * 3:
        if (r := loop.feed(f)) is not None:
            break
    assert r is not None and r.judged and r.rolled_back and not r.accepted
    assert r.agreement_before > 0.2 and r.agreement_after < r.agreement_before - 0.05
    assert loop.last_agreement == r.agreement_before == r.agreement
    state = loop.student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in good.items())


class ColourTeacher:
    """A frame-level teacher: is the frame's first rectangle left or right of centre?"""

    kind = "classify"
    classes = ("left", "right")

    def __init__(self, frames) -> None:
        self.truth = {id(f.image): d for f, d in frames}

    def label(self, images):
        out = []
        for im in images:
            box = self.truth[id(im)].boxes[0]
            right = float((box[0] + box[2]) / 2 > im.shape[1] / 2)
            out.append(SoftLabels(np.array([0.9 - 0.8 * right, 0.1 + 0.8 * right], np.float32)))
        return out


def test_a_classify_task_trains_on_soft_labels(tmp_path, state):
    frames = clip(12)
    cfg = tiny_config(
        tmp_path,
        training={"batch_size": 2, "steps_per_round": 2},
        # a held-out frame is one label: measured once three frames are held out
        adaptation={"new_samples_per_round": 4, "holdout_fraction": 0.25, "min_holdout_labels": 3},
    )
    loop = AdaptationLoop(cfg, ColourTeacher(frames), state_dir=state)
    assert loop.task.kind == "classify" and loop.student.fc.out_features == 2
    rounds = feed_all(loop, frames)
    assert [(r.agreement_after is not None, r.holdout_labels) for r in rounds] == [
        (False, 2),
        (True, 3),
    ]
    r = rounds[-1]
    assert r.agreement_after is not None and 0.0 <= r.agreement_after <= 1.0
    assert r.mean_kl is not None and r.mean_kl >= 0 and "mean_kl" in r.metrics()
    [probs] = loop.predict([frames[0][0].image])
    assert probs.shape == (2,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
