"""Weight updates to the server and metrics to Beehive over RabbitMQ.

The daemon uses, in order: :class:`UpdateEncoder` (delta -> signed blob),
:class:`Outbox` (disk spool), :class:`UpdatePublisher` (thread draining the
outbox), :class:`Telemetry` + :class:`TelemetryPublisher` (wagglemsg metrics).
Between rounds it takes a new global version from :class:`ModelSubscriber`
(signed by the server, verified here; see :mod:`.model_wire`).  The server
(``waggle_trainer.server``) uses :class:`UpdateDecoder`.  The wire
format is described in ``docs/protocol.md``; its names and limits are in
:mod:`.wire`.

The names below are imported on first use, so that ``config.py`` can import
:mod:`.wire` without loading torch and pika.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AmqpSettings",
    "Backoff",
    "Chunk",
    "ChunkError",
    "CodecSettings",
    "DecodedUpdate",
    "EncodedUpdate",
    "Envelope",
    "ErrorFeedback",
    "FatalAmqpError",
    "ModelSubscriber",
    "ModelVersion",
    "Outbox",
    "OutboxEntry",
    "OutboxFull",
    "Reassembler",
    "Telemetry",
    "TelemetryPublisher",
    "TelemetryRoute",
    "TensorSpec",
    "UpdateDecoder",
    "UpdateEncoder",
    "UpdatePublisher",
    "UpdateRejected",
    "apply_delta",
    "decode_model",
    "drop_unaccepted",
    "load_key",
    "load_verify_key",
    "make_message",
    "peek_envelope",
    "reference_spec",
    "split",
    "validate_name",
    "weight_delta",
]  # fmt: skip
_SUBMODULES = (
    "amqp",
    "chunks",
    "codec",
    "outbox",
    "publisher",
    "telemetry",
    "model_wire",
    "model_subscriber",
)


def __getattr__(name: str) -> Any:
    if name in __all__:
        for sub in _SUBMODULES:
            module = importlib.import_module(f".{sub}", __name__)
            if hasattr(module, name):
                value = getattr(module, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .amqp import AmqpSettings, Backoff, FatalAmqpError
    from .chunks import Chunk, ChunkError, Reassembler, split
    from .codec import (
        CodecSettings,
        DecodedUpdate,
        EncodedUpdate,
        Envelope,
        ErrorFeedback,
        TensorSpec,
        UpdateDecoder,
        UpdateEncoder,
        UpdateRejected,
        apply_delta,
        load_key,
        peek_envelope,
        reference_spec,
        weight_delta,
    )
    from .model_subscriber import ModelSubscriber, drop_unaccepted
    from .model_wire import ModelVersion, decode_model, load_verify_key
    from .outbox import Outbox, OutboxEntry, OutboxFull
    from .publisher import UpdatePublisher
    from .telemetry import (
        Telemetry,
        TelemetryPublisher,
        TelemetryRoute,
        make_message,
        validate_name,
    )
