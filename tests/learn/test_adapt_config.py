"""The [student], [training] and [adaptation] sections: errors name the key."""

from __future__ import annotations

import pytest

from waggle_trainer.config import ConfigError, load_config


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "[student]\ninput_width = 100\n",
            "student.input_width: 100 is not a multiple of 32 (the trunk's stride)",
        ),
        ("[student]\nhead_stride = 2\n", "student.head_stride: 2 is not allowed (one of 4 or 8)"),
        (
            "[student]\ntrunk_stride = 8\n",
            "student.trunk_stride: 8 is not allowed (one of 16 or 32)",
        ),
        ('[student]\narch = "vgg16"\n', "student.arch: 'vgg16' is not allowed"),
        (
            '[training]\noptimizer = "lbfgs"\n',
            "training.optimizer: 'lbfgs' is not allowed (one of 'sgd', 'adam' or 'adamw')",
        ),
        ("[training]\nhflip = 1\n", "training.hflip: 1 is the wrong type"),
        (
            "[adaptation]\nteacher_stride_min = 8\nteacher_stride_max = 4\n",
            "adaptation.teacher_stride_max: 4 is below teacher_stride_min (8)",
        ),
        (
            "[adaptation]\nholdout_fraction = 0\n",
            "adaptation.holdout_fraction: 0 is out of range (must be > 0.0)",
        ),
        (
            "[adaptation]\nrollback_margin = 2\n",
            "adaptation.rollback_margin: 2 is out of range (must be <= 1.0)",
        ),
        ("[adaptation]\nbuffer = 3\n", "adaptation.buffer: unknown key (allowed: buffer_size, "),
        (
            "[adaptation]\nmin_holdout_labels = 0\n",
            "adaptation.min_holdout_labels: 0 is out of range (must be >= 1)",
        ),
        (  # a classifier's frame is one label: 4 held-out frames can never give 8
            '[task]\nkind = "classify"\nclasses = ["a", "b"]\n[teacher]\nkind = "classifier"\n'
            "[adaptation]\nbuffer_size = 40\nholdout_fraction = 0.1\n",
            "adaptation.min_holdout_labels: 8 is more than the held-out slice holds (4 frames",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, expected):
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(line.startswith(f"{path}: {expected}") for line in info.value.lines()), (
        info.value.lines()
    )
