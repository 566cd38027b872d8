"""[camera], [task] and [teacher] config: each mistake is one line naming the key."""

from __future__ import annotations

import pytest

from waggle_trainer.config import ConfigError, config_from_dict


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "node.toml")
    return info.value.lines()


def test_defaults_map_coco_ids_to_person_and_vehicle():
    cfg = config_from_dict({})
    assert cfg.task.classes == ["person", "vehicle"]
    assert cfg.task.teacher_ids() == {1: 0, 2: 1, 3: 1, 4: 1, 6: 1, 8: 1}
    assert cfg.teacher.model == "openpibo:ssd_mobilenet_v2_coco"


def test_class_map_accepts_names_and_defaults_coco_names_to_themselves():
    cfg = config_from_dict(
        {
            "task": {
                "classes": ["walker", "wheels"],
                "class_map": {"walker": ["person"], "wheels": ["bicycle", 4]},
            }
        }
    )
    assert cfg.task.class_map == {"walker": [1], "wheels": [2, 4]}
    cfg = config_from_dict({"task": {"classes": ["person", "car", "traffic light"]}})
    assert cfg.task.class_map == {"person": [1], "car": [3], "traffic light": [10]}


@pytest.mark.parametrize(
    "task, expected",
    [
        (
            {"class_map": {"person": [1], "vehicle": [3, 91]}},
            "task.class_map.vehicle: 91 is not a COCO category id (1..90 except 12, 26",
        ),
        (
            {"class_map": {"person": [1], "vehicle": [12]}},
            "task.class_map.vehicle: 12 is not a COCO category id",
        ),
        (
            {"class_map": {"person": [1, 3], "vehicle": [3]}},
            "task.class_map.vehicle: COCO id 3 (car) appears also in 'person' (each id belongs "
            "to one class)",
        ),
        (
            {"class_map": {"person": [1, 1], "vehicle": [3]}},
            "task.class_map.person: COCO id 1 (person) appears twice",
        ),
        (
            {"class_map": {"person": [], "vehicle": [3]}},
            "task.class_map.person: empty (give one or more ids)",
        ),
        ({"class_map": {"person": [1]}}, "task.class_map: no entry for class 'vehicle'"),
        (
            {"class_map": {"person": [1], "vehicle": [3], "bike": [2]}},
            "task.class_map.bike: not one of task.classes (person, vehicle)",
        ),
        (
            {"class_map": {"person": ["persn"], "vehicle": [3]}},
            "task.class_map.person: 'persn' is not a COCO category name",
        ),
        ({"classes": ["person", "blob"]}, "task.class_map: required: 'person' is not a COCO name"),
        ({"classes": []}, "task.classes: empty (name at least one class)"),
        ({"classes": ["a", "a"]}, "task.classes: 'a' appears twice"),
        (
            {"kind": "segment"},
            "task.kind: 'segment' is not allowed (one of 'detect' or 'classify')",
        ),
    ],
)
def test_task_errors(task, expected):
    lines = problems({"task": task})
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"node.toml: {expected}"), lines[0]


def test_classify_task_checks():
    ok = config_from_dict(
        {
            "task": {"kind": "classify", "classes": ["empty", "busy"]},
            "teacher": {"kind": "classifier", "model": "/w.safetensors"},
        }
    )
    assert ok.task.class_map == {}
    [line] = problems(
        {
            "task": {"kind": "classify", "classes": ["a", "b"], "class_map": {"a": [0], "b": [-1]}},
            "teacher": {"kind": "classifier"},
        }
    )
    assert line == (
        "node.toml: task.class_map.b: -1 is not a teacher output index (an integer >= 0)"
    )
    [line] = problems(
        {"task": {"kind": "classify", "classes": ["only"]}, "teacher": {"kind": "classifier"}}
    )
    assert "task.classes: a classify task needs at least 2 classes" in line


def test_teacher_kind_must_fit_the_task():
    [line] = problems({"teacher": {"kind": "classifier"}})
    assert line == (
        "node.toml: teacher.kind: 'classifier' cannot label task.kind = 'detect' (use 'detector')"
    )


@pytest.mark.parametrize(
    "teacher, expected",
    [
        (
            {"model": "openpibo:yolo"},
            "teacher.model: 'openpibo:yolo' is not a known packaged "
            "model (known: openpibo:ssd_mobilenet_v2_coco",
        ),
        ({"mean": [1, 2]}, "teacher.mean: [1.0, 2.0] must be three numbers"),
        ({"framework": "torch"}, "teacher.framework: 'torch' is not allowed"),
        ({"score_threshold": 1.5}, "teacher.score_threshold: 1.5 is out of range"),
        ({"swap_rb": "yes"}, "teacher.swap_rb: 'yes' is the wrong type"),
        ({"arch": "Res Net"}, "teacher.arch: 'Res Net' is not a torchvision architecture"),
    ],
)
def test_teacher_errors(teacher, expected):
    [line] = problems({"teacher": teacher})
    assert line.startswith(f"node.toml: {expected}"), line


@pytest.mark.parametrize(
    "camera, expected",
    [
        ({"frames": "10:5"}, "camera.frames: '10:5' is an empty frame range"),
        ({"frames": "a:b"}, "camera.frames: 'a:b' is not a frame range"),
        (
            {"source": "rtsp://cam/1", "frames": "0:10"},
            "camera.frames: applies to video files, image folders and synthetic frames, not to "
            "the live source 'rtsp://cam/1'",
        ),
        (
            {"reconnect_min_s": 5, "reconnect_max_s": 1},
            "camera.reconnect_max_s: 1.0 is below camera.reconnect_min_s (5.0)",
        ),
        ({"source": " "}, "camera.source: empty"),
        ({"fps": -1}, "camera.fps: -1 is out of range (must be >= 0"),
    ],
)
def test_camera_errors(camera, expected):
    [line] = problems({"camera": camera})
    assert line.startswith(f"node.toml: {expected}"), line


def test_frame_range_forms():
    assert config_from_dict({"camera": {"frames": "551:"}}).camera.frame_range == (551, None)
    assert config_from_dict({"camera": {"frames": ":10"}}).camera.frame_range == (0, 10)
    assert config_from_dict({}).camera.frame_range == (0, None)
