"""Benchmarks stamp their results with where they come from, and a partial run never
replaces the committed full table."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

provenance = importlib.import_module("bench.provenance")


def test_results_path_keeps_the_full_table():
    full = provenance.results_path("checkpointing", "md", partial=False)
    part = provenance.results_path("checkpointing", "md", partial=True)
    assert full == ROOT / "bench" / "results" / "checkpointing.md"
    assert part == ROOT / "bench" / "results" / "checkpointing-partial.md"
    assert provenance.results_path("x", "md", partial=True, out="/tmp/y.md") == Path("/tmp/y.md")


def test_provenance_names_command_commit_cpu_threads_and_load():
    text = "\n".join(provenance.provenance(3, load_before=0.25))
    for part in ("Command: `", "Commit ", "CPU: ", "3 threads", "cores, shared: load average 0.2"):
        assert part in text, part
    assert "threads" not in "\n".join(provenance.provenance(None))  # the processes chose


def test_write_report_writes_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "new" / "table.md"
    text = provenance.write_report(out, ["# T", "", "| a |", "|---|", "| 1 |", ""])
    assert out.read_text() == text == "# T\n\n| a |\n|---|\n| 1 |\n"
    printed = capsys.readouterr()
    assert printed.out.startswith(text) and f"wrote {out}" in printed.err


@pytest.mark.parametrize(
    "argv, partial",
    [
        ([], False),
        (["--cases", "resnet101:8:224"], True),
        (["--quick"], True),
        (["--archs", "resnet18"], True),
        (["--end-to-end-rounds", "0"], True),
    ],
)
def test_checkpointing_partial_runs_are_recognised(monkeypatch, argv, partial):
    pytest.importorskip("matplotlib")
    bench = importlib.import_module("bench.checkpointing")
    monkeypatch.setattr(sys, "argv", ["checkpointing.py", *argv])
    assert bench.is_partial(bench.parse_args()) is partial


def test_allocator_bench_ckpt_measures_checkpointed_sequential():
    """The "ckpt" variant runs this project's executor, not a silent fallback."""
    import json
    import subprocess

    r = subprocess.run(
        [
            sys.executable,
            "bench/allocator.py",
            "--worker",
            "--arch",
            "resnet18",
            "--variant",
            "ckpt",
            "--batch",
            "2",
            "--image",
            "32",
            "--steps",
            "1",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["impl"].startswith("CheckpointedSequential(sequential, ")
    assert out["rss_growth"] > 0
