"""Facts every layer shares: names, limits, sizes and logging set-up.

This module imports only the standard library, so every layer (the pure planners
included) may import it.  Each fact has exactly one home here.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args

# ------------------------------------------------------------------------- names

#: Where Waggle keeps a node's identity and credentials (node-id, vsn, TLS files).
WAGGLE_ETC = Path("/etc/waggle")

Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
#: Student/teacher architectures the config and the command line accept.
ARCHES: tuple[str, ...] = get_args(Arch)

Strategy = Literal["optimal", "revolve", "sequential", "none"]
#: Checkpointing strategies, best first.
STRATEGIES: tuple[str, ...] = get_args(Strategy)

OptimizerName = Literal["sgd", "adam", "adamw"]
#: Optimisers the config and the command line accept.
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)

# ------------------------------------------------------------------------ limits

#: Image side in pixels that a ResNet student can train on (config and CLI alike).
IMAGE_SIZE_MIN = 32
IMAGE_SIZE_MAX = 2048
#: Classes of a task head: at least two (one class has nothing to learn).
CLASSES_MIN = 2
#: Classes when none are given (config and CLI alike).
DEFAULT_CLASSES = 10

# ------------------------------------------------------------------------- sizes

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
SIZE_HELP = 'a positive size: bytes as an integer, or a string like "1.5GB", "512MiB"'


def parse_size(value: Any) -> int:
    """Bytes from an int or a size string (``"1.5GB"``, ``"512MiB"``, ``"4096"``).

    Raises ValueError with what is allowed.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{value} is not a positive size")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if n >= 1:
                return int(n)
    raise ValueError(f"{value!r} is not a size")


def format_size(n: int) -> str:
    """``1610612736`` -> ``"1.5GiB"``; exact integers stay exact (``"512MiB"``)."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            q = n / div
            return f"{q:.0f}{unit}" if q == int(q) else f"{q:.2f}{unit}"
    return f"{n}B"


def parse_budget(v: Any) -> int | Literal["auto"]:
    """``"auto"`` or a size in bytes (see :func:`parse_size`); ValueError otherwise."""
    if v == "auto":
        return "auto"
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError(f'{v!r} is not "auto" or a size ({SIZE_HELP})') from None


# ----------------------------------------------------------------------- logging


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
    # pika logs each failed or dropped connection at ERROR with tracebacks, several
    # lines per event; the transport threads log one clear line per event instead.
    # At debug level everything shows, pika's own lines included.
    logging.getLogger("pika").setLevel(logging.NOTSET if level == "debug" else logging.CRITICAL)
