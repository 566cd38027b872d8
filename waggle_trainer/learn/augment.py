"""Scale-and-shift jitter of training samples (image and boxes together).

A :class:`ViewParams` maps input pixels to output pixels by ``x' = x * scale + tx``,
``y' = y * scale + ty``, then mirrors if ``flip``; the output has the input's size,
uncovered pixels are ImageNet-mean grey.  Boxes follow through
:func:`waggle_trainer.learn.detection.affine_detections`: a box cut to less than half
becomes an ignore region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from waggle_trainer.learn.detection import affine_detections
from waggle_trainer.learn.teachers import Detections

#: Fill of pixels the view does not cover: ImageNet's mean, RGB 0..255.
FILL = (124, 116, 104)


@dataclass(frozen=True)
class ViewParams:
    """``scale`` of the image, its shift ``tx``, ``ty`` in output pixels, mirrored?"""

    scale: float
    tx: float
    ty: float
    flip: bool


def draw_view(
    rng: torch.Generator,
    width: int,
    height: int,
    scale_range: tuple[float, float] = (0.7, 1.4),
    hflip: bool = True,
) -> ViewParams:
    """A random view of a ``width`` x ``height`` image: scale log-uniform in
    ``scale_range``; a shift that keeps the output covered when scaled up and the
    image inside when scaled down; mirrored with probability 1/2 if ``hflip``."""
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range {scale_range}: needs 0 < low <= high")
    u = torch.rand(4, generator=rng, dtype=torch.float64).tolist()
    scale = math.exp(math.log(lo) + u[0] * (math.log(hi) - math.log(lo)))
    # width - scaled width: negative when scaled up (shift in [it, 0]), positive when down
    tx = u[1] * (width - scale * width)
    ty = u[2] * (height - scale * height)
    return ViewParams(scale, tx, ty, hflip and u[3] < 0.5)


def apply_view(
    image: torch.Tensor, dets: Detections, view: ViewParams
) -> tuple[torch.Tensor, Detections]:
    """``image`` (uint8 [3, h, w]) and its boxes seen through ``view``; same size."""
    _, h, w = image.shape
    s = view.scale
    labels = affine_detections(dets, s, s, view.tx, view.ty, w, h, flip=view.flip)
    # pixel i covers [i, i + 1): its centre i + 0.5 maps to s * (i + 0.5) + t
    ox = view.tx + 0.5 * (s - 1)
    oy = view.ty + 0.5 * (s - 1)
    if view.flip:  # x' -> w - x', in pixel indices: i -> w - 1 - i
        m = np.array([[-s, 0.0, w - 1 - ox], [0.0, s, oy]], np.float64)
    else:
        m = np.array([[s, 0.0, ox], [0.0, s, oy]], np.float64)
    hwc = image.permute(1, 2, 0).contiguous().numpy()
    out = cv2.warpAffine(
        hwc,
        m,
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=FILL,
    )
    if out.ndim == 2:  # one channel: cv2 drops the axis
        out = out[:, :, None]
    return torch.from_numpy(out).permute(2, 0, 1).contiguous(), labels
