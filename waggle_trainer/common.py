"""Facts every layer shares: names, limits, sizes and logging set-up.

This module imports only the standard library, so every layer (the pure planners
included) may import it.  Each fact has exactly one home here.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal, get_args

# ------------------------------------------------------------------------- names

#: Where Waggle keeps a node's identity and credentials (node-id, vsn, TLS files).
WAGGLE_ETC = Path("/etc/waggle")

Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
#: Student/teacher architectures the config and the command line accept.
ARCHES: tuple[Arch, ...] = get_args(Arch)

Strategy = Literal["optimal", "revolve", "sequential", "none"]
#: Checkpointing strategies, best first.
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)

Granularity = Literal["block", "conv"]
#: How finely a ResNet is split into stages for checkpointing: one stage per residual
#: block, or one per convolution of a block (the skip tensor carried beside the main
#: one: smaller checkpoints, so a smaller smallest plan).
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)

OptimizerName = Literal["sgd", "adam", "adamw"]
#: Optimisers the config and the command line accept.
OPTIMIZER_NAMES: tuple[OptimizerName, ...] = get_args(OptimizerName)

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
#: A ResNet halves the image side five times (stem conv, max-pool, layer2..4).
RESNET_DOWNSAMPLING = 32


def resnet_final_side(image: int, stride: int = RESNET_DOWNSAMPLING) -> int:
    """Side of a ResNet trunk's last feature map for an ``image`` px input: the side is
    halved (rounding up) down to ``stride`` (32 for the whole ResNet)."""
    return -(-image // stride)


def batch_too_small(
    batch: int, image: int, width: int | None = None, *, stride: int = RESNET_DOWNSAMPLING
) -> str | None:
    """Why a ResNet cannot train on ``batch`` images of ``image`` px (or ``image`` x
    ``width``), or None if it can.

    In training mode BatchNorm needs more than one value per channel: the last
    feature map's ``batch * height * width`` must be at least 2 (for the whole ResNet,
    images of 32 px or less give a 1x1 map).
    """
    h = resnet_final_side(image, stride)
    w = resnet_final_side(image if width is None else width, stride)
    if batch * h * w >= 2:
        return None
    return (
        f"BatchNorm needs more than one value per channel: the last feature map is "
        f"{h}x{w}, so use a batch of at least 2 or images larger than {stride * h} px"
    )


# ------------------------------------------------------------------------- sizes

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "eb": 10**18,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "p": 2**50,
    "e": 2**60,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
    "eib": 2**60,
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


_BINARY_UNITS = (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_size(n: int) -> str:
    """``1610612736`` -> ``"1.5GiB"``; exact integers stay exact (``"512MiB"``)."""
    for unit, div in _BINARY_UNITS:
        if n >= div:
            q = n / div
            return f"{q:.0f}{unit}" if q == int(q) else f"{q:.2f}{unit}"
    return f"{n}B"


def format_sizes_apart(a: int, b: int) -> tuple[str, str]:
    """``a`` and ``b`` in one unit, with the fewest decimals that tell them apart.

    ``(734003, 734100)`` -> ``("716.80KiB", "716.89KiB")``; never two equal strings
    for different sizes (``"734003 bytes"`` when three decimals do not separate them).
    """
    big = max(a, b)
    for unit, div in _BINARY_UNITS:
        if big >= div:
            for decimals in range(1, 4):
                fa, fb = f"{a / div:.{decimals}f}{unit}", f"{b / div:.{decimals}f}{unit}"
                if fa != fb or a == b:
                    return fa, fb
            break
    return f"{a} bytes", f"{b} bytes"


def parse_budget(v: Any) -> int | Literal["auto"]:
    """``"auto"`` or a size in bytes (see :func:`parse_size`); ValueError otherwise."""
    if v == "auto":
        return "auto"
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError(f'{v!r} is not "auto" or a size ({SIZE_HELP})') from None


# ----------------------------------------------------------------------- machine


def cpu_model() -> str:
    """This machine's CPU model (``/proc/cpuinfo``), for profile keys and benchmarks."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------- directories


def usable_directory(path: str | os.PathLike, what: str, *, create_parents: bool = False) -> Path:
    """``path`` as a directory this process can write into, created if missing.

    Without ``create_parents`` only the last component is created: a mistyped
    ``/nonexistent/x`` is refused rather than silently made.  Raises ValueError naming
    ``what`` (a flag or a config key) and the path.
    """
    p = Path(path)
    if not str(path).strip():
        raise ValueError(f"{what}: the path is empty")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p}: not a directory")
    if not p.exists():
        parent = p.absolute().parent
        if not create_parents and not parent.is_dir():
            raise ValueError(f"{what} {p}: {parent} does not exist (create it, or choose another)")
        try:
            p.mkdir(parents=create_parents, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{what} {p}: cannot be created ({exc.strerror})") from None
    # A file created and removed: os.access() passes root on any directory it can
    # reach, and says nothing of a full file system.
    try:
        fd, probe = tempfile.mkstemp(dir=p, prefix=".write-test-")
    except OSError as exc:
        raise ValueError(f"{what} {p}: cannot be written ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return p


# ----------------------------------------------------------------------- logging


def setup_logging(level: str | None) -> None:
    """Log to stderr; under systemd (JOURNAL_STREAM set) journald adds the time."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if under_journald
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
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


# ---------------------------------------------------------------------- progress


def progress_wanted(stream: Any = None) -> bool:
    """Whether to draw progress on ``stream`` (default stderr): only on a terminal,
    never under systemd (``JOURNAL_STREAM``), where it would fill the journal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("JOURNAL_STREAM")


class Progress:
    """``progress(done, total)`` redraws one line ``label: done/total unit`` on a
    terminal and erases it when ``done == total``; does nothing elsewhere."""

    def __init__(self, label: str, unit: str = "", stream: Any = None) -> None:
        self.label, self.unit = label, unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = progress_wanted(self.stream)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if done >= total:
            self.stream.write("\r\033[K")
        else:
            unit = f" {self.unit}" if self.unit else ""
            self.stream.write(f"\r{self.label}: {done}/{total}{unit}\033[K")
        self.stream.flush()
