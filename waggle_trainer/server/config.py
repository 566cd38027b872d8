"""The server config file (``deploy/server.example.toml``): typed, strict, every
problem reported at once as ``FILE: section.key: what (allowed)``.

Every key has a default except the models to serve: ``[models.NAME]`` with the
``initial_weights`` (a safetensors file) that become version 1 of that model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from waggle_trainer.config import (
    ChunkSize,
    ConfigError,
    Size,
    describe_error,
    format_size,
    read_toml,
)
from waggle_trainer.transport.wire import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEFAULT_CHUNK_SIZE,
    MODEL_EXCHANGE,
    SERVER_QUEUE,
    TELEMETRY_EXCHANGE,
    UPDATE_BINDING_KEY,
    UPDATE_EXCHANGE,
)

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


def default_server_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY``, else /var/lib/waggle-trainer-server."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path("/var/lib/waggle-trainer-server")


class ServerSection(_Section):
    state_dir: Path = Field(default_factory=default_server_state_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class BrokerSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(5672, ge=1, le=65535)
    vhost: str = "/"
    username: str = "guest"
    password: SecretStr = SecretStr("guest")
    tls: StrictBool = False
    cacert: Path = Path("/etc/waggle/cacert.pem")
    cert: Path = Path("/etc/waggle/cert.pem")
    key: Path = Path("/etc/waggle/key.pem")
    heartbeat_s: int = Field(15, ge=10, le=20)


class QueueSection(_Section):
    exchange: str = UPDATE_EXCHANGE
    queue: str = SERVER_QUEUE
    binding_key: str = UPDATE_BINDING_KEY
    dead_letter_exchange: str = DEAD_LETTER_EXCHANGE
    dead_letter_queue: str = DEAD_LETTER_QUEUE
    delivery_limit: int = Field(5, ge=1, le=100)
    prefetch: int = Field(4, ge=1, le=64)


class VerifySection(_Section):
    keys_dir: Path = Path("/etc/waggle-trainer-server/node-keys")
    require_user_id: StrictBool = True
    user_id_format: str = Field(
        "{node}",
        description='the broker user a node publishes as, "{node}" standing for its node id '
        '(Beehive\'s certificate users: "node-{node}")',
    )
    max_update_bytes: Size = 512 * 2**20
    staging_max_bytes: Size = 2 * 2**30
    staging_max_age_s: float = Field(3600.0, gt=0)
    staging_partials_per_node: int = Field(
        4, ge=1, le=64, description="incomplete updates one node may have staged at once"
    )

    @field_validator("user_id_format")
    @classmethod
    def _one_node_placeholder(cls, v: str) -> str:
        if (
            v.count("{node}") != 1
            or v.replace("{node}", "").count("{")
            or "}" in v.replace("{node}", "")
        ):
            raise ValueError(f'{v!r} must contain "{{node}}" exactly once and no other braces')
        return v

    def broker_user(self, node_id: str) -> str:
        """The broker-validated user that node ``node_id`` must publish as."""
        return self.user_id_format.replace("{node}", node_id)

    @model_validator(mode="after")
    def _staging_holds_an_update(self) -> VerifySection:
        need = staging_need(self.max_update_bytes)
        if self.staging_max_bytes < need:
            raise ValueError(
                f"verify.staging_max_bytes: {format_size(self.staging_max_bytes)} is too small "
                f"for verify.max_update_bytes ({format_size(self.max_update_bytes)}): staging "
                f"must hold one whole update with its files' bookkeeping, at least "
                f"{format_size(need)}"
            )
        return self


def staging_need(max_update_bytes: int) -> int:
    """Staging space for one update of ``max_update_bytes`` in chunks of at least
    64 KiB: each chunk's body rounded up to 4 KiB blocks and its header file (one
    block each at most 1/8 more), plus the update's directory and metadata."""
    return max_update_bytes + max_update_bytes // 8 + 8 * 4096


class AggregationSection(_Section):
    rule: Literal["fedavg", "median", "trimmed_mean"] = "fedavg"
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    server_lr: float = Field(1.0, gt=0, le=10)
    min_updates: int = Field(10, ge=1)
    window_s: float = Field(600.0, gt=0)
    max_staleness: int = Field(2, ge=0)
    staleness_decay: float = Field(0.5, gt=0, le=1)


class StoreSection(_Section):
    retain_versions: int = Field(10, ge=1)


class BroadcastSection(_Section):
    enabled: StrictBool = True
    exchange: str = MODEL_EXCHANGE
    signing_key_file: Path = Path("/etc/waggle-trainer-server/model-signing.pem")
    chunk_size: ChunkSize = DEFAULT_CHUNK_SIZE
    compression: Literal["zstd", "none"] = "zstd"


class TelemetrySection(_Section):
    enabled: StrictBool = True
    exchange: str = TELEMETRY_EXCHANGE
    history_points: int = Field(500, ge=10, le=100_000)


class StatusSection(_Section):
    enabled: StrictBool = True
    bind: str = "127.0.0.1"
    port: int = Field(8471, ge=0, le=65535)


class ModelSection(_Section):
    initial_weights: Path

    @field_validator("initial_weights")
    @classmethod
    def _safetensors(cls, v: Path) -> Path:
        if v.suffix != ".safetensors":
            raise ValueError(f"{str(v)!r} is not a .safetensors file (pickles are never loaded)")
        return v


class ServerConfig(_Section):
    server: ServerSection = Field(default_factory=ServerSection)
    broker: BrokerSection = Field(default_factory=BrokerSection)
    queue: QueueSection = Field(default_factory=QueueSection)
    verify: VerifySection = Field(default_factory=VerifySection)
    aggregation: AggregationSection = Field(default_factory=AggregationSection)
    store: StoreSection = Field(default_factory=StoreSection)
    broadcast: BroadcastSection = Field(default_factory=BroadcastSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    status: StatusSection = Field(default_factory=StatusSection)
    models: dict[str, ModelSection] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, ModelSection]) -> dict[str, ModelSection]:
        for name in v:
            if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
                raise ValueError(f"{name!r} is not a model name (1-64 of A-Z a-z 0-9 _ - .)")
        return v

    @model_validator(mode="after")
    def _retention_covers_staleness(self) -> ServerConfig:
        need = self.aggregation.max_staleness + 1
        if self.store.retain_versions < need:
            raise ValueError(
                f"store.retain_versions: {self.store.retain_versions} is too small "
                f"(must be >= aggregation.max_staleness + 1 = {need}: the bases of "
                "updates still accepted must be kept)"
            )
        return self


def server_config_from_dict(data: dict, source: str = "<config>") -> ServerConfig:
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [describe_error(e, ServerConfig) for e in exc.errors()]) from None


def load_server_config(path: str | os.PathLike) -> ServerConfig:
    """Read and validate a server config file; raises ConfigError on any problem."""
    return server_config_from_dict(read_toml(path), str(path))
