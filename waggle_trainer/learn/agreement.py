"""How well the student agrees with the teacher: AP50 for boxes, top-1 and KL for
class distributions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [N, 4] with every box in ``b`` [M, 4] (x1, y1, x2, y2)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def average_precision(
    predictions: Sequence, truths: Sequence, cls: int, iou_threshold: float = 0.5
) -> float | None:
    """AP of class ``cls`` over images (all-point interpolated precision/recall area,
    as PASCAL VOC 2010+ and COCO's per-threshold AP).

    ``predictions[i]`` and ``truths[i]`` are the detections of image ``i`` (objects with
    ``boxes``, ``scores``, ``classes``; the truths' scores are ignored).  A prediction
    is a true positive when it overlaps a not yet matched truth of its class in its
    image by at least ``iou_threshold``, predictions taken in descending score order.
    A prediction that matches no truth but lies at least half inside one of the
    truths' ``ignore_boxes`` of its class (the teacher was unsure there) counts
    neither way, as COCO's crowd regions.  None when no image has a truth of class
    ``cls`` (AP is undefined).
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images")
    records: list[tuple[float, int, int]] = []  # score, image, box index
    gts: list[np.ndarray] = []
    ignores: list[np.ndarray] = []
    for i, (p, t) in enumerate(zip(predictions, truths, strict=True)):
        gts.append(np.asarray(t.boxes, np.float32).reshape(-1, 4)[np.asarray(t.classes) == cls])
        ib = np.asarray(getattr(t, "ignore_boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
        ic = np.asarray(getattr(t, "ignore_classes", np.zeros(0)), np.int64).reshape(-1)
        ignores.append(ib[ic == cls])
        pc = np.flatnonzero(np.asarray(p.classes) == cls)
        records += [(float(np.asarray(p.scores)[j]), i, int(j)) for j in pc]
    n_truth = sum(len(g) for g in gts)
    if n_truth == 0:
        return None
    records.sort(key=lambda r: -r[0])
    matched = [np.zeros(len(g), bool) for g in gts]
    tp = np.zeros(len(records))
    counted = np.ones(len(records), bool)
    for k, (_, i, j) in enumerate(records):
        g = gts[i]
        box = np.asarray(predictions[i].boxes, np.float32).reshape(-1, 4)[j]
        if len(g):
            ious = iou_matrix(box[None], g)[0]
            ious[matched[i]] = -1.0
            best = int(np.argmax(ious))
            if ious[best] >= iou_threshold:
                matched[i][best] = True
                tp[k] = 1.0
                continue
        if len(ignores[i]) and _inside_fraction(box, ignores[i]).max() >= 0.5:
            counted[k] = False
    tp = tp[counted]
    if not len(tp):
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_truth
    precision = ctp / np.arange(1, len(tp) + 1)
    # precision envelope, then area under the step curve at each recall change
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[1.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _inside_fraction(box: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Fraction of ``box``'s area inside each of ``regions`` [K, 4]."""
    ix = np.clip(np.minimum(box[2], regions[:, 2]) - np.maximum(box[0], regions[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], regions[:, 3]) - np.maximum(box[1], regions[:, 1]), 0, None)
    area = max(float((box[2] - box[0]) * (box[3] - box[1])), 1e-9)
    return ix * iy / area


def weighted_ap50(predictions: Sequence, truths: Sequence, num_classes: int) -> tuple[float, dict]:
    """AP50 per class, averaged with each class weighted by its share of the truths'
    boxes; and AP50 per class (None: no truth).

    The drift guard's signal: a plain mean over classes lets a class with a handful
    of boxes (three parked cars, labelled in every frame) swing the verdict between
    0 and 1 while the class the task is about moves the other way (measured).  When
    no class has a truth: 1.0 when the student predicts no box, else 0.0.
    """
    per_class = {c: average_precision(predictions, truths, c) for c in range(num_classes)}
    counts = {c: 0 for c in range(num_classes)}
    for t in truths:
        for c in np.asarray(t.classes, np.int64).reshape(-1):
            if 0 <= int(c) < num_classes:
                counts[int(c)] += 1
    total = sum(counts[c] for c, v in per_class.items() if v is not None)
    if total:
        score = sum(counts[c] * v for c, v in per_class.items() if v is not None) / total
        return float(score), per_class
    any_box = any(len(np.asarray(p.scores)) for p in predictions)
    return (0.0 if any_box else 1.0), per_class


def mean_ap50(predictions: Sequence, truths: Sequence, num_classes: int) -> tuple[float, dict]:
    """Mean AP50 over the classes that have truths, and AP50 per class (None: no truth).

    When no class has a truth, the student agrees exactly when it finds nothing:
    1.0 when it predicts no box, else 0.0.
    """
    per_class = {c: average_precision(predictions, truths, c) for c in range(num_classes)}
    defined = [v for v in per_class.values() if v is not None]
    if defined:
        return float(np.mean(defined)), per_class
    any_box = any(len(np.asarray(p.scores)) for p in predictions)
    return (0.0 if any_box else 1.0), per_class


def top1_agreement(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> float:
    """Fraction of samples whose student arg-max equals the teacher's."""
    return float((student_logits.argmax(1) == teacher_probs.argmax(1)).float().mean())


def mean_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> float:
    """Mean KL(teacher || student) in nats, at temperature 1."""
    logq = F.log_softmax(student_logits.float(), dim=1)
    p = teacher_probs.float().clamp(min=0)
    return float(F.kl_div(logq, p, reduction="batchmean"))
