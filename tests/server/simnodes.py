"""Simulated nodes for the server tests: a tiny model, keys, encoded updates."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from waggle_trainer.server.config import server_config_from_dict
from waggle_trainer.server.signing import generate_signing_key
from waggle_trainer.server.staging import ChunkMessage
from waggle_trainer.transport.chunks import split
from waggle_trainer.transport.codec import CodecSettings, UpdateEncoder, _seal

MODEL = "tiny"


def tiny_state(seed: int = 0, big: int = 0) -> dict[str, torch.Tensor]:
    """A few small tensors (plus one of ``big`` floats when asked)."""
    g = torch.Generator().manual_seed(seed)
    extra = {"big.weight": torch.randn(big, generator=g)} if big else {}
    return extra | {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(5, 8, generator=g),
        "fc.bias": torch.randn(5, generator=g),
        "bn.running_var": torch.ones(4),
        "bn.num_batches_tracked": torch.tensor(3),
    }


def node_key(node: str) -> bytes:
    return f"key-of-{node}-0123456789abcdef".encode()


def setup_server_files(tmp: Path, nodes: list[str], big: int = 0, **sections) -> dict:
    """Keys dir, initial weights, signing key; returns the config dict."""
    keys = tmp / "node-keys"
    keys.mkdir(parents=True, exist_ok=True)
    for n in nodes:
        p = keys / f"{n}.key"
        p.write_bytes(node_key(n))
        os.chmod(p, 0o600)
    init = tmp / "initial.safetensors"
    save_file(tiny_state(big=big), str(init))
    sk = tmp / "signing.pem"
    if not sk.exists():
        generate_signing_key(sk)
    cfg = {
        "server": {"state_dir": str(tmp / "state")},
        "verify": {"keys_dir": str(keys)},
        "broadcast": {"signing_key_file": str(sk)},
        "models": {MODEL: {"initial_weights": str(init)}},
        "status": {"port": 0},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def make_config(tmp: Path, nodes: list[str], **sections):
    return server_config_from_dict(setup_server_files(tmp, nodes, **sections))


def random_delta(seed: int, scale: float = 0.01, big: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        k: torch.randn(v.shape, generator=g) * scale
        for k, v in tiny_state(big=big).items()
        if v.is_floating_point()
    }


def encoder(node: str, settings: CodecSettings | None = None, key: bytes | None = None):
    return UpdateEncoder(
        node_id=node,
        vsn="W0T",
        model=MODEL,
        key=key or node_key(node),
        settings=settings or CodecSettings("fp32", "none"),
    )


def messages(
    blob: bytes, update_id: str, node: str, chunk_size: int = 1 << 20, user_id: str | None = "same"
) -> list[ChunkMessage]:
    uid = node if user_id == "same" else user_id
    return [
        ChunkMessage(
            routing_key=f"update.{node}",
            body=c.body,
            message_id=c.message_id,
            headers=c.headers(),
            user_id=uid,
        )
        for c in split(update_id, blob, chunk_size)
    ]


def publish(
    params,
    exchange: str,
    blob: bytes,
    update_id: str,
    node: str,
    *,
    user_id: str | None = "same",
    chunk_size: int = 1 << 20,
    headers=None,
) -> None:
    """Publish an update's chunks as the node's publisher would (persistent,
    mandatory, confirmed), with ``user_id`` = the node (or as given)."""
    import time

    import pika

    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    for c in split(update_id, blob, chunk_size):
        props = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/vnd.waggle.update",
            message_id=c.message_id,
            headers=dict(c.headers(), **(headers or {})),
            user_id=node if user_id == "same" else user_id,
            app_id="waggle-trainer",
            type="waggle.update.chunk",
            timestamp=int(time.time()),
        )
        ch.basic_publish(exchange, f"update.{node}", c.body, props, mandatory=True)
    conn.close()


def dead_letters(params, queue: str) -> list:
    import pika

    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    out = []
    while True:
        m, props, body = ch.basic_get(queue, auto_ack=True)
        if m is None:
            break
        out.append((props, body))
    conn.close()
    return out


def write_toml(path: Path, cfg: dict) -> Path:
    """The config dict as a TOML file (tables of scalars, and [models.NAME])."""
    import json

    lines = []

    def table(name: str, values: dict) -> None:
        lines.append(f"[{name}]")
        for k, v in values.items():
            if isinstance(v, dict):
                continue
            lines.append(f"{k} = {json.dumps(v)}")
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, values in cfg.items():
        table(name, values)
    path.write_text("\n".join(lines) + "\n")
    return path


def broker_sections(n) -> dict:
    return {
        "queue": {
            "exchange": n.exchange,
            "queue": n.queue,
            "dead_letter_exchange": n.dlx,
            "dead_letter_queue": n.dlq,
        },
        "broadcast": {"exchange": n.models},
        "telemetry": {"exchange": n.telemetry},
    }


def _uid(blob: bytes) -> str:
    from waggle_trainer.transport.codec import peek_envelope

    return peek_envelope(blob).update_id


def _forge_raw(u, raw_payload: bytes) -> bytes:
    """Re-sign ``u`` with another (uncompressed) payload, as a node with its key could."""
    import hashlib

    env = u.envelope
    env.payload_sha256 = hashlib.sha256(raw_payload).hexdigest()
    env.payload_bytes = env.raw_bytes = len(raw_payload)
    env.encoding = dict(env.encoding, compression="none")
    return _seal(env.to_json(), raw_payload, node_key(env.node_id))


def _forge(u, mutate) -> bytes:
    from safetensors.torch import load, save

    from waggle_trainer.transport.codec import _split

    payload = _split(u.blob)[3]
    tensors = load(payload)
    mutate(tensors)
    n = struct.unpack("<Q", payload[:8])[0]
    import json

    meta = json.loads(payload[8 : 8 + n]).get("__metadata__")
    return _forge_raw(u, save(tensors, metadata=meta))


class Receiver:
    """The server's consumer and pipeline in process, as the receiving end of the
    node-side tests: accepted updates stay pending (no round is ever due)."""

    def __init__(self, tmp: Path, names, n: int, key: bytes, nodes=("n1",), amqp=None, **sections):
        from waggle_trainer.server.consumer import ServerConsumer
        from waggle_trainer.server.pipeline import UpdatePipeline

        keys = tmp / "recv-keys"
        keys.mkdir(parents=True, exist_ok=True)
        for node in nodes:
            (keys / f"{node}.key").write_bytes(key)
            os.chmod(keys / f"{node}.key", 0o600)
        init = tmp / "recv-initial.safetensors"
        save_file({"w": torch.zeros(n)}, str(init))
        cfg = {
            "server": {"state_dir": str(tmp / "recv-state")},
            "verify": {"keys_dir": str(keys), "require_user_id": False},
            "aggregation": {"min_updates": 10**9, "window_s": 1e9},
            "broadcast": {"enabled": False},
            "telemetry": {"enabled": False},
            "status": {"enabled": False},
            "models": {"m": {"initial_weights": str(init)}},
            "queue": {
                "exchange": names.exchange,
                "queue": names.queue,
                "dead_letter_exchange": names.dlx,
                "dead_letter_queue": names.dlq,
            },
        }
        for k, v in sections.items():
            cfg.setdefault(k, {}).update(v)
        self.cfg = server_config_from_dict(cfg)
        self.pipeline = UpdatePipeline(self.cfg)
        self.pipeline.startup()
        self.consumer = ServerConsumer(self.cfg, self.pipeline, amqp=amqp)
        self.consumer.start()

    def _db(self):
        from waggle_trainer.server.state import StateDB

        return StateDB(self.pipeline.root / "state.sqlite", readonly=True)

    def ids(self) -> list[str]:
        db = self._db()
        try:
            return [
                r[0]
                for r in db.conn.execute(
                    "SELECT update_id FROM updates WHERE status != 'rejected' ORDER BY received_ns"
                )
            ]
        finally:
            db.close()

    @property
    def rejected(self) -> dict[str, int]:
        db = self._db()
        try:
            return {
                r[0]: r[1]
                for r in db.conn.execute("SELECT code, COUNT(*) FROM rejections GROUP BY code")
            }
        finally:
            db.close()

    def counters(self) -> dict[str, int]:
        db = self._db()
        try:
            return db.counters()
        finally:
            db.close()

    def delta(self, update_id: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.pipeline.pending_dir / f"{update_id}.safetensors"))

    def wait_for(self, n: int, timeout: float) -> bool:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.ids()) >= n:
                return True
            time.sleep(0.05)
        return len(self.ids()) >= n

    def stop(self) -> None:
        self.consumer.stop()
