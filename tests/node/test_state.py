"""The state file: round trip, atomic replacement, a failed write keeps the old state."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from waggle_trainer.node import state as statemod
from waggle_trainer.node.state import NodeState, StateError, StateStore


def _state(round_: int) -> NodeState:
    s = NodeState(meta={"round": round_, "base_version": "v1", "history": [{"round": round_}]})
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3) + round_
    s.put_section("loop", {"student/w": w, "student/w_alias": w, "opt/0": torch.zeros(3)})
    s.put_section("base", {"w": torch.ones(2, 3)})
    return s


def test_round_trip_and_header_only_meta(tmp_path):
    store = StateStore(tmp_path)
    assert store.load() is None and store.read_meta() is None
    store.save(_state(3))
    got = store.load()
    assert got.meta["round"] == 3 and got.meta["format"] == statemod.STATE_FORMAT
    assert torch.equal(got.section("loop")["student/w"], _state(3).section("loop")["student/w"])
    assert torch.equal(got.section("base")["w"], torch.ones(2, 3))
    assert store.read_meta()["history"] == [{"round": 3}]


def test_failed_write_keeps_the_last_good_state(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    store.save(_state(1))

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(statemod, "save_file", full)
    with pytest.raises(OSError) as info:
        store.save(_state(2))
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == [statemod.FILE_NAME]
    assert store.load().meta["round"] == 1


def test_interrupted_write_leftovers_are_removed_on_load(tmp_path):
    store = StateStore(tmp_path)
    store.save(_state(1))
    (tmp_path / f".{statemod.FILE_NAME}.999.tmp").write_bytes(b"half a file")
    assert store.load().meta["round"] == 1
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "truncated"),
        (b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}       ', "not a waggle-trainer state file"),
        (b"\xff" * 8, "not plausible"),
    ],
)
def test_unusable_file_is_one_clear_error(tmp_path, content, message):
    (tmp_path / statemod.FILE_NAME).write_bytes(content)
    with pytest.raises(StateError, match=message):
        StateStore(tmp_path).load()


def test_unknown_format_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"x": torch.zeros(1)},
        str(tmp_path / statemod.FILE_NAME),
        metadata={statemod.META_KEY: json.dumps({"format": "other/9"})},
    )
    with pytest.raises(StateError, match="unknown state format 'other/9'"):
        StateStore(tmp_path).read_meta()


def test_set_aside_keeps_the_bad_file_for_a_human(tmp_path):
    (tmp_path / statemod.FILE_NAME).write_bytes(b"junk")
    moved = StateStore(tmp_path).set_aside()
    assert moved.exists() and not (tmp_path / statemod.FILE_NAME).exists()
