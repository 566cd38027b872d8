"""OpenCV's own log: quiet where our one-line error already says what went wrong."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import cv2


@contextlib.contextmanager
def opencv_errors_only() -> Iterator[None]:
    """Silence OpenCV's own warnings (cv2.utils.logging from 4.11, cv2.setLogLevel before)."""
    logging_mod = getattr(cv2.utils, "logging", None)
    get = getattr(logging_mod, "getLogLevel", None) or getattr(cv2, "getLogLevel", None)
    set_ = getattr(logging_mod, "setLogLevel", None) or getattr(cv2, "setLogLevel", None)
    if get is None or set_ is None:
        yield
        return
    before = get()
    set_(2)  # LOG_LEVEL_ERROR
    try:
        yield
    finally:
        set_(before)
