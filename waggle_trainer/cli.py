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
from waggle_trainer.common import LOG_LEVELS, setup_logging

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "waggle_trainer.config_cli",
    "waggle_trainer.learn.cli",
    "waggle_trainer.remat.cli",
    "waggle_trainer.server.cli",
)


#: The arguments to re-execute this command line with, or None when it was called
#: in-process (``main(argv)``); see :func:`reexec_under_allocator`.
REEXEC_ARGV: list[str] | None = None


def reexec_under_allocator(name: str) -> str:
    """Run the rest of this command under allocator ``name`` (see
    :func:`waggle_trainer.remat.allocator.plan_preload`): re-executes the command line
    with ``LD_PRELOAD`` when the library is installed and not yet loaded (does not
    return then); otherwise returns the allocator this process runs under, after one
    log line if the wish cannot be met.  Call it before torch is imported."""
    from waggle_trainer.remat import allocator

    plan = allocator.plan_preload(name)
    if plan.note:
        logging.getLogger("waggle_trainer.cli").warning("%s", plan.note)
    if plan.env is None:
        return allocator.loaded_allocator()
    if REEXEC_ARGV is None:
        logging.getLogger("waggle_trainer.cli").warning(
            "allocator %s: called in-process, cannot re-execute; using %s",
            name, allocator.loaded_allocator())
        return allocator.loaded_allocator()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "waggle_trainer", *REEXEC_ARGV], plan.env)
    raise AssertionError("unreachable")  # pragma: no cover


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    setup_logging(args.log_level)
    # Only a real command line may re-execute itself (under a preloaded allocator):
    # an in-process call (tests) passes argv and carries on as it is.
    global REEXEC_ARGV
    REEXEC_ARGV = list(sys.argv[1:]) if argv is None else None
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
