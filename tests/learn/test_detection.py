"""The detection head's targets, loss and decoding; AP50; the distillation loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from waggle_trainer.learn.agreement import average_precision, iou_matrix, mean_ap50
from waggle_trainer.learn.classify import distillation_loss
from waggle_trainer.learn.detection import (
    Detections,
    decode,
    detection_loss,
    encode_targets,
    focal_loss,
    hflip_detections,
)


def dets(boxes, classes=None, scores=None) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    n = len(b)
    return Detections(
        b,
        np.array(scores if scores is not None else [1.0] * n, np.float32),
        np.array(classes if classes is not None else [0] * n, np.int64),
    )


# ---------------------------------------------------------------- targets


def test_targets_put_a_peak_of_one_at_each_centre_with_size_and_offset():
    # stride 4, grid 16x12 (64x48 input): a person 16x40 px centred at (22, 26),
    # a vehicle 16x8 px centred at (50, 10) (too small for more than a peak)
    t = encode_targets(dets([[14, 6, 30, 46], [42, 6, 58, 14]], [0, 1]), 2, (12, 16), 4)
    assert t.shape == (2 + 5, 12, 16)
    heat, reg = t[:2], t[2:]
    assert heat[0, 6, 5] == 1.0 and heat[1, 2, 12] == 1.0  # (26/4, 22/4), (10/4, 50/4)
    assert int((heat == 1).sum()) == 2
    assert 0 < heat[0, 6, 4] < 1 and 0 < heat[0, 5, 5] < 1  # a Gaussian (radius 1) around it
    assert heat[0, 6, 3] == 0 and int((heat[1] > 0).sum()) == 1
    assert heat[1, 6, 5] == 0  # classes do not mix
    assert reg[:, 6, 5].tolist() == pytest.approx([4.0, 10.0, 0.5, 0.5, 1.0])
    assert reg[:, 2, 12].tolist() == pytest.approx([4.0, 2.0, 0.5, 0.5, 1.0])
    assert float(reg[4].sum()) == 2.0


def test_targets_skip_tiny_boxes_unknown_classes_and_outside_centres():
    t = encode_targets(
        dets([[10, 10, 11, 30], [10, 10, 30, 30], [100, 100, 120, 120]], [0, 5, 0]), 1, (12, 16), 4
    )
    assert float(t[0].max()) == 0 and float(t[-1].sum()) == 0


def test_encoded_targets_decode_back_to_the_boxes():
    truth = dets([[18, 20, 26, 40], [42, 6, 58, 14]], [0, 1])
    t = encode_targets(truth, 2, (12, 16), 4)
    # a perfect head: heat logits +/-large where the target is 1, the regression as encoded
    logits = torch.where(t[:2] == 1, torch.tensor(8.0), torch.tensor(-8.0))
    out = torch.cat([logits, t[2:6]])[None]
    got = decode(out, 4, score_threshold=0.5)[0]
    order = np.argsort(got.classes)
    assert got.classes[order].tolist() == [0, 1]
    np.testing.assert_allclose(got.boxes[order], truth.boxes, atol=1e-4)
    # scale maps input pixels to source pixels (a source twice as large)
    big = decode(out, 4, score_threshold=0.5, scale=(2.0, 2.0))[0]
    np.testing.assert_allclose(
        np.sort(big.boxes, axis=0), np.sort(truth.boxes * 2, axis=0), atol=1e-3
    )


def test_decode_keeps_only_local_maxima_above_the_threshold():
    heat = torch.full((1, 1, 8, 8), -10.0)
    heat[0, 0, 3, 3] = 3.0  # a peak
    heat[0, 0, 3, 4] = 2.0  # its shoulder: suppressed by the 3x3 max-pool
    heat[0, 0, 6, 6] = -1.0  # a separate weak peak (0.27 < 0.3)
    out = torch.cat([heat, torch.ones(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)], 1)
    got = decode(out, 8, score_threshold=0.3)[0]
    assert len(got.scores) == 1
    assert got.scores[0] == pytest.approx(1 / (1 + math.exp(-3)))
    np.testing.assert_allclose(got.boxes[0], [20, 20, 28, 28])
    assert len(decode(out, 8, score_threshold=0.2)[0].scores) == 2


def test_hflip_mirrors_boxes():
    got = hflip_detections(dets([[10, 5, 30, 25]]), 100)
    assert got.boxes.tolist() == [[70, 5, 90, 25]]


# ------------------------------------------------------------------ losses


def test_focal_loss_is_small_for_the_right_heat_map_and_large_for_the_wrong_one():
    target = encode_targets(dets([[14, 6, 30, 46]]), 1, (12, 16), 4)[:1][None]
    right = torch.where(target == 1, torch.tensor(6.0), torch.tensor(-6.0))
    wrong = -right
    assert float(focal_loss(right, target)) < 0.01
    assert float(focal_loss(wrong, target)) > 5
    # penalty reduction: a false peak next to the centre costs less than one far away
    near, far = right.clone(), right.clone()
    near[0, 0, 6, 4], far[0, 0, 0, 15] = 6.0, 6.0
    assert focal_loss(near, target) < focal_loss(far, target)


def test_detection_loss_counts_size_and_offset_only_at_centres():
    target = encode_targets(dets([[14, 6, 30, 46]]), 1, (12, 16), 4)[None]
    heat = torch.where(target[:, :1] == 1, torch.tensor(6.0), torch.tensor(-6.0))
    exact = torch.cat([heat, target[:, 1:5]], 1)
    base = float(detection_loss(exact, target))
    off_centre = exact.clone()
    off_centre[:, 1:5, 0, 0] += 10  # regression away from the centre: free
    assert float(detection_loss(off_centre, target)) == pytest.approx(base)
    bad_size = exact.clone()
    bad_size[:, 1, 6, 5] += 10  # width off by 10 cells: 0.1 * 10
    assert float(detection_loss(bad_size, target)) == pytest.approx(base + 1.0, rel=1e-4)
    bad_offset = exact.clone()
    bad_offset[:, 3, 6, 5] += 0.5
    assert float(detection_loss(bad_offset, target)) == pytest.approx(base + 0.5, rel=1e-4)


def test_distillation_loss_is_kl_times_t_squared_plus_ce_on_confident_labels():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.95, 0.03, 0.02], [0.2, 0.5, 0.3]])
    t = 3.0
    q = torch.log_softmax(logits / t, 1)
    kl = float((teacher * (teacher.log() - q)).sum(1).mean()) * t * t
    got = distillation_loss(logits, teacher, temperature=t, hard_confidence=0.9, hard_weight=0)
    assert float(got) == pytest.approx(kl, rel=1e-5)
    ce = float(torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0])))
    got = distillation_loss(logits, teacher, temperature=t, hard_confidence=0.9, hard_weight=0.5)
    assert float(got) == pytest.approx(kl + 0.5 * ce, rel=1e-5)
    # the student that matches the teacher has (nearly) no KL term
    assert float(
        distillation_loss(teacher.log() * t, teacher, temperature=t, hard_weight=0)
    ) == pytest.approx(0, abs=1e-5)


# -------------------------------------------------------------------- AP50


def test_iou():
    assert iou_matrix(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10]]))[
        0, 0
    ] == pytest.approx(50 / 150)


def test_ap50_perfect_missing_and_false_positive():
    truth = [dets([[0, 0, 10, 10], [20, 20, 30, 30]]), dets([[0, 0, 10, 20]])]
    perfect = [dets(t.boxes, scores=[0.9] * len(t.boxes)) for t in truth]
    assert average_precision(perfect, truth, 0) == pytest.approx(1.0)
    # one of three found: recall stops at 1/3 with precision 1
    one = [dets([[0, 0, 10, 10]], scores=[0.9]), dets([])]
    assert average_precision(one, truth, 0) == pytest.approx(1 / 3)
    # a false positive ranked above the three hits: precision 1/2, 2/3, 3/4 at recall
    # 1/3, 2/3, 1; the envelope (best precision at this recall or more) is 3/4 throughout
    fp = [
        dets([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], scores=[0.99, 0.8, 0.7]),
        dets([[0, 0, 10, 20]], scores=[0.6]),
    ]
    assert average_precision(fp, truth, 0) == pytest.approx(3 / 4)
    # ranked second: precision 1 up to recall 1/3, then the envelope is 3/4
    fp2 = [
        dets([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], scores=[0.8, 0.9, 0.7]),
        dets([[0, 0, 10, 20]], scores=[0.6]),
    ]
    assert average_precision(fp2, truth, 0) == pytest.approx(1 / 3 + 2 / 3 * 3 / 4)
    # the same false positive ranked last costs nothing
    fp_last = [
        dets([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], scores=[0.1, 0.8, 0.7]),
        dets([[0, 0, 10, 20]], scores=[0.6]),
    ]
    assert average_precision(fp_last, truth, 0) == pytest.approx(1.0)


def test_ap50_matches_at_iou_half_each_truth_once_and_by_class():
    truth = [dets([[0, 0, 10, 10]])]
    assert average_precision([dets([[0, 0, 10, 20]], scores=[1])], truth, 0) == 1.0  # IoU 0.5
    assert average_precision([dets([[0, 0, 10, 21]], scores=[1])], truth, 0) == 0.0  # IoU < 0.5
    # a duplicate of a hit is a false positive (after the hit: AP stays 1)
    dup = [dets([[0, 0, 10, 10], [0, 0, 10, 10]], scores=[0.9, 0.8])]
    assert average_precision(dup, truth, 0) == 1.0
    # wrong class: no hit; and a class without truths has no AP
    assert average_precision([dets([[0, 0, 10, 10]], [1], [1])], truth, 0) == 0.0
    assert average_precision([dets([[0, 0, 10, 10]])], truth, 1) is None


def test_mean_ap50_over_classes_with_truths_and_the_empty_case():
    truth = [dets([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1])]
    pred = [dets([[0, 0, 10, 10]], [0], [0.9])]
    mean, per = mean_ap50(pred, truth, 3)
    assert per == {0: 1.0, 1: 0.0, 2: None} and mean == 0.5
    assert mean_ap50([dets([])], [dets([])], 2)[0] == 1.0
    assert mean_ap50([dets([[0, 0, 5, 5]], scores=[0.9])], [dets([])], 2)[0] == 0.0
