"""Where a benchmark's numbers come from: command, commit, CPU, threads, the load on
the (shared) machine; and where its results go, so that a partial run never
overwrites the committed full table."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def commit() -> str:
    """``git describe --always --dirty`` of the checkout, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def provenance(
    threads: int | str | None, extra: str = "", *, load_before: float | None = None
) -> list[str]:
    """Markdown lines naming the command, commit, CPU model and cores, the 1-minute load
    average now (and ``load_before``, taken when the measuring began), threads (None:
    not said, the measured processes choose), torch and Python versions and the date;
    ``extra`` ends the second line."""
    sys.path.insert(0, str(ROOT))
    from waggle_trainer.common import cpu_model

    torch = sys.modules.get("torch")  # a benchmark has imported it; never import it here
    versions = f"torch {torch.__version__}, " if torch is not None else ""
    command = " ".join([".venv/bin/python", *sys.argv])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = f"load average {os.getloadavg()[0]:.1f} at the end"
    if load_before is not None:
        load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    return [
        f"Command: `{command}`  ",
        f"Commit {commit()}; CPU: {cpu_model()} ({platform.machine()}, {os.cpu_count()} "
        f"cores, shared: {load}); {_threads(threads)}"
        f"{versions}Python "
        f"{platform.python_version()}; {when}.{' ' + extra if extra else ''}",
    ]


def _threads(threads: int | str | None) -> str:
    if threads is None:
        return ""
    return f"{threads} thread{'' if str(threads) == '1' else 's'}; "


def write_report(path: Path, lines: list[str]) -> str:
    """Write the markdown ``lines`` to ``path`` (its folder made), print them and where
    they went; returns the text."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"wrote {path}", file=sys.stderr)
    return text


def results_path(name: str, suffix: str, *, partial: bool, out: str | None = None) -> Path:
    """``bench/results/NAME.SUFFIX`` for a full run; ``NAME-partial.SUFFIX`` for a run
    restricted by options (so the committed full table stays); ``out`` wins."""
    if out:
        return Path(out)
    return RESULTS / (f"{name}-partial.{suffix}" if partial else f"{name}.{suffix}")
