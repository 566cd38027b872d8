"""The server's durable bookkeeping (SQLite in the state directory).

* ``updates``: every *verified* update (its HMAC checked), by update id: the
  durable de-duplication set, the pool of pending updates of the next round,
  and which version each update went into.  Updates that fail before their
  signature is checked are not recorded here (a forger must not be able to
  block a real update id), only counted in ``rejections``.
* ``node_streams``: per node, model and stream (the ``<node>-<epoch>`` part of a
  daemon's update ids, ``""`` for ids that name none) the highest round accepted
  and when the stream started: rounds move forward within a stream, and only the
  newest stream of a node is open (``docs/protocol.md``, step 11).
* ``rejections``: every refusal, with code and reason, for the status page.
* ``versions``: the versions the database knows were stored, and whether they
  were broadcast.  The model store's manifests are the truth; at start and
  before every aggregation the database is brought in line with them.

Statuses of an update: ``pending`` (in the pool), ``superseded`` (a newer
update of the same node replaced it before aggregation), ``aggregated``,
``rejected`` (verified, then refused: replay, stale, shape, ...).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waggle_trainer.transport.wire import update_stream

SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    update_id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    model TEXT NOT NULL,
    base_version TEXT NOT NULL,
    round INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    staleness INTEGER NOT NULL DEFAULT 0,
    weight REAL NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    reason TEXT,
    version TEXT,
    created_ns INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    encoding TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS updates_pool ON updates (model, status);
CREATE INDEX IF NOT EXISTS updates_node ON updates (node, received_ns);
CREATE TABLE IF NOT EXISTS node_streams (
    node TEXT NOT NULL, model TEXT NOT NULL, stream TEXT NOT NULL,
    round INTEGER NOT NULL, started_ns INTEGER NOT NULL,
    PRIMARY KEY (node, model, stream)
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT, update_id TEXT, code TEXT NOT NULL, reason TEXT NOT NULL, ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS rejections_node ON rejections (node);
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL, seq INTEGER NOT NULL, broadcast INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, seq)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class PendingUpdate:
    update_id: str
    node: str
    model: str
    base_version: str
    round: int
    samples: int
    staleness: int
    weight: float
    created_ns: int
    received_ns: int
    metrics: dict[str, float]


class StateDB:
    """One connection per thread (``sqlite3`` connections are not shared)."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, timeout=30, check_same_thread=False
            )
        else:
            self.conn = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )  # startup, then the worker
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(SCHEMA)
            self._migrate()
        self.conn.row_factory = sqlite3.Row

    def _migrate(self) -> None:
        """A database of the per-node round rule: each node's round becomes the
        round of its stream ``""`` (the ids it sent named no stream)."""
        old = self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='node_rounds'"
        ).fetchone()
        if old is None:
            return
        with self.transaction():
            self.conn.execute(
                "INSERT OR IGNORE INTO node_streams (node, model, stream, round, started_ns) "
                "SELECT node, model, '', round, 0 FROM node_rounds"
            )
            self.conn.execute("DROP TABLE node_rounds")

    def close(self) -> None:
        self.conn.close()

    def transaction(self):
        """``with db.transaction():`` - one atomic, durable change."""
        return _Tx(self.conn)

    # ------------------------------------------------------------- de-dup, replay
    def update_status(self, update_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT status FROM updates WHERE update_id=?", (update_id,)
        ).fetchone()
        return row["status"] if row else None

    def current_stream(self, node: str, model: str) -> tuple[str, int] | None:
        """(stream, its last accepted round) of the node's newest stream, or None."""
        row = self.conn.execute(
            "SELECT stream, round FROM node_streams WHERE node=? AND model=? "
            "ORDER BY started_ns DESC, rowid DESC LIMIT 1",
            (node, model),
        ).fetchone()
        return (row["stream"], row["round"]) if row else None

    def stream_known(self, node: str, model: str, stream: str) -> bool:
        return (
            self.conn.execute(
                "SELECT 1 FROM node_streams WHERE node=? AND model=? AND stream=?",
                (node, model, stream),
            ).fetchone()
            is not None
        )

    # ------------------------------------------------------------------ changes
    def record_rejection(
        self, node: str | None, update_id: str | None, code: str, reason: str
    ) -> None:
        self.conn.execute(
            "INSERT INTO rejections (node, update_id, code, reason, ns) VALUES (?,?,?,?,?)",
            (node, update_id, code, reason, time.time_ns()),
        )

    def record_verified(
        self,
        env: Any,
        *,
        status: str,
        staleness: int = 0,
        weight: float = 0.0,
        reason: str | None = None,
    ) -> list[str]:
        """Insert a verified update; a ``pending`` one supersedes the node's older
        pending update of the same model and moves the node's round forward.
        Returns the ids it superseded."""
        superseded: list[str] = []
        if status == "pending":
            rows = self.conn.execute(
                "SELECT update_id FROM updates WHERE node=? AND model=? AND status='pending'",
                (env.node_id, env.model),
            ).fetchall()
            superseded = [r["update_id"] for r in rows]
            self.conn.executemany(
                "UPDATE updates SET status='superseded', reason=? WHERE update_id=?",
                [(f"superseded by {env.update_id}", u) for u in superseded],
            )
            self.conn.execute(
                "INSERT INTO node_streams (node, model, stream, round, started_ns) "
                "VALUES (?,?,?,?,?) "
                "ON CONFLICT(node, model, stream) DO UPDATE SET round=excluded.round",
                (
                    env.node_id,
                    env.model,
                    update_stream(env.update_id, env.round),
                    env.round,
                    time.time_ns(),
                ),
            )
        self.conn.execute(
            "INSERT INTO updates (update_id, node, model, base_version, round, samples, "
            "staleness, weight, status, reason, created_ns, received_ns, metrics, encoding) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                env.update_id,
                env.node_id,
                env.model,
                env.base_version,
                env.round,
                env.samples,
                staleness,
                weight,
                status,
                reason,
                env.created_ns,
                time.time_ns(),
                json.dumps(env.metrics, sort_keys=True),
                json.dumps(env.encoding, sort_keys=True),
            ),
        )
        return superseded

    def pending(self, model: str) -> list[PendingUpdate]:
        rows = self.conn.execute(
            "SELECT * FROM updates WHERE model=? AND status='pending' ORDER BY update_id", (model,)
        ).fetchall()
        return [
            PendingUpdate(
                r["update_id"],
                r["node"],
                r["model"],
                r["base_version"],
                r["round"],
                r["samples"],
                r["staleness"],
                r["weight"],
                r["created_ns"],
                r["received_ns"],
                json.loads(r["metrics"]),
            )
            for r in rows
        ]

    def pending_ids(self) -> set[str]:
        return {
            r[0] for r in self.conn.execute("SELECT update_id FROM updates WHERE status='pending'")
        }

    def mark_aggregated(self, model: str, seq: int, update_ids: list[str]) -> None:
        self.conn.executemany(
            "UPDATE updates SET status='aggregated', version=? WHERE update_id=?",
            [(str(seq), u) for u in update_ids],
        )
        self.conn.execute("INSERT OR IGNORE INTO versions (model, seq) VALUES (?,?)", (model, seq))

    def known_versions(self, model: str) -> set[int]:
        return {r[0] for r in self.conn.execute("SELECT seq FROM versions WHERE model=?", (model,))}

    def unbroadcast(self) -> list[tuple[str, int]]:
        return [
            (r[0], r[1])
            for r in self.conn.execute(
                "SELECT model, seq FROM versions WHERE broadcast=0 ORDER BY model, seq"
            )
        ]

    def mark_broadcast(self, model: str, seq: int) -> None:
        self.conn.execute("UPDATE versions SET broadcast=1 WHERE model=? AND seq<=?", (model, seq))

    def bump(self, name: str, n: int = 1) -> None:
        self.conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value",
            (name, n),
        )

    # ------------------------------------------------------------------ reports
    def counters(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT name, value FROM counters")}

    def node_summary(self) -> dict[str, dict[str, Any]]:
        """Per node: accepted count, rejected counts by code, last update."""
        nodes: dict[str, dict[str, Any]] = {}

        def entry(n: str) -> dict[str, Any]:
            return nodes.setdefault(n, {"accepted": 0, "rejected": {}, "last_update": None})

        for r in self.conn.execute(
            "SELECT node, COUNT(*) FROM updates WHERE status IN "
            "('pending','aggregated','superseded') GROUP BY node"
        ):
            entry(r[0])["accepted"] = r[1]
        for r in self.conn.execute(
            "SELECT node, code, COUNT(*) FROM rejections WHERE node IS NOT NULL GROUP BY node, code"
        ):
            entry(r[0])["rejected"][r[1]] = r[2]
        for r in self.conn.execute(
            "SELECT u.* FROM updates u JOIN (SELECT node, MAX(received_ns) m FROM updates "
            "GROUP BY node) l ON u.node=l.node AND u.received_ns=l.m"
        ):
            entry(r["node"])["last_update"] = {
                "update_id": r["update_id"],
                "model": r["model"],
                "round": r["round"],
                "base_version": r["base_version"],
                "samples": r["samples"],
                "status": r["status"],
                "received_ns": r["received_ns"],
                "metrics": json.loads(r["metrics"]),
            }
        return nodes

    def agreement_series(self, limit: int = 500) -> dict[str, list[tuple[int, float]]]:
        """Per node, (created_ns, agreement) of its verified updates, oldest first."""
        out: dict[str, list[tuple[int, float]]] = {}
        for r in self.conn.execute(
            "SELECT node, created_ns, metrics FROM updates ORDER BY created_ns DESC LIMIT ?",
            (limit,),
        ):
            a = json.loads(r["metrics"]).get("agreement")
            if isinstance(a, (int, float)):
                out.setdefault(r["node"], []).append((r["created_ns"], float(a)))
        return {n: sorted(v) for n, v in out.items()}

    def recent_rejections(self, limit: int = 20) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.conn.execute(
                "SELECT node, update_id, code, reason, ns FROM rejections ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        ]


class _Tx:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
