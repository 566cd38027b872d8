"""What the server does with each chunk and each round, without the broker.

:class:`UpdatePipeline` turns a delivered chunk into durable effects (staged
on disk, an update accepted into the pool, a version stored) and tells the
caller what to dead-letter.  It is called from one worker thread, under the
state directory's lock; the AMQP side (``consumer.py``) acknowledges a message
only after the call returned and its dead letters were confirmed.

Checks on a complete update, in order (each refusal has a code, see
``docs/protocol.md``): reassembled SHA-256; framing, envelope, HMAC with the
node's key file, payload hash (codec); update id header; already handled
(duplicate: acked, not counted again); broker-vouched ``user_id`` equals the
node id; finite metrics; model known; base version known and not too stale;
round newer than the last accepted round of the update's stream, and the stream
not one the node has left (replay); payload is
safetensors (a pickle or anything else is refused before it is parsed);
names, shapes, dtypes, finite values against the base version.
"""

from __future__ import annotations

import logging
import math
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zstandard
from safetensors import safe_open
from safetensors.torch import load_file

from waggle_trainer.transport.chunks import ChunkError, parse_headers
from waggle_trainer.transport.codec import Envelope, UpdateDecoder, UpdateRejected
from waggle_trainer.transport.wire import UPDATE_ID_CHARS, UPDATE_ID_MAX, update_stream

from .aggregate import combine, staleness_weight
from .config import ServerConfig
from .files import StateLock, file_sha256, remove_temp_files, save_tensors_atomic
from .keys import NodeKeys
from .staging import ChunkMessage, Staging, valid_update_id
from .state import PendingUpdate, StateDB
from .store import ModelStore, VersionInfo

log = logging.getLogger(__name__)


@dataclass
class DeadLetter:
    msg: ChunkMessage
    code: str
    reason: str


@dataclass
class Outcome:
    """Dead letters to publish (confirmed) before ``finish()`` records the
    refusals durably; then the message may be acknowledged."""

    dead_letters: list[DeadLetter] = field(default_factory=list)
    finish_steps: list[Callable[[], None]] = field(default_factory=list)
    new_versions: list[VersionInfo] = field(default_factory=list)
    accepted: str | None = None
    duplicate: bool = False

    def finish(self) -> None:
        for step in self.finish_steps:
            step()
        self.finish_steps.clear()

    def merge(self, other: Outcome) -> None:
        self.dead_letters += other.dead_letters
        self.finish_steps += other.finish_steps
        self.new_versions += other.new_versions


def looks_like_safetensors(head: bytes, total: int) -> str | None:
    """None if ``head`` (the first bytes of a payload of ``total`` bytes) starts
    like a safetensors file, else what it looks like.  Nothing is parsed."""
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= total - 8 and head[8:9] == b"{":
            return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save)"
    return "not safetensors"


def _payload_head(payload: memoryview, compression: Any, n: int = 4096) -> bytes | None:
    """The first ``n`` decompressed bytes of a payload, without inflating the rest;
    None when they cannot be had (the codec then refuses the payload with the
    precise reason: a bomb, a corrupt stream, an unknown method)."""
    try:
        if compression == "zstd":
            return zstandard.ZstdDecompressor().stream_reader(payload).read(n)
        if compression == "deflate":
            return zlib.decompressobj().decompress(payload, n)
    except (zstandard.ZstdError, zlib.error):
        return None
    return bytes(payload[:n]) if compression == "none" else None


SLICE_BYTES = 16 * 2**20  # float64 working set per slice of one tensor, all contributors


def _combine_in_slices(
    files: list,
    name: str,
    current: torch.Tensor,
    bases: list,
    weights: list[float],
    rule: str,
    trim_fraction: float,
) -> torch.Tensor:
    """:func:`combine` one tensor, reading it from every contributor's file in
    slices along the first dimension, so memory stays bounded however many
    contributors there are (results do not depend on the slicing).

    A contributor whose update was made on an older version (``bases[i]``: that
    version's weights file, opened; None when it is ``current``'s) sent weights minus
    *that* base: its delta from ``current`` is ``delta + base - current``.  Adding its
    delta to ``current`` as it is would count again what ``current`` already holds
    (a node's deltas are cumulative since its base: measured, a single node's second
    update on version 1 applied to version 2 doubled its first step)."""

    def part(i: int, f, rows: slice | None) -> torch.Tensor:
        d = (f.get_tensor(name) if rows is None else f.get_slice(name)[rows]).to(torch.float64)
        if bases[i] is not None:
            b = bases[i].get_tensor(name) if rows is None else bases[i].get_slice(name)[rows]
            cur = current if rows is None else current[rows]
            d = d + (b.to(torch.float64) - cur.to(torch.float64))
        return d

    shape = current.shape
    if len(shape) == 0:
        return combine(
            [part(i, f, None) for i, f in enumerate(files)], weights, rule, trim_fraction
        )
    rows = shape[0]
    row_elems = max(1, math.prod(shape[1:]))
    step = max(1, SLICE_BYTES // (8 * row_elems * len(files)))
    out = torch.empty(shape, dtype=torch.float64)
    for r0 in range(0, rows, step):
        parts = [part(i, f, slice(r0, r0 + step)) for i, f in enumerate(files)]
        out[r0 : r0 + step] = combine(parts, weights, rule, trim_fraction)
    return out


class InitialWeightsError(ValueError):
    """A model's configured initial weights cannot become its version 1."""

    def __init__(self, model: str, message: str):
        super().__init__(message)
        self.model = model


class _AlreadyHandled(Exception):
    """The update's id is in the durable de-duplication set."""


class UpdatePipeline:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        root = Path(cfg.server.state_dir)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root = root
        self.lock = StateLock(root / "lock")
        self.db = StateDB(root / "state.sqlite")
        self.store = ModelStore(root / "models", retain=cfg.store.retain_versions)
        self.staging = Staging(
            root / "staging",
            max_bytes=cfg.verify.staging_max_bytes,
            max_age_s=cfg.verify.staging_max_age_s,
            max_partials_per_node=cfg.verify.staging_partials_per_node,
            max_update_bytes=cfg.verify.max_update_bytes,
        )
        self.pending_dir = root / "pending"
        self.pending_dir.mkdir(exist_ok=True, mode=0o700)
        self.keys = NodeKeys(cfg.verify.keys_dir)
        self.decoder = UpdateDecoder(self.keys, max_update_bytes=cfg.verify.max_update_bytes)

    # ------------------------------------------------------------------ start
    def startup(self) -> list[VersionInfo]:
        """Import initial models, repair interrupted work; returns versions
        stored by this call (to broadcast)."""
        new = []
        with self.lock.held():
            remove_temp_files(self.pending_dir)
            for model, section in self.cfg.models.items():
                self.store.cleanup(model)
                if self.store.latest(model) is None:
                    new.append(self._import_initial(model, Path(section.initial_weights)))
            self.reconcile()
        return new

    def _import_initial(self, model: str, path: Path) -> VersionInfo:
        try:
            weights = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise InitialWeightsError(model, f"{str(path)!r} does not load: {e}") from None
        for name, t in weights.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InitialWeightsError(
                    model, f"{str(path)!r}: tensor {name!r} has non-finite values"
                )
        info = self.store.write(
            model,
            1,
            weights,
            {
                "parent": None,
                "created_ns": time.time_ns(),
                "rule": {"rule": "initial"},
                "source": str(path),
                "contributors": [],
                "nodes": [],
                "samples": 0,
            },
        )
        with self.db.transaction():
            self.db.mark_aggregated(model, 1, [])
        log.info("model %s: version 1 imported from %s", model, path)
        return info

    def reconcile(self) -> None:
        """Bring the database in line with the store (:meth:`_record_stored_versions`)
        and remove files of updates no longer pending."""
        self._record_stored_versions()
        pending = self.db.pending_ids()
        for p in self.pending_dir.glob("*.safetensors"):
            if p.stem not in pending:
                p.unlink(missing_ok=True)
        for uid in self.staging.partials():
            if self.db.update_status(uid) is not None:
                self.staging.discard(uid)

    def _record_stored_versions(self) -> None:
        """A version whose manifest is in the store but not in the database (its
        writer died between the two, this process or another server on the same
        state directory) counts its contributors as aggregated now."""
        for model in self.store.models():
            known = self.db.known_versions(model)
            for seq in self.store.seqs(model):
                if seq not in known:
                    info = self.store.get(model, str(seq))
                    assert info is not None
                    ids = [c["update_id"] for c in info.manifest.get("contributors", [])]
                    with self.db.transaction():
                        self.db.mark_aggregated(model, info.seq, ids)
                    log.info(
                        "model %s: version %s recorded after restart (%d updates)",
                        model,
                        info.version,
                        len(ids),
                    )

    # ------------------------------------------------------------------ chunks
    def handle(self, msg: ChunkMessage) -> Outcome:
        """One delivered chunk.  Call with ``self.lock`` held."""
        out = Outcome()
        # A round that became due (or was interrupted by a crash of this or another
        # server) is completed before anything new joins its pool.
        out.new_versions += self._close_due_rounds()
        try:
            uid, idx, cnt, sha = self._parse(msg)
        except ChunkError as e:
            out.merge(self._reject([msg], e.code, e.reason, node=msg.user_id, uid=None))
            return out
        if self.db.update_status(uid) is not None:
            out.duplicate = True  # a chunk of an update already handled: redelivery or resend
            out.finish_steps.append(lambda: self.db.bump("duplicate_chunks"))
            return out
        try:
            complete, evicted = self.staging.add(uid, idx, cnt, sha, msg)
        except ChunkError as e:
            staged = self.staging.messages(uid) if (self.staging.root / uid).is_dir() else []
            out.merge(self._reject(staged + [msg], e.code, e.reason, node=msg.user_id, uid=uid))
            out.finish_steps.append(lambda: self.staging.discard(uid))
            return out
        for old in evicted:
            out.merge(
                self._expire(
                    old,
                    "staging_full",
                    "evicted: staging full (verify.staging_max_bytes: the node holding the "
                    "most gives way) or its node's share of partial updates taken "
                    "(verify.staging_partials_per_node)",
                )
            )
        if complete:
            out.merge(self._complete(uid))
        return out

    def _parse(self, msg: ChunkMessage) -> tuple[str, int, int, str]:
        """Chunk format, headers and ``message_id`` (``chunks.parse_headers``), and
        an update id that is safe as a directory name."""
        uid, idx, cnt, sha = parse_headers(msg.headers, msg.message_id)
        if not valid_update_id(uid):
            raise ChunkError(
                "headers",
                f"update_id {uid[:80]!r} is not an id (1-{UPDATE_ID_MAX} of {UPDATE_ID_CHARS})",
            )
        return uid, idx, cnt, sha

    def _expire(self, uid: str, code: str, reason: str) -> Outcome:
        msgs = self.staging.messages(uid)
        out = self._reject(msgs, code, reason, node=msgs[0].user_id if msgs else None, uid=uid)
        out.finish_steps.append(lambda: self.staging.discard(uid))
        out.finish_steps.append(lambda: self.db.bump("expired_partials"))
        return out

    def _reject(
        self,
        msgs: list[ChunkMessage],
        code: str,
        reason: str,
        *,
        node: str | None,
        uid: str | None,
        env: Envelope | None = None,
    ) -> Outcome:
        log.warning("refused update %s from %s: %s: %s", uid or "?", node or "?", code, reason)
        out = Outcome(dead_letters=[DeadLetter(m, code, reason) for m in msgs])

        def record() -> None:
            with self.db.transaction():
                self.db.record_rejection(node, uid, code, reason)
                if env is not None:
                    self.db.record_verified(env, status="rejected", reason=f"{code}: {reason}")

        out.finish_steps.append(record)
        return out

    def poison(self, msg: ChunkMessage, error: str) -> Outcome:
        """A chunk whose handling failed unexpectedly ``delivery_limit`` times:
        dead-letter it with the rest of its update."""
        uid = None
        msgs = [msg]
        try:
            uid = self._parse(msg)[0]
            if (self.staging.root / uid).is_dir():
                msgs = [m for m in self.staging.messages(uid) if m.message_id != msg.message_id] + [
                    msg
                ]
        except (ChunkError, OSError, ValueError):
            pass
        out = self._reject(
            msgs,
            "poison",
            f"handling failed {msg.delivery_count + 1} times (queue.delivery_limit): {error}",
            node=msg.user_id,
            uid=uid,
        )
        if uid is not None:
            out.finish_steps.append(lambda: self.staging.discard(uid))
        return out

    # ----------------------------------------------------------------- updates
    def _complete(self, uid: str) -> Outcome:
        msgs = self.staging.messages(uid)
        user_id = msgs[-1].user_id if msgs else None

        def refuse(code: str, reason: str, env: Envelope | None = None) -> Outcome:
            out = self._reject(
                msgs, code, reason, node=env.node_id if env else user_id, uid=uid, env=env
            )
            out.finish_steps.append(lambda: self.staging.discard(uid))
            return out

        try:
            blob = self.staging.blob(uid)
        except ChunkError as e:
            return refuse(e.code, e.reason)
        signed: list[Envelope] = []
        weighting: list[tuple[int, float]] = []

        def checked_reference(env: Envelope):
            """Called by the decoder once the signature held, before the payload is
            decompressed or parsed."""
            if env.update_id != uid:
                raise UpdateRejected("headers", "update_id header differs from the envelope")
            signed.append(env)
            if self.db.update_status(uid) is not None:
                raise _AlreadyHandled
            n = int.from_bytes(blob[4:8], "big")
            payload = memoryview(blob)[8 + n + 32 :]  # a zstd block can be 128 KiB: all of it
            weighting.append(self._check(env, payload, msgs))
            return self._reference(env)

        try:
            decoded = self.decoder.decode(blob, checked_reference)
        except _AlreadyHandled:
            out = Outcome(duplicate=True)
            out.finish_steps.append(lambda: self.staging.discard(uid))
            return out
        except UpdateRejected as e:
            return refuse(e.code, e.reason, signed[0] if signed else None)
        env = decoded.envelope
        staleness, weight = weighting[0]
        save_tensors_atomic(self.pending_dir / f"{uid}.safetensors", decoded.delta)
        with self.db.transaction():
            superseded = self.db.record_verified(
                env, status="pending", staleness=staleness, weight=weight
            )
        for old in superseded:
            (self.pending_dir / f"{old}.safetensors").unlink(missing_ok=True)
        self.staging.discard(uid)
        log.info(
            "accepted update %s from %s (model %s, base %s, round %d, %d samples%s)",
            uid,
            env.node_id,
            env.model,
            env.base_version,
            env.round,
            env.samples,
            f", staleness {staleness}" if staleness else "",
        )
        out = Outcome(accepted=uid)
        out.new_versions += self._close_due_rounds([env.model])
        return out

    def _reference(self, env: Envelope):
        spec = self.store.spec(env.model, env.base_version)
        if spec is None:
            raise UpdateRejected(
                "base_version",
                f"base version {env.base_version!r} of model {env.model!r} is not kept",
            )
        return spec

    def _check(
        self, env: Envelope, payload: memoryview, msgs: list[ChunkMessage]
    ) -> tuple[int, float]:
        """Checks after the signature, before the payload is parsed: (staleness,
        FedAvg weight)."""
        if self.cfg.verify.require_user_id:
            users = {m.user_id for m in msgs}
            expected = self.cfg.verify.broker_user(env.node_id)
            if users != {expected}:
                raise UpdateRejected(
                    "user_id",
                    f"broker-validated user_id "
                    f"{sorted(map(str, users))} differs from {expected!r}, the user of node "
                    f"id {env.node_id!r}",
                )
        for k, v in env.metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UpdateRejected("format", f"metric {k!r} is not a finite number")
        if env.samples < 1:
            raise UpdateRejected("format", f"samples is {env.samples}, must be >= 1")
        if env.model not in self.cfg.models:
            raise UpdateRejected(
                "model",
                f"model {env.model!r} is not served here "
                f"(served: {', '.join(sorted(self.cfg.models))})",
            )
        latest = self.store.latest(env.model)
        base = self.store.get(env.model, env.base_version)
        if base is None or latest is None:
            raise UpdateRejected(
                "base_version",
                f"base version {env.base_version!r} of model {env.model!r} is unknown",
            )
        staleness = latest.seq - base.seq
        if staleness > self.cfg.aggregation.max_staleness or base.retired:
            raise UpdateRejected(
                "stale",
                f"base version {env.base_version} is {staleness} "
                f"versions old (aggregation.max_staleness = "
                f"{self.cfg.aggregation.max_staleness})",
            )
        self._check_order(env)
        head = _payload_head(payload, env.encoding.get("compression"))
        what = looks_like_safetensors(head, env.raw_bytes) if head is not None else None
        if what is not None:
            raise UpdateRejected("format", f"payload is {what}; only safetensors is accepted")
        return staleness, staleness_weight(
            env.samples, staleness, self.cfg.aggregation.staleness_decay
        )

    def _check_order(self, env: Envelope) -> None:
        """Protocol step 11.  Rounds move forward within a stream (the update id's
        ``<node>-<epoch>`` part); a stream never seen before is a node that started
        its state again (lost, or new) and is heard at once; a stream the node has
        since left is refused.  An update accepted before never gets here: its id is
        in the de-duplication set."""
        stream = update_stream(env.update_id, env.round)
        current = self.db.current_stream(env.node_id, env.model)
        if current is None:
            return
        cur_stream, cur_round = current
        if stream == cur_stream:
            if env.round <= cur_round:
                raise UpdateRejected(
                    "replay",
                    f"round {env.round} is not after the last accepted round {cur_round} "
                    f"of node {env.node_id}" + (f" (stream {stream})" if stream else ""),
                )
        elif self.db.stream_known(env.node_id, env.model, stream):
            raise UpdateRejected(
                "replay",
                f"stream {stream or '(no epoch)'!s} of node {env.node_id} has ended: the "
                f"node has since started {cur_stream or '(no epoch)'}",
            )

    # -------------------------------------------------------------- aggregation
    def tick(self) -> Outcome:
        """Periodic work (call with the lock held): expire old partial updates,
        aggregate pools whose time window has passed."""
        out = Outcome()
        for uid in self.staging.expired():
            out.merge(
                self._expire(
                    uid,
                    "incomplete",
                    f"incomplete after "
                    f"{self.cfg.verify.staging_max_age_s:.0f} s "
                    "(verify.staging_max_age_s)",
                )
            )
        self.reconcile()
        out.new_versions += self._close_due_rounds()
        return out

    def _close_due_rounds(self, models: list[str] | None = None) -> list[VersionInfo]:
        """The one way to aggregation: the database is brought in line with the
        stored manifests first, so a pool that a dead server (or this one, before a
        crash) already turned into a version is never aggregated again; then every
        due pool becomes the next version."""
        self._record_stored_versions()
        new = []
        for model in models if models is not None else list(self.cfg.models):
            pool = self.db.pending(model)
            if not pool:
                continue
            agg = self.cfg.aggregation
            oldest_s = (time.time_ns() - min(p.received_ns for p in pool)) / 1e9
            if len(pool) < agg.min_updates and oldest_s < agg.window_s:
                continue
            new.append(self._aggregate(model, pool))
        return new

    def _base_file(self, model: str, version: str, current: VersionInfo):
        """The weights of an older base ``version``, opened for reading tensor by tensor
        (None for ``current``'s own); its content checked against its manifest."""
        if version == current.version:
            return None
        info = self.store.get(model, version)
        if info is None or info.retired:
            raise RuntimeError(
                f"model {model}: base version {version} of a pending update is not kept"
            )
        if file_sha256(info.weights) != info.manifest["weights_sha256"]:
            raise RuntimeError(f"{info.weights}: content differs from its manifest")
        return safe_open(str(info.weights), framework="pt")

    def _aggregate(self, model: str, pool: list[PendingUpdate]) -> VersionInfo:
        """Store the next version of ``model`` from ``pool`` (deterministic).  Only
        :meth:`_close_due_rounds` calls it, with the pool it read after reconciling."""
        agg = self.cfg.aggregation
        current = self.store.latest(model)
        assert current is not None
        if current.seq not in self.db.known_versions(model):
            raise RuntimeError(
                f"model {model}: version {current.seq} is stored but not recorded; "
                "aggregating now could count its updates twice"
            )
        pool = sorted(pool, key=lambda p: p.update_id)
        log.info(
            "model %s: aggregating %d updates into version %d", model, len(pool), current.seq + 1
        )
        base = self.store.load_weights(current)
        prev_m = self.store.load_momentum(current) if agg.server_momentum > 0 else None
        weights = [p.weight for p in pool]
        files = [
            safe_open(str(self.pending_dir / f"{p.update_id}.safetensors"), framework="pt")
            for p in pool
        ]
        # each older base read (and checked against its manifest) once, whoever used it
        opened = {v: self._base_file(model, v, current) for v in {p.base_version for p in pool}}
        bases = [opened[p.base_version] for p in pool]
        new: dict[str, torch.Tensor] = {}
        momentum: dict[str, torch.Tensor] = {}
        for name, b in base.items():
            if not b.is_floating_point():
                new[name] = b.clone()
                continue
            step = _combine_in_slices(files, name, b, bases, weights, agg.rule, agg.trim_fraction)
            if agg.server_momentum > 0:
                m = (
                    step
                    if prev_m is None or name not in prev_m
                    else prev_m[name].to(torch.float64) * agg.server_momentum + step
                )
                momentum[name] = m.to(torch.float32)
                step = m
            new[name] = (b.to(torch.float64) + step * agg.server_lr).to(b.dtype)
        seq = current.seq + 1
        nodes = sorted({p.node for p in pool})
        manifest: dict[str, Any] = {
            "parent": current.version,
            "created_ns": time.time_ns(),
            "rule": {
                "rule": agg.rule,
                "trim_fraction": agg.trim_fraction,
                "server_momentum": agg.server_momentum,
                "server_lr": agg.server_lr,
                "staleness_decay": agg.staleness_decay,
            },
            "contributors": [
                {
                    "update_id": p.update_id,
                    "node": p.node,
                    "round": p.round,
                    "base_version": p.base_version,
                    "samples": p.samples,
                    "staleness": p.staleness,
                    "weight": p.weight,
                    "metrics": p.metrics,
                }
                for p in pool
            ],
            "nodes": nodes,
            "samples": sum(p.samples for p in pool),
        }
        info = self.store.write(model, seq, new, manifest, momentum if momentum else None)
        with self.db.transaction():
            self.db.mark_aggregated(model, seq, [p.update_id for p in pool])
        for p in pool:
            (self.pending_dir / f"{p.update_id}.safetensors").unlink(missing_ok=True)
        log.info(
            "model %s: version %d stored from %d updates of %d nodes (%s, %d samples)",
            model,
            seq,
            len(pool),
            len(nodes),
            agg.rule,
            manifest["samples"],
        )
        return info

    def accepted_bases(self, model: str) -> list[str]:
        """Base versions updates may still be made against (newest first)."""
        # retention keeps at least max_staleness + 1 versions (the config checks it)
        newest = self.store.seqs(model)[-(self.cfg.aggregation.max_staleness + 1) :]
        return [str(seq) for seq in reversed(newest)]
