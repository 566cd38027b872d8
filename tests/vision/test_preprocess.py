"""Preprocessing: letterbox, resize and crop keep an exact map back to source pixels."""

from __future__ import annotations

import numpy as np
import pytest

from waggle_trainer.vision.preprocess import (
    PAD_VALUE,
    center_crop,
    fit,
    letterbox,
    normalize,
    prepare_batch,
    resize,
)

BOXES = np.array([[10, 20, 110, 220], [700, 500, 768, 576], [0, 0, 1, 1]], np.float32)


def frame(w=768, h=576) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("how", ["letterbox", "resize"])
def test_boxes_round_trip(how):
    img, t = fit(frame(), (384, 384), how)
    assert img.shape == (384, 384, 3) and img.dtype == np.uint8
    np.testing.assert_allclose(t.to_source(t.to_target(BOXES)), BOXES, atol=1e-3)


def test_letterbox_geometry_and_bars():
    img, t = letterbox(frame(), (384, 384))  # 768x576 -> 384x288, bars of 48 px
    assert (t.sx, t.sy, t.dx, t.dy) == (0.5, 0.5, 0, 48)
    assert (img[:48] == PAD_VALUE).all() and (img[-48:] == PAD_VALUE).all()
    assert not (img[48:336] == PAD_VALUE).all()
    # the source's top-left pixel lands at (0, 48); a box in a bar clips to zero area
    np.testing.assert_allclose(t.to_target([[0, 0, 768, 576]]), [[0, 48, 384, 336]])
    np.testing.assert_allclose(t.to_source([[0, 0, 100, 40]]), [[0, 0, 200, 0]])


def white_box_image(box, w=768, h=576) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return img


def found_box(img: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(img[..., 0] > 127)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("how", ["letterbox", "resize", "crop"])
def test_a_box_lands_where_the_transform_says(how):
    box = [300, 200, 468, 376]
    img, t = fit(white_box_image(box), (320, 256), how)
    np.testing.assert_allclose(found_box(img), t.to_target([box])[0], atol=1.0)


def test_center_crop_maps_back_to_the_visible_part():
    img, t = center_crop(frame(), (288, 288))  # scale 0.5 -> 384x288, cut 48 px each side
    assert img.shape == (288, 288, 3)
    np.testing.assert_allclose(t.to_source([[0, 0, 288, 288]]), [[96, 0, 672, 576]])


def test_resize_scales_each_axis():
    _, t = resize(frame(), (300, 300))
    np.testing.assert_allclose(t.to_target([[768, 576, 768, 576]]), [[300, 300, 300, 300]])


def test_normalize_and_batch():
    a = np.zeros((8, 8, 3), np.uint8)
    a[..., 0] = 255
    out = normalize(a, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (1, 3, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, -1.0, -1.0])
    batch, transforms = prepare_batch([frame(), frame(640, 480)], (320, 240))
    assert batch.shape == (2, 3, 240, 320) and len(transforms) == 2
    with pytest.raises(ValueError, match="expected RGB uint8"):
        normalize(np.zeros((4, 4), np.float32))
