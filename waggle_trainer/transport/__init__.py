"""Weight updates to the server and metrics to Beehive over RabbitMQ.

The daemon uses, in order: :class:`UpdateEncoder` (delta -> signed blob),
:class:`Outbox` (disk spool), :class:`UpdatePublisher` (thread draining the
outbox), :class:`Telemetry` + :class:`TelemetryPublisher` (wagglemsg metrics).
The server uses :class:`UpdateConsumer` / :class:`UpdateDecoder`.  The wire
format is described in ``docs/protocol.md``.
"""

from .amqp import AmqpSettings, Backoff, FatalAmqpError
from .chunks import Chunk, ChunkError, Reassembler, split
from .codec import (CodecSettings, DecodedUpdate, EncodedUpdate, Envelope, ErrorFeedback,
                    TensorSpec, UpdateDecoder, UpdateEncoder, UpdateRejected, apply_delta,
                    load_key, peek_envelope, reference_spec, weight_delta)
from .consumer import SeenUpdates, UpdateConsumer
from .outbox import Outbox, OutboxEntry, OutboxFull
from .publisher import UpdatePublisher
from .telemetry import Telemetry, TelemetryPublisher, make_message, validate_name

__all__ = [
    "AmqpSettings", "Backoff", "FatalAmqpError", "Chunk", "ChunkError", "Reassembler", "split",
    "CodecSettings", "DecodedUpdate", "EncodedUpdate", "Envelope", "ErrorFeedback", "TensorSpec",
    "UpdateDecoder", "UpdateEncoder", "UpdateRejected", "apply_delta", "load_key",
    "peek_envelope", "reference_spec", "weight_delta", "SeenUpdates", "UpdateConsumer", "Outbox",
    "OutboxEntry", "OutboxFull", "UpdatePublisher", "Telemetry", "TelemetryPublisher",
    "make_message", "validate_name",
]
