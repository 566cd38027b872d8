"""The thin command line: ``waggle-trainer COMMAND ...``.

Each layer registers its own subcommands through ``register(subparsers)``; a
subcommand's parser sets ``handler``, a callable ``(args) -> exit code``.  Heavy
imports (torch) happen inside handlers so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from waggle_trainer import __version__

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "waggle_trainer.config_cli",
    "waggle_trainer.learn.cli",
    "waggle_trainer.remat.cli",
    "waggle_trainer.server.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waggle-trainer",
        description="Edge-training daemon for Waggle nodes.",
    )
    parser.add_argument("--version", action="version", version=f"waggle-trainer {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=None,
        help="log level (default: the config's, else info)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(level: str | None) -> None:
    """Log to stderr; under systemd (JOURNAL_STREAM set) journald adds the time."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journald else (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel((level or "info").upper())


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported (it reads this once): tensors of 2 MiB or more are
    # 2 MiB-aligned and madvise(MADV_HUGEPAGE)d, so the fresh mappings that make a
    # checkpointing plan's savings real take 512x fewer page faults
    # (see waggle_trainer.remat.allocator).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    setup_logging(args.log_level)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
