"""``python tests/node/standin_main.py run --config FILE ...``: the real daemon and
command line with the stand-in loop and source (see standin.py)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from standin import factories_from_env

from waggle_trainer.cli import build_parser
from waggle_trainer.common import setup_logging
from waggle_trainer.node.cli import run_command

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    args = build_parser().parse_args(sys.argv[1:])
    setup_logging(args.log_level)
    sys.exit(run_command(args, **factories_from_env()))
