"""The node config file: typed, strict, with every problem reported at once.

A TOML file with the sections below; every key is optional and has a default, so an
empty file (or no file: ``default_config()``) is a valid configuration that needs no
camera, broker or weights.  Unknown sections and keys are errors: a typo must never
be silently ignored.  ``deploy/node.example.toml`` documents every key.

Sizes accept integers (bytes) or strings such as ``"1.5GB"`` (decimal units) and
``"512MiB"`` (binary units).

Node identity: ``[node] id`` / ``vsn`` default to ``/etc/waggle/node-id`` (or
``node_id``) and ``/etc/waggle/vsn``; the environment variables ``WAGGLE_NODE_ID`` /
``WAGGLE_NODE_VSN`` override both the file and the config.
"""

from __future__ import annotations

import codecs
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from waggle_trainer.common import (
    CLASSES_MIN,
    IMAGE_SIZE_MAX,
    IMAGE_SIZE_MIN,
    SIZE_HELP,
    WAGGLE_ETC,
    Arch,
    LogLevel,
    OptimizerName,
    Strategy,
    batch_too_small,
    format_size,
    parse_budget,
    parse_size,
)
from waggle_trainer.learn.model_refs import PACKAGED_MODELS, is_ref
from waggle_trainer.remat.allocator import DEFAULT_ALLOCATOR, AllocatorName
from waggle_trainer.transport.wire import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    MODEL_EXCHANGE,
    NODE_EXCHANGE,
    TELEMETRY_EXCHANGE,
    UPDATE_EXCHANGE,
)
from waggle_trainer.vision.coco import COCO_IDS, COCO_NAMES, coco_id
from waggle_trainer.vision.source_spec import is_live_source, parse_frame_range

# --------------------------------------------------------------------------- sizes


def _size(v: Any) -> int:
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError(f"{v!r} is not a size ({SIZE_HELP})") from None


Size = Annotated[int, BeforeValidator(_size)]


def _chunk_size(v: int) -> int:
    if not MIN_CHUNK_SIZE <= v <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"{format_size(v)} is out of range ({format_size(MIN_CHUNK_SIZE)}.."
            f"{format_size(MAX_CHUNK_SIZE)}: RabbitMQ refuses messages over 16MiB)"
        )
    return v


#: A message size the broker takes (updates and models travel in chunks of it).
ChunkSize = Annotated[Size, AfterValidator(_chunk_size)]


Budget = Annotated[int | Literal["auto"], BeforeValidator(parse_budget)]

# ------------------------------------------------------------------------ sections


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_default=True, frozen=True, allow_inf_nan=False
    )


def _read_first(*paths: Path) -> str | None:
    for p in paths:
        try:
            text = p.read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class NodeSection(_Section):
    id: str | None = Field(None, description="node id; default /etc/waggle/node-id")
    vsn: str | None = Field(None, description="node VSN; default /etc/waggle/vsn")
    log_level: LogLevel = "info"

    @field_validator("id", "vsn")
    @classmethod
    def _ident(cls, v: str | None) -> str | None:
        if v is not None and not _ID_RE.match(v):
            raise ValueError(f"{v!r} is not an identifier (1-64 of A-Z a-z 0-9 _ -)")
        return v


class CameraSection(_Section):
    source: str = Field(
        "synthetic",
        description='"synthetic" (generated moving shapes), a device (/dev/videoN, '
        "/dev/waggle_cam_top, or an index), an rtsp:// or http:// URL, a video file "
        "or an image folder",
    )
    width: int = Field(640, ge=16, le=8192)
    height: int = Field(480, ge=16, le=8192)
    fps: float = Field(1.0, ge=0, le=120)
    loop: StrictBool = False
    frames: str | None = None
    reconnect_min_s: float = Field(0.5, gt=0, le=60)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)
    timeout_s: float = Field(10.0, gt=0, le=300)

    @field_validator("source")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('empty (give a device, URL, video file, image folder or "synthetic")')
        return v

    @field_validator("frames")
    @classmethod
    def _range(cls, v: str | None) -> str | None:
        if v is not None:
            parse_frame_range(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CameraSection:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"camera.reconnect_max_s: {self.reconnect_max_s} is below "
                f"camera.reconnect_min_s ({self.reconnect_min_s})"
            )
        if self.frames is not None and is_live_source(self.source):
            raise ValueError(
                f"camera.frames: applies to video files, image folders and synthetic "
                f"frames, not to the live source {self.source!r}"
            )
        return self

    @property
    def frame_range(self) -> tuple[int, int | None]:
        """(first frame, stop frame or None) of ``frames``; (0, None) when unset."""
        return parse_frame_range(self.frames) if self.frames is not None else (0, None)


TeacherKind = Literal["detector", "classifier"]
Framework = Literal["auto", "tensorflow", "onnx", "tflite", "caffe", "darknet"]
DEFAULT_TEACHER_MODEL = "openpibo:ssd_mobilenet_v2_coco"


class TeacherSection(_Section):
    kind: TeacherKind = "detector"
    model: str = DEFAULT_TEACHER_MODEL
    config: Path | None = None
    framework: Framework = "auto"
    arch: str = "resnet50"
    input_width: int = Field(300, ge=16, le=4096)
    input_height: int = Field(300, ge=16, le=4096)
    swap_rb: StrictBool = True
    scale: float = Field(1.0, gt=0)
    mean: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    score_threshold: float = Field(0.5, ge=0, le=1)
    ignore_threshold: float = Field(0.3, ge=0, le=1)
    nms_threshold: float = Field(0.5, gt=0, le=1)
    tiles: int = Field(2, ge=1, le=4)
    tile_size: float = Field(0.6, gt=0, le=1)
    temperature: float = Field(2.0, gt=0, le=100)
    threads: int = Field(0, ge=0, le=256)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(
                f"empty (give a model file or a packaged model such as {DEFAULT_TEACHER_MODEL!r})"
            )
        if is_ref(v) and v not in PACKAGED_MODELS:
            raise ValueError(
                f"{v!r} is not a known packaged model "
                f"(known: {', '.join(PACKAGED_MODELS)}; or give a file path)"
            )
        return v

    @field_validator("mean")
    @classmethod
    def _three(cls, v: list[float]) -> list[float]:
        if len(v) != 3:
            raise ValueError(f"{v!r} must be three numbers (one per channel, R G B)")
        return v

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", v):
            raise ValueError(f"{v!r} is not a torchvision architecture name (e.g. resnet50)")
        return v

    @model_validator(mode="after")
    def _ignore_below_score(self) -> TeacherSection:
        if self.ignore_threshold > self.score_threshold:
            raise ValueError(
                f"teacher.ignore_threshold: {self.ignore_threshold} is above "
                f"teacher.score_threshold ({self.score_threshold}); boxes scoring between "
                "the two are ignore regions (make them equal for none)"
            )
        return self


TaskKind = Literal["detect", "classify"]
DEFAULT_CLASSES_MAP: dict[str, list[int | str]] = {"person": [1], "vehicle": [2, 3, 4, 6, 8]}
_CLASS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_ .-]{0,63}$")


class TaskSection(_Section):
    kind: TaskKind = "detect"
    classes: list[str] = Field(default_factory=lambda: list(DEFAULT_CLASSES_MAP))
    class_map: dict[str, list[int | str]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_map(cls, data: Any) -> Any:
        """Without a class_map, a detect task maps each class that is a COCO name to its
        id (the default classes to the default table); a classify task takes the
        teacher's outputs as its classes, in order."""
        if not isinstance(data, dict) or "class_map" in data:
            return data
        kind = data.get("kind", "detect")
        classes = data.get("classes")
        if kind != "detect" or not isinstance(classes, list) and classes is not None:
            return data
        if classes is None or classes == list(DEFAULT_CLASSES_MAP):
            return {**data, "class_map": {k: list(v) for k, v in DEFAULT_CLASSES_MAP.items()}}
        if all(isinstance(c, str) and c in COCO_IDS for c in classes):
            return {**data, "class_map": {c: [COCO_IDS[c]] for c in classes}}
        return data

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("empty (name at least one class)")
        seen: set[str] = set()
        for name in v:
            if not _CLASS_RE.match(name):
                raise ValueError(f"{name!r} is not a class name (1-64 of A-Z a-z 0-9 _ - . space)")
            if name in seen:
                raise ValueError(f"{name!r} appears twice")
            seen.add(name)
        return v

    @model_validator(mode="after")
    def _check_map(self) -> TaskSection:
        if self.kind == "classify":
            if len(self.classes) < CLASSES_MIN:
                raise ValueError(
                    f"task.classes: a classify task needs at least "
                    f"{CLASSES_MIN} classes (got {len(self.classes)})"
                )
            if not self.class_map:
                return self
        elif not self.class_map:
            missing = [c for c in self.classes]
            raise ValueError(
                f"task.class_map: required: {missing[0]!r} is not a COCO name, so give "
                f"the COCO ids of every class (e.g. {{ {missing[0]} = [1] }})"
            )
        extra = [k for k in self.class_map if k not in self.classes]
        if extra:
            raise ValueError(
                f"task.class_map.{extra[0]}: not one of task.classes ({', '.join(self.classes)})"
            )
        owner: dict[int, str] = {}
        resolved: dict[str, list[int]] = {}
        for name in self.classes:
            ids = self.class_map.get(name)
            if ids is None:
                raise ValueError(
                    f"task.class_map: no entry for class {name!r} "
                    "(every class needs the teacher ids that make it)"
                )
            if not ids:
                raise ValueError(f"task.class_map.{name}: empty (give one or more ids)")
            out = []
            for raw in ids:
                if self.kind == "detect":
                    try:
                        i = coco_id(raw)
                    except ValueError as exc:
                        raise ValueError(f"task.class_map.{name}: {exc}") from None
                    label = f"COCO id {i} ({COCO_NAMES[i]})"
                else:
                    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                        raise ValueError(
                            f"task.class_map.{name}: {raw!r} is not a teacher "
                            "output index (an integer >= 0)"
                        )
                    i, label = raw, f"teacher output {raw}"
                if i in owner:
                    where = "twice" if owner[i] == name else f"also in {owner[i]!r}"
                    raise ValueError(
                        f"task.class_map.{name}: {label} appears {where} "
                        "(each id belongs to one class)"
                    )
                owner[i] = name
                out.append(i)
            resolved[name] = out
        object.__setattr__(self, "class_map", resolved)
        return self

    def teacher_ids(self) -> dict[int, int]:
        """Teacher class id -> index into ``classes`` (empty for an identity map)."""
        return {
            int(i): self.classes.index(name) for name, ids in self.class_map.items() for i in ids
        }


class StudentSection(_Section):
    arch: Arch = "resnet18"
    weights: Path | None = None
    input_width: int = Field(384, ge=IMAGE_SIZE_MIN, le=IMAGE_SIZE_MAX)
    input_height: int = Field(288, ge=IMAGE_SIZE_MIN, le=IMAGE_SIZE_MAX)
    head_stride: Literal[4, 8] = 4
    trunk_stride: Literal[16, 32] = 16
    score_threshold: float = Field(0.3, gt=0, lt=1)
    max_detections: int = Field(100, ge=1, le=1000)

    @model_validator(mode="after")
    def _multiple_of_32(self) -> StudentSection:
        for key in ("input_width", "input_height"):
            v = getattr(self, key)
            if v % 32:
                raise ValueError(f"student.{key}: {v} is not a multiple of 32 (the trunk's stride)")
        return self


class TrainingSection(_Section):
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    optimizer: OptimizerName = "adamw"
    weight_decay: float = Field(1e-4, ge=0, lt=1)
    warmup_steps: int = Field(20, ge=1)
    decay_steps: int = Field(150, ge=0)
    final_lr_fraction: float = Field(0.05, gt=0, le=1)
    steps_per_round: int = Field(16, ge=1)
    new_sample_share: float = Field(0.5, ge=0, le=1)
    hflip: StrictBool = True
    scale_range: list[float] = Field(default_factory=lambda: [0.7, 1.4])
    seed: int = Field(0, ge=0)

    @field_validator("scale_range")
    @classmethod
    def _scale_range(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0 < v[0] <= v[1] <= 4:
            raise ValueError(
                f"{v!r} must be two numbers [low, high] with 0 < low <= high <= 4 "
                "(the zoom of training views; [1, 1] turns it off)"
            )
        return v


class AdaptationSection(_Section):
    buffer_size: int = Field(256, ge=2)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    new_samples_per_round: int = Field(4, ge=1)
    teacher_stride_min: int = Field(2, ge=1)
    teacher_stride_max: int = Field(32, ge=1)
    teacher_budget: float = Field(0.5, gt=0)
    patience: int = Field(4, ge=1)
    stride_agreement: float = Field(0.6, ge=0, le=1)
    rollback_margin: float = Field(0.05, ge=0, le=1)
    min_holdout_labels: int = Field(8, ge=1)
    temperature: float = Field(2.0, gt=0)
    hard_label_confidence: float = Field(0.9, gt=0, le=1)
    hard_label_weight: float = Field(0.5, ge=0)

    @property
    def holdout_capacity(self) -> int:
        """Samples the held-out slice keeps (its share of ``buffer_size``)."""
        return max(1, round(self.buffer_size * self.holdout_fraction))

    @model_validator(mode="after")
    def _stride_bounds(self) -> AdaptationSection:
        if self.teacher_stride_max < self.teacher_stride_min:
            raise ValueError(
                f"adaptation.teacher_stride_max: {self.teacher_stride_max} is below "
                f"teacher_stride_min ({self.teacher_stride_min})"
            )
        return self


class MemorySection(_Section):
    budget: Budget = "auto"
    safety_margin: float = Field(0.1, ge=0, lt=1)
    strategy: Strategy = "optimal"
    replan_threshold: float = Field(0.1, gt=0, le=1)
    fused_step: StrictBool = False
    allocator: AllocatorName = DEFAULT_ALLOCATOR

    @field_validator("budget")
    @classmethod
    def _fits_machine(cls, v: int | str) -> int | str:
        if isinstance(v, int):
            import psutil

            total = psutil.virtual_memory().total
            if v > total:
                raise ValueError(
                    f"{format_size(v)} is larger than this machine's RAM "
                    f'({format_size(total)}; use "auto" or a smaller size)'
                )
        return v


class TransportSection(_Section):
    enabled: StrictBool = False
    host: str = "127.0.0.1"
    port: int = Field(5672, ge=1, le=65535)
    vhost: str = "/"
    username: str = "guest"
    password: SecretStr = SecretStr("guest")
    tls: StrictBool = False
    cacert: Path = WAGGLE_ETC / "cacert.pem"
    cert: Path = WAGGLE_ETC / "cert.pem"
    key: Path = WAGGLE_ETC / "key.pem"
    exchange: str = UPDATE_EXCHANGE
    declare_exchanges: StrictBool = True
    hmac_key_file: Path = WAGGLE_ETC / "train-hmac.key"
    codec: Literal["fp32", "fp16", "int8"] = "fp16"
    compression: Literal["zstd", "deflate", "none"] = "zstd"
    topk: float = Field(0.0, ge=0, le=1, description="fraction kept by top-k; 0 = dense")
    chunk_size: ChunkSize = DEFAULT_CHUNK_SIZE
    outbox_max_bytes: Size = 512 * 2**20
    heartbeat_s: int = Field(15, ge=10, le=20)


# [telemetry] keys that pywaggle's environment variables fill when the file leaves
# them unset (a Waggle plugin's pod gets these from the scheduler).
PLUGIN_ENVIRONMENT = {
    "host": "WAGGLE_PLUGIN_HOST",
    "port": "WAGGLE_PLUGIN_PORT",
    "username": "WAGGLE_PLUGIN_USERNAME",
    "password": "WAGGLE_PLUGIN_PASSWORD",
    "app_id": "WAGGLE_APP_ID",
}


class TelemetrySection(_Section):
    enabled: StrictBool = False
    route: Literal["beehive", "node"] = "beehive"
    exchange: str = TELEMETRY_EXCHANGE
    scope: Literal["all", "node", "beehive"] = "all"
    app_id: str | None = None
    host: str = "rabbitmq"
    port: int = Field(5672, ge=1, le=65535)
    username: str = "plugin"
    password: SecretStr = SecretStr("plugin")
    interval_s: float = Field(60.0, gt=0, le=120)
    buffer_messages: int = Field(1000, ge=1)

    @field_validator("exchange")
    @classmethod
    def _exchange_of_route(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("route") == "node" and v != TELEMETRY_EXCHANGE:
            raise ValueError(
                f'{v!r}: only for route "beehive" (route "node" always '
                f'publishes to the node broker\'s "{NODE_EXCHANGE}")'
            )
        return v


_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,255}$")


class ModelsSection(_Section):
    enabled: StrictBool = False
    server_public_key: Path = WAGGLE_ETC / "train-server.pub"
    exchange: str = MODEL_EXCHANGE
    queue: str = ""
    max_bytes: Size = 2**30

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, v: str) -> str:
        if v and not _QUEUE_RE.match(v):
            raise ValueError(
                f"{v!r} is not a queue name (1-255 of A-Z a-z 0-9 _ . : -; "
                "empty: waggle.train.models.<node id>)"
            )
        return v


class DaemonSection(_Section):
    global_model_file: Path | None = Field(
        None, description="safetensors file with a new global model, adopted between rounds"
    )
    stop_flush_s: float = Field(10.0, ge=0, le=60)


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY``; else /var/lib/waggle-trainer when it is ours to
    write (root); else ``$XDG_STATE_HOME/waggle-trainer`` for a developer's run."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    system = Path("/var/lib/waggle-trainer")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return system
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "waggle-trainer"


class StateSection(_Section):
    dir: Path = Field(default_factory=default_state_dir)


class Config(_Section):
    node: NodeSection = Field(default_factory=NodeSection)
    camera: CameraSection = Field(default_factory=CameraSection)
    task: TaskSection = Field(default_factory=TaskSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    student: StudentSection = Field(default_factory=StudentSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    adaptation: AdaptationSection = Field(default_factory=AdaptationSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    transport: TransportSection = Field(default_factory=TransportSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    daemon: DaemonSection = Field(default_factory=DaemonSection)
    state: StateSection = Field(default_factory=StateSection)

    @model_validator(mode="after")
    def _trainable_shape(self) -> Config:
        """The whole ResNet (stride 32: a classify student, ``waggle-trainer run``) must
        be trainable at the student's input size and batch."""
        s = self.student
        why = batch_too_small(self.training.batch_size, s.input_height, s.input_width)
        if why:
            raise ValueError(
                f"training.batch_size: {self.training.batch_size} is too small for "
                f"the student input {s.input_width}x{s.input_height} ({why})"
            )
        return self

    @model_validator(mode="after")
    def _teacher_fits_task(self) -> Config:
        want = {"detect": "detector", "classify": "classifier"}[self.task.kind]
        if self.teacher.kind != want:
            raise ValueError(
                f"teacher.kind: {self.teacher.kind!r} cannot label task.kind = "
                f"{self.task.kind!r} (use {want!r})"
            )
        return self

    @model_validator(mode="after")
    def _holdout_can_hold_the_evidence(self) -> Config:
        """A classify sample is one label: a held-out slice that can never hold
        ``min_holdout_labels`` of them would leave every round unjudged."""
        a = self.adaptation
        if self.task.kind == "classify" and a.holdout_capacity < a.min_holdout_labels:
            raise ValueError(
                f"adaptation.min_holdout_labels: {a.min_holdout_labels} is more than the "
                f"held-out slice holds ({a.holdout_capacity} frames = buffer_size "
                f"{a.buffer_size} x holdout_fraction {a.holdout_fraction:g}, one label "
                "each for a classifier): no round would be judged; lower it or hold out more"
            )
        return self

    @model_validator(mode="after")
    def _identity_when_sending(self) -> Config:
        sending = self.transport.enabled or self.telemetry.enabled or self.models.enabled
        if sending and not self.node.id:
            raise ValueError(
                "node.id: required when transport, telemetry or models is enabled "
                "(set it, write /etc/waggle/node-id, or set WAGGLE_NODE_ID)"
            )
        return self

    @model_validator(mode="after")
    def _one_source_of_global_models(self) -> Config:
        if self.models.enabled and self.daemon.global_model_file is not None:
            raise ValueError(
                "daemon.global_model_file: not with models.enabled = true (global models "
                "come from the server's broadcast then; remove one of the two)"
            )
        return self


# ------------------------------------------------------------------------- loading


class ConfigError(Exception):
    """One or more problems with a config file, each as ``(location, message)``.

    ``origins`` maps a location whose value did not come from the file (the node
    identity from ``WAGGLE_NODE_ID`` or ``/etc/waggle/node-id``) to where it came from,
    so that the message names that place instead of the file.
    """

    def __init__(
        self, path: str, problems: list[tuple[str, str]], origins: dict[str, str] | None = None
    ):
        self.path = path
        self.problems = problems
        self.origins = origins or {}
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [
            f"{self.origins[loc]}: {msg}" if loc in self.origins else f"{self.path}: {loc}: {msg}"
            for loc, msg in self.problems
        ]


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        annotation = field.annotation if field is not None else None
        if get_origin(annotation) is dict and parts:  # a table of named sections
            annotation = get_args(annotation)[1]
            parts.pop(0)
        if not isinstance(annotation, type) or not issubclass(annotation, BaseModel):
            return []
        model = annotation
    return list(model.model_fields)


_LOCATED_RE = re.compile(r"^([a-z_]+\.[a-z_]+(?:\.[A-Za-z0-9_ .-]+?)?): (.*)$", re.DOTALL)


def describe_error(err: Any, root: type[BaseModel] | None = None) -> tuple[str, str]:
    """(``section.key``, what is wrong and what is allowed) for one pydantic error
    of a config model (``root``: the top model, default the node's ``Config``)."""
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(root or Config, loc))
        what = "section" if len(loc) == 1 else "key"
        return where, f"unknown {what} (allowed: {allowed})"
    if kind == "literal_error":
        expected = err["ctx"]["expected"]
        return where, f"{err['input']!r} is not allowed (one of {expected})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {
            "greater_than": ">",
            "greater_than_equal": ">=",
            "less_than": "<",
            "less_than_equal": "<=",
        }[kind]
        bound = next(iter(err["ctx"].values()))
        return where, f"{err['input']!r} is out of range (must be {op} {bound})"
    if kind == "finite_number":
        return where, f"{err['input']!r} is not a finite number"
    if kind == "value_error":
        msg = str(err["ctx"]["error"])
        m = _LOCATED_RE.match(msg)
        if m:  # a check across keys names the key it blames
            return m.group(1), m.group(2)
        return where, msg
    if kind == "model_type" or kind == "dict_type":
        return where, f"{err['input']!r} is not a table (write it as [{where}])"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return where, f"{err['input']!r} is the wrong type ({err['msg'].lower()})"
    return where, err["msg"]


def _node_identity(data: dict) -> tuple[dict, dict[str, str]]:
    """``data`` with the node identity filled in, and where each value not from the
    file came from (``{"node.id": "environment variable WAGGLE_NODE_ID"}``)."""
    node = data.get("node")
    if node is not None and not isinstance(node, dict):
        return data, {}
    node = dict(node or {})
    origins: dict[str, str] = {}
    for key, env, files in (
        ("id", "WAGGLE_NODE_ID", ("node-id", "node_id")),
        ("vsn", "WAGGLE_NODE_VSN", ("vsn",)),
    ):
        if os.environ.get(env):
            node[key] = os.environ[env].strip()
            origins[f"node.{key}"] = f"environment variable {env}"
        elif key not in node:
            for path in (WAGGLE_ETC / f for f in files):
                found = _read_first(path)
                if found:
                    node[key] = found
                    origins[f"node.{key}"] = str(path)
                    break
    return {**data, "node": node}, origins


def _plugin_environment(data: dict, source: str) -> dict:
    """``data`` with unset ``[telemetry]`` connection keys taken from pywaggle's
    environment variables (:data:`PLUGIN_ENVIRONMENT`)."""
    tel = data.get("telemetry")
    if tel is not None and not isinstance(tel, dict):
        return data
    tel = dict(tel or {})
    for key, env in PLUGIN_ENVIRONMENT.items():
        value = os.environ.get(env, "").strip()
        if key in tel or not value:
            continue
        if key == "port":
            if not value.isdigit() or not 1 <= int(value) <= 65535:
                raise ConfigError(
                    source,
                    [
                        (
                            "telemetry.port",
                            f"{value!r} from environment variable {env} is not a port (1..65535)",
                        )
                    ],
                )
            tel[key] = int(value)
        else:
            tel[key] = value
    return {**data, "telemetry": tel}


def _tls_file_problems(cfg: Config) -> list[tuple[str, str]]:
    """With TLS in use, the CA, certificate and key must be usable now: a missing
    or mismatched file is a configuration error, not something to retry."""
    t = cfg.transport
    telemetry_via_transport = cfg.telemetry.enabled and cfg.telemetry.route == "beehive"
    if not (t.tls and (t.enabled or telemetry_via_transport)):
        return []
    from waggle_trainer.transport.amqp import TlsFileError, tls_context

    try:
        tls_context(str(t.cacert), str(t.cert), str(t.key))
    except TlsFileError as e:
        return [
            (
                f"transport.{e.field}",
                f"{e.path}: {e.detail} (TLS needs the node's "
                "CA, certificate and key; see docs/deploy.md)",
            )
        ]
    return []


def _model_key_problems(cfg: Config) -> list[tuple[str, str]]:
    """With ``[models]`` enabled, the server's public key must load now."""
    m = cfg.models
    if not m.enabled:
        return []
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = m.server_public_key
    hint = (
        "the server's Ed25519 public key, PEM: `waggle-trainer server-keygen PATH` "
        "writes it as PATH.pub"
    )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [("models.server_public_key", f"{path}: not found ({hint})")]
    except IsADirectoryError:
        return [("models.server_public_key", f"{path}: is a directory ({hint})")]
    except OSError as e:
        return [("models.server_public_key", f"{path}: cannot be read: {e.strerror}")]
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        return [("models.server_public_key", f"{path}: not a PEM public key ({hint})")]
    if not isinstance(key, Ed25519PublicKey):
        return [("models.server_public_key", f"{path}: not an Ed25519 key ({hint})")]
    return []


def config_from_dict(data: dict, source: str = "<config>") -> Config:
    """Validate a parsed TOML document; raises ConfigError listing every problem."""
    resolved, origins = _node_identity(data)
    try:
        cfg = Config.model_validate(_plugin_environment(resolved, source))
    except ValidationError as exc:
        problems = [describe_error(e) for e in exc.errors()]
        raise ConfigError(source, problems, origins) from None
    problems = _tls_file_problems(cfg) + _model_key_problems(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def read_toml(path: str | os.PathLike) -> dict:
    """Parse a TOML config file; raises ConfigError (``file`` or ``line L, column C``)."""
    source = str(path)
    if not source.strip():
        problem = ("file", "no file named (give the path of a TOML file)")
        raise ConfigError("(empty path)", [problem])
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, [("file", "not found (give the path of a TOML file)")]) from None
    except IsADirectoryError:
        raise ConfigError(
            source, [("file", "is a directory (give the path of a TOML file)")]
        ) from None
    except OSError as exc:
        raise ConfigError(source, [("file", f"cannot be read: {exc.strerror}")]) from None
    if raw.startswith(codecs.BOM_UTF8):
        raise ConfigError(
            source,
            [
                (
                    "file",
                    "starts with a UTF-8 byte-order mark (BOM), which TOML "
                    "does not allow (save it as UTF-8 without BOM)",
                )
            ],
        )
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [("file", f"is not UTF-8 text (byte {exc.start})")]) from None
    except RecursionError:  # tomllib parses arrays and inline tables recursively
        problem = ("file", "arrays or tables nested too deeply (a config nests a few levels)")
        raise ConfigError(source, [problem]) from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        where = f"line {m.group(1)}, column {m.group(2)}" if m else "syntax"
        detail = msg[: m.start()].strip() if m else msg
        problem = (where, f"invalid TOML: {detail} (see https://toml.io)")
        raise ConfigError(source, [problem]) from None
    return data


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a node config file; raises ConfigError on any problem."""
    return config_from_dict(read_toml(path), str(path))


def default_config() -> Config:
    """The embedded defaults (plus node identity from /etc/waggle and the environment)."""
    return config_from_dict({}, "<defaults>")


# ------------------------------------------------------------------------- output


_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        items = [
            f"{k if _BARE_KEY_RE.match(k) else _toml_value(k)} = {_toml_value(x)}"
            for k, x in v.items()
        ]
        return "{ " + ", ".join(items) + " }"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isinf(v)):
        return repr(v)
    if isinstance(v, SecretStr):
        return '"********"'
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(cfg: Config) -> str:
    """The resolved configuration as TOML, secrets masked."""
    out: list[str] = []
    for section in Config.model_fields:
        out.append(f"[{section}]")
        sec = getattr(cfg, section)
        for key in type(sec).model_fields:
            value = getattr(sec, key)
            if value is None:
                out.append(f"# {key} = (not set)")
            else:
                out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
