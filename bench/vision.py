"""Frame sources and the reference teacher: frames per second and milliseconds per frame.

- Teacher: SSD-MobileNet-v2 (COCO) from the ``demo`` extra at 300x300 on frames of
  the street video ``vtest.avi`` (768x576), ``label()`` time (blob, forward, decoding,
  class mapping, NMS) with OpenCV on 1 and on 2 threads (``cv2.setNumThreads``),
  after a warm-up; persons and vehicles found per frame.
- Sources, read as fast as the consumer can (``fps = 0``) unless said otherwise:
  the video file (every frame; and ``fps = 1``, i.e. every 10th frame), an image folder
  (the same frames as JPEG files in a temporary folder, deleted afterwards), synthetic
  frames at 768x576, and a live HTTP MJPEG stream from a local server (the same JPEGs,
  sent as fast as the socket takes them; then paced at ``fps = 5``).
- Preprocessing: letterbox 768x576 -> 384x288 and ImageNet normalisation per frame.

The machine is shared: the load average is printed beside the numbers.

    .venv/bin/python bench/vision.py --video /work/shared/data/vtest.avi
"""

from __future__ import annotations

import argparse
import http.server
import os
import socketserver
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bench.provenance import provenance, write_report  # noqa: E402
from waggle_trainer.config import CameraSection, default_config  # noqa: E402
from waggle_trainer.learn.teachers import load_teacher  # noqa: E402
from waggle_trainer.vision.frames import open_source  # noqa: E402
from waggle_trainer.vision.preprocess import prepare_batch  # noqa: E402


def read_frames(video: Path, indices: list[int]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    out = []
    for i in indices:
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, bgr = cap.read()
        if not ok:
            raise SystemExit(f"{video}: cannot read frame {i}")
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def bench_teacher(video: Path, n: int, threads: list[int]) -> list[str]:
    cfg = default_config()
    t0 = time.perf_counter()
    teacher = load_teacher(cfg)
    load_s = time.perf_counter() - t0
    frames = read_frames(video, list(np.linspace(0, 794, n).astype(int)))
    rows = []
    for th in threads:
        cv2.setNumThreads(th)
        teacher.label(frames[:3])  # warm-up
        times, persons, vehicles = [], [], []
        for f in frames:
            t = time.perf_counter()
            [d] = teacher.label([f])
            times.append((time.perf_counter() - t) * 1000)
            persons.append(int((d.classes == 0).sum()))
            vehicles.append(int((d.classes == 1).sum()))
        q = statistics.quantiles(times, n=10)
        med, mean = statistics.median(times), statistics.mean(times)
        rows.append(
            f"| {th} | {len(frames)} | {med:.1f} | {mean:.1f} | {q[0]:.1f} | {q[-1]:.1f} "
            f"| {np.mean(persons):.2f} | {np.mean(vehicles):.2f} |"
        )
        print(rows[-1], file=sys.stderr)
    head = [
        f"Teacher: {teacher.description}; load {load_s:.2f} s.",
        "",
        "| OpenCV threads | frames | median ms | mean ms | p10 ms | p90 ms | persons/frame "
        "| vehicles/frame |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    return head + rows


class MjpegServer:
    def __init__(self, jpegs: list[bytes]):
        outer = self
        self.sent = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=f")
                self.end_headers()
                try:
                    i = 0
                    while True:
                        jpg = jpegs[i % len(jpegs)]
                        self.wfile.write(
                            b"--f\r\nContent-Type: image/jpeg\r\nContent-Length: "
                            + str(len(jpg)).encode()
                            + b"\r\n\r\n"
                            + jpg
                            + b"\r\n"
                        )
                        outer.sent += 1
                        i += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cam.mjpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def rate(camera: CameraSection, limit_frames: int | None, limit_s: float) -> tuple[int, float]:
    src = open_source(camera)
    n = 0
    t0 = time.perf_counter()
    try:
        for _ in src:
            n += 1
            if (limit_frames and n >= limit_frames) or time.perf_counter() - t0 > limit_s:
                break
    finally:
        src.close()
    return n, time.perf_counter() - t0


def bench_sources(video: Path, seconds: float) -> list[str]:
    rows = ["| source | setting | frames | s | frames/s |", "| --- | --- | ---: | ---: | ---: |"]

    def add(kind: str, setting: str, n: int, s: float) -> None:
        rows.append(f"| {kind} | {setting} | {n} | {s:.2f} | {n / s:.1f} |")
        print(rows[-1], file=sys.stderr)

    add(
        "video file",
        "vtest.avi, fps = 0 (every frame)",
        *rate(CameraSection(source=str(video), fps=0), None, 120),
    )
    add(
        "video file",
        "vtest.avi, fps = 1 (1 frame in 10)",
        *rate(CameraSection(source=str(video), fps=1), None, 120),
    )
    frames = read_frames(video, list(range(0, 200)))
    jpegs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in frames]
    with tempfile.TemporaryDirectory() as tmp:
        for i, jpg in enumerate(jpegs):
            (Path(tmp) / f"{i:04d}.jpg").write_bytes(jpg)
        add("image folder", "200 JPEGs 768x576", *rate(CameraSection(source=tmp), None, 120))
    add(
        "synthetic",
        "768x576",
        *rate(CameraSection(source="synthetic", width=768, height=576, frames="0:300"), None, 120),
    )
    server = MjpegServer(jpegs)
    try:
        sent0 = server.sent
        n, s = rate(CameraSection(source=server.url, fps=0), None, seconds)
        add("live HTTP MJPEG", f"fps = 0 (server sent {server.sent - sent0} frames)", n, s)
        n, s = rate(CameraSection(source=server.url, fps=5), None, seconds)
        add("live HTTP MJPEG", "fps = 5 (paced)", n, s)
    finally:
        server.close()
    t = time.perf_counter()
    for f in frames[:100]:
        prepare_batch([f], (384, 288))
    ms = (time.perf_counter() - t) * 10
    rows += ["", f"Preprocessing (letterbox 768x576 -> 384x288 + normalise): {ms:.2f} ms/frame."]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--video",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "vtest.avi",
        help="default ../shared/data/vtest.avi beside the repository",
    )
    ap.add_argument("--frames", type=int, default=40, help="teacher frames per thread count")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=4.0, help="per live-stream run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vision.md")
    args = ap.parse_args()
    if not args.video.is_file():
        print(f"--video {args.video}: no such file", file=sys.stderr)
        return 2
    load0 = os.getloadavg()[0]
    teacher = bench_teacher(args.video, args.frames, args.threads)
    sources = bench_sources(args.video, args.seconds)
    threads = " and ".join(map(str, args.threads))
    lines = [
        "# Frame sources and the reference teacher",
        "",
        *provenance(
            threads,
            f"OpenCV {cv2.__version__}; video {args.video.name}.",
            load_before=load0,
        ),
        "",
        "## Teacher: ms per frame",
        "",
        *teacher,
        "",
        "## Sources: frames per second delivered to the caller (decoding and RGB included)",
        "",
        *sources,
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
