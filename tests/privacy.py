"""Test helper: prove that images stay in RAM.

Two tools, for any test that runs product code on frames:

``ImagesStayInRam(allowed_dirs)`` (a context manager) watches the code it wraps:

- a ``sys.addaudithook`` hook sees every ``open()``/``os.open()`` in every thread; a
  file opened for writing (``w``, ``a``, ``x``, ``+``; ``O_WRONLY``, ``O_RDWR``,
  ``O_CREAT``, ``O_APPEND``, ``O_TRUNC``) outside ``allowed_dirs`` is a violation, and
  so are ``os.rename``/``os.replace``/``shutil.copyfile`` to such a place;
- writers that bypass Python's ``open`` are wrapped while the guard is active:
  ``cv2.imwrite*`` and ``cv2.VideoWriter`` are violations wherever they write, and
  ``torch.save`` and ``safetensors`` ``save_file`` (C++/Rust file I/O) are checked
  against ``allowed_dirs``.

A violation raises ``PrivacyViolation`` at the offending call and is recorded; the
guard fails on exit if anything was recorded (so code that swallows the exception is
still caught).  Python's own ``__pycache__`` writes are ignored.  Limits: writes by C
code other than the wrapped functions are not seen, nor a writer bound before the
guard started (``from cv2 import imwrite`` at import time).

``scan_for_images(root, frames)`` then looks at what was written: JPEG, PNG, WebP and
GIF signatures, ``.npy``/safetensors arrays shaped like a frame, files exactly the
size of a raw frame, and byte runs of the given frames themselves (RGB/BGR/planar
uint8 and float32 as ``x/255`` or ImageNet-normalised).  ``scan_bytes`` does the same
for one buffer, e.g. captured log text or a message body.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


class PrivacyViolation(PermissionError):
    """Image data could have left RAM (raised at the offending call)."""


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_ACTIVE: list[ImagesStayInRam] = []
_IN_HOOK = threading.local()
_HOOK_LOCK = threading.Lock()
_HOOK_INSTALLED = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _ACTIVE or getattr(_IN_HOOK, "on", False):
        return
    _IN_HOOK.on = True
    try:
        guard = _ACTIVE[-1]
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
            )
            if writing and not isinstance(path, int):
                guard.check_path(path, f"open({path!r}, {mode or flags!r})")
        elif event in ("os.rename", "shutil.copyfile", "shutil.copytree", "os.link", "os.symlink"):
            guard.check_path(args[1], f"{event}({args[0]!r} -> {args[1]!r})")
    finally:
        _IN_HOOK.on = False


def _install_hook() -> None:
    global _HOOK_INSTALLED
    with _HOOK_LOCK:
        if not _HOOK_INSTALLED:  # audit hooks cannot be removed: one for the process
            sys.addaudithook(_audit)
            _HOOK_INSTALLED = True


class ImagesStayInRam:
    """Fail on any file written outside ``allowed_dirs`` and on any OpenCV image or
    video writer call while active (see the module docstring)."""

    def __init__(self, allowed_dirs: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.allowed = [Path(d).resolve() for d in allowed_dirs]
        self.violations: list[str] = []
        self._patches: list[tuple[Any, str, Any]] = []

    # -- checks
    def allowed_path(self, path: Any) -> bool:
        p = Path(os.fsdecode(path))
        if "__pycache__" in p.parts or str(p) == os.devnull:
            return True
        try:
            resolved = p.resolve()
        except OSError:
            resolved = p.absolute()
        return any(resolved == d or d in resolved.parents for d in self.allowed)

    def violation(self, what: str) -> None:
        self.violations.append(what)
        raise PrivacyViolation(f"images must stay in RAM: {what}")

    def check_path(self, path: Any, what: str) -> None:
        if not self.allowed_path(path):
            self.violation(f"{what} is outside the allowed directories")

    # -- patching writers that do not go through Python's open()
    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def _forbid(self, owner: Any, name: str) -> None:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            self.violation(f"{owner.__name__}.{name}{_short(args)}")

        self._patch(owner, name, refuse)

    def _guard_path(self, owner: Any, name: str, path_arg: int) -> None:
        original = getattr(owner, name)

        def checked(*args: Any, **kwargs: Any) -> Any:
            target = (
                args[path_arg] if len(args) > path_arg else kwargs.get("filename", kwargs.get("f"))
            )
            if isinstance(target, (str, bytes, os.PathLike)):
                self.check_path(target, f"{owner.__name__}.{name}({os.fsdecode(target)!r})")
            return original(*args, **kwargs)

        self._patch(owner, name, checked)

    def __enter__(self) -> ImagesStayInRam:
        import cv2

        for name in dir(cv2):
            if name.startswith("imwrite") or name == "VideoWriter":
                self._forbid(cv2, name)
        if "torch" in sys.modules:
            self._guard_path(sys.modules["torch"], "save", 1)
        for mod in ("safetensors.torch", "safetensors.numpy"):
            if mod in sys.modules:
                self._guard_path(sys.modules[mod], "save_file", 1)
        _install_hook()
        _ACTIVE.append(self)
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        _ACTIVE.remove(self)
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()
        if self.violations and exc_type is None:
            raise AssertionError("images left RAM:\n  " + "\n  ".join(self.violations))


def _short(args: tuple[Any, ...]) -> str:
    shown = [a if isinstance(a, (str, bytes, int, float, Path)) else type(a).__name__ for a in args]
    return "(" + ", ".join(map(repr, shown)) + ")"


# -------------------------------------------------------------------------- scanning

_SIGNATURES = [
    ("JPEG (JFIF)", re.compile(rb"\xff\xd8\xff\xe0..JFIF\x00", re.DOTALL)),
    ("JPEG (Exif)", re.compile(rb"\xff\xd8\xff\xe1..Exif\x00\x00", re.DOTALL)),
    ("JPEG", re.compile(rb"\xff\xd8\xff\xdb\x00[\x43\x84]\x00")),
    ("PNG", re.compile(rb"\x89PNG\r\n\x1a\n")),
    ("WebP", re.compile(rb"RIFF....WEBPVP8", re.DOTALL)),
    ("GIF", re.compile(rb"GIF8[79]a")),
    ("base64 JPEG", re.compile(rb"/9j/4AAQSkZJRg|/9j/4QA|/9j/2wBD")),
    ("base64 PNG", re.compile(rb"iVBORw0KGgo")),
]

_RUN = 32  # pixels in a fingerprint run


def _fingerprints(frames: Iterable[np.ndarray]) -> list[tuple[str, bytes]]:
    """Byte runs that only a copy of these frames (raw or as a tensor) contains."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out: list[tuple[str, bytes]] = []
    for k, img in enumerate(frames):
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[1] < _RUN:
            continue
        h, w = img.shape[:2]
        for y in sorted({h * k // 9 for k in range(1, 9)}):  # 8 rows: strips are found too
            x = (w - _RUN) // 2
            run = img[y, x : x + _RUN]  # [RUN, 3] RGB
            if len(np.unique(run[:, 0])) < 8:  # flat runs would match anything
                continue
            r_plane = run[:, 0]
            out += [
                (f"frame {k} row {y} as RGB bytes", run.tobytes()),
                (f"frame {k} row {y} as BGR bytes", run[:, ::-1].tobytes()),
                (f"frame {k} row {y} as a uint8 plane", r_plane.tobytes()),
                (
                    f"frame {k} row {y} as float32 0..1",
                    (r_plane.astype(np.float32) / 255).tobytes(),
                ),
                (
                    f"frame {k} row {y} as float32 normalised",
                    ((r_plane.astype(np.float32) / 255 - mean[0]) / std[0]).tobytes(),
                ),
                (
                    f"frame {k} row {y} as float32 HWC 0..1",
                    (run.astype(np.float32) / 255).tobytes(),
                ),
            ]
    return out


def _frame_shaped(shape: list[int], shapes: set[tuple[int, int]]) -> bool:
    dims = [int(d) for d in shape]
    for h, w in shapes:
        for tail in ((h, w, 3), (3, h, w), (h, w)):
            if len(dims) >= len(tail) and tuple(dims[-len(tail) :]) == tail:
                return True
    return False


def _array_headers(data: bytes, shapes: set[tuple[int, int]]) -> list[str]:
    found = []
    if data.startswith(b"\x93NUMPY"):
        m = re.search(rb"'shape': \(([0-9, ]*)\)", data[:512])
        if m:
            dims = [int(x) for x in m.group(1).split(b",") if x.strip()]
            if _frame_shaped(dims, shapes):
                found.append(f".npy array of shape {tuple(dims)}")
    if len(data) >= 8:
        (n,) = struct.unpack("<Q", data[:8])
        if 2 <= n <= min(len(data) - 8, 100_000_000) and data[8:9] == b"{":
            try:
                header = json.loads(data[8 : 8 + n])
            except ValueError:
                header = {}
            for key, meta in header.items():
                if key != "__metadata__" and isinstance(meta, dict):
                    if _frame_shaped(meta.get("shape", []), shapes):
                        found.append(f"safetensors tensor {key!r} of shape {meta['shape']}")
    return found


def scan_bytes(
    data: bytes,
    where: str,
    frames: Iterable[np.ndarray] = (),
    shapes: Iterable[tuple[int, int]] = (),
) -> list[str]:
    """Image data in one buffer: a list of findings (empty when clean)."""
    frames = list(frames)
    shape_set = {tuple(s) for s in shapes} | {f.shape[:2] for f in frames}
    findings = [
        f"{where}: {name} signature at byte {m.start()}"
        for name, rx in _SIGNATURES
        for m in [rx.search(data)]
        if m
    ]
    findings += [f"{where}: {h}" for h in _array_headers(data, shape_set)]  # type: ignore[arg-type]
    raw_sizes = {h * w * c * b for h, w in shape_set for c in (1, 3) for b in (1, 2, 4)}
    if len(data) in raw_sizes:
        findings.append(f"{where}: {len(data)} bytes, exactly a raw frame's size")
    findings += [f"{where}: contains {name}" for name, fp in _fingerprints(frames) if fp in data]
    return findings


def scan_for_images(
    root: str | os.PathLike[str],
    frames: Iterable[np.ndarray] = (),
    shapes: Iterable[tuple[int, int]] = (),
) -> list[str]:
    """Image data in any file under ``root``: a list of findings (empty when clean).
    ``frames``: the frames the run saw (their sizes and contents are looked for);
    ``shapes``: more (height, width) sizes to treat as frame-sized."""
    frames = list(frames)
    shapes = list(shapes)
    findings: list[str] = []
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            findings += scan_bytes(path.read_bytes(), str(path), frames, shapes)
    return findings
