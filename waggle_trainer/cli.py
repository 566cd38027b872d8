"""The thin command line: ``waggle-trainer COMMAND ...``.

Each layer registers its own subcommands through ``register(subparsers)``; a
subcommand's parser sets ``handler``, a callable ``(args) -> exit code``.  Heavy
imports (torch) happen inside handlers so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from waggle_trainer import __version__, lean_import
from waggle_trainer.common import LOG_LEVELS, setup_logging

#: Exit status when stdout's reader has gone (128 + SIGPIPE, as a shell reports it).
EXIT_BROKEN_PIPE = 141

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "waggle_trainer.config_cli",
    "waggle_trainer.node.cli",
    "waggle_trainer.learn.cli",
    "waggle_trainer.learn.adapt_cli",
    "waggle_trainer.remat.cli",
    "waggle_trainer.server.cli",
    "waggle_trainer.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waggle-trainer",
        description="Edge-training daemon for Waggle nodes.",
    )
    parser.add_argument("--version", action="version", version=f"waggle-trainer {__version__}")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="log level (default: the config's, else info)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported (it reads this once): tensors of 2 MiB or more are
    # 2 MiB-aligned and madvise(MADV_HUGEPAGE)d, so the fresh mappings that make a
    # checkpointing plan's savings real take 512x fewer page faults
    # (see waggle_trainer.remat.allocator).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # TorchDynamo only when something compiles (75 MiB less resident; see lean_import).
    # Done here, for the command's own process, not on ``import waggle_trainer``: a
    # library user's torch stays as torch ships it.
    lean_import.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    setup_logging(args.log_level)
    # Only a real command line may re-execute itself (under a preloaded allocator,
    # ``allocator.reexec_under``): an in-process call (tests) passes argv and carries on.
    args.reexec_argv = list(sys.argv[1:]) if argv is None else None
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``... | head -1``): stop quietly, as other tools do.
        # stdout is pointed at /dev/null so that the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
