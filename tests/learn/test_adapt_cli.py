"""``waggle-trainer adapt`` and ``detect`` end to end (subprocesses, real sources)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from waggle_trainer.cli import main
from waggle_trainer.learn.student import StudentSpec, build_student, save_student
from waggle_trainer.learn.task import Task

ROOT = Path(__file__).resolve().parents[2]
VTEST = ROOT.parent / "shared" / "data" / "vtest.avi"


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """One state directory for the module's runs: the chain is profiled once."""
    return tmp_path_factory.mktemp("state")


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "waggle_trainer", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def write_config(
    tmp_path: Path, source: str, extra: str = "", student: str = "", state: Path | None = None
) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[camera]\nsource = "{source}"\nfps = 0\n'
        "[student]\ninput_width = 96\ninput_height = 64\nmax_detections = 5\n"
        + student
        + f'[state]\ndir = "{state or tmp_path / "state"}"\n'
        + extra
    )
    return cfg


def image_folder(tmp_path: Path, n: int, width: int = 192, height: int = 128) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(
            str(folder / f"{i:03d}.png"), (rng.random((height, width, 3)) * 255).astype(np.uint8)
        )
    return folder


def constant_student(path: Path) -> StudentSpec:
    """A student whose every output cell says: person, score sigmoid(5), a 4x6-cell box
    centred in the cell; so its boxes' source-pixel coordinates are known."""
    spec = StudentSpec("resnet18", Task("detect", ("person", "vehicle")), 96, 64, 4, 16)
    model = build_student(spec)
    with torch.no_grad():
        heat, box = model.head.heat[-1], model.head.box[-1]
        heat.weight.zero_()
        heat.bias.copy_(torch.tensor([5.0, -10.0]))
        box.weight.zero_()
        box.bias.copy_(torch.tensor([4.0, 6.0, 0.5, 0.5]))
    save_student(model, spec, path)
    return spec


def test_detect_jsonl_writes_student_boxes_in_source_pixels(tmp_path, capsys):
    folder = image_folder(tmp_path, 4)
    weights = tmp_path / "student.safetensors"
    constant_student(weights)
    code = main(
        [
            "detect",
            "--config",
            str(write_config(tmp_path, str(folder))),
            "--weights",
            str(weights),
            "--frames",
            "1:3",
            "--jsonl",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [line["frame"] for line in lines] == [1, 2]
    sx, sy = 192 / 96, 128 / 64  # source pixels per input pixel
    for line in lines:
        assert len(line["boxes"]) == 5  # max_detections
        for x1, y1, x2, y2, score, cls in line["boxes"]:
            assert cls == 0 and score == pytest.approx(1 / (1 + math.exp(-5)), abs=1e-4)
            assert (x2 - x1, y2 - y1) == (
                pytest.approx(4 * 4 * sx, abs=0.02),
                pytest.approx(6 * 4 * sy, abs=0.02),
            )
            cx, cy = (x1 + x2) / 2 / (4 * sx) - 0.5, (y1 + y2) / 2 / (4 * sy) - 0.5
            assert cx == pytest.approx(round(cx), abs=0.01) and 0 <= round(cx) < 24
            assert cy == pytest.approx(round(cy), abs=0.01) and 0 <= round(cy) < 16


@pytest.mark.skipif(not VTEST.exists(), reason="needs /work/shared/data/vtest.avi")
def test_detect_jsonl_with_the_teacher_finds_people_on_vtest(tmp_path, capsys):
    code = main(
        [
            "detect",
            "--config",
            str(write_config(tmp_path, str(VTEST))),
            "--teacher",
            "--frames",
            "0:2",
            "--jsonl",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [line["frame"] for line in lines] == [0, 1]
    for line in lines:
        people = [b for b in line["boxes"] if b[5] == 0]
        assert len(people) >= 2
        assert all(0 <= b[0] < b[2] <= 768 and 0 <= b[1] < b[3] <= 576 for b in people)


def test_detect_usage_errors_are_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path, str(image_folder(tmp_path, 1)))
    assert main(["detect", "--config", str(cfg), "--jsonl"]) == 2
    assert capsys.readouterr().err.strip() == (
        "waggle-trainer detect: --weights FILE is required (or --teacher)"
    )
    missing = tmp_path / "none.safetensors"
    assert main(["detect", "--config", str(cfg), "--weights", str(missing)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"waggle-trainer detect: {missing}: student weights file not found"
    )
    with pytest.raises(SystemExit) as info:
        main(["detect", "--config", str(cfg), "--weights", "x", "--frames", "5:2"])
    assert info.value.code == 2 and "empty frame range" in capsys.readouterr().err


def test_adapt_runs_saves_a_student_and_summarises(tmp_path, state):
    # the synthetic source (moving shapes) and the reference teacher: a few frames, one round
    cfg = write_config(
        tmp_path,
        "synthetic",
        extra=(
            # every frame labelled by one look of the teacher (the budget allows it)
            "[teacher]\ntiles = 1\n"
            "[training]\nbatch_size = 1\nsteps_per_round = 2\n"
            "[adaptation]\nteacher_stride_min = 1\nnew_samples_per_round = 2\n"
            "holdout_fraction = 0.3\nteacher_budget = 1.0\n"
        ),
        state=state,
    )
    out = tmp_path / "adapted.safetensors"
    r = cli(
        "adapt", "--config", str(cfg), "--frames", "4", "--save", str(out), "--seed", "3", "--json"
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["frames_seen"] == 4 and summary["teacher_calls"] == 4
    assert summary["labelled_frames"] == 4 and summary["teacher_calls_per_label"] == 1
    assert summary["steps_done"] in (0, 2)  # a rolled-back round gives its steps back
    verdicts = ("rounds_accepted", "rounds_rolled_back", "rounds_not_judged")
    assert summary["rounds"] == 1 and sum(summary[k] for k in verdicts) == 1
    # a round without enough held-out evidence shows no agreement
    assert (summary["agreement_first"] is None) == (summary["rounds_not_judged"] == 1)
    assert summary["strategy"] in ("optimal", "none") and summary["budget_bytes"] > 0
    assert out.is_file() and summary["saved"] == str(out)
    r = cli("detect", "--config", str(cfg), "--weights", str(out), "--frames", "0:1", "--jsonl")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["frame"] == 0


def test_adapt_refuses_a_missing_source_and_bad_weights(tmp_path, capsys):
    cfg = write_config(tmp_path, str(tmp_path / "nope.avi"))
    assert main(["adapt", "--config", str(cfg), "--frames", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("waggle-trainer adapt: ") and "nope.avi" in err[-1]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    cfg = write_config(tmp_path, "synthetic", student=f'weights = "{bad}"\n')
    assert main(["adapt", "--config", str(cfg), "--frames", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1]
        == f"waggle-trainer adapt: {bad}: not a safetensors file "
        + err[-1].split("not a safetensors file ")[1]
    )


def test_adapt_summary_says_when_no_round_could_be_judged(capsys):
    from waggle_trainer.common import format_size
    from waggle_trainer.learn.adapt_cli import _print_summary

    summary = {
        "arch": "resnet18",
        "task": "detect",
        "classes": ["person"],
        "input": [96, 64],
        "frames_seen": 6,
        "seconds": 2.0,
        "fps": 3.0,
        "teacher_calls": 6,
        "teacher_calls_per_frame": 1.0,
        "labelled_frames": 6,
        "teacher_calls_per_label": 1,
        "teacher_seconds_per_label": 0.05,
        "steps_done": 4,
        "teacher_stride": 1,
        "rounds": 2,
        "rounds_accepted": 0,
        "rounds_rolled_back": 0,
        "rounds_not_judged": 2,
        "agreement_first": None,
        "agreement_last": None,
        "agreement_best": None,
        "strategy": "none",
        "recomputes": False,
        "budget_bytes": 2**20,
        "predicted_peak_bytes": 2**19,
        "measured_peak_bytes": 2**19,
        "allocator": "glibc",
        "fused_step": False,
    }
    _print_summary(summary, format_size)
    out = capsys.readouterr().out
    assert (
        "rounds 2 (4 steps kept): 0 accepted, 0 rolled back, 2 not judged; "
        "held-out agreement not measured: the held-out slice never held enough teacher "
        "labels (adaptation.min_holdout_labels)"
    ) in out
