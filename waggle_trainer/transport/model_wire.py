"""Global model versions on the wire: the server signs, every node verifies.

A version is the model's whole state dict as safetensors (never a pickle),
compressed, in a signed blob (see ``docs/protocol.md``)::

    b"WGM1" | u32 envelope length | envelope (canonical JSON)
            | 64-byte Ed25519 signature of everything before it and the payload
            | payload (compressed safetensors)

Ed25519, not HMAC: nodes hold only the server's *public* key, so a node that
is taken over cannot forge a model for the others.  Keys are PEM files
(``openssl genpkey -algorithm ed25519``, or ``waggle-trainer server-keygen``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import zstandard
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .codec import TensorSpec, UpdateRejected

MAGIC = b"WGM1"
FORMAT_VERSION = 1
SIG_BYTES = 64
MAX_ENVELOPE_BYTES = 64 * 1024


@dataclass
class ModelEnvelope:
    broadcast_id: str
    model: str
    version: str
    parent: str | None
    created_ns: int
    accepts: list[str]  # base versions the server still accepts updates against
    compression: str
    payload_sha256: str
    payload_bytes: int
    raw_bytes: int
    v: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(
            asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ModelEnvelope:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UpdateRejected("format", f"model envelope is not JSON: {e}") from None
        if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION:
            raise UpdateRejected("format", "unsupported model envelope")
        types = {
            "broadcast_id": str,
            "model": str,
            "version": str,
            "created_ns": int,
            "accepts": list,
            "compression": str,
            "payload_sha256": str,
            "payload_bytes": int,
            "raw_bytes": int,
            "v": int,
        }
        for k, t in types.items():
            if not isinstance(obj.get(k), t) or isinstance(obj.get(k), bool):
                raise UpdateRejected(
                    "format", f"model envelope field {k!r} missing or not {t.__name__}"
                )
        if not (obj.get("parent") is None or isinstance(obj.get("parent"), str)):
            raise UpdateRejected("format", "model envelope field 'parent' is not a string")
        if not all(isinstance(a, str) for a in obj["accepts"]):
            raise UpdateRejected("format", "model envelope field 'accepts' is not strings")
        extra = set(obj) - set(types) - {"parent"}
        if extra:
            raise UpdateRejected("format", f"unknown model envelope fields {sorted(extra)}")
        return cls(**obj)


@dataclass
class ModelVersion:
    envelope: ModelEnvelope
    state: dict[str, torch.Tensor]

    @property
    def version(self) -> str:
        return self.envelope.version


# ----------------------------------------------------------------------- keys


def load_verify_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """The server's public key (PEM), as a node holds it."""
    p = Path(path)
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except ValueError as e:
        raise ValueError(f"{p}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{p}: not an Ed25519 public key")
    return key


# ----------------------------------------------------------------- encode/decode


def encode_model(
    state: Mapping[str, torch.Tensor],
    *,
    model: str,
    version: str,
    parent: str | None,
    accepts: list[str],
    key: Ed25519PrivateKey,
    compression: str = "zstd",
    created_ns: int | None = None,
) -> tuple[ModelEnvelope, bytes]:
    """Sign a model version for broadcast: (envelope, blob)."""
    raw = st_save(
        {k: v.detach().contiguous() for k, v in state.items()},
        metadata={"format": "waggle-model/1", "model": model, "version": version},
    )
    if compression == "zstd":
        payload = zstandard.ZstdCompressor(level=3).compress(raw)
    elif compression == "none":
        payload = raw
    else:
        raise ValueError(f"compression must be zstd or none, not {compression!r}")
    env = ModelEnvelope(
        broadcast_id=str(uuid.uuid4()),
        model=model,
        version=version,
        parent=parent,
        created_ns=created_ns if created_ns is not None else time.time_ns(),
        accepts=list(accepts),
        compression=compression,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_bytes=len(payload),
        raw_bytes=len(raw),
    )
    env_json = env.to_json()
    head = MAGIC + struct.pack(">I", len(env_json)) + env_json
    return env, b"".join((head, key.sign(head + payload), payload))


def verify_model(
    blob: bytes, key: Ed25519PublicKey, *, max_bytes: int = 1 << 30
) -> tuple[ModelEnvelope, bytes]:
    """Check framing and the server's signature; (envelope, compressed payload)."""
    if len(blob) > max_bytes:
        raise UpdateRejected("size", f"model is {len(blob)} bytes, limit {max_bytes}")
    if len(blob) < 8 or blob[:4] != MAGIC:
        raise UpdateRejected("format", "not a waggle model (bad magic)")
    (n,) = struct.unpack(">I", blob[4:8])
    if n > MAX_ENVELOPE_BYTES or len(blob) < 8 + n + SIG_BYTES:
        raise UpdateRejected("format", "truncated model or oversized envelope")
    head, sig, payload = blob[: 8 + n], blob[8 + n : 8 + n + SIG_BYTES], blob[8 + n + SIG_BYTES :]
    try:
        key.verify(sig, head + payload)
    except InvalidSignature:
        raise UpdateRejected(
            "signature", "model signature does not verify with the server's key"
        ) from None
    env = ModelEnvelope.from_json(blob[8 : 8 + n])
    if (
        len(payload) != env.payload_bytes
        or hashlib.sha256(payload).hexdigest() != env.payload_sha256
    ):
        raise UpdateRejected("sha256", "model payload differs from its envelope")
    return env, payload


def decode_model(
    blob: bytes,
    key: Ed25519PublicKey,
    *,
    expected: Mapping[str, TensorSpec] | None = None,
    max_bytes: int = 1 << 30,
) -> ModelVersion:
    """Verify and decode a broadcast model.  ``expected``: names, shapes and
    dtypes the node's model has (its floating tensors must match exactly)."""
    env, payload = verify_model(blob, key, max_bytes=max_bytes)
    if env.raw_bytes > max_bytes:
        raise UpdateRejected("size", f"model would decompress to {env.raw_bytes} bytes")
    if env.compression == "zstd":
        try:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=env.raw_bytes)
        except zstandard.ZstdError as e:
            raise UpdateRejected("format", f"model payload does not decompress: {e}") from None
    elif env.compression == "none":
        raw = payload
    else:
        raise UpdateRejected("format", f"unknown compression {env.compression!r}")
    if len(raw) != env.raw_bytes:
        raise UpdateRejected("size", "model payload length differs from its envelope")
    try:
        state = st_load(raw)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise UpdateRejected("format", f"model payload is not safetensors: {e}") from None
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UpdateRejected("nonfinite", f"model tensor {name!r} has non-finite values")
    if expected is not None:
        floats = {n: t for n, t in state.items() if t.is_floating_point()}
        if set(floats) != set(expected):
            missing = sorted(set(expected) - set(floats))[:5]
            extra = sorted(set(floats) - set(expected))[:5]
            raise UpdateRejected(
                "names", f"model tensors differ: missing {missing}, unexpected {extra}"
            )
        for name, spec in expected.items():
            t = floats[name]
            if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                raise UpdateRejected(
                    "shape",
                    f"{name}: {tuple(t.shape)} {t.dtype}, expected "
                    f"{tuple(spec.shape)} {spec.dtype}",
                )
    return ModelVersion(env, state)
