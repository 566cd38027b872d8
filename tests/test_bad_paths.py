"""A bad path or a hostile config file is one line and a non-zero exit, never a
traceback: every path a command writes is checked once, before it starts
(``waggle_trainer.writable``), and the config reader survives any input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def read_only(tmp_path):
    """A directory on a read-only file system (a tmpfs mounted ``ro``; as root, file
    modes do not stop writes, the mount does), or one without write permission."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)
        return
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WAGGLE_NODE_ID": "n1",
        "WAGGLE_NODE_VSN": "W0T",
        **(env or {}),
    }
    e.pop("STATE_DIRECTORY", None)
    return subprocess.run(
        [sys.executable, "-m", "waggle_trainer", *args],
        capture_output=True,
        text=True,
        env=e,
        cwd=ROOT,
        timeout=300,
    )


def one_line(r: subprocess.CompletedProcess, *words: str) -> str:
    out = (r.stdout + r.stderr).strip()
    assert r.returncode != 0, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def nested_toml(path: Path) -> Path:
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    return path


def test_check_config_on_a_deeply_nested_file(tmp_path):
    f = nested_toml(tmp_path / "deep.toml")
    one_line(cli("check-config", str(f)), str(f), "nested", "deeply")


def test_server_config_on_a_deeply_nested_file(tmp_path):
    f = nested_toml(tmp_path / "deep.toml")
    one_line(cli("server", "--config", str(f)), str(f), "nested")


def node_config(tmp_path: Path, state_dir: Path, **sections) -> Path:
    lines = [f'[state]\ndir = "{state_dir}"']
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [
            f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in keys.items()
        ]
    p = tmp_path / "node.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_run_with_the_state_dir_on_a_read_only_file_system(tmp_path, read_only):
    state = read_only / "state"
    cfg = node_config(tmp_path, state, memory={"allocator": "glibc"})
    line = one_line(cli("run", "--config", str(cfg), "--max-rounds", "1"), "state.dir", str(state))
    assert "cannot be created" in line


def test_run_with_the_state_dir_naming_a_file(tmp_path):
    state = tmp_path / "a-file"
    state.write_text("not a directory\n")
    cfg = node_config(tmp_path, state, memory={"allocator": "glibc"})
    line = one_line(cli("run", "--config", str(cfg), "--max-rounds", "1"), "state.dir", str(state))
    assert "not a directory" in line
    assert state.read_text() == "not a directory\n"  # nothing of the user's touched


def test_run_with_a_state_subdirectory_that_is_a_file(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox").write_text("x")
    cfg = node_config(tmp_path, state, memory={"allocator": "glibc"})
    one_line(cli("run", "--config", str(cfg), "--max-rounds", "1"), "state.dir", "outbox")


def test_adapt_with_a_read_only_state_dir(tmp_path, read_only):
    cfg = node_config(tmp_path, read_only, memory={"allocator": "glibc"})
    line = one_line(cli("adapt", "--config", str(cfg), "--frames", "2"), "state.dir")
    assert str(read_only) in line and ("Read-only" in line or "ermission" in line)


def test_adapt_save_into_a_read_only_directory_is_refused_before_training(tmp_path, read_only):
    cfg = node_config(tmp_path, tmp_path / "state", memory={"allocator": "glibc"})
    out = read_only / "adapted.safetensors"
    r = cli("adapt", "--config", str(cfg), "--frames", "2", "--save", str(out))
    one_line(r, "--save", str(out))
    assert not (tmp_path / "state" / "profiles").exists() or not any(
        (tmp_path / "state" / "profiles").iterdir()
    ), "no training before the check"


def test_server_with_a_read_only_state_dir(tmp_path, read_only):
    sys.path.insert(0, str(ROOT / "tests" / "server"))
    from simnodes import setup_server_files, write_toml

    cfg = setup_server_files(tmp_path, ["a"])
    cfg["server"]["state_dir"] = str(read_only / "state")
    f = write_toml(tmp_path / "server.toml", cfg)
    one_line(cli("server", "--config", str(f)), "server.state_dir", str(read_only / "state"))


def test_prepare_names_key_path_and_need(tmp_path):
    from waggle_trainer.writable import PathProblem, node_state_targets, prepare

    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(PathProblem) as e:
        prepare(node_state_targets(f / "sub"))
    assert str(e.value).startswith(f"state.dir: {f / 'sub'}: a part of the path is a file")
    assert "[state] dir" in str(e.value)
    prepare(node_state_targets(tmp_path / "ok"))
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == sorted(
        ["node", "outbox", "profiles", "models"]
    )


def test_plan_with_a_cache_dir_on_a_read_only_file_system(tmp_path, read_only):
    for d, words in ((read_only, "cannot be written"), (read_only / "new", "cannot be created")):
        r = cli("plan", "--budget", "120MiB", "--cache-dir", str(d))
        one_line(r, "--cache-dir", str(d), words)
