"""Names and limits of the update wire that the node and the server share.

The node's publisher and the server's consumer both import this module; neither
imports the other.  It imports nothing, so ``config.py`` may use it too.  The
contract itself is written down in ``docs/protocol.md``.
"""

from __future__ import annotations

# -- exchanges, queues, routing ------------------------------------------------
UPDATE_EXCHANGE = "waggle.train.updates"  # topic; routing key update.<node_id>
UPDATE_BINDING_KEY = "update.*"
SERVER_QUEUE = "waggle.train.updates.quorum"  # quorum queue (docs/protocol.md: arguments)
LEGACY_SERVER_QUEUE = "waggle.train.updates.server"  # the classic queue it replaced
DEAD_LETTER_EXCHANGE = "waggle.train.dead"  # fanout
DEAD_LETTER_QUEUE = "waggle.train.dead"


def update_routing_key(node_id: str) -> str:
    """The routing key a node publishes its update chunks with."""
    return f"update.{node_id}"


# -- global model versions (server -> nodes) --------------------------------------
MODEL_EXCHANGE = "waggle.train.models"  # topic; routing key model.<model>
MODEL_CONTENT_TYPE = "application/vnd.waggle.model"
MODEL_MESSAGE_TYPE = "waggle.model.chunk"


def model_routing_key(model: str) -> str:
    """The routing key a model version is broadcast with."""
    return f"model.{model}"


def node_model_queue(node_id: str) -> str:
    """A node's own durable queue of broadcast versions."""
    return f"{MODEL_EXCHANGE}.{node_id}"


# -- telemetry (wagglemsg) ---------------------------------------------------------
TELEMETRY_EXCHANGE = "waggle.msg"  # route "beehive": topic; routing key = metric name
NODE_EXCHANGE = "to-validator"  # route "node": the node broker's, as pywaggle publishes


# -- chunk messages -------------------------------------------------------------
CONTENT_TYPE = "application/vnd.waggle.update"
MESSAGE_TYPE = "waggle.update.chunk"
APP_ID = "waggle-trainer"
CHUNK_FORMAT = "waggle-update-chunk/1"

HEADER_UPDATE_ID = "update_id"
HEADER_CHUNK_INDEX = "chunk_index"
HEADER_CHUNK_COUNT = "chunk_count"
HEADER_PAYLOAD_SHA256 = "payload_sha256"
HEADER_FORMAT = "format"

# RabbitMQ refuses messages over 16 MiB by default (``max_message_size``); a chunk
# stays below that with room for properties and headers.  Below 64 KiB the
# per-message overhead dominates.
MIN_CHUNK_SIZE = 64 * 2**10
MAX_CHUNK_SIZE = 15 * 2**20
DEFAULT_CHUNK_SIZE = 8 * 2**20
#: Properties and headers of one chunk message, as the server stages them (JSON):
#: a node's chunk needs well under 1 KiB; the broker's own headers (x-death,
#: x-delivery-count) fit with room to spare.
MAX_HEADERS_BYTES = 16 * 2**10

# -- update ids -------------------------------------------------------------------
#: What an update id may be: safe as a file and directory name, long enough for
#: ``<node_id>-<epoch>-r<round>`` with any node id (1-64 of A-Z a-z 0-9 _ -).
UPDATE_ID_CHARS = "A-Z a-z 0-9 _ -"
UPDATE_ID_MAX = 128


def update_id_for(node_id: str, epoch: str, round: int) -> str:
    """A node daemon's update id: ``<node_id>-<epoch>-r<round>``.  ``epoch`` is new
    whenever the node's training state is created (a first start, or a start after
    the state was lost), so the id names the *stream* of updates it belongs to."""
    return f"{node_id}-{epoch}-r{round}"


def update_stream(update_id: str, round: int) -> str:
    """The stream an update belongs to: the id without its ``-r<round>`` suffix when
    the suffix is the envelope's round (a daemon's ``<node_id>-<epoch>``), else ""
    (an id that names no stream, e.g. a UUID: one stream per node and model).
    Rounds are ordered within a stream; see ``docs/protocol.md``, step 11."""
    suffix = f"-r{round}"
    if round >= 0 and update_id.endswith(suffix) and len(update_id) > len(suffix):
        return update_id[: -len(suffix)]
    return ""


# -- dead-lettering -------------------------------------------------------------
HEADER_REJECT_CODE = "x-waggle-reject-code"
HEADER_REJECT_REASON = "x-waggle-reject-reason"
HEADER_ORIGINAL_EXCHANGE = "x-waggle-original-exchange"
HEADER_ORIGINAL_ROUTING_KEY = "x-waggle-original-routing-key"
HEADER_ORIGINAL_USER_ID = "x-waggle-original-user-id"
HEADER_REJECTED_NS = "x-waggle-rejected-ns"
