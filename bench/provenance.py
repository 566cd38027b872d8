"""Where a benchmark's numbers come from: command, commit, CPU, threads; and where
its results go, so that a partial run never overwrites the committed full table."""

from __future__ import annotations

import datetime
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


def provenance(threads: int, extra: str = "") -> list[str]:
    """Markdown lines naming the command, commit, CPU model, threads and date."""
    sys.path.insert(0, str(ROOT))
    from waggle_trainer.common import cpu_model

    torch = sys.modules.get("torch")  # a benchmark has imported it; never import it here
    versions = f"torch {torch.__version__}, " if torch is not None else ""
    command = " ".join([".venv/bin/python", *sys.argv])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"Command: `{command}`  ",
        f"Commit {commit()}; CPU: {cpu_model()} ({platform.machine()}); {threads} threads; "
        f"{versions}Python {platform.python_version()}; {when}.{' ' + extra if extra else ''}",
    ]


def results_path(name: str, suffix: str, *, partial: bool, out: str | None = None) -> Path:
    """``bench/results/NAME.SUFFIX`` for a full run; ``NAME-partial.SUFFIX`` for a run
    restricted by options (so the committed full table stays); ``out`` wins."""
    if out:
        return Path(out)
    return RESULTS / (f"{name}-partial.{suffix}" if partial else f"{name}.{suffix}")
