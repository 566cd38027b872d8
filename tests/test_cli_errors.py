"""Every user mistake on the command line: one line naming the value, non-zero exit,
no traceback; one set of limits for the config and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from waggle_trainer.cli import main
from waggle_trainer.common import DEFAULT_CLASSES, IMAGE_SIZE_MAX, IMAGE_SIZE_MIN

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run ``argv`` in-process (argparse errors exit through SystemExit)."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    cap = capsys.readouterr()
    assert rc == code, (rc, cap.out, cap.err)
    lines = cap.err.strip().splitlines()
    assert "Traceback" not in cap.err
    # argparse prints its usage before the one-line error
    return lines[-1]


@pytest.mark.parametrize("cmd", ["plan", "bench"])
@pytest.mark.parametrize(
    "flags, words",
    [
        (["--image", "7"], ["--image", "7", f"{IMAGE_SIZE_MIN}"]),
        (["--image", str(IMAGE_SIZE_MAX + 1)], ["--image", str(IMAGE_SIZE_MAX + 1)]),
        (["--classes", "1"], ["--classes", "1", "2"]),
        (["--batch", "1", "--image", "32"], ["--batch 1", "BatchNorm"]),
        (["--safety-margin", "1.0"], ["--safety-margin", "1.0"]),
    ],
)
def test_plan_and_bench_refuse_what_cannot_train(capsys, cmd, flags, words):
    line = one_line_error(capsys, [cmd, *flags])
    for w in words:
        assert w in line, line


def test_bench_batch_1_image_7(capsys):
    line = one_line_error(capsys, ["bench", "--batch", "1", "--steps", "2", "--image", "7"])
    assert "--image" in line


def test_memory_uses_the_same_image_limits(capsys):
    line = one_line_error(capsys, ["memory", "--image", str(IMAGE_SIZE_MAX + 1)])
    assert f"{IMAGE_SIZE_MIN} to {IMAGE_SIZE_MAX}" in line
    assert main(["memory", "--image", str(IMAGE_SIZE_MIN), "--batch", "2", "--json"]) == 0
    capsys.readouterr()


def test_classes_default_is_shared():
    from waggle_trainer.cli import build_parser
    from waggle_trainer.learn.planned_training import RunSpec

    args = build_parser().parse_args(["plan"])
    assert args.classes == DEFAULT_CLASSES == RunSpec().classes


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--budget", "120MiB", "--cache-dir", "/etc/passwd"],
        ["memory", "--profile", "--cache-dir", "/etc/passwd"],
    ],
)
def test_cache_dir_that_is_a_file(capsys, argv):
    line = one_line_error(capsys, argv)
    assert "--cache-dir" in line and "/etc/passwd" in line and "not a directory" in line


def test_cache_dir_under_a_missing_directory_is_not_created(capsys, tmp_path):
    target = tmp_path / "nonexistent" / "x"
    line = one_line_error(capsys, ["plan", "--cache-dir", str(target)])
    assert "--cache-dir" in line and str(target.parent) in line
    assert not target.parent.exists()


def test_revolve_refuses_a_table_too_large_to_compute(capsys):
    t0 = time.monotonic()
    line = one_line_error(capsys, ["revolve", "--length", "100000", "--slots", "10"])
    assert time.monotonic() - t0 < 5
    assert "--length" in line and "100000" in line and "at most" in line


def test_broken_pipe_is_quiet(tmp_path):
    """``check-config FILE | head -1``: no traceback when the reader goes away."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    p = subprocess.run(
        [sys.executable, "-m", "waggle_trainer", "check-config", "deploy/node.example.toml"],
        stdout=w,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        timeout=60,
        text=True,
    )
    os.close(w)
    assert p.returncode != 0
    assert p.stderr == "", p.stderr


def test_check_config_empty_path(capsys):
    assert main(["check-config", ""]) == 2
    out = capsys.readouterr().out
    assert "is a directory" not in out and "empty" in out


@pytest.mark.parametrize(
    "text",
    [
        "[student]\ninput_width = 32\ninput_height = 32\n[training]\nbatch_size = 1\n",
        "[memory]\nsafety_margin = 1.0\n",
        "[training]\nlearning_rate = inf\n",
    ],
)
def test_check_config_and_run_refuse_the_same_files(tmp_path, capsys, text):
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    assert main(["check-config", str(cfg)]) == 2
    checked = capsys.readouterr().out.strip()
    assert main(["run", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == checked


def test_make_test_runs_lint_and_types():
    make = (ROOT / "Makefile").read_text()
    assert "\ntest: check\n" in make
    check = make.split("\ncheck:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check waggle_trainer tests bench" in check and "mypy" in check


def test_plan_granularity_and_a_budget_below_the_smallest_plan(capsys, tmp_path):
    """``plan --granularity conv``: more stages, a smallest plan no larger; a budget
    below it is refused in one line naming the smallest budget that can."""
    import json

    base = ["plan", "--arch", "resnet50", "--batch", "2", "--image", "64"]
    base += ["--cache-dir", str(tmp_path), "--json"]
    found = {}
    for granularity in ("block", "conv"):
        assert main([*base, "--budget", "1GiB", "--granularity", granularity]) == 0
        found[granularity] = json.loads(capsys.readouterr().out)
    block, conv = found["block"], found["conv"]
    assert (block["granularity"], block["stages"], conv["stages"]) == ("block", 23, 55)
    assert conv["min_feasible_bytes"] < block["min_feasible_bytes"]
    low = conv["min_feasible_bytes"]
    argv = [*base[:-1], "--budget", str(low - 1), "--granularity", "conv"]
    assert main(argv) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert "(residual blocks split at their convolutions)" in out[0]
    assert out[-1].startswith("nothing fits: the budget") and f"{low} bytes" in out[-1]
    line = one_line_error(capsys, ["plan", "--granularity", "layer"])
    assert "--granularity" in line and "'layer'" in line
