"""systemd/waggle-trainer.service: verified by systemd-analyze, exposure <= 2.5, and
every setting the node relies on present (CI installs systemd's tools: .ci/run)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "waggle-trainer.service"
MAX_EXPOSURE = 2.5

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    analyze is None,
    reason="systemd-analyze not installed (.ci/run installs it: apt-get install systemd)",
)


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's command (verify insists the
    binary exists; the installed path is /opt/waggle-trainer/venv/bin)."""
    exe = Path(sys.executable).with_name("waggle-trainer")
    if not exe.exists():
        exe = Path(sys.executable)
    text = UNIT.read_text().replace("/opt/waggle-trainer/venv/bin/waggle-trainer", str(exe))
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path):
    r = subprocess.run(
        [analyze, "verify", str(runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    problems = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert r.returncode == 0 and not problems, problems


@needs_analyze
def test_security_exposure_is_at_most_2_5(tmp_path):
    r = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout[-500:] + r.stderr
    exposure = float(m.group(1))
    print(f"\nsystemd-analyze security --offline=yes: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE


def test_the_unit_carries_what_the_node_relies_on():
    s = settings()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["Restart"] == "on-failure"
    assert one["StartLimitIntervalSec"] == "0"  # never locked out for good
    assert one["RestartPreventExitStatus"] == "2"  # a config error waits for a human
    assert int(one["WatchdogSec"]) >= 300 and int(one["TimeoutStopSec"]) > 10
    assert one["MemoryHigh"] and one["MemoryMax"] and one["IOSchedulingClass"] == "idle"
    assert one["Nice"] and one["CPUWeight"]
    assert one["DynamicUser"] == "yes" and one["StateDirectory"] == "waggle-trainer"
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert one[key] in ("strict", "yes"), key
    assert one["CapabilityBoundingSet"] == ""
    assert s["SystemCallFilter"][0] == "@system-service"
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert sorted(s["DeviceAllow"]) == ["/dev/waggle_cam_bottom rw", "/dev/waggle_cam_top rw"]
    assert one["DevicePolicy"] == "closed" and one["ReadOnlyPaths"] == "/etc/waggle"
    assert "MemoryDenyWriteExecute" not in s  # breaks PyTorch's JIT-compiled CPU kernels
    assert "stop_flush_s" in UNIT.read_text()


def test_stop_flush_fits_in_the_stop_timeout():
    from waggle_trainer.config import default_config

    stop = int(settings()["TimeoutStopSec"][-1])
    assert default_config().daemon.stop_flush_s + 30 < stop
