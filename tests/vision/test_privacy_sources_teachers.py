"""Images stay in RAM: the guard and the scan catch what they must, and the sources,
preprocessing and teachers run under them without writing an image anywhere."""

from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.privacy import ImagesStayInRam, PrivacyViolation, scan_bytes, scan_for_images
from tests.reference_teacher import reference_teacher
from waggle_trainer.config import CameraSection
from waggle_trainer.vision.frames import open_source
from waggle_trainer.vision.preprocess import prepare_batch

H, W = 48, 64


def street(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


# ------------------------------------------------------- the guard catches writes


def test_guard_refuses_writes_outside_the_allowed_directory(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(AssertionError, match="images left RAM"):
        with ImagesStayInRam([state]) as guard:
            (state / "ok.json").write_text("{}")  # allowed
            with pytest.raises(PrivacyViolation):
                open(tmp_path / "leak.bin", "wb")
            with pytest.raises(PrivacyViolation):
                os.open(tmp_path / "leak2", os.O_WRONLY | os.O_CREAT)
            with pytest.raises(PrivacyViolation):
                os.replace(state / "ok.json", tmp_path / "moved.json")
            with pytest.raises(PrivacyViolation):
                cv2.imwrite(str(state / "frame.jpg"), street())  # even inside state/
            with pytest.raises(PrivacyViolation):
                cv2.VideoWriter(str(state / "clip.avi"), 0, 10.0, (W, H))
            with pytest.raises(PrivacyViolation):
                torch.save({"x": torch.zeros(1)}, tmp_path / "x.pt")  # C++ file writer
            torch.save({"x": torch.zeros(1)}, state / "x.pt")  # allowed
    assert len(guard.violations) == 6
    assert not (tmp_path / "leak.bin").exists()
    # the writers are restored afterwards
    assert cv2.imwrite(str(tmp_path / "after.png"), street())


def test_scan_finds_encoded_and_raw_images(tmp_path):
    img = street()
    ok, jpg = cv2.imencode(".jpg", img)
    ok2, png = cv2.imencode(".png", img)
    (tmp_path / "a.bin").write_bytes(b"header" + jpg.tobytes())
    (tmp_path / "b.log").write_bytes(b"x" * 10 + png.tobytes())
    (tmp_path / "c.raw").write_bytes(img.tobytes())
    tensor = (img.astype(np.float32) / 255).transpose(2, 0, 1)[None]
    save_file(
        {"batch": torch.from_numpy(np.ascontiguousarray(tensor))}, str(tmp_path / "d.safetensors")
    )
    np.save(tmp_path / "e.npy", img[None])
    (tmp_path / "f.bin").write_bytes(b"0" * 7 + img[5:25].tobytes() + b"1" * 5)  # a strip
    findings = scan_for_images(tmp_path, frames=[img])
    text = "\n".join(findings)
    for name in ("a.bin", "b.log", "c.raw", "d.safetensors", "e.npy", "f.bin"):
        assert name in text, f"{name} not found:\n{text}"
    assert "JPEG (JFIF) signature" in text and "PNG signature" in text
    assert "safetensors tensor 'batch' of shape [1, 3, 48, 64]" in text


def test_scan_passes_clean_state(tmp_path):
    torch.manual_seed(0)
    weights = {"w": torch.randn(256, 512), "b": torch.randn(3, 3, 3)}  # not frame-shaped
    save_file(weights, str(tmp_path / "student.safetensors"))
    (tmp_path / "meta.json").write_text('{"round": 3, "agreement": 0.71}')
    assert scan_for_images(tmp_path, frames=[street(), street(1)]) == []
    assert scan_bytes(b"INFO round 3 accepted", "log", frames=[street()]) == []
    assert scan_bytes(b"data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ", "log") != []


# ------------------------------------------- product code under the guard


def test_sources_preprocessing_and_teacher_keep_images_in_ram(tmp_path, caplog):
    # fixtures written before the guard starts (writing test data is fine)
    video = tmp_path / "clip.avi"
    out = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (W, H))
    for i in range(12):
        out.write(street(i))
    out.release()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.png"), street(100 + i))
    state = tmp_path / "state"
    state.mkdir()
    teacher = None
    try:
        teacher = reference_teacher()  # loaded (file reads only) before the guard
    except pytest.skip.Exception:
        pass

    seen = []
    caplog.set_level(logging.DEBUG)
    with ImagesStayInRam([state]):
        for source in (str(video), str(folder), "synthetic", "/dev/video97"):
            try:
                src = open_source(
                    CameraSection(
                        source=source,
                        fps=0,
                        width=W,
                        height=H,
                        frames="0:6" if not source.startswith("/dev") else None,
                    )
                )
            except Exception as exc:  # noqa: BLE001 (the missing device: its error is logged)
                logging.getLogger("test").warning("%s", exc)
                continue
            with src:
                frames = [f.image for f in src]
            seen += frames
            batch, _ = prepare_batch(frames, (32, 32))
            if teacher is not None:
                teacher.label(frames[:2])
            del batch
    assert len(seen) == 16
    assert scan_for_images(state, frames=seen) == []
    assert scan_bytes(caplog.text.encode(), "log", frames=seen) == []
    if teacher is None:
        pytest.skip(
            "sources and preprocessing passed; the reference teacher (demo extra) "
            "is not installed, so it was not run under the guard"
        )
