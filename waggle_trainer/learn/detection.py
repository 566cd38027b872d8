"""CenterNet-style dense detection: targets, loss and decoding (Zhou et al., 2019).

The head's output (:class:`waggle_trainer.learn.student.CenterHead`) is a tensor
``[B, C + 4, h, w]`` on a grid of ``stride`` input pixels per cell:

* channels ``0 .. C-1``: per-class centre heat-map logits;
* ``C, C+1``: box width and height, in cells;
* ``C+2, C+3``: the centre's offset from its cell's corner, in cells (0..1).

A box with centre ``(cx, cy)`` (cells) puts a Gaussian peak of value 1 at cell
``(int(cx), int(cy))`` of its class's heat-map, radius from CornerNet's
``gaussian_radius``; the size and offset are regressed at that cell only.  The
heat-map loss is the penalty-reduced focal loss (alpha 2, beta 4) over all cells,
normalised by the number of centres; size (weight 0.1) and offset (weight 1) are
L1 losses at centres.  Ignore regions (``Detections.ignore_boxes``, and boxes too
small to learn) mark the cells they cover in their class's heat-map with target -1
wherever no positive Gaussian reaches: those cells add no loss.  Decoding: sigmoid,
3x3 max-pool to keep local peaks (the "NMS"), the top ``max_detections`` peaks
above ``score_threshold``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from waggle_trainer.learn.teachers import Detections

SIZE_WEIGHT = 0.1
OFFSET_WEIGHT = 1.0
#: Boxes narrower or lower than this many input pixels are not learnable targets.
MIN_BOX_PX = 2.0


def _ignore_of(dets) -> tuple[np.ndarray, np.ndarray]:
    """(ignore boxes float32 [K, 4], ignore classes int64 [K]) of ``dets``; empty when
    it has none."""
    boxes = getattr(dets, "ignore_boxes", None)
    classes = getattr(dets, "ignore_classes", None)
    if boxes is None or classes is None:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64).reshape(-1)


def scale_detections(dets, sx: float, sy: float) -> Detections:
    """``dets`` (any object with ``boxes``, ``scores``, ``classes``) in an image scaled
    by ``sx`` horizontally and ``sy`` vertically, ignore regions too; a copy."""
    scale = np.array([sx, sy, sx, sy], np.float32)
    ib, ic = _ignore_of(dets)
    return Detections(
        (np.asarray(dets.boxes, np.float32).reshape(-1, 4) * scale).astype(np.float32),
        np.asarray(dets.scores, np.float32).reshape(-1).copy(),
        np.asarray(dets.classes, np.int64).reshape(-1).copy(),
        (ib * scale).astype(np.float32),
        ic.copy(),
    )


def affine_detections(
    dets,
    sx: float,
    sy: float,
    tx: float,
    ty: float,
    width: int,
    height: int,
    flip: bool = False,
) -> Detections:
    """``dets`` mapped by ``x' = x * sx + tx``, ``y' = y * sy + ty`` (then mirrored in a
    ``width``-pixel image if ``flip``), clipped to ``[0, width] x [0, height]``.  A box
    keeping less than half its area becomes an ignore region of its class; boxes
    (and ignore regions) with nothing left vanish."""
    m = np.array([sx, sy, sx, sy], np.float64)
    t = np.array([tx, ty, tx, ty], np.float64)
    lim = np.array([width, height, width, height], np.float64)

    def mapped(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b = b.astype(np.float64) * m + t
        b = np.concatenate(
            [np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1
        )  # a negative scale swaps the corners
        if flip:
            b = np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        c = np.clip(b, 0, lim)
        kept = (c[:, 2] - c[:, 0]).clip(0) * (c[:, 3] - c[:, 1]).clip(0)
        return c.astype(np.float32), kept, area

    boxes = np.asarray(dets.boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(dets.scores, np.float32).reshape(-1)
    classes = np.asarray(dets.classes, np.int64).reshape(-1)
    b, kept, area = mapped(boxes)
    whole = (kept > 0) & (kept >= 0.5 * area)
    cut = (kept > 0) & ~whole
    ib, ic = _ignore_of(dets)
    ib2, ikept, _ = mapped(ib)
    return Detections(
        b[whole],
        scores[whole].copy(),
        classes[whole].copy(),
        np.concatenate([ib2[ikept > 0], b[cut]]).astype(np.float32),
        np.concatenate([ic[ikept > 0], classes[cut]]).astype(np.int64),
    )


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CornerNet's radius: corners within it still give IoU >= ``min_overlap``."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def _draw_gaussian(heat: np.ndarray, cx: int, cy: int, radius: int) -> None:
    sigma = (2 * radius + 1) / 6
    ys, xs = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    g = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma))
    h, w = heat.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    patch = heat[cy - top : cy + bottom, cx - left : cx + right]
    gpatch = g[radius - top : radius + bottom, radius - left : radius + right]
    np.maximum(patch, gpatch, out=patch)


def encode_targets(
    dets: Detections, num_classes: int, grid: tuple[int, int], stride: int
) -> torch.Tensor:
    """Dense training target ``[C + 5, h, w]`` for boxes in input pixels: heat-maps,
    width/height, offset (as the head's output) and a centre mask (last channel).
    Heat-map cells of an ignore region (ignore boxes, boxes under ``MIN_BOX_PX``) that
    no positive Gaussian reaches are -1."""
    h, w = grid
    heat = np.zeros((num_classes, h, w), np.float32)
    reg = np.zeros((5, h, w), np.float32)  # w, h, dx, dy, mask
    boxes = np.asarray(dets.boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(dets.classes, np.int64).reshape(-1)
    # large boxes first, so that a small box's centre wins a shared cell
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
    ignore_boxes, ignore_classes = _ignore_of(dets)
    tiny: list[int] = []
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        c = int(classes[i])
        if not 0 <= c < num_classes:
            continue
        if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
            tiny.append(int(i))
            continue
        bw, bh = (x2 - x1) / stride, (y2 - y1) / stride
        cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
        ix, iy = int(cx), int(cy)
        if not (0 <= ix < w and 0 <= iy < h):
            continue
        radius = max(0, int(gaussian_radius(math.ceil(bh), math.ceil(bw))))
        _draw_gaussian(heat[c], ix, iy, radius)
        reg[:, iy, ix] = (bw, bh, cx - ix, cy - iy, 1.0)
    regions = np.concatenate([ignore_boxes, boxes[tiny]])
    region_classes = np.concatenate([ignore_classes, classes[tiny]])
    for (x1, y1, x2, y2), c in zip(regions.tolist(), region_classes.tolist(), strict=True):
        # the cells the box overlaps (a sliver of a box still covers its cell)
        gx1, gy1 = max(0, math.floor(x1 / stride)), max(0, math.floor(y1 / stride))
        gx2, gy2 = min(w, math.ceil(x2 / stride)), min(h, math.ceil(y2 / stride))
        if not 0 <= c < num_classes or gx2 <= gx1 or gy2 <= gy1:
            continue
        cells = heat[c, gy1:gy2, gx1:gx2]
        cells[cells == 0] = -1.0
    return torch.from_numpy(np.concatenate([heat, reg]))


def hflip_detections(dets: Detections, width: int) -> Detections:
    """Boxes of the horizontally mirrored image (``width`` pixels wide)."""
    b = np.asarray(dets.boxes, np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = width - b[:, [2, 0]]
    ib, ic = _ignore_of(dets)
    ib = ib.copy()
    ib[:, [0, 2]] = width - ib[:, [2, 0]]
    return Detections(
        b, np.asarray(dets.scores, np.float32), np.asarray(dets.classes, np.int64), ib, ic.copy()
    )


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Penalty-reduced pixel-wise focal loss (CornerNet), summed over cells and
    divided by the number of centres (cells where ``target`` is 1); cells where
    ``target`` is negative (ignore regions) add nothing."""
    pos = target.eq(1).float()
    neg = target.ge(0).float() - pos
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = (log_p * (1 - p) ** 2 * pos).sum()
    neg_loss = (log_not_p * p**2 * (1 - target.clamp(min=0)) ** 4 * neg).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def detection_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Focal loss on heat-maps + 0.1 L1 on sizes + L1 on offsets (at centres)."""
    c = output.shape[1] - 4
    heat_loss = focal_loss(output[:, :c], target[:, :c])
    mask = target[:, c + 4 : c + 5]
    n = mask.sum().clamp(min=1.0)
    size_loss = (
        F.l1_loss(output[:, c : c + 2], target[:, c : c + 2], reduction="none") * mask
    ).sum()
    off_loss = (
        F.l1_loss(output[:, c + 2 : c + 4], target[:, c + 2 : c + 4], reduction="none") * mask
    ).sum()
    return heat_loss + (SIZE_WEIGHT * size_loss + OFFSET_WEIGHT * off_loss) / n


@torch.no_grad()
def decode(
    output: torch.Tensor,
    stride: int,
    *,
    score_threshold: float = 0.3,
    max_detections: int = 100,
    scale: tuple[float, float] = (1.0, 1.0),
) -> list[Detections]:
    """Boxes from the head's output ``[B, C + 4, h, w]``, in input pixels times
    ``scale`` (``(sx, sy)``, e.g. source size / input size)."""
    c = output.shape[1] - 4
    heat = torch.sigmoid(output[:, :c])
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    b, _, h, w = heat.shape
    k = min(max_detections, c * h * w)
    scores, idx = peaks.reshape(b, -1).topk(k)
    sx, sy = scale
    out = []
    for i in range(b):
        keep = scores[i] >= score_threshold
        s, j = scores[i][keep], idx[i][keep]
        cls = j // (h * w)
        ys, xs = (j % (h * w)) // w, j % w
        bw, bh = output[i, c, ys, xs].clamp(min=0), output[i, c + 1, ys, xs].clamp(min=0)
        cx = xs.float() + output[i, c + 2, ys, xs]
        cy = ys.float() + output[i, c + 3, ys, xs]
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1) * stride
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        out.append(
            Detections(
                boxes.numpy().astype(np.float32),
                s.numpy().astype(np.float32),
                cls.numpy().astype(np.int64),
            )
        )
    return out
