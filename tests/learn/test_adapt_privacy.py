"""A full short adaptation (source -> teacher -> student -> saved student) under the
privacy audit: nothing is written outside the state directory, no image writer is
called, and the state directory holds no image data afterwards."""

from __future__ import annotations

from tests.privacy import ImagesStayInRam, scan_for_images
from waggle_trainer.cli import main
from waggle_trainer.config import load_config
from waggle_trainer.vision.frames import open_source


def test_adaptation_keeps_images_in_ram(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[camera]\nsource = "synthetic"\nfps = 0\n'
        "[student]\ninput_width = 96\ninput_height = 64\n"
        "[training]\nbatch_size = 2\nsteps_per_round = 2\n"
        "[adaptation]\nteacher_stride_min = 1\nnew_samples_per_round = 3\nholdout_fraction = 0.25\n"
        "teacher_budget = 5.0\n"  # the tiled teacher on every frame: two rounds
        f'[state]\ndir = "{state}"\n'
    )
    with ImagesStayInRam(allowed_dirs=[state]) as guard:
        code = main(
            [
                "adapt",
                "--config",
                str(cfg),
                "--frames",
                "10",
                "--json",
                "--save",
                str(state / "student.safetensors"),
            ]
        )
    assert code == 0, capsys.readouterr().err
    assert not guard.violations
    out = capsys.readouterr()
    assert '"rounds": 2' in out.out
    # the frames the run saw, to look for their bytes in what was written
    source = open_source(load_config(cfg).camera)
    frames = [next(source).image for _ in range(10)]
    source.close()
    written = list(state.rglob("*"))
    assert any(p.name == "student.safetensors" for p in written)
    assert any(p.parent.name == "profiles" for p in written)
    assert scan_for_images(state, frames, shapes=[(64, 96)]) == []
    assert scan_for_images(tmp_path / "state", [], shapes=[(480, 640)]) == []
