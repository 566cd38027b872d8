"""Labels: the tiled teacher (tiles, cut boxes, merging, ignore regions), ignore regions
in the targets and the loss, and the scale-and-shift jitter of training samples."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from waggle_trainer.config import ConfigError, config_from_dict
from waggle_trainer.learn.augment import FILL, ViewParams, apply_view, draw_view
from waggle_trainer.learn.detection import (
    affine_detections,
    encode_targets,
    focal_loss,
    hflip_detections,
    scale_detections,
)
from waggle_trainer.learn.teachers import (
    Detections,
    DnnDetectorTeacher,
    merge_looks,
    on_inner_edge,
    tile_grid,
)

PERSON = 0


def dets(boxes, classes=None, scores=None, ignore=(), ignore_classes=None) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    ib = np.array(ignore, np.float32).reshape(-1, 4)
    return Detections(
        b,
        np.array(scores if scores is not None else [1.0] * len(b), np.float32),
        np.array(classes if classes is not None else [0] * len(b), np.int64),
        ib,
        np.array(ignore_classes if ignore_classes is not None else [0] * len(ib), np.int64),
    )


# ----------------------------------------------------------------- teacher


class BlobNet:
    """A fake SSD: each bright blob of the (red channel of the) blob it is given is a
    person, score = its brightness / 255, box = its extent in 0..1."""

    def __init__(self) -> None:
        self.calls = 0

    def setInput(self, blob):
        self.blob = blob

    def forward(self):
        self.calls += 1
        red = self.blob[0, 0]
        h, w = red.shape
        n, lab, stats, _ = cv2.connectedComponentsWithStats((red > 40).astype(np.uint8))
        rows = []
        for i in range(1, n):
            x, y, bw, bh, _ = stats[i]
            score = float(red[lab == i].max()) / 255
            rows.append([0, 1, score, x / w, y / h, (x + bw) / w, (y + bh) / h])
        return np.array(rows, np.float32).reshape(1, 1, -1, 7)


def street(people: list[tuple[tuple[int, int, int, int], int]]) -> np.ndarray:
    img = np.zeros((150, 200, 3), np.uint8)
    for (x1, y1, x2, y2), v in people:
        img[y1:y2, x1:x2] = v
    return img


def tiled_teacher(**kw) -> DnnDetectorTeacher:
    args = {"score_threshold": 0.5, "ignore_threshold": 0.3, "tiles": 2, "tile_size": 0.6}
    return DnnDetectorTeacher(BlobNet(), ["person"], {1: PERSON}, **(args | kw))


def test_tile_grid_spreads_overlapping_tiles_from_edge_to_edge():
    grid = tile_grid(200, 150, 2, 0.6)
    assert grid == [(0, 0, 120, 90), (80, 0, 200, 90), (0, 60, 120, 150), (80, 60, 200, 150)]
    assert tile_grid(768, 576, 1, 0.6) == [(0, 0, 768, 576)]
    grid3 = tile_grid(768, 576, 3, 0.5)
    assert len(grid3) == 9 and grid3[0][:2] == (0, 0) and grid3[-1][2:] == (768, 576)
    covered = np.zeros((576, 768), int)
    for x1, y1, x2, y2 in grid3:
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1 and covered.max() == 4  # every pixel; overlaps
    with pytest.raises(ValueError, match="tiles 0 must be >= 1"):
        tile_grid(10, 10, 0, 0.5)


def test_inner_edges_cut_boxes_frame_borders_do_not():
    tile = (80, 60, 200, 150)  # bottom right: its left and top edges are inner
    boxes = [[81, 100, 100, 120], [100, 61, 120, 80], [150, 100, 200, 150], [90, 70, 110, 90]]
    assert on_inner_edge(np.array(boxes), tile, 200, 150).tolist() == [True, True, False, False]


def test_tiled_labels_merge_into_one_box_per_person_and_drop_cut_ones():
    # a: in both top tiles and the whole frame; b: whole in the bottom-right tile and
    # the frame, cut by the bottom-left tile's inner edge x = 120 (its 110..120 part);
    # c: faint (score 0.39): an ignore region, seen by the frame and the bottom-left tile
    a, b, c = (90, 20, 110, 50), (110, 100, 150, 140), (20, 100, 40, 130)
    teacher = tiled_teacher()
    assert teacher.calls_per_label == 5
    (got,) = teacher.label([street([(a, 230), (b, 230), (c, 100)])])
    assert teacher.net.calls == 5
    assert got.classes.tolist() == [PERSON, PERSON] and got.scores.min() > 0.85
    order = np.argsort(got.boxes[:, 0])
    np.testing.assert_allclose(got.boxes[order], [a, b], atol=2.5)
    assert got.ignore_classes.tolist() == [PERSON]
    np.testing.assert_allclose(got.ignore_boxes[0], c, atol=2.5)
    assert (got.boxes.dtype, got.ignore_boxes.dtype, got.ignore_classes.dtype) == (
        np.float32,
        np.float32,
        np.int64,
    )
    # the cut box would have survived the merge (IoU 0.25 with b): the edge test drops it
    cut = np.array([[110, 100, 120, 140]], np.float32)
    assert on_inner_edge(cut, (0, 60, 120, 150), 200, 150).tolist() == [True]
    # one look only: one call, the same people
    whole = tiled_teacher(tiles=1)
    (one,) = whole.label([street([(a, 230), (b, 230)])])
    assert whole.calls_per_label == 1 and whole.net.calls == 1 and len(one) == 2


def test_merge_keeps_confident_boxes_and_uncertain_ones_elsewhere():
    got = merge_looks(
        np.array(
            [[0, 0, 10, 20], [1, 0, 11, 20], [0, 0, 10, 19], [50, 50, 60, 70], [0, 0, 10, 20]],
            np.float32,
        ),
        np.array([0.9, 0.8, 0.4, 0.35, 0.4], np.float32),
        np.array([0, 0, 0, 0, 1], np.int64),
        score_threshold=0.5,
        ignore_threshold=0.3,
        nms_threshold=0.5,
    )
    assert got.boxes.tolist() == [[0, 0, 10, 20]] and got.scores.tolist() == [pytest.approx(0.9)]
    # the uncertain person under the confident one goes; the one elsewhere and the
    # uncertain class-1 box on the person stay
    assert sorted(map(tuple, got.ignore_boxes.tolist())) == [(0, 0, 10, 20), (50, 50, 60, 70)]
    assert sorted(got.ignore_classes.tolist()) == [0, 1]


def test_ignore_threshold_above_score_threshold_is_refused():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"teacher": {"score_threshold": 0.4, "ignore_threshold": 0.45}}, "n.toml")
    assert info.value.lines() == [
        "n.toml: teacher.ignore_threshold: 0.45 is above teacher.score_threshold (0.4); "
        "boxes scoring between the two are ignore regions (make them equal for none)"
    ]
    with pytest.raises(ConfigError, match=r"teacher.tiles: 5 is out of range \(must be <= 4\)"):
        config_from_dict({"teacher": {"tiles": 5}})
    with pytest.raises(ConfigError, match=r"teacher.tile_size: 0 is out of range \(must be > 0"):
        config_from_dict({"teacher": {"tile_size": 0}})
    t = config_from_dict({}).teacher
    assert (t.tiles, t.tile_size, t.ignore_threshold, t.nms_threshold) == (2, 0.6, 0.3, 0.5)


def test_load_detector_passes_the_tiling_through(monkeypatch):
    from waggle_trainer.learn import teachers

    cfg = config_from_dict({"teacher": {"tiles": 3, "tile_size": 0.5, "ignore_threshold": 0.2}})
    monkeypatch.setattr(teachers, "_model_files", lambda t: (None, None, "onnx", "fake"))
    monkeypatch.setattr(teachers, "_read_net", lambda *a: BlobNet())
    teacher = teachers.load_detector(cfg)
    assert (teacher.tiles, teacher.tile_size, teacher.ignore_threshold) == (3, 0.5, 0.2)
    assert teacher.calls_per_label == 10


# ------------------------------------------------------- targets and the loss


def test_ignore_cells_are_minus_one_but_never_a_positive():
    # a person centred at cell (5, 6); an ignore box over it and to its right; a tiny box
    d = dets([[14, 6, 30, 46], [50, 30, 51, 40]], ignore=[[16, 8, 48, 40]])
    t = encode_targets(d, 1, (12, 16), 4)
    heat = t[0]
    assert heat[6, 5] == 1.0 and int((heat == 1).sum()) == 1
    assert 0 < heat[6, 4] < 1 and 0 < heat[6, 6] < 1  # the Gaussian stays
    assert heat[2, 11] == -1 and heat[9, 11] == -1 and heat[2, 4] == -1  # cells 4..11, 2..9
    assert heat[2, 12] == 0 and heat[10, 11] == 0 and heat[1, 4] == 0
    assert heat[8, 12] == -1 and heat[9, 12] == -1  # the tiny box: cell 12, rows 7..9
    assert float(t[-1].sum()) == 1  # one centre
    # an ignore box of another class leaves this class alone
    t2 = encode_targets(
        dets([[14, 6, 30, 46]], ignore=[[16, 8, 48, 40]], ignore_classes=[1]), 2, (12, 16), 4
    )
    assert float(t2[0].min()) == 0 and float(t2[1].min()) == -1


def test_ignore_cells_contribute_no_loss():
    plain = encode_targets(dets([[14, 6, 30, 46]]), 1, (12, 16), 4)[:1][None]
    ignored = encode_targets(dets([[14, 6, 30, 46]], ignore=[[40, 8, 60, 40]]), 1, (12, 16), 4)
    ignored = ignored[:1][None]
    assert bool((ignored[0, 0, 3, 12] == -1).item())
    logits = torch.where(plain == 1, torch.tensor(6.0), torch.tensor(-6.0))
    wrong = logits.clone()
    wrong[0, 0, 3, 12] = 50.0  # a confident peak where the label is uncertain
    base = focal_loss(logits, plain)
    assert float(focal_loss(wrong, plain)) > float(base) + 10  # as background: punished
    assert float(focal_loss(wrong, ignored)) == pytest.approx(float(base), abs=1e-6)
    assert float(focal_loss(logits, ignored)) <= float(base)


def test_scale_and_flip_carry_ignore_boxes():
    d = dets([[10, 5, 30, 25]], ignore=[[0, 0, 4, 8]], ignore_classes=[1])
    s = scale_detections(d, 2, 0.5)
    assert s.ignore_boxes.tolist() == [[0, 0, 8, 4]] and s.ignore_classes.tolist() == [1]
    f = hflip_detections(d, 100)
    assert f.boxes.tolist() == [[70, 5, 90, 25]] and f.ignore_boxes.tolist() == [[96, 0, 100, 8]]
    plain = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert plain.ignore_boxes.shape == (0, 4) and plain.ignore_classes.dtype == np.int64
    assert len(Detections.empty().ignore_boxes) == 0


def test_affine_detections_clip_cut_boxes_into_ignore_regions():
    d = dets(
        [[10, 10, 30, 30], [90, 10, 110, 30], [96, 40, 116, 60], [200, 0, 220, 20]],
        classes=[0, 1, 0, 1],
        scores=[0.9, 0.8, 0.7, 0.6],
        ignore=[[-30, 0, -10, 10], [5, 5, 15, 15]],
    )
    got = affine_detections(d, 1.0, 1.0, 0.0, 0.0, 100, 80)
    # half of box 1 stays (a box); a fifth of box 2 (ignore); box 3 is gone
    assert got.boxes.tolist() == [[10, 10, 30, 30], [90, 10, 100, 30]]
    assert got.scores.tolist() == pytest.approx([0.9, 0.8]) and got.classes.tolist() == [0, 1]
    assert got.ignore_boxes.tolist() == [[5, 5, 15, 15], [96, 40, 100, 60]]
    assert got.ignore_classes.tolist() == [0, 0]
    # scaled by 2, shifted by (-20, 10), mirrored in 100 px
    got = affine_detections(dets([[10, 10, 30, 30]]), 2.0, 2.0, -20.0, 10.0, 100, 80, flip=True)
    assert got.boxes.tolist() == [[60, 30, 100, 70]]  # x 0..40 -> 60..100


# -------------------------------------------------------------------- jitter


def test_identity_view_and_flip():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 256, (3, 48, 64), dtype=np.uint8))
    d = dets([[10, 5, 30, 25]], ignore=[[0, 0, 4, 8]])
    out, got = apply_view(img, d, ViewParams(1.0, 0.0, 0.0, False))
    assert out.dtype == torch.uint8 and torch.equal(out, img)
    assert got.boxes.tolist() == [[10, 5, 30, 25]] and got.ignore_boxes.tolist() == [[0, 0, 4, 8]]
    out, got = apply_view(img, d, ViewParams(1.0, 0.0, 0.0, True))
    assert torch.equal(out, img.flip(2))
    assert got.boxes.tolist() == [[34, 5, 54, 25]] and got.ignore_boxes.tolist() == [[60, 0, 64, 8]]


def test_views_move_image_and_boxes_together():
    img = torch.zeros((3, 60, 80), dtype=torch.uint8)
    img[:, 10:30, 20:40] = 255  # a white square with its box
    d = dets([[20, 10, 40, 30]])
    for view in (ViewParams(0.5, 10.0, 4.0, False), ViewParams(1.25, -12.0, -5.0, True)):
        out, got = apply_view(img, d, view)
        assert out.shape == img.shape
        x1, y1, x2, y2 = got.boxes[0]
        inside = out[0, int(y1) + 1 : int(y2) - 1, int(x1) + 1 : int(x2) - 1]
        assert inside.float().mean() > 250
        ring = out[0].clone()
        ring[max(0, int(y1) - 1) : int(y2) + 2, max(0, int(x1) - 1) : int(x2) + 2] = 0
        assert int(ring.max()) <= max(FILL)  # white only inside the moved box
    out, _ = apply_view(img, d, ViewParams(0.5, 0.0, 0.0, False))
    assert out[:, 59, 79].tolist() == list(FILL)  # uncovered: mean grey


def test_draw_view_ranges_and_determinism():
    views = [draw_view(torch.Generator().manual_seed(s), 384, 288) for s in range(200)]
    assert draw_view(torch.Generator().manual_seed(7), 384, 288) == views[7]
    assert all(0.7 <= v.scale <= 1.4 for v in views)
    assert 0.3 < np.mean([v.flip for v in views]) < 0.7
    for v in views:
        sw, sh = v.scale * 384, v.scale * 288
        if v.scale >= 1:  # the output stays covered
            assert v.tx <= 0 and v.tx + sw >= 384 - 1e-6 and v.ty <= 0 and v.ty + sh >= 288 - 1e-6
        else:  # the image stays inside
            assert v.tx >= 0 and v.tx + sw <= 384 + 1e-6 and v.ty >= 0 and v.ty + sh <= 288 + 1e-6
    assert not any(
        draw_view(torch.Generator().manual_seed(s), 64, 48, hflip=False).flip for s in range(20)
    )
    with pytest.raises(ValueError, match="needs 0 < low <= high"):
        draw_view(torch.Generator(), 64, 48, scale_range=(1.2, 0.8))
