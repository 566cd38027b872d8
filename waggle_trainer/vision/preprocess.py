"""Preprocessing in RAM: resize, letterbox or centre-crop a frame, normalise to a tensor.

Every geometric step returns the image and a :class:`BoxTransform`, the exact affine
map between source pixels and the prepared image, so boxes travel both ways: teacher
boxes (source pixels) ``to_target`` for training, student boxes ``to_source`` for
output in the camera's pixels.  numpy/OpenCV only; the learning side converts the
float32 NCHW array to a torch tensor (``torch.from_numpy``, no copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import cv2
import numpy as np

Fit = Literal["letterbox", "resize", "crop"]
FITS: tuple[str, ...] = get_args(Fit)

#: torchvision's ImageNet statistics for RGB in 0..1 (the student's pretrained trunks).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Grey of the letterbox bars (YOLO's convention).
PAD_VALUE = 114


@dataclass(frozen=True, slots=True)
class BoxTransform:
    """``target = source * (sx, sy) + (dx, dy)``, between a ``src_w`` x ``src_h`` source
    and a ``dst_w`` x ``dst_h`` prepared image.  Boxes are x1, y1, x2, y2 in pixels."""

    sx: float
    sy: float
    dx: float
    dy: float
    src_w: int
    src_h: int
    dst_w: int
    dst_h: int

    def to_target(self, boxes: np.ndarray, clip: bool = True) -> np.ndarray:
        """Source-pixel boxes [N, 4] -> boxes in the prepared image (float32)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = b * (self.sx, self.sy, self.sx, self.sy) + (self.dx, self.dy, self.dx, self.dy)
        if clip:
            out = np.clip(out, 0, (self.dst_w, self.dst_h, self.dst_w, self.dst_h))
        return out.astype(np.float32)

    def to_source(self, boxes: np.ndarray, clip: bool = True) -> np.ndarray:
        """Boxes [N, 4] in the prepared image -> source pixels (float32); clipped to the
        source, so a box in a letterbox bar shrinks to zero area."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = (b - (self.dx, self.dy, self.dx, self.dy)) / (self.sx, self.sy, self.sx, self.sy)
        if clip:
            out = np.clip(out, 0, (self.src_w, self.src_h, self.src_w, self.src_h))
        return out.astype(np.float32)


def _resized(image: np.ndarray, w: int, h: int) -> np.ndarray:
    src_h, src_w = image.shape[:2]
    if (w, h) == (src_w, src_h):
        return image.copy()
    shrink = w < src_w and h < src_h
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, BoxTransform]:
    """Stretch to ``size`` = (width, height), aspect ratio not kept."""
    w, h = size
    src_h, src_w = image.shape[:2]
    return _resized(image, w, h), BoxTransform(w / src_w, h / src_h, 0.0, 0.0, src_w, src_h, w, h)


def letterbox(
    image: np.ndarray, size: tuple[int, int], pad_value: int = PAD_VALUE
) -> tuple[np.ndarray, BoxTransform]:
    """Scale to fit inside ``size`` keeping the aspect ratio, centre, pad with grey."""
    w, h = size
    src_h, src_w = image.shape[:2]
    s = min(w / src_w, h / src_h)
    nw, nh = max(1, round(src_w * s)), max(1, round(src_h * s))
    left, top = (w - nw) // 2, (h - nh) // 2
    out = np.full((h, w, image.shape[2]), pad_value, dtype=image.dtype)
    out[top : top + nh, left : left + nw] = _resized(image, nw, nh)
    return out, BoxTransform(nw / src_w, nh / src_h, left, top, src_w, src_h, w, h)


def center_crop(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, BoxTransform]:
    """Scale to cover ``size`` keeping the aspect ratio, cut the centre."""
    w, h = size
    src_h, src_w = image.shape[:2]
    s = max(w / src_w, h / src_h)
    nw, nh = max(w, round(src_w * s)), max(h, round(src_h * s))
    left, top = (nw - w) // 2, (nh - h) // 2
    out = np.ascontiguousarray(_resized(image, nw, nh)[top : top + h, left : left + w])
    return out, BoxTransform(nw / src_w, nh / src_h, -left, -top, src_w, src_h, w, h)


def fit(
    image: np.ndarray, size: tuple[int, int], how: Fit = "letterbox"
) -> tuple[np.ndarray, BoxTransform]:
    """``letterbox``, ``resize`` or ``crop`` (centre) ``image`` to ``size`` = (w, h)."""
    if how == "letterbox":
        return letterbox(image, size)
    if how == "resize":
        return resize(image, size)
    if how == "crop":
        return center_crop(image, size)
    raise ValueError(f"{how!r} is not a way to fit an image (one of {', '.join(FITS)})")


def normalize(
    images: np.ndarray | list[np.ndarray],
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """RGB uint8 images (one HxWx3 or a list of equal size) -> float32 [N, 3, H, W],
    ``(pixel / 255 - mean) / std``."""
    batch = np.stack(images) if isinstance(images, list) else np.asarray(images)[None]
    if batch.ndim != 4 or batch.shape[3] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"expected RGB uint8 images HxWx3, got {batch.dtype} {batch.shape[1:]}")
    m = np.asarray(mean, dtype=np.float32) * 255
    inv = 1.0 / (np.asarray(std, dtype=np.float32) * 255)
    out = (batch.astype(np.float32) - m) * inv
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def prepare_batch(
    images: list[np.ndarray],
    size: tuple[int, int],
    how: Fit = "letterbox",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> tuple[np.ndarray, list[BoxTransform]]:
    """Fit every frame to ``size`` and normalise: float32 [N, 3, h, w] and, per frame,
    the transform that maps boxes back to its source pixels."""
    fitted = [fit(img, size, how) for img in images]
    return normalize([f[0] for f in fitted], mean, std), [f[1] for f in fitted]
