"""The command line: exit codes, --help/--version, check-config, logging."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from waggle_trainer import __version__
from waggle_trainer.cli import main
from waggle_trainer.common import setup_logging
from waggle_trainer.config import Config

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "waggle_trainer", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"waggle-trainer {__version__}"
    r = run("--help")
    assert r.returncode == 0
    assert "check-config" in r.stdout


def test_no_command_prints_help_and_fails():
    r = run()
    assert r.returncode == 2 and "usage: waggle-trainer" in r.stdout


def test_check_config_ok_prints_resolved_config():
    r = run("check-config", "deploy/node.example.toml")
    assert r.returncode == 0, r.stderr
    assert "[memory]" in r.stdout and 'strategy = "optimal"' in r.stdout


def test_check_config_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nbatch_size = 0\n[nope]\n")
    r = run("check-config", str(bad))
    assert r.returncode == 2
    assert r.stdout.splitlines() == [
        f"{bad}: training.batch_size: 0 is out of range (must be >= 1)",
        f"{bad}: nope: unknown section (allowed: {', '.join(Config.model_fields)})",
    ]
    assert "Traceback" not in r.stderr + r.stdout


def test_check_config_missing_file():
    r = run("check-config", "/no/such/file.toml")
    assert r.returncode == 2
    assert r.stdout.strip() == "/no/such/file.toml: file: not found (give the path of a TOML file)"


def test_unknown_command_and_bad_option():
    assert run("frobnicate").returncode == 2
    assert run("--log-level", "loud", "check-config", "x").returncode == 2


def test_in_process_main(tmp_path, capsys):
    good = tmp_path / "n.toml"
    good.write_text("[training]\nbatch_size = 4\n")
    assert main(["check-config", str(good)]) == 0
    assert "batch_size = 4" in capsys.readouterr().out


@pytest.mark.parametrize("journal, has_time", [(None, True), ("8:1234", False)])
def test_logging_format_follows_journald(monkeypatch, journal, has_time):
    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", journal)
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("debug")
    handler = logging.getLogger().handlers[0]
    assert logging.getLogger().level == logging.DEBUG
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    line = handler.format(rec)
    assert line.endswith("INFO x: hello")
    assert (line != "INFO x: hello") == has_time
