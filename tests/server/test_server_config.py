"""The server config file and the server's command line: FILE: section.key: what (allowed)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from waggle_trainer.config import ConfigError, parse_size
from waggle_trainer.server.config import ServerConfig, load_server_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "server.example.toml"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "waggle_trainer", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )


def test_example_documents_every_key_with_its_default():
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    defaults = ServerConfig()
    for section, field in ServerConfig.model_fields.items():
        if section == "models":
            assert "[models.resnet18]" in text and "initial_weights =" in text
            continue
        assert section in data, f"[{section}] missing"
        sec = getattr(defaults, section)
        for key in field.annotation.model_fields:
            assert key in data[section], f"{section}.{key} undocumented"
            got, value = getattr(sec, key), data[section][key]
            if hasattr(got, "get_secret_value"):
                got = got.get_secret_value()
            if isinstance(value, str) and isinstance(got, int) and not isinstance(got, bool):
                value = parse_size(value)
            assert str(got) == str(value), f"{section}.{key}: example {value!r} != {got!r}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[queue]\nprefetch = 0\n", "queue.prefetch: 0 is out of range (must be >= 1)"),
        ("[queue]\nprefech = 2\n", "queue.prefech: unknown key (allowed: exchange, queue, "),
        ('[aggregation]\nrule = "mean"\n', "aggregation.rule: 'mean' is not allowed (one of "),
        ('[verify]\nmax_update_bytes = "lots"\n', "verify.max_update_bytes: 'lots' is not a size"),
        ("[store]\nretain_versions = 2\n", "store.retain_versions: 2 is too small (must be >= "),
        (
            '[models.m]\ninitial_weights = "w.pt"\n',
            "models.m.initial_weights: 'w.pt' is not a .safetensors file",
        ),
        (
            '[models.m]\nweights = "w.safetensors"\n',
            "models.m.weights: unknown key (allowed: initial_weights)",
        ),
        ("[serve]\n", "serve: unknown section (allowed: server, broker, "),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(tmp_path, text, expected):
    p = tmp_path / "server.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_server_config(p)
    assert any(line.startswith(f"{p}: {expected}") for line in info.value.lines()), (
        info.value.lines()
    )


def test_server_command_exits_2_with_one_line_per_problem(tmp_path):
    p = tmp_path / "server.toml"
    p.write_text("[queue]\ndelivery_limit = 0\n[status]\nport = -1\n")
    r = run_cli("server", "--config", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stdout.splitlines() == [
        f"{p}: queue.delivery_limit: 0 is out of range (must be >= 1)",
        f"{p}: status.port: -1 is out of range (must be >= 0)",
    ]
    # files named by a valid config are checked before anything starts
    p.write_text(
        f'[server]\nstate_dir = "{tmp_path}/state"\n'
        f'[verify]\nkeys_dir = "{tmp_path}/nokeys"\n'
        f'[broadcast]\nsigning_key_file = "{tmp_path}/none.pem"\n'
        f'[models.m]\ninitial_weights = "{tmp_path}/m.safetensors"\n'
    )
    r = run_cli("server", "--config", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "models.m.initial_weights",
        "verify.keys_dir",
        "broadcast.signing_key_file",
    ], lines
    (tmp_path / "m.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    r = run_cli("server", "--config", str(p))
    assert r.returncode == 2
    assert (
        f"{p}: models.m.initial_weights: '{tmp_path}/m.safetensors' is not a safetensors"
        in r.stdout
    )
    r = run_cli("server", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and r.stdout.startswith(f"{tmp_path}/missing.toml: file: not found")


def test_keygen_and_models_commands(tmp_path):
    key = tmp_path / "k.pem"
    r = run_cli("server-keygen", str(key))
    assert r.returncode == 0 and key.exists() and (tmp_path / "k.pem.pub").exists()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert run_cli("server-keygen", str(key)).returncode == 2  # never overwrites
    p = tmp_path / "server.toml"
    p.write_text(f'[server]\nstate_dir = "{tmp_path}/state"\n')
    r = run_cli("models", "--config", str(p), "show", "m", "3")
    assert r.returncode == 1 and "model 'm' has no version '3'" in r.stdout


def test_reading_the_server_config_loads_neither_torch_nor_pika():
    code = (
        "import sys, waggle_trainer.server.config, waggle_trainer.server.signing; "
        "print(sorted(m for m in ('torch', 'pika') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    ).stdout
    assert out.strip() == "[]"


def test_a_status_port_in_use_is_one_line_and_exit_2(tmp_path, capsys):
    import socket

    from simnodes import make_config

    from waggle_trainer.server.app import run
    from waggle_trainer.server.signing import load_signing_key

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = make_config(tmp_path, ["a"], status={"port": port}, telemetry={"enabled": False})
        rc = run(cfg, load_signing_key(cfg.broadcast.signing_key_file), "server.toml")
    out = capsys.readouterr().out
    assert rc == 2 and out.startswith(
        f"server.toml: status.port: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
