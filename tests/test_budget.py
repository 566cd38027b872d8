"""Free memory from psutil and cgroups (fake v1/v2 trees and this machine), the budget."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest

from waggle_trainer.remat import budget as B

MiB = 2**20
V1_UNLIMITED = 9223372036854771712


def _write(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def _v1_tree(tmp: Path, proc_path: str = "/a/b", mount_root: str = "/"):
    mnt = tmp / "sys" / "memory"
    proc = tmp / "cgroup"
    proc.write_text(f"9:name=systemd:/\n4:memory:{proc_path}\n3:cpuset:/\n0::/\n")
    mi = tmp / "mountinfo"
    mi.write_text(
        f"31 23 0:28 / {tmp}/sys rw,relatime - tmpfs tmpfs rw\n"
        f"35 31 0:32 {mount_root} {mnt} rw,relatime - cgroup cgroup rw,memory\n"
        f"41 31 0:38 / {tmp}/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    return mnt, proc, mi


def _v1_level(limit: int, usage: int, inactive: int = 0) -> dict[str, str]:
    return {
        "memory.limit_in_bytes": f"{limit}\n",
        "memory.usage_in_bytes": f"{usage}\n",
        "memory.stat": f"cache 0\nrss {usage}\ninactive_file {inactive // 2}\n"
        f"total_inactive_file {inactive}\n",
    }


def test_v1_nested_parent_limit_is_what_counts(tmp_path):
    mnt, proc, mi = _v1_tree(tmp_path)
    _write(mnt, _v1_level(V1_UNLIMITED, 5000 * MiB))
    # the parent: 1 GiB limit, 900 MiB used of which 100 MiB reclaimable cache
    _write(mnt / "a", _v1_level(1024 * MiB, 900 * MiB, 100 * MiB))
    _write(mnt / "a" / "b", _v1_level(V1_UNLIMITED, 300 * MiB, 20 * MiB))
    loc = B.find_memory_cgroup(proc, mi)
    assert loc == B.CgroupLocation(1, mnt, mnt / "a" / "b")
    cg = B.read_cgroup_memory(loc)
    assert cg.limit_bytes == 1024 * MiB
    assert cg.usage_bytes == 300 * MiB
    assert cg.available_bytes == (1024 - 800) * MiB
    fm = B.free_memory(loc)
    assert fm.free_bytes == min(psutil.virtual_memory().available, 224 * MiB)
    assert fm.limited_by == "cgroup v1"


def test_v1_own_limit_smaller_than_parent_headroom(tmp_path):
    mnt, proc, mi = _v1_tree(tmp_path)
    _write(mnt, _v1_level(V1_UNLIMITED, 0))
    _write(mnt / "a", _v1_level(4096 * MiB, 1000 * MiB))
    _write(mnt / "a" / "b", _v1_level(512 * MiB, 400 * MiB, 50 * MiB))
    cg = B.read_cgroup_memory(B.find_memory_cgroup(proc, mi))
    assert cg.limit_bytes == 512 * MiB
    assert cg.available_bytes == (512 - 350) * MiB


def test_v1_unlimited_everywhere_means_system(tmp_path):
    mnt, proc, mi = _v1_tree(tmp_path)
    _write(mnt, _v1_level(V1_UNLIMITED, 0))
    _write(mnt / "a", _v1_level(V1_UNLIMITED, 10 * MiB))
    _write(mnt / "a" / "b", _v1_level(V1_UNLIMITED, 10 * MiB))
    loc = B.find_memory_cgroup(proc, mi)
    cg = B.read_cgroup_memory(loc)
    assert cg.limit_bytes is None and cg.available_bytes is None
    fm = B.free_memory(loc)
    assert fm.cgroup_available_bytes is None
    assert fm.limited_by == "system"
    assert fm.free_bytes == fm.system_available_bytes


def test_v1_container_mount_root(tmp_path):
    # inside a container the hierarchy's mount root is the container's own group
    mnt, proc, mi = _v1_tree(tmp_path, proc_path="/docker/abc", mount_root="/docker/abc")
    _write(mnt, _v1_level(256 * MiB, 100 * MiB))
    loc = B.find_memory_cgroup(proc, mi)
    assert loc.directory == mnt and loc.ancestors() == [mnt]
    assert B.read_cgroup_memory(loc).available_bytes == 156 * MiB


def _v2_tree(tmp: Path, proc_path: str = "/x/y"):
    mnt = tmp / "unified"
    proc = tmp / "cgroup"
    proc.write_text(f"0::{proc_path}\n")
    mi = tmp / "mountinfo"
    mi.write_text(f"29 23 0:26 / {mnt} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    return mnt, proc, mi


def _v2_level(mx: str, current: int, inactive: int = 0, high: str = "max") -> dict[str, str]:
    return {
        "memory.max": mx + "\n",
        "memory.high": high + "\n",
        "memory.current": f"{current}\n",
        "memory.stat": f"anon {current}\nfile 0\ninactive_file {inactive}\n",
    }


def test_v2_nested(tmp_path):
    mnt, proc, mi = _v2_tree(tmp_path)
    _write(mnt, {"cgroup.controllers": "cpu memory\n"})  # root: no memory.max
    _write(mnt / "x", _v2_level(str(2048 * MiB), 1500 * MiB, 300 * MiB))
    _write(mnt / "x" / "y", _v2_level("max", 600 * MiB, 100 * MiB))
    loc = B.find_memory_cgroup(proc, mi)
    assert loc == B.CgroupLocation(2, mnt, mnt / "x" / "y")
    cg = B.read_cgroup_memory(loc)
    assert cg.version == 2
    assert cg.limit_bytes == 2048 * MiB
    assert cg.available_bytes == (2048 - 1200) * MiB


def test_v2_memory_high_counts_as_limit(tmp_path):
    mnt, proc, mi = _v2_tree(tmp_path, "/s")
    _write(mnt, {})
    _write(mnt / "s", _v2_level(str(1024 * MiB), 100 * MiB, high=str(512 * MiB)))
    cg = B.read_cgroup_memory(B.find_memory_cgroup(proc, mi))
    assert cg.limit_bytes == 512 * MiB
    assert cg.available_bytes == 412 * MiB


def test_v2_unlimited(tmp_path):
    mnt, proc, mi = _v2_tree(tmp_path)
    _write(mnt / "x", _v2_level("max", 10 * MiB))
    _write(mnt / "x" / "y", _v2_level("max", 10 * MiB))
    cg = B.read_cgroup_memory(B.find_memory_cgroup(proc, mi))
    assert cg.limit_bytes is None and cg.available_bytes is None


def test_cgroup2_without_memory_controller_is_not_a_memory_cgroup(tmp_path):
    mnt, proc, mi = _v2_tree(tmp_path)
    _write(mnt / "x" / "y", {"cgroup.procs": ""})  # no memory.* files
    assert B.find_memory_cgroup(proc, mi) is None
    assert B.find_memory_cgroup(tmp_path / "missing", mi) is None


def test_usage_below_inactive_file_never_goes_negative(tmp_path):
    lv = B.CgroupLevel("d", limit_bytes=100, usage_bytes=10, inactive_file_bytes=50)
    assert lv.headroom_bytes == 100
    lv = B.CgroupLevel("d", limit_bytes=100, usage_bytes=500, inactive_file_bytes=0)
    assert lv.headroom_bytes == 0


# ------------------------------------------------------------------ this machine


def test_this_machine_agrees_with_its_files():
    fm = B.free_memory()
    assert 0 < fm.free_bytes <= psutil.virtual_memory().total
    assert fm.free_bytes <= fm.system_available_bytes
    text = Path("/proc/self/cgroup").read_text()
    loc = B.find_memory_cgroup()
    if ":memory:" in text:
        assert loc is not None and loc.version == 1
        own = (loc.directory / "memory.usage_in_bytes").read_text()
        assert int(own) >= 0
    if loc is not None:
        cg = B.read_cgroup_memory(loc)
        assert cg.levels[0].directory == str(loc.directory)


@pytest.mark.cgroup
def test_free_memory_inside_a_limited_cgroup_reads_the_limit():
    from tests.cgroup_util import CgroupUnavailable, run_in_memory_cgroup

    code = (
        "import json; from waggle_trainer.remat.budget import free_memory;"
        "f = free_memory(); print(json.dumps([f.free_bytes, f.cgroup_limit_bytes, f.limited_by]))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        run = run_in_memory_cgroup([sys.executable, "-c", code], 400 * MiB, env=env, timeout=120)
    except CgroupUnavailable as exc:
        pytest.skip(str(exc))
    assert run.returncode == 0, run.stderr
    free, limit, by = json.loads(run.stdout.strip().splitlines()[-1])
    assert limit == 400 * MiB
    assert by.startswith("cgroup")
    # the interpreter + pydantic + psutil use some tens of MiB of the 400
    assert 200 * MiB < free < 400 * MiB


# ------------------------------------------------------------------ training state


def test_training_state_of_a_module():
    torch = pytest.importorskip("torch")
    m = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    m[2].weight.requires_grad_(False)
    trainable = (10 * 5 + 5 + 5 + 5 + 2) * 4  # lin1 w+b, bn w+b, lin2 bias
    frozen = 5 * 2 * 4
    buffers = 5 * 4 * 2 + 8  # running mean, var, num_batches_tracked (int64)
    for opt, mult in (("sgd", 0), ("sgd-momentum", 1), ("adam", 2), ("adamw", 2)):
        s = B.training_state_bytes(m, opt)
        assert s.parameter_bytes == trainable + frozen
        assert s.buffer_bytes == buffers
        assert s.gradient_bytes == trainable
        assert s.optimizer_state_bytes == mult * trainable
        assert s.total_bytes == trainable + frozen + buffers + trainable * (1 + mult)
    assert B.training_state_bytes(m, "sgd", momentum=0.9).optimizer == "sgd-momentum"
    assert B.training_state_bytes(m, "sgd", momentum=0.0).optimizer == "sgd"


def test_training_state_bad_input():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'.*allowed"):
        B.training_state_bytes(100, "rmsprop")
    with pytest.raises(ValueError, match=">= 0"):
        B.training_state_bytes(-1)
    with pytest.raises(TypeError):
        B.training_state_bytes("big")


# ------------------------------------------------------------------ budget


def test_activation_budget_arithmetic():
    state = B.training_state_bytes(100 * MiB, "adam")  # 100 params + 100 grads + 200 adam
    b = B.activation_budget(state, free=2000 * MiB, safety_fraction=0.1, reserve_bytes=50 * MiB)
    assert b.safety_margin_bytes == 200 * MiB
    assert b.training_state_bytes == 400 * MiB
    assert b.activation_budget_bytes == (2000 - 200 - 400 - 50) * MiB
    # parameters already allocated when free was read: not subtracted twice
    b2 = B.activation_budget(
        state,
        free=2000 * MiB,
        safety_fraction=0.1,
        reserve_bytes=50 * MiB,
        state_resident_bytes=100 * MiB,
    )
    assert b2.activation_budget_bytes == b.activation_budget_bytes + 100 * MiB
    # the margin has a floor, the budget a floor of 0
    small = B.activation_budget(0, free=100 * MiB, safety_fraction=0.01)
    assert small.safety_margin_bytes == 32 * MiB
    assert B.activation_budget(state, free=300 * MiB).activation_budget_bytes == 0
    assert any("activations" in line for line in b.lines())


def test_activation_budget_reads_free_memory_and_rejects_bad_values():
    b = B.activation_budget(0)
    assert b.free_bytes > 0 and b.limited_by in ("system", "cgroup v1", "cgroup v2")
    with pytest.raises(ValueError, match="safety_fraction"):
        B.activation_budget(0, free=10, safety_fraction=1.5)
    with pytest.raises(ValueError, match="reserve_bytes"):
        B.activation_budget(0, free=10, reserve_bytes=-1)


def test_sizes_come_from_the_config_parser():
    assert B.parse_size("1.5GB") == 1_500_000_000
    assert B.parse_size("512MiB") == 512 * MiB
    assert B.parse_size(4096) == 4096


# ------------------------------------------------------------------ watcher


def test_budget_watcher_reports_moves_beyond_the_threshold():
    values = iter([1000, 1050, 950, 1200, 1190, 1000, 1000])
    now = [0.0]
    w = B.BudgetWatcher(threshold=0.1, reader=lambda: next(values), clock=lambda: now[0])
    assert w.reference_bytes == 1000
    assert w.poll() is None  # +5%
    assert w.poll() is None  # -5%
    ch = w.poll()  # +20%
    assert ch == B.BudgetChange(1000, 1200) and ch.fraction == pytest.approx(0.2)
    assert w.reference_bytes == 1200
    assert w.poll() is None  # 1190 vs 1200
    ch = w.poll()  # 1000 vs 1200: -16.7%
    assert ch is not None and ch.current_bytes == 1000


def test_budget_watcher_rate_limit_and_reset():
    reads = []

    def reader():
        reads.append(1)
        return 500 if len(reads) > 1 else 1000

    now = [0.0]
    w = B.BudgetWatcher(threshold=0.2, reader=reader, min_interval_s=5.0, clock=lambda: now[0])
    now[0] = 1.0
    assert w.poll() is None and len(reads) == 1  # too soon: not even read
    now[0] = 6.0
    assert w.poll() == B.BudgetChange(1000, 500)
    w.reset(2000)
    assert w.reference_bytes == 2000
    with pytest.raises(ValueError, match="threshold"):
        B.BudgetWatcher(threshold=0, reader=lambda: 1)


def test_budget_watcher_is_cheap():
    import time

    w = B.BudgetWatcher(threshold=0.5)
    t0 = time.perf_counter()
    for _ in range(200):
        w.poll()
    assert (time.perf_counter() - t0) / 200 < 0.005
