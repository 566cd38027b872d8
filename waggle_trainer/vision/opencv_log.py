"""OpenCV's own log: quiet where our one-line error already says what went wrong."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import cv2

_lock = threading.Lock()
_depth = 0
_saved: int | None = None


@contextlib.contextmanager
def opencv_errors_only() -> Iterator[None]:
    """Silence OpenCV's own warnings (cv2.utils.logging from 4.11, cv2.setLogLevel before).
    Safe across threads: the level is restored when the last user leaves."""
    global _depth, _saved
    logging_mod = getattr(cv2.utils, "logging", None)
    get = getattr(logging_mod, "getLogLevel", None) or getattr(cv2, "getLogLevel", None)
    set_ = getattr(logging_mod, "setLogLevel", None) or getattr(cv2, "setLogLevel", None)
    if get is None or set_ is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = get()
            set_(2)  # LOG_LEVEL_ERROR
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                set_(_saved)
