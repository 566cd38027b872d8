"""Frame sources: each kind on data the test writes itself, and the clear errors."""

from __future__ import annotations

import http.server
import socketserver
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from waggle_trainer.config import CameraSection
from waggle_trainer.vision.frames import (
    Frame,
    LiveSource,
    SourceError,
    SyntheticSource,
    open_source,
)

W, H, N, FPS = 64, 48, 40, 10.0


def level(i: int) -> int:
    """The grey level that encodes frame i (survives JPEG compression)."""
    return 20 + 5 * i


def frame_bgr(i: int) -> np.ndarray:
    img = np.full((H, W, 3), level(i), np.uint8)
    img[:8, :8] = (255, 0, 0)  # a blue corner in BGR: tells RGB from BGR
    return img


def decoded_index(frame: Frame) -> int:
    return round((float(frame.image[H // 2 :, W // 2 :, 1].mean()) - 20) / 5)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert out.isOpened()
    for i in range(N):
        out.write(frame_bgr(i))
    out.release()
    return path


def cam(source: str | Path, **kw) -> CameraSection:
    return CameraSection(source=str(source), **kw)


def test_video_every_frame_in_order_as_rgb(video):
    with open_source(cam(video, fps=0)) as src:
        frames = list(src)
    assert [f.index for f in frames] == list(range(N))
    assert [decoded_index(f) for f in frames] == list(range(N))
    f = frames[0]
    assert f.image.dtype == np.uint8 and f.image.shape == (H, W, 3)
    assert f.image[2, 2, 2] > 200 and f.image[2, 2, 0] < 50  # BGR blue is RGB channel 2
    assert isinstance(f.ts_ns, int) and abs(f.ts_ns - time.time_ns()) < 60e9
    assert src.stats.delivered == N and src.stats.skipped == 0


def test_video_sampled_at_config_fps(video):
    with open_source(cam(video, fps=2.5)) as src:  # file at 10 fps: every 4th frame
        assert [decoded_index(f) for f in src] == list(range(0, N, 4))


def test_video_frame_range_and_loop(video):
    src = open_source(cam(video, fps=0, frames="30:35", loop=True))
    got = [next(src).index for _ in range(12)]
    src.close()
    assert got == [30, 31, 32, 33, 34] * 2 + [30, 31]
    with open_source(cam(video, fps=0, frames="37:")) as src:
        assert [decoded_index(f) for f in src] == [37, 38, 39]


def test_video_range_past_the_end_is_a_clear_error(video):
    with pytest.raises(
        SourceError,
        match=r"camera.frames '50:60': starts after the end of .*"
        r"\(40 frames\)",
    ):
        open_source(cam(video, frames="50:60"))


def test_not_a_video_and_missing_path(tmp_path):
    bogus = tmp_path / "notes.avi"
    bogus.write_text("not a video")
    with pytest.raises(
        SourceError, match=r"camera.source '.*notes.avi': cannot be read as a video"
    ):
        open_source(cam(bogus))
    with pytest.raises(SourceError, match=r"camera.source '.*nope.mp4': no such file or folder"):
        open_source(cam(tmp_path / "nope.mp4"))


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for i in (1, 2, 3, 10, 11):  # natural order puts img10 after img3
        assert cv2.imwrite(str(d / f"img{i}.png"), frame_bgr(i))
    (d / "img4.jpg").write_bytes(b"\xff\xd8garbage")  # corrupt: skipped and counted
    (d / "readme.txt").write_text("not an image")  # ignored
    return d


def test_folder_natural_order_skips_corrupt(folder):
    with open_source(cam(folder)) as src:
        frames = list(src)
    assert [decoded_index(f) for f in frames] == [1, 2, 3, 10, 11]
    assert [f.index for f in frames] == [0, 1, 2, 4, 5]  # position among the image files
    assert src.stats.skipped == 1 and src.stats.delivered == 5
    assert frames[0].image[2, 2, 2] > 200  # RGB


def test_folder_range_loop(folder):
    src = open_source(cam(folder, frames="1:3", loop=True))
    assert [decoded_index(next(src)) for _ in range(5)] == [2, 3, 2, 3, 2]


def test_empty_folder_and_unreadable_folder(tmp_path):
    with pytest.raises(SourceError, match=r"camera.source '.*': no images in this folder"):
        open_source(cam(tmp_path))
    (tmp_path / "a.jpg").write_bytes(b"junk")
    with pytest.raises(SourceError, match=r"none of the images 0:1 can be read"):
        list(open_source(cam(tmp_path)))


@pytest.mark.parametrize("source", ["/dev/video97", "97"])
def test_missing_device_is_one_clear_error(source):
    with pytest.raises(SourceError) as info:
        open_source(cam(source))
    msg = str(info.value)
    assert msg.startswith(f"camera.source {source!r}: no such device (/dev/video97 does not exist")
    assert "\n" not in msg


def test_unreachable_stream_is_one_clear_error():
    with pytest.raises(
        SourceError,
        match=r"camera.source 'http://127.0.0.1:9/cam': cannot be "
        r"opened within 2 s",
    ):
        open_source(cam("http://127.0.0.1:9/cam", timeout_s=2))


def test_synthetic_frames_are_deterministic_and_move():
    c = cam("synthetic", width=96, height=64, frames="5:8")
    a, b = list(open_source(c)), list(open_source(c))
    assert [f.index for f in a] == [5, 6, 7]
    assert a[0].image.shape == (64, 96, 3)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    src = SyntheticSource(c)
    assert not np.array_equal(src.boxes(0), src.boxes(50))
    assert not np.array_equal(a[0].image, a[2].image)


# --------------------------------------------------------------------------- live


class FakeCapture:
    """A camera that delivers numbered frames, then fails after ``fail_after`` grabs."""

    def __init__(self, start: int, fail_after: int | None, period_s: float = 0.002):
        self.n = start
        self.fail_after = fail_after
        self.period_s = period_s
        self.grabs = 0
        self.released = False

    def grab(self) -> bool:
        time.sleep(self.period_s)
        self.grabs += 1
        if self.fail_after is not None and self.grabs > self.fail_after:
            return False
        self.n += 1
        return True

    def retrieve(self):
        img = np.zeros((4, 4, 3), np.uint8)
        img[0, 0, 0] = self.n % 256
        img[0, 0, 1] = self.n // 256
        return True, img

    def read(self):
        return self.grab(), self.retrieve()[1]

    def release(self) -> None:
        self.released = True


def number(frame: Frame) -> int:
    return int(frame.image[0, 0, 2]) + 256 * int(frame.image[0, 0, 1])  # RGB of BGR (n, hi)


def test_live_stream_drops_and_returns_with_backoff():
    """The camera fails after 20 grabs; the next two open attempts fail; then it is
    back and frames flow again (a counted reconnect)."""
    opens = iter([FakeCapture(0, 20), None, None, FakeCapture(1000, None)])
    camera = cam("rtsp://camera.invalid/stream", fps=0, reconnect_min_s=0.01, reconnect_max_s=0.04)
    src = LiveSource(camera, opener=lambda: next(opens))
    try:
        numbers = []
        while not numbers or numbers[-1] < 1010:
            frame = src.read(timeout_s=5)
            assert frame is not None, "no frame within 5 s"
            numbers.append(number(frame))
        assert src.stats.reconnects == 1
        assert any(n < 1000 for n in numbers) and numbers == sorted(numbers)
    finally:
        src.close()


def test_live_keeps_only_the_latest_frame_and_paces_at_fps():
    camera = cam("rtsp://camera.invalid/stream", fps=20)  # 50 ms apart
    src = LiveSource(camera, opener=lambda: FakeCapture(0, None, period_s=0.001))
    try:
        frames = [next(src)]
        time.sleep(0.3)  # a slow consumer: ~300 frames go by and must not queue up
        frames += [next(src) for _ in range(3)]
        nums = [number(f) for f in frames]
        assert nums[1] - nums[0] > 50, nums  # the latest frame, not the next in a queue
        gaps = np.diff([f.ts_ns for f in frames[1:]])
        assert (gaps >= 50e6 - 2e6).all(), gaps  # at most 20 frames/s
    finally:
        src.close()
    with pytest.raises(StopIteration):
        next(src)


class _MjpegServer:
    """A local HTTP MJPEG camera that ends each connection after ``per_connection``
    frames (a dropped stream) and refuses requests while ``down``."""

    def __init__(self, per_connection: int):
        outer = self
        self.per_connection = per_connection
        self.down = False
        self.counter = 0
        self.connections = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if outer.down:
                    self.send_error(503)
                    return
                outer.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=f")
                self.end_headers()
                try:
                    for _ in range(outer.per_connection):
                        outer.counter += 1
                        ok, jpg = cv2.imencode(".jpg", frame_bgr(outer.counter % 40))
                        self.wfile.write(
                            b"--f\r\nContent-Type: image/jpeg\r\nContent-Length: "
                            + str(len(jpg)).encode()
                            + b"\r\n\r\n"
                            + jpg.tobytes()
                            + b"\r\n"
                        )
                        time.sleep(0.01)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cam.mjpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_http_mjpeg_stream_reconnects_after_a_drop():
    server = _MjpegServer(per_connection=15)
    camera = cam(server.url, fps=0, reconnect_min_s=0.05, reconnect_max_s=0.2, timeout_s=3)
    src = open_source(camera)
    try:
        assert src.kind == "live"
        got = 0
        deadline = time.monotonic() + 20
        while src.stats.reconnects < 2 and time.monotonic() < deadline:
            if src.read(timeout_s=5) is not None:
                got += 1
            if src.stats.reconnects == 1 and not server.down and server.connections == 2:
                server.down = True  # refuse the next attempts for a moment
                threading.Timer(0.3, lambda: setattr(server, "down", False)).start()
        assert src.stats.reconnects >= 2, src.stats
        assert got > 15  # frames came from more than one connection
        frame = src.read(timeout_s=5)
        assert frame is not None and frame.image.shape == (H, W, 3)
    finally:
        src.close()
        server.close()


class FlakyCapture(FakeCapture):
    """Every 4th decoded frame is empty (a corrupt frame from the camera)."""

    def __init__(self):
        super().__init__(0, None, period_s=0.001)
        self.retrieved = 0

    def retrieve(self):
        self.retrieved += 1
        if self.retrieved % 4 == 0:
            return True, np.zeros((0, 0, 3), np.uint8)
        return super().retrieve()


def test_live_empty_frames_are_skipped_and_counted():
    src = LiveSource(cam("rtsp://camera.invalid/s", fps=0), opener=FlakyCapture)
    try:
        frames = [src.read(timeout_s=5) for _ in range(20)]
    finally:
        src.close()
    assert all(f is not None and f.image.shape == (4, 4, 3) for f in frames)
    assert src.stats.skipped >= 5
    assert src.stats.reconnects == 0  # isolated empty frames are not a dropped stream


def test_reconnect_delays_double_up_to_the_cap():
    """Open attempts while the camera is away come after min(max, min * 2**k) seconds,
    times a random factor in [0.5, 1]."""
    calls = []

    def opener():
        calls.append(time.monotonic())
        if len(calls) == 1:
            return FakeCapture(0, 3)  # the first connection drops after 3 grabs
        return FakeCapture(0, None) if len(calls) == 8 else None

    camera = cam("rtsp://camera.invalid/s", fps=0, reconnect_min_s=0.02, reconnect_max_s=0.1)
    src = LiveSource(camera, opener=opener)
    try:
        deadline = time.monotonic() + 10
        while src.stats.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        src.close()
    assert src.stats.reconnects == 1 and len(calls) == 8
    gaps = np.diff(calls[1:])  # between failed attempts 1..7
    nominal = np.minimum(0.1, 0.02 * 2.0 ** np.arange(1, 7))
    assert (gaps >= 0.5 * nominal - 0.002).all(), (gaps, nominal)
    assert (gaps <= nominal + 0.25).all(), (gaps, nominal)  # capped (generous for a busy CPU)


class BrokenCapture(FakeCapture):
    def grab(self) -> bool:
        if self.grabs >= 3:
            raise RuntimeError("driver bug")
        return super().grab()


def test_a_failing_grab_thread_is_an_error_not_a_hang():
    src = LiveSource(cam("rtsp://camera.invalid/s", fps=0), opener=lambda: BrokenCapture(0, None))
    try:
        with pytest.raises(SourceError, match=r"the grab thread failed \(RuntimeError: driver bug"):
            for _ in range(10):
                src.read(timeout_s=5)
    finally:
        src.close()
