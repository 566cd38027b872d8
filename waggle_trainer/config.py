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

import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from waggle_trainer.common import (
    ARCHES,
    IMAGE_SIZE_MAX,
    IMAGE_SIZE_MIN,
    SIZE_HELP,
    STRATEGIES,
    WAGGLE_ETC,
    Arch,
    LogLevel,
    OptimizerName,
    Strategy,
    format_size,
    parse_budget,
    parse_size,
)

# --------------------------------------------------------------------------- sizes


def _size(v: Any) -> int:
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError(f"{v!r} is not a size ({SIZE_HELP})") from None


Size = Annotated[int, BeforeValidator(_size)]


Budget = Annotated[int | Literal["auto"], BeforeValidator(parse_budget)]

# ------------------------------------------------------------------------ sections


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


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
        description='"synthetic", a device (/dev/videoN, /dev/waggle_cam_top), '
        "an rtsp:// or http:// URL, a video file or an image folder",
    )
    width: int = Field(640, ge=16, le=8192)
    height: int = Field(480, ge=16, le=8192)
    fps: float = Field(1.0, gt=0, le=120)


class TeacherSection(_Section):
    arch: Arch = "resnet50"
    weights: Path | None = None
    num_classes: int = Field(10, ge=2)
    min_confidence: float = Field(0.5, ge=0, le=1)


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
    learning_rate: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    optimizer: OptimizerName = "sgd"
    steps_per_round: int = Field(20, ge=1)
    hflip: StrictBool = True
    seed: int = Field(0, ge=0)


class AdaptationSection(_Section):
    buffer_size: int = Field(256, ge=2)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    new_samples_per_round: int = Field(16, ge=1)
    teacher_stride_min: int = Field(2, ge=1)
    teacher_stride_max: int = Field(32, ge=1)
    stride_agreement: float = Field(0.6, ge=0, le=1)
    rollback_margin: float = Field(0.05, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)
    hard_label_confidence: float = Field(0.9, gt=0, le=1)
    hard_label_weight: float = Field(0.5, ge=0)

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
    safety_margin: float = Field(0.1, ge=0, le=1)
    strategy: Strategy = "optimal"
    replan_threshold: float = Field(0.1, gt=0, le=1)

    @field_validator("budget")
    @classmethod
    def _fits_machine(cls, v: int | str) -> int | str:
        if isinstance(v, int):
            import psutil

            total = psutil.virtual_memory().total
            if v > total:
                raise ValueError(
                    f"{format_size(v)} is larger than this machine's RAM "
                    f"({format_size(total)}; use \"auto\" or a smaller size)"
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
    exchange: str = "waggle.train.updates"
    hmac_key_file: Path = WAGGLE_ETC / "train-hmac.key"
    codec: Literal["fp32", "fp16", "int8"] = "fp16"
    compression: Literal["zstd", "deflate", "none"] = "zstd"
    topk: float = Field(0.0, ge=0, le=1, description="fraction kept by top-k; 0 = dense")
    chunk_size: Size = 8 * 2**20
    outbox_max_bytes: Size = 512 * 2**20
    heartbeat_s: int = Field(15, ge=10, le=20)

    @field_validator("chunk_size")
    @classmethod
    def _below_broker_limit(cls, v: int) -> int:
        if not 64 * 2**10 <= v <= 15 * 2**20:
            raise ValueError(f"{format_size(v)} is out of range (64KiB..15MiB: "
                             "RabbitMQ refuses messages over 16MiB)")
        return v


class TelemetrySection(_Section):
    enabled: StrictBool = False
    exchange: str = "waggle.msg"
    interval_s: float = Field(60.0, gt=0, le=120)
    buffer_messages: int = Field(1000, ge=1)


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
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    student: StudentSection = Field(default_factory=StudentSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    adaptation: AdaptationSection = Field(default_factory=AdaptationSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    transport: TransportSection = Field(default_factory=TransportSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    state: StateSection = Field(default_factory=StateSection)

    @model_validator(mode="after")
    def _identity_when_sending(self) -> "Config":
        if (self.transport.enabled or self.telemetry.enabled) and not self.node.id:
            raise ValueError(
                "node.id: required when transport or telemetry is enabled "
                "(set it, write /etc/waggle/node-id, or set WAGGLE_NODE_ID)"
            )
        return self


# ------------------------------------------------------------------------- loading


class ConfigError(Exception):
    """One or more problems with a config file, each as ``(location, message)``."""

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.path}: {loc}: {msg}" for loc, msg in self.problems]


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return list(model.model_fields)


_KEY_PREFIX = re.compile(r"^([a-z_]+\.[a-z_]+): ")


def _describe(err: dict) -> tuple[str, str]:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(Config, loc))
        what = "section" if len(loc) == 1 else "key"
        return where, f"unknown {what} (allowed: {allowed})"
    if kind == "literal_error":
        expected = err["ctx"]["expected"]
        return where, f"{err['input']!r} is not allowed (one of {expected})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=",
              "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(err["ctx"].values()))
        return where, f"{err['input']!r} is out of range (must be {op} {bound})"
    if kind == "value_error":
        msg = str(err["ctx"]["error"])
        m = _KEY_PREFIX.match(msg)
        if m:  # a check across keys names the key it blames
            return m.group(1), msg[m.end():]
        return where, msg
    if kind == "model_type" or kind == "dict_type":
        return where, f"{err['input']!r} is not a table (write it as [{where}])"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return where, f"{err['input']!r} is the wrong type ({err['msg'].lower()})"
    return where, err["msg"]


def _node_identity(data: dict) -> dict:
    node = data.get("node")
    if node is not None and not isinstance(node, dict):
        return data
    node = dict(node or {})
    for key, env, files in (
        ("id", "WAGGLE_NODE_ID", ("node-id", "node_id")),
        ("vsn", "WAGGLE_NODE_VSN", ("vsn",)),
    ):
        if os.environ.get(env):
            node[key] = os.environ[env].strip()
        elif key not in node:
            found = _read_first(*(WAGGLE_ETC / f for f in files))
            if found:
                node[key] = found
    return {**data, "node": node}


def config_from_dict(data: dict, source: str = "<config>") -> Config:
    """Validate a parsed TOML document; raises ConfigError listing every problem."""
    try:
        return Config.model_validate(_node_identity(data))
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a node config file; raises ConfigError on any problem."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, [("file", "not found (give the path of a TOML file)")]) from None
    except IsADirectoryError:
        raise ConfigError(source, [("file", "is a directory (give the path of a TOML file)")]) from None
    except OSError as exc:
        raise ConfigError(source, [("file", f"cannot be read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [("file", f"is not UTF-8 text (byte {exc.start})")]) from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        where = f"line {m.group(1)}, column {m.group(2)}" if m else "syntax"
        detail = msg[: m.start()].strip() if m else msg
        raise ConfigError(source, [(where, f"invalid TOML: {detail} (see https://toml.io)")]) from None
    return config_from_dict(data, source)


def default_config() -> Config:
    """The embedded defaults (plus node identity from /etc/waggle and the environment)."""
    return config_from_dict({}, "<defaults>")


# ------------------------------------------------------------------------- output


def _toml_value(v: Any) -> str:
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
