"""What a ``[camera] source`` string names, and frame ranges: pure string rules shared
by the config (validation) and the frame sources.  Standard library only."""

from __future__ import annotations

import re

_LIVE_RE = re.compile(r"^([a-z][a-z0-9+.-]*://|/dev/|[0-9]+$)", re.IGNORECASE)


def is_live_source(source: str) -> bool:
    """A camera device, a device index or a stream URL (as opposed to a file, a folder
    of images or ``"synthetic"``)."""
    return bool(_LIVE_RE.match(source))


def parse_frame_range(text: str) -> tuple[int, int | None]:
    """``"A:B"`` (frames A..B-1), ``"A:"`` or ``":B"`` -> (start, stop or None)."""
    m = re.fullmatch(r"\s*([0-9]*)\s*:\s*([0-9]*)\s*", text)
    if not m:
        raise ValueError(f'{text!r} is not a frame range ("A:B", "A:" or ":B", B > A >= 0)')
    start = int(m.group(1)) if m.group(1) else 0
    stop = int(m.group(2)) if m.group(2) else None
    if stop is not None and stop <= start:
        raise ValueError(f"{text!r} is an empty frame range (B must be greater than A)")
    return start, stop
