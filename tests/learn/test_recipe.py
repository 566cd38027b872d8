"""The training recipe's mechanisms, each on its own: the learning-rate schedule
across rounds, rollbacks and restarts; precise BatchNorm statistics; the drift
guard's signal (labels-weighted AP, ignore regions) and its keeping of the best
student; plateaus; the teacher's cost; fresh samples in every batch; the U-Net
student."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from waggle_trainer.learn.adaptation import AdaptationLoop
from waggle_trainer.learn.agreement import average_precision, mean_ap50, weighted_ap50
from waggle_trainer.learn.schedule import learning_rate
from waggle_trainer.learn.student import (
    StudentError,
    StudentSpec,
    build_student,
    check_metadata,
    recompute_batchnorm,
)
from waggle_trainer.learn.task import Task
from waggle_trainer.learn.teachers import Detections
from waggle_trainer.remat.chain import named_stages

from .adapt_util import ClipTeacher, clip, tiny_config


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


def _loop(tmp_path, state, frames, teacher=None, **sections):
    sections.setdefault("training", {})
    sections["training"] = {"batch_size": 2, "steps_per_round": 2, **sections["training"]}
    sections.setdefault("student", {})
    sections["student"] = {"input_width": 64, "input_height": 64, **sections["student"]}
    return AdaptationLoop(
        tiny_config(tmp_path, **sections), teacher or ClipTeacher(frames), state_dir=state
    )


def _rounds(loop, frames, n):
    """The first ``n`` rounds of ``loop`` on ``frames``."""
    out = []
    for f, _ in frames:
        if (r := loop.feed(f)) is not None:
            out.append(r)
            if len(out) == n:
                break
    assert len(out) == n, out
    return out


def _dets(boxes, classes, ignore=(), ignore_classes=()):
    return Detections(
        np.array(boxes, np.float32).reshape(-1, 4),
        np.linspace(1.0, 0.5, len(boxes)).astype(np.float32),
        np.array(classes, np.int64),
        np.array(ignore, np.float32).reshape(-1, 4),
        np.array(ignore_classes, np.int64),
    )


# ------------------------------------------------------------------ schedule


def test_learning_rate_warms_up_decays_and_stays_at_its_floor():
    lr = [learning_rate(s, 1e-3, warmup=10, decay=100, final_fraction=0.05) for s in range(200)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lr[:10], lr[1:10], strict=False))
    assert lr[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lr[10:110], lr[11:111], strict=False))
    assert lr[60] == pytest.approx(0.5 * (1e-3 + 5e-5))
    assert lr[110:] == [pytest.approx(5e-5)] * 90  # a node never stops learning
    with pytest.raises(ValueError, match="negative"):
        learning_rate(-1, 1e-3, warmup=1, decay=1, final_fraction=0.1)


def test_the_schedule_continues_across_a_rollback_and_a_restart(tmp_path, state, monkeypatch):
    frames = clip(12)
    schedule = {"warmup_steps": 3, "decay_steps": 20, "final_lr_fraction": 0.1}
    adaptation = {"new_samples_per_round": 2, "min_holdout_labels": 1, "rollback_margin": 0.05}
    loop = _loop(tmp_path, state, frames, training=schedule, adaptation=adaptation)
    seen: list[float] = []
    step = loop.training.step

    def recording(x, y):
        seen.append(loop.training.optimizer.param_groups[0]["lr"])
        return step(x, y)

    monkeypatch.setattr(loop.training, "step", recording)
    # round 1 accepted (0.5 -> 0.6), round 2 rolled back (0.6 -> 0.2), round 3 accepted
    values = iter([0.5, 0.6, 0.6, 0.2, 0.6, 0.7])
    monkeypatch.setattr(loop, "agreement", lambda: (next(values), None))
    results = _rounds(loop, frames, 3)
    assert [r.accepted for r in results] == [True, False, True]
    assert [r.steps_done for r in results] == [2, 2, 4]
    lr = [learning_rate(s, 1e-3, warmup=3, decay=20, final_fraction=0.1) for s in range(4)]
    # the rolled-back round's steps are given back: round 3 repeats steps 2 and 3
    assert seen[:6] == pytest.approx([lr[0], lr[1], lr[2], lr[3], lr[2], lr[3]])
    tensors, meta = loop.export_state()
    restarted = _loop(tmp_path, state, frames, training=schedule, adaptation=adaptation)
    restarted.load_state(tensors, meta)
    assert restarted.steps_done == 4
    restarted._set_learning_rate()
    assert restarted.training.optimizer.param_groups[0]["lr"] == pytest.approx(
        learning_rate(4, 1e-3, warmup=3, decay=20, final_fraction=0.1)
    )


def test_weight_decay_spares_biases_and_batchnorm(tmp_path, state):
    loop = _loop(tmp_path, state, clip(2), training={"optimizer": "adamw", "weight_decay": 0.01})
    decayed, spared = loop.training.optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and spared["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in spared["params"])


# ----------------------------------------------------------------- BatchNorm


def test_precise_batchnorm_is_the_plain_average_over_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3)).eval()
    data = [torch.randn(2, 3, 5, 5) * 3 + 1 for _ in range(3)]
    assert recompute_batchnorm(model, data) == 6
    bn = model[1]
    with torch.no_grad():
        feats = torch.cat([model[0](x) for x in data])
    mean = feats.mean(dim=(0, 2, 3))
    # the average of per-batch unbiased variances, as a cumulative BatchNorm keeps
    var = torch.stack([model[0](x).var(dim=(0, 2, 3), unbiased=True) for x in data]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var.detach(), atol=1e-4)
    assert bn.momentum == 0.3 and not model.training  # mode and momentum restored
    assert recompute_batchnorm(model, []) == 0 and torch.allclose(bn.running_mean, mean)


def test_after_a_round_batchnorm_statistics_do_not_depend_on_the_steps(tmp_path, state):
    """Precise statistics: a round's BatchNorm running statistics are those of the
    training buffer under the round's final weights, whatever the batches were."""
    frames = clip(10)
    loop = _loop(tmp_path, state, frames, adaptation={"new_samples_per_round": 4})
    result = next(r for f, _ in frames if (r := loop.feed(f)) is not None)
    assert result is not None
    kept = {k: v.clone() for k, v in loop.student.state_dict().items() if "running" in k}
    # scramble the statistics, recompute from the same buffer: the same values
    for m in loop.student.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(9.0)
    loop._recompute_batchnorm()
    for k, v in loop.student.state_dict().items():
        if "running" in k:
            assert torch.allclose(v, kept[k], atol=1e-5), k


# --------------------------------------------------------- the guard's signal


def test_a_few_vehicles_do_not_swing_the_guard_the_people_decide():
    people = [[10 * i, 0, 10 * i + 8, 20] for i in range(10)]
    truth = [_dets(people + [[200, 200, 260, 230]], [0] * 10 + [1])]
    found = [_dets(people, [0] * 10)]  # every person, the parked car missed
    mean, per_class = mean_ap50(found, truth, 2)
    assert per_class == {0: pytest.approx(1.0), 1: 0.0} and mean == pytest.approx(0.5)
    weighted, _ = weighted_ap50(found, truth, 2)
    assert weighted == pytest.approx(10 / 11)


def test_a_box_where_the_teacher_was_unsure_counts_neither_way():
    truth = [_dets([[0, 0, 10, 20]], [0], ignore=[[50, 50, 70, 90]], ignore_classes=[0])]
    hit = [[0, 0, 10, 20]]
    in_ignore = [[52, 52, 68, 88]]
    elsewhere = [[120, 0, 130, 20]]
    assert average_precision([_dets(in_ignore + hit, [0, 0])], truth, 0) == pytest.approx(1.0)
    assert average_precision([_dets(elsewhere + hit, [0, 0])], truth, 0) == pytest.approx(0.5)
    # an ignore region of another class does not excuse a person box
    truth_car = [_dets([[0, 0, 10, 20]], [0], ignore=[[50, 50, 70, 90]], ignore_classes=[1])]
    assert average_precision([_dets(in_ignore + hit, [0, 0])], truth_car, 0) == pytest.approx(0.5)


# ------------------------------------------------------------ the best student


def test_the_guard_keeps_the_best_student_through_a_slow_drift(tmp_path, state, monkeypatch):
    """Accepted rounds that each lose a little (within the margin) add up: once the
    student is more than the margin below the best seen, the best comes back."""
    frames = clip(20)
    adaptation = {"new_samples_per_round": 2, "min_holdout_labels": 1, "rollback_margin": 0.05}
    loop = _loop(tmp_path, state, frames, adaptation=adaptation)
    # (before, after) per round; the last value is the best student re-measured
    values = iter([0.3, 0.6, 0.6, 0.57, 0.57, 0.56, 0.56, 0.53, 0.6])
    monkeypatch.setattr(loop, "agreement", lambda: (next(values), None))
    results, best_weights = [], None
    for f, _ in frames:
        r = loop.feed(f)
        if r is None:
            continue
        results.append(r)
        if r.index == 0:
            best_weights = {k: v.clone() for k, v in loop.student.state_dict().items()}
        if len(results) == 4:
            break
    assert [r.accepted for r in results] == [True] * 4
    assert [r.restored_best for r in results] == [False, False, False, True]
    last = results[-1]
    assert last.agreement == pytest.approx(0.6) and loop.best_agreement == pytest.approx(0.6)
    assert "best student restored (0.600)" in last.verdict
    assert best_weights is not None
    for k, v in loop.student.state_dict().items():
        assert torch.equal(v, best_weights[k]), k


def test_a_plateau_slows_training_and_the_teacher_down(tmp_path, state, monkeypatch):
    frames = clip(40)
    adaptation = {
        "new_samples_per_round": 2,
        "min_holdout_labels": 1,
        "rollback_margin": 0.05,
        "patience": 2,
        "teacher_stride_min": 1,
        "teacher_stride_max": 8,
    }
    loop = _loop(tmp_path, state, frames, adaptation=adaptation)
    # a new best in round 0, then no better: a plateau after 2 rounds
    values = iter([0.4, 0.5] + [0.5, 0.5] * 10)
    monkeypatch.setattr(loop, "agreement", lambda: (next(values), None))
    results = _rounds(loop, frames, 4)
    assert [r.slowdown for r in results[:3]] == [1, 1, 2]
    assert results[2].teacher_stride == 2 * results[1].teacher_stride
    # with slowdown 2 a round waits for twice the new samples
    assert results[3].samples - results[2].samples == 4


# --------------------------------------------------------- the teacher's cost


class TiledClipTeacher(ClipTeacher):
    calls_per_label = 5


def test_tiled_labels_count_as_their_calls_and_keep_the_teacher_in_its_budget(tmp_path, state):
    frames = clip(40)
    loop = _loop(
        tmp_path,
        state,
        frames,
        teacher=TiledClipTeacher(frames),
        adaptation={
            "teacher_budget": 0.5,
            "teacher_stride_min": 1,
            "teacher_stride_max": 32,
            "new_samples_per_round": 1000,
        },
    )
    assert loop.stride_floor == 10
    for f, _ in frames:
        loop.feed(f)
    assert loop.labelled_frames == 4 and loop.teacher_calls == 20
    assert loop.stats()["teacher_calls_per_frame"] <= 0.5


def test_a_batch_takes_its_share_of_the_new_samples(tmp_path, state):
    frames = clip(30)
    loop = _loop(
        tmp_path,
        state,
        frames,
        training={"new_sample_share": 1.0, "batch_size": 4},
        adaptation={"new_samples_per_round": 1000},
    )
    for f, _ in frames[:20]:
        loop.feed(f)
    loop._fresh_from = loop._seq - 2  # the last two samples are new
    fresh = {i for i, s in enumerate(loop._train) if s.seq >= loop._fresh_from}
    assert len(fresh) >= 1
    for _ in range(10):
        assert set(loop._pick()) <= fresh


# ----------------------------------------------------------------- the student


@pytest.mark.parametrize(("trunk", "head"), [(16, 4), (16, 8), (32, 8), (32, 4)])
def test_the_unet_student_runs_as_a_chain_of_stages(trunk, head):
    spec = StudentSpec("resnet18", Task("detect", ("person", "vehicle")), 128, 96, head, trunk)
    model = build_student(spec).eval()
    x = torch.randn(1, 3, 96, 128)
    y = model(x)
    assert tuple(y.shape) == (1, 6, *spec.output_size)
    chain = nn.Sequential(*[s for _, s in named_stages(model)])
    assert torch.allclose(chain(x), y)
    # the finest trunk features reach the head: a skip changes the output
    ups = [m.inner for m in model.modules() if type(m).__name__ == "MergeSkip"]
    assert len(ups) == int(math.log2(trunk // head))


def test_a_student_file_of_the_old_format_is_refused_with_a_reason():
    spec = StudentSpec("resnet18", Task("detect", ("person",)), 64, 64)
    with pytest.raises(StudentError, match="old.safetensors: a student of the format "):
        check_metadata({"format": "waggle-student-1"}, spec, "old.safetensors")


def test_a_best_student_no_better_on_todays_slice_is_not_restored(tmp_path, state, monkeypatch):
    """The held-out slice changes as samples arrive: re-measured, the old best is within
    the margin of the student, so the newer student stays and becomes the best."""
    frames = clip(20)
    adaptation = {"new_samples_per_round": 2, "min_holdout_labels": 1, "rollback_margin": 0.05}
    loop = _loop(tmp_path, state, frames, adaptation=adaptation)
    values = iter([0.3, 0.6, 0.6, 0.57, 0.57, 0.56, 0.56, 0.53, 0.55])
    monkeypatch.setattr(loop, "agreement", lambda: (next(values), None))
    first = _rounds(loop, frames, 1)
    best_weights = {k: v.clone() for k, v in loop.student.state_dict().items()}
    results = first + _rounds(loop, frames[len(loop._train) + len(loop._holdout) :], 3)
    assert not results[-1].restored_best and results[-1].agreement == pytest.approx(0.53)
    assert loop.best_agreement == pytest.approx(0.53)
    state = loop.student.state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in best_weights.items())
