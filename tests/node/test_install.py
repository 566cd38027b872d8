"""deploy/install-node.sh under a temporary root: dry run changes nothing, install
is idempotent, an operator's config is never overwritten, bad options exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "install-node.sh"


def install(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_dry_run_changes_nothing_and_says_what_it_would_do(tmp_path):
    r = install(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path) == {}
    out = r.stdout
    assert "would run: python3 -m venv" in out and "/opt/waggle-trainer/venv" in out
    assert "download.pytorch.org/whl/cpu" in out
    assert "would install: /etc/systemd/system/waggle-trainer.service" in out
    assert "would install: /etc/waggle-trainer/node.toml" in out


def test_install_then_again_is_idempotent(tmp_path):
    first = install(tmp_path, "--skip-pip")
    assert first.returncode == 0, first.stderr
    files = tree(tmp_path)
    assert (
        files["etc/systemd/system/waggle-trainer.service"]
        == (ROOT / "systemd" / "waggle-trainer.service").read_bytes()
    )
    example = (ROOT / "deploy" / "node.example.toml").read_bytes()
    assert files["etc/waggle-trainer/node.toml"] == example
    assert "warning: /etc/waggle/node-id is missing" in first.stdout
    second = install(tmp_path, "--skip-pip")
    assert second.returncode == 0 and tree(tmp_path) == files
    assert "nothing to do: already installed" in second.stdout


def test_an_edited_config_is_kept_and_a_changed_unit_replaced(tmp_path):
    install(tmp_path, "--skip-pip")
    conf = tmp_path / "etc/waggle-trainer/node.toml"
    conf.write_text('[node]\nid = "mine"\n')
    unit = tmp_path / "etc/systemd/system/waggle-trainer.service"
    unit.write_text("stale")
    (tmp_path / "etc/waggle").mkdir()
    (tmp_path / "etc/waggle/node-id").write_text("mine\n")
    (tmp_path / "etc/waggle/train-hmac.key").write_text("k" * 32)
    r = install(tmp_path, "--skip-pip")
    assert r.returncode == 0
    assert conf.read_text() == '[node]\nid = "mine"\n'
    assert unit.read_bytes() == (ROOT / "systemd" / "waggle-trainer.service").read_bytes()
    assert "kept: /etc/waggle-trainer/node.toml (exists)" in r.stdout
    assert "warning" not in r.stdout


def test_bad_options_exit_2_with_one_line(tmp_path):
    r = install(tmp_path, "--frobnicate")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "install-node: unknown option --frobnicate (see --help)"
    ]
    r = install(tmp_path / "missing")
    assert r.returncode == 2 and "not a directory" in r.stderr
