"""``python tests/node/demo_main.py NODE_TOML SERVER_TOML [--duration S] [--full-duration]``:
the demo orchestration (``waggle_trainer.demo.run_demo``: the real daemon, the real
server in its own process) with the stand-in loop and source (see standin.py), so a
run takes seconds.  ``STANDIN_FRAME_SLEEP`` paces the frames (default 0.05 s)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from standin import StandInLoop, StandInSource

from waggle_trainer.common import setup_logging
from waggle_trainer.demo import run_demo


def factories(frame_sleep: float) -> dict:
    """Every round accepted (the loop closes at the first update)."""
    return {
        "loop_factory": lambda cfg, d: StandInLoop(cfg, d, reject_every=0),
        "source_factory": lambda cfg: StandInSource(frame_sleep),
    }


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("node", type=Path)
    p.add_argument("server", type=Path)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--full-duration", action="store_true")
    a = p.parse_args()
    setup_logging(None)
    sys.exit(
        run_demo(
            a.node,
            a.server,
            duration_s=a.duration,
            stop_at_loop=not a.full_duration,
            **factories(float(os.environ.get("STANDIN_FRAME_SLEEP", "0.05"))),
        )
    )
