"""The node config file: every error class in the shape FILE: section.key: what (allowed)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import psutil
import pytest

from waggle_trainer import config as cfgmod
from waggle_trainer.common import parse_size
from waggle_trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "node.example.toml"


@pytest.fixture(autouse=True)
def _no_host_identity(monkeypatch, tmp_path):
    """Tests must not depend on this machine's /etc/waggle or environment."""
    monkeypatch.setattr(cfgmod, "WAGGLE_ETC", tmp_path / "etc-waggle")
    monkeypatch.delenv("WAGGLE_NODE_ID", raising=False)
    monkeypatch.delenv("WAGGLE_NODE_VSN", raising=False)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.lines()


def test_example_config_loads_and_documents_every_key():
    cfg = load_config(EXAMPLE)
    assert cfg == cfgmod.config_from_dict({}, "x").model_copy(update={"state": cfg.state})
    text = EXAMPLE.read_text()
    # every key of every section appears in the example (commented or not)
    for section, model in cfgmod.Config.model_fields.items():
        assert f"[{section}]" in text
        for key in model.annotation.model_fields:
            assert f"{key} =" in text, f"{section}.{key} undocumented"


def test_example_values_are_the_defaults():
    data = tomllib.loads(EXAMPLE.read_text())
    defaults = cfgmod.default_config()
    for section, keys in data.items():
        sec = getattr(defaults, section)
        for key, value in keys.items():
            got = getattr(sec, key)
            if hasattr(got, "get_secret_value"):
                got = got.get_secret_value()
            if isinstance(value, str) and key in ("chunk_size", "outbox_max_bytes", "max_bytes"):
                value = parse_size(value)
            assert str(got) == str(value), f"{section}.{key}: example {value!r} != default {got!r}"


def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.training.batch_size == 8
    assert cfg.memory.budget == "auto"
    assert cfg.node.id is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[training]\nbatch_size = 0\n", "training.batch_size: 0 is out of range (must be >= 1)"),
        (
            "[training]\nlearning_rate = 0\n",
            "training.learning_rate: 0 is out of range (must be > 0.0)",
        ),
        (
            "[memory]\nsafety_margin = 1.5\n",
            "memory.safety_margin: 1.5 is out of range (must be < 1.0)",
        ),
        (
            "[memory]\nsafety_margin = -0.1\n",
            "memory.safety_margin: -0.1 is out of range (must be >= 0.0)",
        ),
        ("[training]\nbach_size = 3\n", "training.bach_size: unknown key (allowed: batch_size, "),
        ("[trainig]\nbatch_size = 3\n", "trainig: unknown section (allowed: node, camera, "),
        ('[training]\nbatch_size = "eight"\n', "training.batch_size: 'eight' is the wrong type ("),
        ('[transport]\nenabled = "yes"\n', "transport.enabled: 'yes' is the wrong type ("),
        (
            '[memory]\nstrategy = "fast"\n',
            "memory.strategy: 'fast' is not allowed (one of 'optimal', ",
        ),
        ('[memory]\nbudget = "lots"\n', "memory.budget: 'lots' is not \"auto\" or a size ("),
        ("training = 3\n", "training: 3 is not a table (write it as [training])"),
    ],
)
def test_each_error_class_has_the_exact_shape(tmp_path, text, expected):
    path = write(tmp_path, text)
    lines = problems(path)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: {expected}"), lines[0]


def test_budget_larger_than_ram_is_refused(tmp_path):
    total = psutil.virtual_memory().total
    path = write(tmp_path, f"[memory]\nbudget = {total + 2**30}\n")
    [line] = problems(path)
    assert line.startswith(f"{path}: memory.budget: ")
    assert "larger than this machine's RAM" in line and 'use "auto" or a smaller size' in line


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(
        tmp_path, "[training]\nbatch_size = 0\nlearning_rate = -1\n[memory]\nsafety_margin = 2\n"
    )
    lines = problems(path)
    assert [l.split(": ")[1] for l in lines] == [
        "training.batch_size",
        "training.learning_rate",
        "memory.safety_margin",
    ]


def test_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "[node]\nid = \n")
    [line] = problems(path)
    assert line.startswith(f"{path}: line 2, column 6: invalid TOML: ")


def test_missing_unreadable_and_directory(tmp_path):
    assert problems(tmp_path / "nope.toml") == [
        f"{tmp_path / 'nope.toml'}: file: not found (give the path of a TOML file)"
    ]
    assert problems(tmp_path) == [
        f"{tmp_path}: file: is a directory (give the path of a TOML file)"
    ]
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert problems(binary)[0].startswith(f"{binary}: file: is not UTF-8 text")


@pytest.mark.parametrize(
    "value, expected",
    [
        (4096, 4096),
        ("1.5GB", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("2 KiB", 2048),
        ("10kb", 10_000),
        ("3G", 3 * 2**30),
        ("100", 100),
    ],
)
def test_sizes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [0, -5, "", "1.5XB", "GB", True, 1.5, "-1MB"])
def test_bad_sizes(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_size_fields_accept_strings(tmp_path):
    cfg = load_config(
        write(tmp_path, '[memory]\nbudget = "512MiB"\n[transport]\nchunk_size = "1MiB"\n')
    )
    assert cfg.memory.budget == 512 * 2**20
    assert cfg.transport.chunk_size == 2**20


def test_node_identity_from_files_and_env(tmp_path, monkeypatch):
    etc = tmp_path / "etc-waggle"
    etc.mkdir()
    (etc / "node-id").write_text("0000001E06107D7F\n")
    (etc / "vsn").write_text("W01B\n")
    path = write(tmp_path, "")
    cfg = load_config(path)
    assert (cfg.node.id, cfg.node.vsn) == ("0000001E06107D7F", "W01B")
    # the config file's value beats the file
    cfg = load_config(write(tmp_path, '[node]\nid = "fromconfig"\n'))
    assert cfg.node.id == "fromconfig"
    # the environment beats both
    monkeypatch.setenv("WAGGLE_NODE_ID", "fromenv")
    monkeypatch.setenv("WAGGLE_NODE_VSN", "W0FF")
    cfg = load_config(path)
    assert (cfg.node.id, cfg.node.vsn) == ("fromenv", "W0FF")


def test_node_id_alternative_file_name(tmp_path):
    etc = tmp_path / "etc-waggle"
    etc.mkdir()
    (etc / "node_id").write_text("abc123\n")
    assert load_config(write(tmp_path, "")).node.id == "abc123"


def test_sending_requires_a_node_id(tmp_path):
    path = write(tmp_path, "[transport]\nenabled = true\n")
    [line] = problems(path)
    assert line.startswith(
        f"{path}: node.id: required when transport, telemetry or models is enabled"
    )


def test_bad_env_node_id_is_reported_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WAGGLE_NODE_ID", "has space")
    [line] = problems(write(tmp_path, ""))
    assert "WAGGLE_NODE_ID: 'has space' is not an identifier" in line


def test_render_masks_secrets(tmp_path):
    cfg = load_config(write(tmp_path, '[transport]\npassword = "hunter2"\n'))
    text = cfgmod.render_config(cfg)
    assert "hunter2" not in text
    assert 'password = "********"' in text
    assert cfg.transport.password.get_secret_value() == "hunter2"
    # the rendered config is valid TOML that loads to the same configuration
    again = cfgmod.config_from_dict(tomllib.loads(text))
    secrets = {"transport": {"password"}, "telemetry": {"password"}}
    assert again.model_dump(exclude=secrets) == cfg.model_dump(exclude=secrets)


# ------------------------------------------------ what the program cannot run is refused


@pytest.mark.parametrize(
    "text, expected",
    [
        # ResNet's last stage is 1x1 at 32 px: BatchNorm needs more than one value per channel
        (
            "[student]\ninput_width = 32\ninput_height = 32\n[training]\nbatch_size = 1\n",
            "training.batch_size: 1 is too small for the student input 32x32",
        ),
        (
            "[memory]\nsafety_margin = 1.0\n",
            "memory.safety_margin: 1.0 is out of range (must be < 1",
        ),
        ("[training]\nlearning_rate = inf\n", "training.learning_rate: inf is not a finite number"),
        ("[training]\nlearning_rate = nan\n", "training.learning_rate: nan is not a finite number"),
        ("[student]\ninput_width = 7\n", "student.input_width: 7 is out of range (must be >= 32)"),
        (
            '[training]\noptimizer = "rmsprop"\n',
            "training.optimizer: 'rmsprop' is not allowed (one of 'sgd', 'adam' or 'adamw')",
        ),
    ],
)
def test_what_run_cannot_run_is_refused(tmp_path, text, expected):
    path = write(tmp_path, text)
    [line] = problems(path)
    assert line.startswith(f"{path}: {expected}"), line


@pytest.mark.parametrize("batch, width, height", [(2, 32, 32), (1, 64, 32), (1, 64, 64)])
def test_smallest_runnable_shapes_are_accepted(tmp_path, batch, width, height):
    cfg = load_config(
        write(
            tmp_path,
            f"[student]\ninput_width = {width}\ninput_height = {height}\n"
            f"[training]\nbatch_size = {batch}\n",
        )
    )
    s = cfg.student
    assert (cfg.training.batch_size, s.input_width, s.input_height) == (batch, width, height)


def test_adamw_is_accepted(tmp_path):
    assert (
        load_config(write(tmp_path, '[training]\noptimizer = "adamw"\n')).training.optimizer
        == "adamw"
    )


# ------------------------------------------------ messages that name the right thing


def test_bad_env_node_id_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("WAGGLE_NODE_ID", "a b")
    path = write(tmp_path, "")
    [line] = problems(path)
    assert line.startswith("environment variable WAGGLE_NODE_ID: 'a b' is not an identifier"), line
    assert str(path) not in line


def test_bad_node_id_file_names_the_file(tmp_path):
    etc = tmp_path / "etc-waggle"
    etc.mkdir()
    (etc / "node-id").write_text("a b\n")
    [line] = problems(write(tmp_path, ""))
    assert line.startswith(f"{etc / 'node-id'}: 'a b' is not an identifier"), line


def test_empty_path_is_named():
    with pytest.raises(ConfigError) as info:
        load_config("")
    [line] = info.value.lines()
    assert "is a directory" not in line and "empty" in line


def test_utf8_bom_is_named(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[training]\nbatch_size = 4\n")
    [line] = problems(path)
    assert line.startswith(f"{path}: file: ") and "BOM" in line


@pytest.mark.parametrize("size", ["1PB", "1PiB", "2EB"])
def test_huge_budgets_are_sizes_larger_than_ram(tmp_path, size):
    [line] = problems(write(tmp_path, f'[memory]\nbudget = "{size}"\n'))
    assert "larger than this machine's RAM" in line, line
