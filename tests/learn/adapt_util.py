"""A tiny synthetic clip with known boxes and a teacher that knows them (for the loop's
tests): coloured rectangles moving over a fixed noisy background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from waggle_trainer.config import config_from_dict
from waggle_trainer.learn.detection import Detections


@dataclass
class Frame:
    image: np.ndarray
    index: int
    ts_ns: int = 0


def clip(
    n: int, width: int = 96, height: int = 64, seed: int = 0
) -> list[tuple[Frame, Detections]]:
    rng = np.random.default_rng(seed)
    background = (rng.random((height, width, 3)) * 90).astype(np.uint8)
    out = []
    for i in range(n):
        image = background.copy()
        boxes = []
        for k, colour in enumerate(((235, 205, 60), (60, 225, 235))):
            bw, bh = 14 + 4 * k, 22
            x = (7 + 41 * k + 5 * i) % (width - bw)
            y = (5 + 17 * k + 3 * i) % (height - bh)
            image[y : y + bh, x : x + bw] = colour
            boxes.append([x, y, x + bw, y + bh])
        out.append(
            (
                Frame(image, i),
                Detections(
                    np.array(boxes, np.float32), np.ones(2, np.float32), np.zeros(2, np.int64)
                ),
            )
        )
    return out


class ClipTeacher:
    """Labels the clip's frames with their true boxes (one class, "person")."""

    kind = "detect"
    classes = ("person",)

    def __init__(self, frames) -> None:
        self.truth = {id(f.image): d for f, d in frames}
        self.calls = 0

    def label(self, images):
        self.calls += len(images)
        return [self.truth[id(im)] for im in images]


def tiny_config(tmp_path, **sections):
    data = {
        "student": {"input_width": 96, "input_height": 64, "head_stride": 4},
        "training": {
            "batch_size": 4,
            "steps_per_round": 8,
            "optimizer": "adam",
            "learning_rate": 0.001,
            # a constant learning rate, uniform batches and no zoom: the loop's
            # mechanics; tests/learn/test_recipe.py tests the recipe's parts
            "warmup_steps": 1,
            "decay_steps": 0,
            "final_lr_fraction": 1.0,
            "new_sample_share": 0.0,
            "scale_range": [1.0, 1.0],
        },
        "adaptation": {
            "teacher_stride_min": 1,
            "teacher_stride_max": 4,
            "teacher_budget": 1.0,
            "new_samples_per_round": 8,
            "holdout_fraction": 0.2,
            "rollback_margin": 1.0,
        },
        "state": {"dir": str(tmp_path / "state")},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data, "test")
