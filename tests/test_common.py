"""The bottom module's helpers: sizes told apart, the smallest trainable batch,
directories, progress only on a terminal."""

from __future__ import annotations

import io

import pytest

from waggle_trainer.common import (
    Progress,
    batch_too_small,
    format_sizes_apart,
    parse_size,
    progress_wanted,
    resnet_final_side,
    usable_directory,
)


@pytest.mark.parametrize(
    "a, b", [(734003, 734100), (2**20, 2**20 + 1), (10, 11), (5 * 2**30, 5 * 2**30 + 4096)]
)
def test_different_sizes_never_print_alike(a, b):
    fa, fb = format_sizes_apart(a, b)
    assert fa != fb


def test_equal_sizes_print_alike_and_briefly():
    assert format_sizes_apart(3 * 2**20, 3 * 2**20) == ("3.0MiB", "3.0MiB")


@pytest.mark.parametrize("value, expected", [("1PB", 10**15), ("2PiB", 2**51), ("1EB", 10**18)])
def test_large_units(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("image, side", [(32, 1), (33, 2), (64, 2), (65, 3), (224, 7)])
def test_resnet_final_side(image, side):
    assert resnet_final_side(image) == side


@pytest.mark.parametrize(
    "batch, image, ok", [(1, 32, False), (2, 32, True), (1, 33, True), (1, 224, True)]
)
def test_batch_too_small(batch, image, ok):
    why = batch_too_small(batch, image)
    assert (why is None) == ok
    if not ok:
        assert "BatchNorm" in why and "at least 2" in why


def test_batch_too_small_is_what_batchnorm_refuses():
    torch = pytest.importorskip("torch")
    from waggle_trainer.remat.chain import build_resnet

    model = build_resnet("resnet18", 10).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.randn(1, 3, 32, 32))
    model(torch.randn(1, 3, 33, 33))  # the smallest image batch 1 trains on


def test_usable_directory(tmp_path):
    assert usable_directory(tmp_path / "new", "--x") == tmp_path / "new"
    assert (tmp_path / "new").is_dir()
    with pytest.raises(ValueError, match="--x .*: not a directory"):
        (tmp_path / "file").write_text("")
        usable_directory(tmp_path / "file", "--x")
    with pytest.raises(ValueError, match="does not exist"):
        usable_directory(tmp_path / "a" / "b", "--x")
    assert not (tmp_path / "a").exists()
    assert usable_directory(tmp_path / "a" / "b", "cache", create_parents=True).is_dir()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_not_under_journald(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not progress_wanted(io.StringIO())
    tty = _Tty()
    assert progress_wanted(tty)
    bar = Progress("profiling", "stages", stream=tty)
    bar(3, 10)
    bar(10, 10)
    assert "profiling: 3/10 stages" in tty.getvalue() and tty.getvalue().endswith("\r\033[K")
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    quiet = _Tty()
    Progress("profiling", stream=quiet)(1, 2)
    assert quiet.getvalue() == ""
