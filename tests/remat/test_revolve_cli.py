"""``waggle-trainer revolve``: text, JSON, errors, and the installed console script."""

import json
import pathlib
import subprocess
import sys

import pytest

from waggle_trainer.cli import main

SCRIPT = pathlib.Path(sys.executable).parent / "waggle-trainer"


def test_text_output(capsys):
    assert main(["revolve", "--length", "10", "--slots", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Opt[10, 2] = 35")
    assert out[1] == "forward steps: 24"
    assert out[-1].split()[0] == "FC0" and out[-1].split()[-1] == "BW0"


@pytest.mark.parametrize(
    "l,c,uf,ub", [(10, 2, 1, 1), (20, 3, 1, 1), (50, 5, 1, 1), (13, 1, 2.5, 0.5), (0, 1, 1, 4)]
)
def test_json_output(capsys, l, c, uf, ub):
    assert (
        main(
            [
                "revolve",
                "--length",
                str(l),
                "--slots",
                str(c),
                "--uf",
                str(uf),
                "--ub",
                str(ub),
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"length", "slots", "uf", "ub", "cost", "forward_steps", "actions"}
    assert (data["length"], data["slots"], data["uf"], data["ub"]) == (l, c, uf, ub)
    assert data["cost"] == pytest.approx(data["forward_steps"] * uf + (l + 1) * ub)
    assert data["forward_steps"] == sum(1 for op, _ in data["actions"] if op in ("FN", "FC"))
    known = {(10, 2): 35, (20, 3): 70, (50, 5): 176}
    if (l, c) in known:
        assert data["cost"] == known[(l, c)]
    if c == 1:
        assert data["cost"] == l * (l + 1) / 2 * uf + (l + 1) * ub


def test_more_slots_than_steps(capsys):
    assert main(["revolve", "--length", "4", "--slots", "50", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["slots"] == 50 and data["cost"] == 4 + 5


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--length", "-1", "--slots", "2"], "--length"),
        (["--length", "5", "--slots", "0"], "--slots"),
        (["--length", "5", "--slots", "2", "--uf", "-1"], "--uf"),
        (["--length", "5", "--slots", "2", "--ub", "nan"], "--ub"),
    ],
)
def test_bad_values(capsys, argv, flag):
    assert main(["revolve", *argv]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "must be" in err[0]
    assert "Traceback" not in cap.err and cap.out == ""


def test_console_script():
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} not installed (run .venv/bin/pip install -e .)")
    r = subprocess.run(
        [str(SCRIPT), "revolve", "--length", "20", "--slots", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cost"] == 70
    r = subprocess.run(
        [str(SCRIPT), "revolve", "--length", "3", "--slots", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--slots" in r.stderr and "Traceback" not in r.stderr
