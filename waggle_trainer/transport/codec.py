"""Weight-update codec: delta -> safetensors -> compression -> signed blob, and back.

An *update* is the student's weights minus its base weights (the global model
version the node started from), for floating-point tensors only.  Integer
buffers such as BatchNorm's ``num_batches_tracked`` are not part of it.

Blob layout (all integers big-endian; see ``docs/protocol.md``)::

    b"WGU1" | u32 envelope length | envelope (canonical JSON, UTF-8)
            | 32-byte HMAC-SHA256 | payload (compressed safetensors)

The HMAC covers magic, length, envelope and payload.  The envelope names the
payload's SHA-256 and the encoding.  Nothing here unpickles: the payload is
read with ``safetensors.torch.load``, which only ever builds tensors.

Lossy settings (fp16, int8, top-k) lose a little every round.  An
:class:`ErrorFeedback` object carries what was not sent into the next update,
so the error does not accumulate; give the same object to every ``encode``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import stat
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import zstandard
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAGIC = b"WGU1"
FORMAT_VERSION = 1
MAC_BYTES = 32
MAX_ENVELOPE_BYTES = 64 * 1024
PAYLOAD_FORMAT = "waggle-update-payload/1"
INDEX_SUFFIX = ":idx"  # sparse tensors: "<name>" holds values, "<name>:idx" flat indices

Dtype = Literal["fp32", "fp16", "int8"]
Compression = Literal["zstd", "deflate", "none"]

_WIRE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
_FP16_MAX = 65504.0
#: The largest int8 scale: 127 x scale must still be a finite float32.
MAX_INT8_SCALE = float(torch.finfo(torch.float32).max) / 127.0


class UpdateRejected(Exception):
    """An update failed validation.  ``code`` is a short machine-readable reason
    (``signature``, ``sha256``, ``format``, ``size``, ``names``, ``shape``,
    ``dtype``, ``nonfinite``, ``model``, ``base_version``, ``key``); ``str(e)``
    says what exactly was wrong."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.reason = message


@dataclass(frozen=True)
class CodecSettings:
    """How a delta is put on the wire.  ``topk`` is the fraction of entries of
    each tensor that is sent (largest magnitudes); 0 sends every entry."""

    dtype: Dtype = "fp16"
    compression: Compression = "zstd"
    topk: float = 0.0
    zstd_level: int = 3
    deflate_level: int = 6

    def __post_init__(self) -> None:
        if self.dtype not in _WIRE_DTYPE:
            raise ValueError(f"dtype must be one of {sorted(_WIRE_DTYPE)}, not {self.dtype!r}")
        if self.compression not in ("zstd", "deflate", "none"):
            raise ValueError(f"compression must be zstd, deflate or none, not {self.compression!r}")
        if not 0.0 <= self.topk < 1.0:
            raise ValueError(f"topk must be in [0, 1), not {self.topk!r}")

    def describe(self) -> str:
        sparse = f"+top{self.topk:g}" if self.topk else ""
        return f"{self.dtype}{sparse}+{self.compression}"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def reference_spec(state: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of the floating-point tensors of a state dict
    (or pass-through for a mapping that already holds :class:`TensorSpec`)."""
    out: dict[str, TensorSpec] = {}
    for name, t in state.items():
        if isinstance(t, TensorSpec):
            out[name] = t
        elif torch.is_tensor(t) and t.is_floating_point():
            out[name] = TensorSpec(tuple(t.shape), t.dtype)
    return out


def load_key(path: str | os.PathLike) -> bytes:
    """Read an HMAC key file (raw bytes; one trailing newline is ignored).
    At least 16 bytes; a key readable by group or others is refused."""
    p = Path(path)
    st = p.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"{p}: HMAC key file must not be accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}; chmod 600)"
        )
    key = p.read_bytes()
    if key.endswith(b"\n"):
        key = key[:-1]
    if len(key) < 16:
        raise ValueError(f"{p}: HMAC key is {len(key)} bytes; at least 16 are needed")
    return key


def weight_delta(
    weights: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``weights - base`` in float32 for every floating tensor of ``base``."""
    delta = {}
    for name, b in base.items():
        if not (torch.is_tensor(b) and b.is_floating_point()):
            continue
        if name not in weights:
            raise ValueError(f"weights lack tensor {name!r} of the base")
        w = weights[name]
        if tuple(w.shape) != tuple(b.shape):
            raise ValueError(f"{name}: shape {tuple(w.shape)} differs from base {tuple(b.shape)}")
        delta[name] = w.detach().to("cpu", torch.float32) - b.detach().to("cpu", torch.float32)
    return delta


def apply_delta(
    base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """New weights ``base + delta`` (tensors without a delta are copied)."""
    out = {}
    for name, b in base.items():
        if name in delta:
            out[name] = (b.detach().to(torch.float32) + delta[name]).to(b.dtype)
        else:
            out[name] = b.detach().clone()
    return out


class ErrorFeedback:
    """What lossy encoding did not send, carried into the next update.

    Updates are cumulative deltas from a base version, and a newer update for
    the same base supersedes an older one.  So the residual added to an update
    is the one left by the last update of the *previous* base version; encoding
    again for the same base replaces the pending residual instead of stacking on
    it.
    """

    def __init__(self) -> None:
        self._committed: dict[str, torch.Tensor] = {}
        self._pending_base: str | None = None
        self._pending: dict[str, torch.Tensor] = {}

    def carry(self, base_version: str) -> dict[str, torch.Tensor]:
        if self._pending_base is not None and self._pending_base != base_version:
            self._committed, self._pending = self._pending, {}
            self._pending_base = None
        return self._committed

    def record(self, base_version: str, residual: dict[str, torch.Tensor]) -> None:
        self._pending_base = base_version
        self._pending = residual

    def norm(self) -> float:
        res = self._pending if self._pending_base is not None else self._committed
        return math.sqrt(sum(float(r.pow(2).sum()) for r in res.values()))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], str | None]:
        """Tensors (``committed/<name>``, ``pending/<name>``) and the pending base
        version: what a node saves to resume with the same residual."""
        tensors = {f"committed/{k}": v for k, v in self._committed.items()}
        tensors.update({f"pending/{k}": v for k, v in self._pending.items()})
        return tensors, self._pending_base

    def load_state_dict(
        self, tensors: Mapping[str, torch.Tensor], pending_base: str | None
    ) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._committed = {
            k[len("committed/") :]: v for k, v in tensors.items() if k.startswith("committed/")
        }
        self._pending = {
            k[len("pending/") :]: v for k, v in tensors.items() if k.startswith("pending/")
        }
        self._pending_base = pending_base


@dataclass
class Envelope:
    update_id: str
    node_id: str
    vsn: str
    model: str
    base_version: str
    round: int
    samples: int
    metrics: dict[str, float]
    created_ns: int
    encoding: dict[str, Any]
    payload_sha256: str
    payload_bytes: int
    raw_bytes: int
    v: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(
            self.__dict__, sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # also too-deep nesting, too-long integers
            raise UpdateRejected("format", f"envelope is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise UpdateRejected("format", "envelope is not a JSON object")
        if obj.get("v") != FORMAT_VERSION:
            raise UpdateRejected("format", f"unsupported envelope version {obj.get('v')!r}")
        types = {
            "update_id": str,
            "node_id": str,
            "vsn": str,
            "model": str,
            "base_version": str,
            "round": int,
            "samples": int,
            "metrics": dict,
            "created_ns": int,
            "encoding": dict,
            "payload_sha256": str,
            "payload_bytes": int,
            "raw_bytes": int,
            "v": int,
        }
        for k, t in types.items():
            if not isinstance(obj.get(k), t) or isinstance(obj.get(k), bool):
                raise UpdateRejected("format", f"envelope field {k!r} missing or not {t.__name__}")
        extra = set(obj) - set(types)
        if extra:
            raise UpdateRejected("format", f"unknown envelope fields {sorted(extra)}")
        for name, value in obj["metrics"].items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UpdateRejected("format", f"metric {name!r} is {value!r:.40}, not a number")
            if not _finite_number(value):  # NaN, Infinity, 1e999 (read as inf), 10**400
                raise UpdateRejected(
                    "nonfinite",
                    f"metric {name!r} is {value!r:.40}: only finite numbers are allowed",
                )
        obj["metrics"] = {name: float(value) for name, value in obj["metrics"].items()}
        return cls(**obj)


@dataclass
class EncodedUpdate:
    envelope: Envelope
    blob: bytes

    @property
    def update_id(self) -> str:
        return self.envelope.update_id


@dataclass
class DecodedUpdate:
    envelope: Envelope
    delta: dict[str, torch.Tensor] = field(repr=False)


@contextmanager
def _torch_threads(n: int | None):
    """Run with ``n`` torch intra-op threads, then restore the previous count.

    The codec's work is a few memory-bound elementwise ops on each of many small
    tensors; intra-op threads only add a synchronisation per op, and on a busy
    machine each costs milliseconds (ResNet-18 encode: 0.35 s on one thread,
    2.4 s on two threads sharing two loaded cores).  torch's thread count is
    process-wide, so this assumes no other thread runs torch work meanwhile
    (true for the daemon: the training thread encodes between rounds)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _compress(data: bytes, s: CodecSettings) -> bytes:
    if s.compression == "zstd":
        return zstandard.ZstdCompressor(level=s.zstd_level).compress(data)
    if s.compression == "deflate":
        return zlib.compress(data, s.deflate_level)
    return data


def _decompress(data: bytes, method: str, raw_bytes: int) -> bytes:
    """The decompressed payload; never more than ``raw_bytes + 1`` bytes are produced."""
    try:
        if method == "zstd":
            out = _unzstd(data, raw_bytes)
        elif method == "deflate":
            out = _inflate(data, raw_bytes)
        elif method == "none":
            out = data
        else:
            raise UpdateRejected("format", f"unknown compression {method!r}")
    except (zstandard.ZstdError, zlib.error) as e:
        raise UpdateRejected("format", f"payload does not decompress: {e}") from None
    if len(out) > raw_bytes:
        raise UpdateRejected("size", f"payload decompresses to more than raw_bytes = {raw_bytes}")
    if len(out) != raw_bytes:
        raise UpdateRejected(
            "size", f"payload decompresses to {len(out)} bytes, envelope says {raw_bytes}"
        )
    return out


def _unzstd(data: bytes, raw_bytes: int) -> bytes:
    # zstandard's one-shot decompress() allocates the size the frame header declares
    # and then ignores max_output_size (2**50 declared: MemoryError).  So the declared
    # size is checked first, and a streaming reader produces at most raw_bytes + 1.
    declared = zstandard.frame_content_size(data)
    if declared < 0:
        raise UpdateRejected("size", "zstd frame does not declare its content size")
    if declared > raw_bytes:
        raise UpdateRejected(
            "size",
            f"zstd frame declares {declared} bytes, more than the "
            f"envelope's raw_bytes = {raw_bytes}",
        )
    parts: list[bytes] = []
    left = raw_bytes + 1
    # read_across_frames: data after the first frame is decoded too and counts
    # against the bound (or fails as garbage) instead of being silently ignored.
    with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
        while left > 0:
            part = reader.read(left)
            if not part:
                break
            parts.append(part)
            left -= len(part)
    return b"".join(parts)


def _inflate(data: bytes, raw_bytes: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, raw_bytes + 1)
    if len(out) <= raw_bytes:
        if not d.eof:
            raise UpdateRejected("format", "deflate stream is truncated")
        if d.unused_data:
            raise UpdateRejected("format", f"{len(d.unused_data)} bytes after the deflate stream")
    return out


def _quantize(x: torch.Tensor, dtype: Dtype) -> tuple[torch.Tensor, float | None, torch.Tensor]:
    """(wire tensor, int8 scale or None, what the receiver will reconstruct)."""
    if dtype == "fp32":
        return x, None, x
    if dtype == "fp16":
        q = x.to(torch.float16)
        return q, None, q.to(torch.float32)
    amax = float(x.abs().max()) if x.numel() else 0.0
    scale = float(torch.tensor(amax / 127.0, dtype=torch.float32)) if amax > 0 else 0.0
    if scale > 0:
        q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    else:
        q = torch.zeros_like(x, dtype=torch.int8)
    return q, scale, q.to(torch.float32) * scale


class UpdateEncoder:
    """Encodes and signs this node's updates.

    ``encode`` is pure CPU work (no I/O) and takes well under a second for a
    ResNet-18; hand the resulting blob to the outbox / publisher.
    ``torch_threads``: intra-op threads while encoding (None: leave torch's).
    """

    def __init__(
        self,
        *,
        node_id: str,
        vsn: str,
        model: str,
        key: bytes,
        settings: CodecSettings | None = None,
        feedback: ErrorFeedback | None = None,
        torch_threads: int | None = 1,
    ):
        if len(key) < 16:
            raise ValueError("HMAC key must be at least 16 bytes")
        self.node_id, self.vsn, self.model = node_id, vsn, model
        self._key = key
        self.settings = settings or CodecSettings()
        lossy = self.settings.dtype != "fp32" or self.settings.topk > 0
        self.feedback = feedback if feedback is not None else (ErrorFeedback() if lossy else None)
        self.torch_threads = torch_threads

    def encode(
        self,
        weights: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        *,
        base_version: str,
        round: int,
        samples: int,
        metrics: Mapping[str, float] | None = None,
        update_id: str | None = None,
    ) -> EncodedUpdate:
        """Encode ``weights - base`` (floating tensors of ``base``).  ``update_id``:
        a caller-chosen id (a node derives it from its id and round, so a retried
        round keeps its id); default a random UUID."""
        with _torch_threads(self.torch_threads):
            return self.encode_delta(
                weight_delta(weights, base),
                base_version=base_version,
                round=round,
                samples=samples,
                metrics=metrics,
                update_id=update_id,
            )

    def encode_delta(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        base_version: str,
        round: int,
        samples: int,
        metrics: Mapping[str, float] | None = None,
        update_id: str | None = None,
    ) -> EncodedUpdate:
        """Encode a ready-made delta (name -> tensor)."""
        with _torch_threads(self.torch_threads):
            return self._encode(
                delta, str(base_version), int(round), int(samples), metrics, update_id
            )

    def _encode(
        self,
        delta: Mapping[str, torch.Tensor],
        base_version: str,
        round: int,
        samples: int,
        metrics: Mapping[str, float] | None,
        update_id: str | None = None,
    ) -> EncodedUpdate:
        s = self.settings
        metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        for metric, value in metrics.items():
            if not math.isfinite(value):
                raise ValueError(f"metric {metric!r} is not finite: {value}")
        carry = self.feedback.carry(base_version) if self.feedback is not None else {}
        tensors: dict[str, torch.Tensor] = {}
        scales: dict[str, float] = {}
        residual: dict[str, torch.Tensor] = {}
        for name, d in delta.items():
            if INDEX_SUFFIX in name:
                raise ValueError(f"tensor name {name!r} contains {INDEX_SUFFIX!r}")
            x = d.detach().to("cpu", torch.float32)
            if name in carry:
                x = x + carry[name]
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"update tensor {name!r} has non-finite values")
            if s.dtype == "fp16" and x.numel() and float(x.abs().max()) > _FP16_MAX:
                raise ValueError(f"update tensor {name!r} exceeds the fp16 range")
            flat = x.reshape(-1)
            if s.topk > 0:
                k = max(1, math.ceil(s.topk * flat.numel())) if flat.numel() else 0
                idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
                q, scale, rec = _quantize(flat[idx], s.dtype)
                tensors[name] = q.contiguous()
                tensors[name + INDEX_SUFFIX] = idx.to(torch.int32)
                sent = torch.zeros_like(flat)
                sent[idx] = rec
            else:
                q, scale, sent = _quantize(flat, s.dtype)
                tensors[name] = q.reshape(x.shape).contiguous()
            if scale is not None:
                scales[name] = scale
            if self.feedback is not None:
                residual[name] = (flat - sent).reshape(x.shape)
        meta = {"format": PAYLOAD_FORMAT, "dtype": s.dtype, "sparse": "topk" if s.topk else "dense"}
        if s.dtype == "int8":
            meta["scales"] = json.dumps(scales, sort_keys=True)
        raw = st_save(tensors, metadata=meta)
        payload = _compress(raw, s)
        env = Envelope(
            update_id=update_id or str(uuid.uuid4()),
            node_id=self.node_id,
            vsn=self.vsn,
            model=self.model,
            base_version=base_version,
            round=round,
            samples=samples,
            metrics=metrics,
            created_ns=time.time_ns(),
            encoding={"dtype": s.dtype, "topk": s.topk, "compression": s.compression},
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            payload_bytes=len(payload),
            raw_bytes=len(raw),
        )
        blob = _seal(env.to_json(), payload, self._key)
        if self.feedback is not None:
            self.feedback.record(base_version, residual)
        return EncodedUpdate(env, blob)


def _seal(env_json: bytes, payload: bytes, key: bytes) -> bytes:
    if len(env_json) > MAX_ENVELOPE_BYTES:
        raise ValueError("envelope too large")
    head = MAGIC + struct.pack(">I", len(env_json)) + env_json
    mac = hmac.new(key, head, hashlib.sha256)
    mac.update(payload)
    return b"".join((head, mac.digest(), payload))


def _split(blob: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(signed head, envelope json, mac, payload); only the framing is checked."""
    if len(blob) < len(MAGIC) + 4 or blob[:4] != MAGIC:
        raise UpdateRejected("format", "not a waggle update (bad magic)")
    (n,) = struct.unpack(">I", blob[4:8])
    if n > MAX_ENVELOPE_BYTES or len(blob) < 8 + n + MAC_BYTES:
        raise UpdateRejected("format", "truncated update or oversized envelope")
    head = blob[: 8 + n]
    return head, blob[8 : 8 + n], blob[8 + n : 8 + n + MAC_BYTES], blob[8 + n + MAC_BYTES :]


def peek_envelope(blob: bytes) -> Envelope:
    """The envelope *without* checking the signature: only for local bookkeeping
    (the outbox), never for trusting an update."""
    return Envelope.from_json(_split(blob)[1])


KeyLookup = Callable[[str], "bytes | None"]


class UpdateDecoder:
    """Verifies and decodes updates (server side, and tests).

    ``keys`` is one key, a mapping node id -> key, or a callable returning the
    key for a node id (None: unknown node).  ``max_update_bytes`` bounds both the
    blob and its decompressed payload.
    """

    def __init__(
        self,
        keys: bytes | Mapping[str, bytes] | KeyLookup,
        *,
        max_update_bytes: int = 1 << 30,
        torch_threads: int | None = 1,
    ):
        if isinstance(keys, (bytes, bytearray)):
            k = bytes(keys)
            self._key_for: KeyLookup = lambda node: k
        elif isinstance(keys, Mapping):
            self._key_for = keys.get
        else:
            self._key_for = keys
        self.max_update_bytes = max_update_bytes
        self.torch_threads = torch_threads

    def verify(self, blob: bytes) -> tuple[Envelope, bytes]:
        """Check size, framing, signature and payload hash; return the envelope
        and the (still compressed) payload."""
        if len(blob) > self.max_update_bytes:
            raise UpdateRejected(
                "size", f"update is {len(blob)} bytes, limit {self.max_update_bytes}"
            )
        head, env_json, mac, payload = _split(blob)
        env = Envelope.from_json(env_json)
        key = self._key_for(env.node_id)
        if not key:
            raise UpdateRejected("key", f"no key for node {env.node_id!r}")
        expected = hmac.new(key, head, hashlib.sha256)
        expected.update(payload)
        if not hmac.compare_digest(expected.digest(), mac):
            raise UpdateRejected(
                "signature",
                f"HMAC of update {env.update_id} from node {env.node_id!r} does not match",
            )
        if len(payload) != env.payload_bytes:
            raise UpdateRejected("size", "payload length differs from envelope")
        if not hmac.compare_digest(hashlib.sha256(payload).hexdigest(), env.payload_sha256):
            raise UpdateRejected("sha256", "payload SHA-256 differs from envelope")
        return env, payload

    def decode(
        self,
        blob: bytes,
        reference: Mapping[str, Any] | Callable[[Envelope], Mapping[str, Any] | None],
        *,
        expected_model: str | None = None,
        expected_base_version: str | None = None,
    ) -> DecodedUpdate:
        """Verify, then decode to dense float32 deltas shaped like ``reference``
        (a state dict or a mapping of :class:`TensorSpec`, or a callable that
        returns one for the verified envelope, e.g. by model and base version)."""
        env, payload = self.verify(blob)
        ref = reference(env) if callable(reference) else reference
        if ref is None:
            raise UpdateRejected(
                "base_version",
                f"no reference weights for model {env.model!r} base {env.base_version!r}",
            )
        if expected_model is not None and env.model != expected_model:
            raise UpdateRejected(
                "model", f"update is for model {env.model!r}, expected {expected_model!r}"
            )
        if expected_base_version is not None and env.base_version != str(expected_base_version):
            raise UpdateRejected(
                "base_version",
                f"update is against base {env.base_version!r}, expected {expected_base_version!r}",
            )
        enc = env.encoding
        dtype, topk, comp = enc.get("dtype"), enc.get("topk"), enc.get("compression")
        if (
            dtype not in _WIRE_DTYPE
            or not isinstance(topk, (int, float))
            or not 0 <= topk < 1
            or not isinstance(comp, str)
        ):
            raise UpdateRejected("format", f"bad encoding {enc!r:.200}")
        if env.raw_bytes > self.max_update_bytes or env.raw_bytes < 8:
            raise UpdateRejected(
                "size",
                f"decompressed payload would be {env.raw_bytes} bytes, "
                f"limit {self.max_update_bytes}",
            )
        raw = _decompress(payload, comp, env.raw_bytes)
        sparse = topk > 0
        header = _safetensors_header(raw)
        _check_wire_dtypes(header, dtype, sparse)
        try:
            tensors = st_load(raw)
        except SafetensorError as e:
            raise UpdateRejected("format", f"payload is not safetensors: {e}") from None
        meta = header.get("__metadata__") or {}  # str -> str: st_load checked it
        if (
            meta.get("format") != PAYLOAD_FORMAT
            or meta.get("dtype") != dtype
            or meta.get("sparse") != ("topk" if sparse else "dense")
        ):
            raise UpdateRejected("format", f"payload metadata {meta!r} does not match envelope")
        spec = reference_spec(ref)
        with _torch_threads(self.torch_threads):
            return DecodedUpdate(env, _rebuild(tensors, meta, spec, dtype, sparse))


def _safetensors_header(raw: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file (u64 length, then JSON), or "format"."""
    if len(raw) < 8:
        raise UpdateRejected("format", "payload is not safetensors: too short")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise UpdateRejected(
            "format", f"payload is not safetensors: header of {n} bytes in {len(raw)}"
        )
    try:
        header = json.loads(raw[8 : 8 + n])
    except (ValueError, RecursionError) as e:
        raise UpdateRejected("format", f"payload is not safetensors: header: {e}") from None
    if not isinstance(header, dict):
        raise UpdateRejected("format", "payload is not safetensors: header is not an object")
    return header


_SAFETENSORS_DTYPE = {"fp32": "F32", "fp16": "F16", "int8": "I8"}


def _check_wire_dtypes(header: Mapping[str, Any], dtype: str, sparse: bool) -> None:
    """Refuse any tensor whose dtype the encoding does not use, before a tensor is
    built (safetensors' torch loader fails with KeyError on dtypes torch lacks)."""
    allowed = {_SAFETENSORS_DTYPE[dtype]} | ({"I32"} if sparse else set())
    for name, info in header.items():
        if name == "__metadata__":
            continue
        got = info.get("dtype") if isinstance(info, dict) else None
        if got not in allowed:
            raise UpdateRejected(
                "dtype",
                f"{name}: safetensors dtype {got!r:.40}, expected {' or '.join(sorted(allowed))}",
            )


def _finite_number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond the range of a float
        return False


def _rebuild(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    spec: Mapping[str, TensorSpec],
    dtype: str,
    sparse: bool,
) -> dict[str, torch.Tensor]:
    wire = _WIRE_DTYPE[dtype]
    expected_names = set(spec)
    if sparse:
        expected_names |= {n + INDEX_SUFFIX for n in spec}
    got = set(tensors)
    if got != expected_names:
        missing, extra = sorted(expected_names - got)[:5], sorted(got - expected_names)[:5]
        raise UpdateRejected(
            "names",
            f"tensor names differ from the reference: missing {missing}, unexpected {extra}",
        )
    scales: dict[str, float] = {}
    if dtype == "int8":
        try:
            scales = json.loads(meta.get("scales", ""))
        except (ValueError, RecursionError):
            raise UpdateRejected("format", "int8 scales are not JSON") from None
        if not isinstance(scales, dict) or set(scales) != set(spec):
            raise UpdateRejected("format", "int8 scales do not name every tensor")
        for n, v in scales.items():
            if not _finite_number(v) or not 0 <= v <= MAX_INT8_SCALE:
                raise UpdateRejected(
                    "nonfinite",
                    f"int8 scale of {n!r} is {v!r:.40} (allowed: a number in "
                    f"0..{MAX_INT8_SCALE:.3g}, so that 127 x scale is a finite float32)",
                )
    out: dict[str, torch.Tensor] = {}
    for name, sp in spec.items():
        t = tensors[name]
        if t.dtype != wire:
            raise UpdateRejected("dtype", f"{name}: dtype {t.dtype}, expected {wire}")
        numel = math.prod(sp.shape)
        if sparse:
            idx = tensors[name + INDEX_SUFFIX]
            if (
                idx.dtype != torch.int32
                or idx.dim() != 1
                or t.dim() != 1
                or idx.numel() != t.numel()
            ):
                raise UpdateRejected("shape", f"{name}: sparse values/indices malformed")
            if idx.numel() > numel:
                raise UpdateRejected("shape", f"{name}: {idx.numel()} indices for {numel} entries")
            idx64 = idx.to(torch.int64)
            if idx64.numel() and (
                int(idx64.min()) < 0
                or int(idx64.max()) >= numel
                or not bool((idx64[1:] > idx64[:-1]).all())
            ):
                raise UpdateRejected("shape", f"{name}: indices out of range or not increasing")
        elif tuple(t.shape) != tuple(sp.shape):
            raise UpdateRejected(
                "shape", f"{name}: shape {tuple(t.shape)}, expected {tuple(sp.shape)}"
            )
        vals = t.to(torch.float32)
        if dtype == "int8":
            vals = vals * float(scales[name])
        # Every decoded tensor, whatever its codec: the pool takes finite values only.
        if not bool(torch.isfinite(vals).all()):
            raise UpdateRejected("nonfinite", f"{name}: non-finite values")
        if sparse:
            dense = torch.zeros(numel, dtype=torch.float32)
            dense[idx64] = vals
            out[name] = dense.reshape(sp.shape)
        else:
            out[name] = vals
    return out
