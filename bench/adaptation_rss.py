"""Is the adaptation loop's memory flat over a long stream?

Feeds ``--frames`` frames of a looping source (default: the synthetic camera,
640x480) through :class:`AdaptationLoop` with a teacher that knows the synthetic
frames' boxes (so that teacher inference does not dominate the run), and samples the
process's RSS every ``--every`` frames.  Growth is measured after a warm-up (the first
``--warmup`` frames: buffers fill up, the chain is profiled, the optimiser state is
created).  Target: growth < 2% after warm-up.

    .venv/bin/python bench/adaptation_rss.py [--frames 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, write_report  # noqa: E402
from waggle_trainer.common import format_size  # noqa: E402
from waggle_trainer.config import config_from_dict  # noqa: E402
from waggle_trainer.learn.adaptation import AdaptationLoop  # noqa: E402
from waggle_trainer.learn.teachers import Detections  # noqa: E402
from waggle_trainer.vision.frames import SyntheticSource, open_source  # noqa: E402


class SyntheticTeacher:
    """The synthetic source's own boxes, as a detector teacher would give them."""

    kind = "detect"
    classes = ("person", "vehicle")

    def __init__(self, source: SyntheticSource) -> None:
        self.source = source
        self.index = 0

    def label(self, images):
        boxes = np.asarray(self.source.boxes(self.index), np.float32).reshape(-1, 4)
        n = len(boxes)
        return [Detections(boxes, np.ones(n, np.float32), np.zeros(n, np.int64))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    state = Path(tempfile.mkdtemp(prefix="waggle-rss-"))
    cfg = config_from_dict(
        {
            "camera": {"source": "synthetic", "fps": 0, "loop": True},
            "student": {"input_width": 160, "input_height": 128},
            "training": {
                "batch_size": 2,
                "steps_per_round": 4,
                "optimizer": "adam",
                "learning_rate": 1e-3,
            },
            "adaptation": {
                "buffer_size": 64,
                "new_samples_per_round": 16,
                "teacher_stride_min": 4,
                "teacher_stride_max": 8,
            },
            "state": {"dir": str(state)},
        },
        "bench",
    )
    source = open_source(cfg.camera)
    teacher = SyntheticTeacher(source)
    loop = AdaptationLoop(cfg, teacher, state_dir=state)
    proc = psutil.Process()
    samples = []
    t0 = time.perf_counter()
    for n, frame in enumerate(source, 1):
        teacher.index = frame.index
        loop.feed(frame)
        if n % args.every == 0:
            samples.append((n, proc.memory_info().rss))
            print(
                f"frame {n}: RSS {format_size(samples[-1][1])}, rounds {loop.rounds}",
                file=sys.stderr,
                flush=True,
            )
        if n >= args.frames:
            break
    source.close()
    loop.close()
    after = [rss for n, rss in samples if n >= args.warmup]
    base, peak, last = after[0], max(after), after[-1]
    growth = (last - base) / base
    lines = [
        "# Adaptation loop memory over a long stream",
        "",
        *provenance(
            1,
            f"{args.frames} synthetic 640x480 frames (looping), student 160x128, buffer 64, "
            f"teacher stride 4-8; {loop.rounds} rounds; {time.perf_counter() - t0:.0f} s.",
        ),
        "",
        "| frames | RSS |",
        "|---|---|",
        *[f"| {n} | {format_size(rss)} |" for n, rss in samples],
        "",
        f"After warm-up (frame {args.warmup}): {format_size(base)} -> {format_size(last)} "
        f"(peak {format_size(peak)}): growth {100 * growth:+.2f}% "
        f"({'met' if growth < 0.02 else 'MISSED'}: target < 2%).",
    ]
    write_report(args.out / "adaptation_rss.md", lines)
    (args.out / "adaptation_rss.json").write_text(
        json.dumps(
            {"samples": samples, "warmup": args.warmup, "growth": growth, "rounds": loop.rounds}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
