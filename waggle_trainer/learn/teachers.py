"""Teachers: frozen models that label frames, loaded from local files only.

One small interface, :class:`Teacher`: ``label(images)`` takes RGB uint8 frames and
returns one label per frame, in the task's classes (``[task] classes``):

- :class:`DnnDetectorTeacher` (``kind = "detect"``): a detector run by OpenCV's DNN
  module (TensorFlow ``.pb`` + ``.pbtxt``, ONNX, TFLite; Caffe and Darknet where the
  installed OpenCV still reads them) whose output is the SSD detection layout,
  rows ``[image, class id, score, x1, y1, x2, y2]`` with coordinates in 0..1.  Teacher
  class ids are mapped to task classes by ``[task] class_map``; boxes under
  ``score_threshold`` or of unmapped classes are dropped, then non-maximum
  suppression runs within each task class (a car and a truck box on one vehicle
  become one ``vehicle``).  Labels are :class:`Detections` in the frame's pixels.
  With ``tiles`` >= 2 the detector also looks at an n x n grid of overlapping
  crops (:func:`tile_grid`): small people the squeezed whole frame misses are found
  there; a tile's box on an inner tile edge (a person the crop cuts) is dropped, and
  all looks are merged by per-class NMS (:func:`merge_looks`).  Boxes scoring in
  ``[ignore_threshold, score_threshold)`` become ignore regions (``ignore_boxes``),
  where the student is neither rewarded nor punished.
- :class:`ClassifierTeacher` (``kind = "classify"``): a torchvision architecture with
  weights from a safetensors file or a state dict (``torch.load(weights_only=True)``);
  labels are :class:`SoftLabels`, ``softmax(logits / temperature)``, summed over the
  outputs that ``class_map`` groups into each task class.

``load_teacher(cfg)`` builds the one the config names; every problem with the files
is a :class:`TeacherError` of one line that names the key and the file.
"""

from __future__ import annotations

import logging
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from waggle_trainer.learn.agreement import iou_matrix
from waggle_trainer.learn.model_refs import ModelRefError, is_ref, resolve_ref
from waggle_trainer.vision.opencv_log import opencv_errors_only
from waggle_trainer.vision.preprocess import center_crop, normalize

if TYPE_CHECKING:
    import torch

    from waggle_trainer.config import Config, TeacherSection

log = logging.getLogger(__name__)


class TeacherError(Exception):
    """A teacher that cannot be loaded (one line: which key, which file, why)."""


def _no_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


def _no_classes() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclass(eq=False)
class Detections:
    """Boxes of one frame: ``boxes`` float32 [N, 4] x1, y1, x2, y2 in the frame's pixels,
    ``scores`` float32 [N], ``classes`` int64 [N] indices into the task's classes;
    highest score first.  ``ignore_boxes`` float32 [K, 4] and ``ignore_classes`` int64
    [K]: regions where the label is uncertain (neither object nor background);
    empty by default."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    ignore_boxes: np.ndarray = field(default_factory=_no_boxes)
    ignore_classes: np.ndarray = field(default_factory=_no_classes)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(eq=False)
class SoftLabels:
    """Class probabilities of one frame: ``probs`` float32 [C], summing to 1."""

    probs: np.ndarray


Labels = Detections | SoftLabels


class Teacher(ABC):
    """A frozen model that labels frames (see the module docstring)."""

    #: "detect" or "classify", as ``[task] kind``
    kind: str
    #: the task's class names; label class indices point into this list
    classes: list[str]
    #: what model this is, for logs
    description: str

    @property
    def calls_per_label(self) -> int:
        """Teacher cost of one label, in equivalent whole-frame network calls."""
        return 1

    @abstractmethod
    def label(self, images: list[np.ndarray]) -> list[Any]:
        """One label per RGB uint8 HxWx3 image: Detections or SoftLabels."""


# -------------------------------------------------------------------- detector


def _decode_rows(
    raw: np.ndarray, width: int, height: int, class_ids: dict[int, int], min_score: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, scores, task classes) of the SSD rows scoring >= ``min_score`` whose
    class is mapped, boxes in pixels of a ``width`` x ``height`` image; no NMS."""
    rows = np.asarray(raw, dtype=np.float32).reshape(-1, 7)
    rows = rows[rows[:, 2] >= min_score]
    ids = rows[:, 1].astype(np.int64)
    mapped = np.array([class_ids.get(int(i), -1) for i in ids], dtype=np.int64)
    keep = mapped >= 0
    rows, mapped = rows[keep], mapped[keep]
    boxes = np.clip(
        rows[:, 3:7] * np.array([width, height, width, height], np.float32),
        0,
        [width, height, width, height],
    ).astype(np.float32)
    area_ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[area_ok], rows[area_ok, 2].astype(np.float32), mapped[area_ok]


def _nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by per-class NMS (cv2.dnn), highest score first."""
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    kept = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), classes.tolist(), 0.0, iou)
    idx = np.asarray(kept, dtype=np.int64).reshape(-1)
    return idx[np.argsort(-scores[idx], kind="stable")]


def decode_detections(
    raw: np.ndarray,
    width: int,
    height: int,
    class_ids: dict[int, int],
    score_threshold: float,
    nms_threshold: float,
) -> Detections:
    """SSD detection output of one image -> task-class :class:`Detections`.

    ``raw``: rows ``[image, class id, score, x1, y1, x2, y2]`` (any leading shape),
    coordinates in 0..1; ``class_ids``: teacher class id -> task class index.
    """
    boxes, scores, classes = _decode_rows(raw, width, height, class_ids, score_threshold)
    idx = _nms(boxes, scores, classes, nms_threshold)
    if len(idx) == 0:
        return Detections.empty()
    return Detections(boxes[idx], scores[idx], classes[idx])


def tile_grid(width: int, height: int, tiles: int, size: float) -> list[tuple[int, int, int, int]]:
    """``tiles`` x ``tiles`` crops (x1, y1, x2, y2) of a ``width`` x ``height`` frame,
    each ``size`` of the frame's width and height, spread evenly from edge to edge
    (they overlap when ``tiles * size > 1``); row by row.  ``tiles`` 1: the frame."""
    if tiles < 1 or not 0 < size <= 1:
        raise ValueError(f"tile_grid: tiles {tiles} must be >= 1 and size {size} in (0, 1]")
    if tiles == 1:
        return [(0, 0, width, height)]
    tw, th = max(1, round(width * size)), max(1, round(height * size))
    xs = [round(i * (width - tw) / (tiles - 1)) for i in range(tiles)]
    ys = [round(j * (height - th) / (tiles - 1)) for j in range(tiles)]
    return [(x, y, x + tw, y + th) for y in ys for x in xs]


def on_inner_edge(
    boxes: np.ndarray, tile: tuple[int, int, int, int], width: int, height: int, margin: float = 2.0
) -> np.ndarray:
    """Bool [N]: which boxes (frame pixels) come within ``margin`` pixels of an edge of
    ``tile`` that is not the frame's border (an object the crop cuts)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    x1, y1, x2, y2 = tile
    cut = np.zeros(len(b), bool)
    if x1 > 0:
        cut |= b[:, 0] <= x1 + margin
    if y1 > 0:
        cut |= b[:, 1] <= y1 + margin
    if x2 < width:
        cut |= b[:, 2] >= x2 - margin
    if y2 < height:
        cut |= b[:, 3] >= y2 - margin
    return cut


def merge_looks(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    *,
    score_threshold: float,
    ignore_threshold: float,
    nms_threshold: float,
) -> Detections:
    """One frame's :class:`Detections` from the boxes of all looks (frame pixels):
    boxes scoring >= ``score_threshold`` merged by per-class NMS; those scoring in
    ``[ignore_threshold, score_threshold)`` merged likewise into ignore regions,
    except where a kept box of the same class overlaps them at IoU >= 0.5."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    classes = np.asarray(classes, np.int64).reshape(-1)
    sure = scores >= score_threshold
    unsure = ~sure & (scores >= ignore_threshold)
    b, s, c = boxes[sure], scores[sure], classes[sure]
    idx = _nms(b, s, c, nms_threshold)
    b, s, c = b[idx], s[idx], c[idx]
    ub, us, uc = boxes[unsure], scores[unsure], classes[unsure]
    uidx = _nms(ub, us, uc, nms_threshold)
    ub, uc = ub[uidx], uc[uidx]
    if len(ub) and len(b):
        covered = (iou_matrix(ub, b) >= 0.5) & (uc[:, None] == c[None, :])
        ub, uc = ub[~covered.any(axis=1)], uc[~covered.any(axis=1)]
    return Detections(b, s, c, ub.astype(np.float32), uc.astype(np.int64))


_FRAMEWORK_BY_SUFFIX = {
    ".pb": "tensorflow",
    ".onnx": "onnx",
    ".tflite": "tflite",
    ".caffemodel": "caffe",
    ".weights": "darknet",
}
_FRAMEWORK_NAMES = {
    "tensorflow": "TensorFlow",
    "onnx": "ONNX",
    "tflite": "TFLite",
    "caffe": "Caffe",
    "darknet": "Darknet",
}


def _cv_reason(exc: cv2.error) -> str:
    """The informative part of an OpenCV error, on one line."""
    text = " ".join(str(exc).split())
    m = re.search(r"error: \([-0-9:A-Za-z ]+\) (.*?)( in function '.*')?$", text)
    reason = m.group(1) if m else text
    return reason[:200]


def _read_net(model: Path, config: Path | None, framework: str) -> Any:
    name = _FRAMEWORK_NAMES[framework]
    # Caffe and Darknet readers exist in OpenCV 4.x only (OpenCV 5 removed them)
    fn = {"caffe": "readNetFromCaffe", "darknet": "readNetFromDarknet"}.get(framework, "")
    readers = {
        "tensorflow": lambda: cv2.dnn.readNetFromTensorflow(str(model), str(config or "")),
        "onnx": lambda: cv2.dnn.readNetFromONNX(str(model)),
        "tflite": lambda: cv2.dnn.readNetFromTFLite(str(model)),
        "caffe": lambda: getattr(cv2.dnn, fn)(str(config), str(model)),
        "darknet": lambda: getattr(cv2.dnn, fn)(str(config), str(model)),
    }
    if fn and not hasattr(cv2.dnn, fn):
        raise TeacherError(
            f"teacher.framework: OpenCV {cv2.__version__} cannot read {name} models "
            "(OpenCV 5 dropped that importer; convert the model to ONNX, or use OpenCV 4.x)"
        )
    if framework in ("caffe", "darknet") and config is None:
        raise TeacherError(
            f"teacher.config: a {name} model needs its network description "
            f"({'.prototxt' if framework == 'caffe' else '.cfg'})"
        )
    try:
        with opencv_errors_only():  # OpenCV's warnings would repeat our error
            net = readers[framework]()
    except cv2.error as exc:
        raise TeacherError(
            f"teacher.model {str(model)!r}: cannot be read as a {name} model ({_cv_reason(exc)})"
        ) from None
    if net is None or net.empty():
        raise TeacherError(f"teacher.model {str(model)!r}: OpenCV read an empty {name} network")
    return net


class DnnDetectorTeacher(Teacher):
    """A detector run by ``cv2.dnn`` (see the module docstring)."""

    kind = "detect"

    def __init__(
        self,
        net: Any,
        classes: list[str],
        class_ids: dict[int, int],
        *,
        input_size: tuple[int, int] = (300, 300),
        swap_rb: bool = True,
        scale: float = 1.0,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        score_threshold: float = 0.5,
        nms_threshold: float = 0.5,
        ignore_threshold: float | None = None,
        tiles: int = 1,
        tile_size: float = 0.6,
        description: str = "OpenCV DNN detector",
    ) -> None:
        """``ignore_threshold`` None: no ignore regions; ``tiles`` 1: whole frame only."""
        self.net = net
        self.classes = list(classes)
        self.class_ids = dict(class_ids)
        self.input_size = input_size
        # Frames are RGB; ``swap_rb`` says (as OpenCV's docs for BGR images) that the
        # network wants RGB: then nothing is swapped here, else RGB becomes BGR.
        self._swap = not swap_rb
        self._mean = tuple(mean) if swap_rb else tuple(reversed(mean))
        self.scale = scale
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.ignore_threshold = score_threshold if ignore_threshold is None else ignore_threshold
        if self.ignore_threshold > score_threshold:
            raise ValueError(
                f"ignore_threshold {self.ignore_threshold} is above score_threshold "
                f"{score_threshold}"
            )
        tile_grid(1, 1, tiles, tile_size)  # checks both
        self.tiles = tiles
        self.tile_size = tile_size
        self.description = description

    @property
    def calls_per_label(self) -> int:
        return 1 + self.tiles * self.tiles if self.tiles >= 2 else 1

    def raw(self, image: np.ndarray) -> np.ndarray:
        """The network's output for one RGB frame."""
        blob = cv2.dnn.blobFromImage(
            image,
            scalefactor=self.scale,
            size=self.input_size,
            mean=self._mean,
            swapRB=self._swap,
            crop=False,
        )
        self.net.setInput(blob)
        return self.net.forward()

    def check_output(self) -> None:
        """Run once on a grey frame: the output must have the SSD detection layout."""
        probe = np.full((self.input_size[1], self.input_size[0], 3), 127, np.uint8)
        try:
            out = self.raw(probe)
        except cv2.error as exc:
            raise TeacherError(
                f"teacher.model: {self.description} fails on a test frame "
                f"({_cv_reason(exc)}); check input_width/input_height"
            ) from None
        if out.ndim != 4 or out.shape[-1] != 7:
            raise TeacherError(
                f"teacher.model: {self.description} outputs shape {tuple(out.shape)}, not the "
                "detection layout [1, 1, N, 7] (image, class id, score, x1, y1, x2, y2)"
            )

    def label(self, images: list[np.ndarray]) -> list[Any]:
        return [self.label_one(img) for img in images]

    def label_one(self, image: np.ndarray) -> Detections:
        """The whole frame, then each tile (``tiles`` >= 2), merged (module docstring)."""
        h, w = image.shape[:2]
        low = min(self.ignore_threshold, self.score_threshold)
        looks = [(0, 0, w, h)] + (
            tile_grid(w, h, self.tiles, self.tile_size) if self.tiles >= 2 else []
        )
        found = []
        for i, (x1, y1, x2, y2) in enumerate(looks):
            crop = image if i == 0 else np.ascontiguousarray(image[y1:y2, x1:x2])
            b, s, c = _decode_rows(self.raw(crop), x2 - x1, y2 - y1, self.class_ids, low)
            b = b + np.array([x1, y1, x1, y1], np.float32)
            if i > 0:
                keep = ~on_inner_edge(b, (x1, y1, x2, y2), w, h)
                b, s, c = b[keep], s[keep], c[keep]
            found.append((b, s, c))
        return merge_looks(
            np.concatenate([f[0] for f in found]),
            np.concatenate([f[1] for f in found]),
            np.concatenate([f[2] for f in found]),
            score_threshold=self.score_threshold,
            ignore_threshold=self.ignore_threshold,
            nms_threshold=self.nms_threshold,
        )


def _model_files(t: TeacherSection) -> tuple[Path, Path | None, str, str]:
    """(model, config, framework, description) of the detector the section names."""
    if is_ref(t.model):
        try:
            entry, model, config = resolve_ref(t.model)
        except ModelRefError as exc:
            raise TeacherError(f"teacher.model: {exc}") from None
        if t.config is not None:
            raise TeacherError(
                f"teacher.config: not used with the packaged model {t.model!r} "
                "(it brings its own); remove it"
            )
        return model, config, entry.framework, f"{t.model} ({entry.about})"
    model = Path(t.model).expanduser()
    if not model.is_file():
        what = "is a folder" if model.is_dir() else "no such file"
        raise TeacherError(f"teacher.model {t.model!r}: {what} (give the model file)")
    config = t.config.expanduser() if t.config is not None else None
    if config is not None and not config.is_file():
        raise TeacherError(f"teacher.config {str(t.config)!r}: no such file")
    framework: str = t.framework
    if framework == "auto":
        framework = _FRAMEWORK_BY_SUFFIX.get(model.suffix.lower(), "")
        if not framework:
            raise TeacherError(
                f"teacher.framework: cannot tell the framework of {model.name} from its "
                f"name (set framework to one of {', '.join(_FRAMEWORK_NAMES)})"
            )
    return model, config, framework, f"{model.name} ({_FRAMEWORK_NAMES[framework]})"


def load_detector(cfg: Config) -> DnnDetectorTeacher:
    t = cfg.teacher
    model, config, framework, description = _model_files(t)
    net = _read_net(model, config, framework)
    teacher = DnnDetectorTeacher(
        net,
        cfg.task.classes,
        cfg.task.teacher_ids(),
        input_size=(t.input_width, t.input_height),
        swap_rb=t.swap_rb,
        scale=t.scale,
        mean=(t.mean[0], t.mean[1], t.mean[2]),
        score_threshold=t.score_threshold,
        nms_threshold=t.nms_threshold,
        ignore_threshold=t.ignore_threshold,
        tiles=t.tiles,
        tile_size=t.tile_size,
        description=description,
    )
    teacher.check_output()
    return teacher


# ------------------------------------------------------------------- classifier


class ClassifierTeacher(Teacher):
    """A torchvision classifier giving soft labels (see the module docstring)."""

    kind = "classify"

    def __init__(
        self,
        model: torch.nn.Module,
        classes: list[str],
        groups: list[list[int]] | None,
        *,
        input_size: tuple[int, int] = (224, 224),
        temperature: float = 1.0,
        description: str = "torchvision classifier",
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.classes = list(classes)
        self.groups = groups
        self.input_size = input_size
        self.temperature = temperature
        self.description = description

    def label(self, images: list[np.ndarray]) -> list[Any]:
        import torch

        if not images:
            return []
        batch = normalize([center_crop(img, self.input_size)[0] for img in images])
        with torch.no_grad():
            logits = self.model(torch.from_numpy(batch))
            probs = torch.softmax(logits.float() / self.temperature, dim=1)
            if self.groups is not None:
                probs = torch.stack([probs[:, g].sum(dim=1) for g in self.groups], dim=1)
                probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return [SoftLabels(p.numpy().astype(np.float32)) for p in probs]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    where = f"teacher.model {str(path)!r}"
    if not path.is_file():
        raise TeacherError(
            f"{where}: {'is a folder' if path.is_dir() else 'no such file'} "
            "(give a .safetensors file or a state dict)"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:160]
            raise TeacherError(f"{where}: not a readable safetensors file ({reason})") from None
    try:
        with warnings.catch_warnings():  # our own error below says what matters
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (pickle, zip and torch errors alike)
        text = " ".join(str(exc).split())
        m = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
        reason = (
            f"refused by the weights-only unpickler: {m.group(1)[:120]}; a pickle that holds "
            "more than tensors could run code"
            if m
            else f"{type(exc).__name__}: {text[:160]}"
        )
        raise TeacherError(
            f"{where}: not a state dict that torch.load(weights_only=True) can read ({reason})"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise TeacherError(
            f"{where}: holds a {type(obj).__name__}, not a state dict "
            "(a mapping of parameter names to tensors)"
        )
    return obj


def _final_linear(model: torch.nn.Module) -> str:
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return names[-1] if names else ""


def load_classifier(cfg: Config) -> ClassifierTeacher:
    import torch
    import torchvision

    t = cfg.teacher
    if is_ref(t.model):
        raise TeacherError(
            f"teacher.model: {t.model!r} is a packaged detector; a classifier "
            "teacher needs a .safetensors file or a state dict"
        )
    try:
        builder = torchvision.models.get_model_builder(t.arch)
    except ValueError:
        known = torchvision.models.list_models(module=torchvision.models)
        raise TeacherError(
            f"teacher.arch: {t.arch!r} is not a torchvision classification "
            f"model (e.g. {', '.join(known[:8])}, ...)"
        ) from None
    state = _read_state_dict(Path(t.model).expanduser())
    model = builder(weights=None)
    head = f"{_final_linear(model)}.weight"
    n_out = state[head].shape[0] if head in state else None
    if n_out is not None and n_out != model.state_dict()[head].shape[0]:
        model = builder(weights=None, num_classes=n_out)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        found = (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong))
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in found if v]
        raise TeacherError(
            f"teacher.model {t.model!r}: does not fit teacher.arch {t.arch!r}: "
            f"tensors {', '.join(parts)}"
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    if n_out is None:
        with torch.no_grad():
            n_out = int(model(torch.zeros(1, 3, 64, 64)).shape[1])
    groups: list[list[int]] | None = None
    if cfg.task.class_map:
        groups = [list(map(int, cfg.task.class_map[c])) for c in cfg.task.classes]
        for name, ids in zip(cfg.task.classes, groups, strict=True):
            bad = [i for i in ids if i >= n_out]
            if bad:
                raise TeacherError(
                    f"task.class_map.{name}: output {bad[0]} does not exist "
                    f"(the teacher has {n_out} outputs, 0..{n_out - 1})"
                )
    elif n_out != len(cfg.task.classes):
        raise TeacherError(
            f"teacher.model {t.model!r}: has {n_out} outputs but task.classes names "
            f"{len(cfg.task.classes)} (set task.class_map to group the outputs into classes)"
        )
    return ClassifierTeacher(
        model,
        cfg.task.classes,
        groups,
        input_size=(t.input_width, t.input_height),
        temperature=t.temperature,
        description=f"{t.arch} from {Path(t.model).name}",
    )


# ---------------------------------------------------------------------- loading


def load_teacher(cfg: Config) -> Teacher:
    """The teacher ``[teacher]`` and ``[task]`` describe; TeacherError (one line) when
    its files are missing, unreadable or do not fit the task."""
    if cfg.teacher.threads:
        cv2.setNumThreads(cfg.teacher.threads)
    teacher: Teacher
    if cfg.teacher.kind == "detector":
        teacher = load_detector(cfg)
    else:
        teacher = load_classifier(cfg)
    log.info("teacher: %s, classes %s", teacher.description, ", ".join(teacher.classes))
    return teacher
