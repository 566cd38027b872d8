"""Frame sources: a camera, a stream, a video file, a folder of images, or generated frames.

``open_source(cfg.camera)`` returns a :class:`FrameSource`: an iterator of
:class:`Frame` (RGB ``uint8`` HxWx3, an integer-nanosecond wall-clock timestamp and
the frame's index in its source) with ``close()`` and ``stats``.  A source that
cannot be opened raises :class:`SourceError` at once, with one line that names the
source and the reason.  Frames live in RAM only: nothing here writes a file.

Sampling (``[camera] fps``):

- *live sources* (a V4L2 device, an RTSP/HTTP stream): a grab thread drains the
  camera continuously and decodes only when a frame is due, keeping just the latest
  one (no queue grows when the consumer is slow); ``next()`` returns the latest frame
  no sooner than ``1/fps`` after the previous one.  A stream that drops is reopened
  with capped exponential backoff and jitter; ``next()`` waits meanwhile.
- *video files*: every n-th frame, n = the file's own fps / ``fps`` (as fast as the
  caller reads; nothing is paced in real time).
- *image folders* and *synthetic* frames: every frame.

``fps = 0`` takes every frame.  Empty or corrupt frames (and unreadable images) are
skipped and counted in ``stats.skipped``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from waggle_trainer.vision.opencv_log import opencv_errors_only
from waggle_trainer.vision.source_spec import is_live_source, parse_frame_range

log = logging.getLogger(__name__)

#: Image file suffixes an image folder source reads.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: Consecutive unreadable frames after which a file ends or a stream counts as dropped.
MAX_BAD_RUN = 30


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One frame: ``image`` RGB uint8 HxWx3 (owned: nobody else holds the buffer),
    ``ts_ns`` wall-clock capture time (``time.time_ns()``), ``index`` the frame's
    number in its source (file frame, folder position, or live frame counter)."""

    image: np.ndarray
    ts_ns: int
    index: int


@dataclass
class SourceStats:
    read: int = 0  # frames decoded from the source
    delivered: int = 0  # frames handed to the caller
    skipped: int = 0  # empty or corrupt frames, unreadable images
    reconnects: int = 0  # times a dropped live source was opened again

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class CameraSettings(Protocol):
    """What a source reads from the config's ``[camera]`` section (``CameraSection``)."""

    source: str
    width: int
    height: int
    fps: float
    loop: bool
    frames: str | None
    reconnect_min_s: float
    reconnect_max_s: float
    timeout_s: float


def _frame_range(camera: CameraSettings) -> tuple[int, int | None]:
    return parse_frame_range(camera.frames) if camera.frames is not None else (0, None)


class SourceError(Exception):
    """A source that cannot be opened or read (one line: which source, why)."""


class FrameSource(ABC):
    """An iterator of :class:`Frame`; ``close()`` releases the source."""

    #: "synthetic", "video", "folder" or "live"
    kind: str = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = SourceStats()
        #: what is being read, for logs (no image content)
        self.description = name

    def __iter__(self) -> FrameSource:
        return self

    @abstractmethod
    def __next__(self) -> Frame: ...

    def close(self) -> None:  # noqa: B027 (sources without resources need nothing)
        """Release the source; iteration ends."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(camera: CameraSettings) -> FrameSource:
    """The frame source ``camera.source`` names; SourceError when it cannot be opened."""
    src = camera.source
    if src == "synthetic":
        return SyntheticSource(camera)
    if is_live_source(src):
        return LiveSource(camera)
    path = Path(src).expanduser()
    if path.is_dir():
        return ImageFolderSource(camera, path)
    if path.is_file():
        return VideoFileSource(camera, path)
    if path.exists():
        raise SourceError(f"camera.source {src!r}: not a regular file or a folder")
    raise SourceError(
        f"camera.source {src!r}: no such file or folder (give a video file, an image "
        'folder, a device such as /dev/video0, a stream URL or "synthetic")'
    )


def _rgb(bgr: Any) -> np.ndarray:
    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    if bgr.shape[2] == 4:
        return cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _usable(img: Any) -> bool:
    return (
        isinstance(img, np.ndarray)
        and img.size > 0
        and img.dtype == np.uint8
        and (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3, 4)))
    )


# ---------------------------------------------------------------------- synthetic


class SyntheticSource(FrameSource):
    """Generated frames, for tests and demos without a camera: a fixed textured
    background with a few coloured rectangles moving and bouncing across it.  Frame
    ``i`` is a pure function of ``i`` (and the seed), so a frame range is exact."""

    kind = "synthetic"
    N_OBJECTS = 4

    def __init__(self, camera: CameraSettings, seed: int = 0) -> None:
        super().__init__("synthetic")
        self.width, self.height = camera.width, camera.height
        self.start, self.stop = _frame_range(camera)
        self.loop = camera.loop
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0 : self.height, 0 : self.width]
        base = 60 + 60 * (yy / self.height)[..., None] + 20 * (xx / self.width)[..., None]
        noise = rng.integers(0, 24, (self.height, self.width, 3))
        self._background = np.clip(base + noise, 0, 255).astype(np.uint8)
        side = min(self.width, self.height)
        self._sizes = rng.uniform(0.08, 0.25, (self.N_OBJECTS, 2)) * side
        self._pos0 = rng.uniform(0, 1, (self.N_OBJECTS, 2))
        self._vel = rng.uniform(-0.02, 0.02, (self.N_OBJECTS, 2))
        self._colors = rng.integers(0, 256, (self.N_OBJECTS, 3))
        self._next = self.start
        self.description = f"synthetic frames {self.width}x{self.height}"

    def boxes(self, index: int) -> np.ndarray:
        """The rectangles of frame ``index`` as float32 [N, 4] x1, y1, x2, y2 pixels."""
        t = self._pos0 + self._vel * index
        t = np.abs((t + 1) % 2 - 1)  # bounce between 0 and 1
        free = np.array([self.width, self.height]) - self._sizes
        xy = t * free
        return np.concatenate([xy, xy + self._sizes], axis=1).astype(np.float32)

    def render(self, index: int) -> np.ndarray:
        img = self._background.copy()
        for (x1, y1, x2, y2), color in zip(self.boxes(index), self._colors, strict=True):
            cv2.rectangle(img, (int(x1), int(y1)), (int(x2), int(y2)), color.tolist(), -1)
        return img

    def __next__(self) -> Frame:
        if self.stop is not None and self._next >= self.stop:
            if not self.loop:
                raise StopIteration
            self._next = self.start
        i = self._next
        self._next += 1
        img = self.render(i)
        self.stats.read += 1
        self.stats.delivered += 1
        return Frame(img, time.time_ns(), i)


# --------------------------------------------------------------------- video file


class VideoFileSource(FrameSource):
    """A video file read with OpenCV: every n-th frame (n = file fps / ``fps``), within
    ``frames`` A:B, looping when asked.  ``Frame.index`` is the file's frame number."""

    kind = "video"

    def __init__(self, camera: CameraSettings, path: Path) -> None:
        super().__init__(str(path))
        self.path = path
        self.loop = camera.loop
        self.start, stop = _frame_range(camera)
        self._cap = self._open()
        self.file_fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = count if count > 0 else None
        if self.frame_count is not None and self.start >= self.frame_count:
            self._cap.release()
            raise SourceError(
                f"camera.frames {camera.frames!r}: starts after the end of {path} "
                f"({self.frame_count} frames)"
            )
        self.stop = (
            stop if self.frame_count is None else min(stop or self.frame_count, self.frame_count)
        )
        if camera.fps > 0 and self.file_fps > 0:
            self.step = max(1, round(self.file_fps / camera.fps))
        else:
            self.step = 1
        self._seek(self.start)
        self._check_first_frame()
        self._lap_delivered = False
        self.description = (
            f"video file {path} ({self.frame_count or '?'} frames at {self.file_fps:g} fps; "
            f"frames {self.start}:{'' if self.stop is None else self.stop}, "
            f"{'every frame' if self.step == 1 else f'1 frame in {self.step}'}"
            f"{', looping' if self.loop else ''})"
        )

    def _open(self) -> cv2.VideoCapture:
        with opencv_errors_only():
            cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"camera.source {str(self.path)!r}: cannot be read as a video "
                "(not a video file, or a codec this OpenCV build lacks)"
            )
        return cap

    def _seek(self, frame: int) -> None:
        self._pos = 0
        if frame == 0:
            return
        if (
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, frame)
            and int(self._cap.get(cv2.CAP_PROP_POS_FRAMES)) == frame
        ):
            self._pos = frame
            return
        # no exact seek in this container: reopen and step there
        self._cap.release()
        self._cap = self._open()
        while self._pos < frame and self._cap.grab():
            self._pos += 1

    def _check_first_frame(self) -> None:
        ok = self._cap.grab()
        if not ok:
            self._cap.release()
            raise SourceError(
                f"camera.source {str(self.path)!r}: no frame can be decoded at frame {self.start}"
            )
        self._cap.release()  # back to the first frame of the range
        self._cap = self._open()
        self._seek(self.start)

    def _end_of_lap(self) -> None:
        """At the end of the range: start again (looping) or stop."""
        if not self._lap_delivered:
            raise SourceError(
                f"camera.source {self.name!r}: no frame of "
                f"{self.start}:{self.stop or ''} can be decoded"
            )
        if not self.loop:
            raise StopIteration
        self._rewind()
        self._lap_delivered = False

    def _rewind(self) -> None:
        """Back to the first frame of the range: a seek, or reopening the file."""
        cap = self._cap
        if cap.set(cv2.CAP_PROP_POS_FRAMES, self.start) and (
            int(cap.get(cv2.CAP_PROP_POS_FRAMES)) == self.start
        ):
            self._pos = self.start
            return
        cap.release()
        self._cap = self._open()
        self._seek(self.start)

    def __next__(self) -> Frame:
        failed = 0  # failed reads in a row: corrupt frames, or the end of the file
        while True:
            if self.stop is not None and self._pos >= self.stop:
                self._end_of_lap()
                continue
            pos = self._pos
            want = (pos - self.start) % self.step == 0
            try:
                if want:
                    ok, bgr = self._cap.read()
                else:
                    ok, bgr = self._cap.grab(), None
            except cv2.error:
                ok, bgr = False, None
            self._pos += 1
            if not ok:
                failed += 1
                known_end = self.frame_count is not None and pos >= self.frame_count - 1
                if self.frame_count is None or known_end or failed >= MAX_BAD_RUN:
                    if not known_end and self.frame_count is not None:
                        log.warning(
                            "%s: %d unreadable frames in a row at frame %d of %d; "
                            "treating it as the end",
                            self.name,
                            failed,
                            pos,
                            self.frame_count,
                        )
                    self._end_of_lap()
                    failed = 0
                continue
            self.stats.skipped += failed  # reads that failed before a good one: corrupt
            failed = 0
            if not want:
                continue
            self.stats.read += 1
            if not _usable(bgr):
                self.stats.skipped += 1
                continue
            self.stats.delivered += 1
            self._lap_delivered = True
            return Frame(_rgb(bgr), time.time_ns(), pos)

    def close(self) -> None:
        self._cap.release()


# -------------------------------------------------------------------- image folder


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


class ImageFolderSource(FrameSource):
    """The images of a folder in natural order (img2 before img10), each read into RAM
    with ``cv2.imread`` when it is next; ``Frame.index`` is its position in that order."""

    kind = "folder"

    def __init__(self, camera: CameraSettings, folder: Path) -> None:
        super().__init__(str(folder))
        try:
            files = sorted(
                (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                key=_natural_key,
            )
        except OSError as exc:
            raise SourceError(
                f"camera.source {str(folder)!r}: cannot list the folder ({exc.strerror})"
            ) from None
        if not files:
            raise SourceError(
                f"camera.source {str(folder)!r}: no images in this folder "
                f"(looked for {' '.join(IMAGE_SUFFIXES)})"
            )
        start, stop = _frame_range(camera)
        if start >= len(files):
            raise SourceError(
                f"camera.frames {camera.frames!r}: starts after the last image "
                f"of {folder} ({len(files)} images)"
            )
        self.files = files
        self.start, self.stop = start, min(stop or len(files), len(files))
        self.loop = camera.loop
        self._next = self.start
        self._delivered_this_lap = 0
        self.description = (
            f"image folder {folder} ({len(files)} images; "
            f"images {self.start}:{self.stop}{', looping' if self.loop else ''})"
        )

    def __next__(self) -> Frame:
        while True:
            if self._next >= self.stop:
                if self._delivered_this_lap == 0:
                    raise SourceError(
                        f"camera.source {self.name!r}: none of the images "
                        f"{self.start}:{self.stop} can be read"
                    )
                if not self.loop:
                    raise StopIteration
                self._next, self._delivered_this_lap = self.start, 0
            i = self._next
            self._next += 1
            bgr = cv2.imread(str(self.files[i]), cv2.IMREAD_COLOR)
            if not _usable(bgr):
                self.stats.skipped += 1
                log.warning(
                    "%s: cannot read %s as an image; skipped", self.name, self.files[i].name
                )
                continue
            self.stats.read += 1
            self.stats.delivered += 1
            self._delivered_this_lap += 1
            return Frame(_rgb(bgr), time.time_ns(), i)


# ------------------------------------------------------------------------- live


@dataclass(frozen=True, slots=True, eq=False)
class _Grabbed:
    bgr: np.ndarray
    ts_ns: int
    mono_ns: int
    seq: int


class LiveSource(FrameSource):
    """A V4L2 camera (path or index) or a network stream (RTSP/HTTP), read by a grab
    thread that keeps only the latest frame.

    The thread grabs every frame the camera sends (so nothing queues up in the driver
    or the network buffer) but decodes one only when the consumer will want it; the
    consumer's ``next()`` waits for a frame captured at least ``1/fps`` after the one
    it had before.  When the stream drops (a failed grab, a read timeout, a run of
    empty frames) the thread reopens it after ``min(reconnect_max_s,
    reconnect_min_s * 2**attempt)`` seconds, times a random factor in [0.5, 1].
    """

    kind = "live"

    def __init__(self, camera: CameraSettings, *, opener: Any = None) -> None:
        super().__init__(camera.source)
        self.camera = camera
        self.period_ns = int(1e9 / camera.fps) if camera.fps > 0 else 0
        self._opener = opener or self._open_capture
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._latest: _Grabbed | None = None
        self._taken_seq = -1
        self._seq = 0
        self._due_ns = 0
        self._closed = False
        self._failure: str | None = None  # set if the grab thread itself fails
        self.connected = False
        cap = self._open_or_raise()
        self.connected = True
        self._thread = threading.Thread(
            target=self._run, args=(cap,), daemon=True, name=f"grab {self.name}"
        )
        self._thread.start()
        self.description = (
            f"live source {self.name} "
            f"({'every frame' if not self.period_ns else f'{camera.fps:g} fps'})"
        )

    # -- opening
    def _target(self) -> tuple[Any, int, list[int]]:
        src = self.camera.source
        timeout_ms = int(self.camera.timeout_s * 1000)
        if src.isdigit() or src.startswith("/dev/"):
            dev = f"/dev/video{src}" if src.isdigit() else src
            if not os.path.exists(dev):
                have = sorted(str(p) for p in Path("/dev").glob("video*"))
                raise SourceError(
                    f"camera.source {src!r}: no such device ({dev} does not "
                    f"exist; cameras here: {', '.join(have) or 'none'})"
                )
            if not os.access(dev, os.R_OK | os.W_OK):
                raise SourceError(
                    f"camera.source {src!r}: no permission to open {dev} "
                    "(run as a user in the 'video' group)"
                )
            return (int(src) if src.isdigit() else dev), cv2.CAP_V4L2, []
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            timeout_ms,
        ]
        return src, cv2.CAP_FFMPEG, params

    def _open_capture(self) -> Any:
        target, api, params = self._target()
        with opencv_errors_only():
            cap = cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)
        if not cap.isOpened():
            cap.release()
            return None
        if api == cv2.CAP_V4L2:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.camera.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.camera.height)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap

    def _open_or_raise(self) -> Any:
        src = self.camera.source
        cap = self._opener()
        if cap is None:
            what = (
                "OpenCV's V4L2 backend cannot open it (busy, or not a capture device)"
                if src.isdigit() or src.startswith("/dev/")
                else f"cannot be opened within {self.camera.timeout_s:g} s (unreachable, "
                "refused, or not a video stream)"
            )
            raise SourceError(f"camera.source {src!r}: {what}")
        for _ in range(MAX_BAD_RUN):
            try:
                ok, bgr = cap.read()
            except cv2.error:
                ok, bgr = False, None
            if not ok:
                break
            self.stats.read += 1
            if _usable(bgr):
                self._publish(bgr)
                return cap
            self.stats.skipped += 1
        cap.release()
        raise SourceError(
            f"camera.source {src!r}: opened, but delivered no usable frame "
            f"within {self.camera.timeout_s:g} s"
        )

    # -- the grab thread
    def _publish(self, bgr: np.ndarray) -> None:
        g = _Grabbed(bgr, time.time_ns(), time.monotonic_ns(), self._seq)
        self._seq += 1
        with self._cond:
            self._latest = g
            self._cond.notify_all()

    def _run(self, cap: Any) -> None:
        attempt = 0
        bad = 0
        cam = self.camera
        try:
            while not self._stop.is_set():
                if cap is None:
                    delay = min(cam.reconnect_max_s, cam.reconnect_min_s * 2**attempt)
                    delay *= random.uniform(0.5, 1.0)
                    attempt += 1
                    if self._stop.wait(delay):
                        break
                    try:
                        cap = self._opener()
                    except SourceError as exc:  # e.g. the device node vanished
                        log.warning("%s", exc)
                        cap = None
                    if cap is None:
                        log.info(
                            "camera.source %r: still unavailable (attempt %d)", self.name, attempt
                        )
                        continue
                    self.stats.reconnects += 1
                    self.connected = True
                    log.info(
                        "camera.source %r: reconnected after %d attempt(s)", self.name, attempt
                    )
                    attempt = bad = 0
                    continue
                try:
                    ok = cap.grab()
                    if ok and time.monotonic_ns() >= self._due_ns:
                        ok, bgr = cap.retrieve()
                        self.stats.read += 1
                        if not ok or not _usable(bgr):
                            self.stats.skipped += 1
                            bad += 1
                            if bad < MAX_BAD_RUN:
                                continue
                            ok = False
                        else:
                            bad = 0
                            self._publish(bgr)
                except cv2.error:
                    ok = False
                if not ok:
                    log.warning("camera.source %r: stream dropped; reconnecting", self.name)
                    cap.release()
                    cap = None
                    self.connected = False
        except Exception as exc:  # a bug must not leave next() waiting forever
            log.exception("camera.source %r: the grab thread failed", self.name)
            with self._cond:
                self._failure = f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()
        finally:
            if cap is not None:
                cap.release()

    # -- the consumer
    def read(self, timeout_s: float | None = None) -> Frame | None:
        """The next frame that is due, waiting up to ``timeout_s`` (None: no limit);
        None on timeout; StopIteration once closed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise StopIteration
                if self._failure is not None:
                    raise SourceError(
                        f"camera.source {self.name!r}: the grab thread failed ({self._failure})"
                    )
                g = self._latest
                if g is not None and g.seq != self._taken_seq and g.mono_ns >= self._due_ns:
                    break
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    return None
                self._cond.wait(wait)
            self._taken_seq = g.seq
            self._latest = None  # the consumer owns the frame now; no second copy stays
        if self.period_ns:
            self._due_ns = g.mono_ns + self.period_ns
        self.stats.delivered += 1
        return Frame(_rgb(g.bgr), g.ts_ns, g.seq)

    def __next__(self) -> Frame:
        frame = self.read(None)
        assert frame is not None
        return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._latest = None
            self._cond.notify_all()
        self._stop.set()
        self._thread.join(timeout=self.camera.timeout_s + 1)
