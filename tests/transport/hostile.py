"""Builders of hostile updates: validly signed (the attacker holds a node's key, or the
node is buggy), but malformed inside.  Used by the codec tests and the broker tests."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from waggle_trainer.transport.codec import _seal, _split

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def resign(
    blob: bytes,
    key: bytes,
    *,
    payload: bytes | None = None,
    envelope_json: bytes | None = None,
    **changes: Any,
) -> bytes:
    """``blob`` with a new payload and/or envelope fields, signed again with ``key``.
    The envelope's payload hash and length follow the new payload; ``changes``
    override envelope fields; ``envelope_json`` replaces the envelope text verbatim."""
    _, env_json, _, old_payload = _split(blob)
    payload = old_payload if payload is None else payload
    if envelope_json is None:
        env = json.loads(env_json)
        env.update(payload_sha256=hashlib.sha256(payload).hexdigest(), payload_bytes=len(payload))
        env.update(changes)
        envelope_json = json.dumps(env, sort_keys=True, separators=(",", ":")).encode()
    return _seal(envelope_json, payload, key)


def zstd_declaring(frame: bytes, content_size: int | None) -> bytes:
    """The same zstd frame whose header declares ``content_size`` bytes (an 8-byte
    Frame_Content_Size field), or no size at all (None).  Blocks are left alone."""
    assert frame[:4] == ZSTD_MAGIC
    fhd = frame[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5
    window = b""
    if not single:
        window = frame[pos : pos + 1]
        pos += 1
    dict_id = frame[pos : pos + (0, 1, 2, 4)[dict_flag]]
    pos += len(dict_id)
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    old_size = int.from_bytes(frame[pos : pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
    pos += fcs_len
    if single:
        # Without Single_Segment the window is declared apart from the content size:
        # make it large enough for the blocks as they are (window log >= 10).
        log = max(10, (old_size - 1).bit_length())
        window = bytes([(log - 10) << 3])
    if content_size is None:
        new_fhd, fcs = (fhd & 0x1F) & ~0x20, b""
    else:
        new_fhd, fcs = ((3 << 6) | (fhd & 0x1F)) & ~0x20, struct.pack("<Q", content_size)
    return ZSTD_MAGIC + bytes([new_fhd]) + window + dict_id + fcs + frame[pos:]


def zstd_bomb(blob: bytes, key: bytes, declared: int = 2**50) -> bytes:
    """A zstd-compressed update whose frame header declares ``declared`` bytes."""
    payload = _split(blob)[3]
    return resign(blob, key, payload=zstd_declaring(payload, declared))


def with_metrics_text(blob: bytes, key: bytes, metrics_json: str) -> bytes:
    """The update with its envelope's ``metrics`` replaced by raw JSON text
    (e.g. ``{"loss":NaN}``, which strict JSON writers never produce)."""
    env_json = _split(blob)[1].decode()
    start = env_json.index('"metrics":') + len('"metrics":')
    end = env_json.index("}", start) + 1
    return resign(
        blob, key, envelope_json=(env_json[:start] + metrics_json + env_json[end:]).encode()
    )
