"""Chunking/reassembly and the disk outbox (no broker)."""

from __future__ import annotations

import hashlib
import logging
import os
import random

import pytest
import torch

from waggle_trainer.transport.amqp import AmqpSettings, Backoff, classify
from waggle_trainer.transport.chunks import ChunkError, Reassembler, parse_headers, split
from waggle_trainer.transport.codec import CodecSettings, UpdateEncoder
from waggle_trainer.transport.outbox import Outbox, OutboxFull

KEY = b"k" * 32


def blob_of(nbytes: int, base_version: str = "1", round: int = 1) -> bytes:
    """A real encoded update of roughly ``nbytes`` (fp32, uncompressed)."""
    enc = UpdateEncoder(
        node_id="n1", vsn="W01", model="m", key=KEY, settings=CodecSettings("fp32", "none")
    )
    delta = {"w": torch.randn(max(1, nbytes // 4))}
    return enc.encode_delta(delta, base_version=base_version, round=round, samples=1).blob


# ---------------------------------------------------------------------- chunks


def test_split_and_reassemble_in_any_order_with_duplicates():
    data = os.urandom(10_000)
    chunks = split("u1", data, 1024)
    assert len(chunks) == 10 and all(len(c.body) <= 1024 for c in chunks)
    assert chunks[3].message_id == "u1:3"
    h = chunks[3].headers()
    assert parse_headers(h, "u1:3") == ("u1", 3, 10, hashlib.sha256(data).hexdigest())
    order = chunks + chunks[:4]  # a resend of the first chunks
    random.Random(1).shuffle(order)
    r = Reassembler()
    done = []
    for tag, c in enumerate(order):
        out = r.add(c.update_id, c.index, c.count, c.payload_sha256, c.body, tag)
        if out:
            done.append(out)
    # the update completes once; tags of duplicates that came before completion ride along
    assert len(done) == 1 and done[0].blob == data
    assert len(r) <= 1


def test_single_chunk_and_exact_multiple():
    assert len(split("u", b"x" * 10, 1024)) == 1
    assert len(split("u", b"", 1024)) == 1
    assert len(split("u", b"x" * 2048, 1024)) == 2


def test_reassembly_detects_corruption_and_conflicts():
    data = os.urandom(5000)
    chunks = split("u", data, 1000)
    r = Reassembler()
    flipped = bytearray(chunks[2].body)
    flipped[10] ^= 0xFF
    for i, c in enumerate(chunks):
        body = bytes(flipped) if i == 2 else c.body
        if i < len(chunks) - 1:
            assert r.add("u", c.index, c.count, c.payload_sha256, body, i) is None
        else:
            with pytest.raises(ChunkError) as e:
                r.add("u", c.index, c.count, c.payload_sha256, body, i)
    assert e.value.code == "sha256" and sorted(e.value.tags) == list(range(5))
    assert len(r) == 0
    # same index, different bytes
    r.add("v", 0, 2, chunks[0].payload_sha256, b"a", "t1")
    with pytest.raises(ChunkError) as e:
        r.add("v", 0, 2, chunks[0].payload_sha256, b"b", "t2")
    assert e.value.code == "conflict" and e.value.tags == ["t1", "t2"]
    # too many chunks / headers inconsistent between chunks
    with pytest.raises(ChunkError, match="size"):
        Reassembler(max_chunks=4).add("w", 0, 5, "0" * 64, b"", 1)
    r.add("x", 0, 3, "0" * 64, b"", 1)
    with pytest.raises(ChunkError, match="headers"):
        r.add("x", 1, 4, "0" * 64, b"", 2)


F1 = {"format": "waggle-update-chunk/1"}


@pytest.mark.parametrize(
    "headers,mid",
    [
        (F1, "u:0"),
        (
            {
                "update_id": "u",
                "chunk_index": 3,
                "chunk_count": 3,
                "payload_sha256": "0" * 64,
                **F1,
            },
            "u:3",
        ),
        (
            {
                "update_id": "u",
                "chunk_index": True,
                "chunk_count": 3,
                "payload_sha256": "0" * 64,
                **F1,
            },
            "u:True",
        ),
        (
            {"update_id": "u", "chunk_index": 0, "chunk_count": 1, "payload_sha256": "short", **F1},
            "u:0",
        ),
        (
            {
                "update_id": "u",
                "chunk_index": 0,
                "chunk_count": 1,
                "payload_sha256": "0" * 64,
                **F1,
            },
            "v:0",
        ),
    ],
)
def test_bad_headers(headers, mid):
    good = {"update_id": "u", "chunk_index": 0, "chunk_count": 1, "payload_sha256": "0" * 64, **F1}
    assert parse_headers(good, "u:0") == ("u", 0, 1, "0" * 64)
    with pytest.raises(ChunkError) as e:
        parse_headers(headers, mid)
    assert e.value.code == "headers"


def test_expire_partials():
    r = Reassembler()
    r.add("u", 0, 2, "0" * 64, b"a", 7)
    assert r.expire(3600) == []
    assert r.expire(-1) == [("u", [7])] and len(r) == 0


# ---------------------------------------------------------------------- outbox


def test_outbox_put_survives_restart_and_remove(tmp_path):
    ob = Outbox(tmp_path / "out", 10_000_000)
    b1, b2 = blob_of(1000, round=1), blob_of(1000, round=2)
    e1, e2 = ob.put(b1), ob.put(b2)
    assert [e.update_id for e in ob.pending()] == [e1.update_id, e2.update_id]
    # an interrupted write leaves only a temp file, which is ignored and removed
    (tmp_path / "out" / ".0000-junk.wgu.tmp").write_bytes(b"partial")
    ob2 = Outbox(tmp_path / "out", 10_000_000)
    assert [e.update_id for e in ob2.pending()] == [e1.update_id, e2.update_id]
    assert ob2.read(ob2.pending()[0]) == b1
    assert not (tmp_path / "out" / ".0000-junk.wgu.tmp").exists()
    assert ob2.remove(e1.update_id) and not ob2.remove(e1.update_id)
    assert len(Outbox(tmp_path / "out", 10_000_000)) == 1


def test_outbox_drops_corrupt_files_loudly(tmp_path, caplog):
    d = tmp_path / "out"
    d.mkdir()
    (d / "00000000000000000001-x.wgu").write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR):
        ob = Outbox(d, 1_000_000)
    assert len(ob) == 0 and ob.dropped_corrupt == 1 and "unreadable" in caplog.text


def test_outbox_bound_supersedes_same_base_first(tmp_path, caplog):
    one = len(blob_of(40_000))
    ob = Outbox(tmp_path, int(one * 3.5))
    old_other = ob.put(blob_of(40_000, base_version="0", round=1))
    a1 = ob.put(blob_of(40_000, base_version="1", round=1))
    a2 = ob.put(blob_of(40_000, base_version="1", round=2))
    with caplog.at_level(logging.WARNING):
        a3 = ob.put(blob_of(40_000, base_version="1", round=3))
    ids = [e.update_id for e in ob.pending()]
    # the oldest update of the same base version went, not the other base's
    assert ids == [old_other.update_id, a2.update_id, a3.update_id]
    assert ob.dropped_superseded == 1 and ob.dropped_full == 0
    assert a1.update_id in caplog.text and "superseded" in caplog.text
    assert ob.bytes <= ob.max_bytes
    # a new base version: no same-base entry, so the oldest goes
    b1 = ob.put(blob_of(40_000, base_version="2", round=1))
    assert [e.update_id for e in ob.pending()][0] == a2.update_id
    assert ob.dropped_full == 1 and b1.update_id in ob
    assert ob.stats()["dropped_full"] == 1


def test_outbox_refuses_what_can_never_fit(tmp_path, caplog):
    ob = Outbox(tmp_path, 1000)
    with pytest.raises(OutboxFull), caplog.at_level(logging.ERROR):
        ob.put(blob_of(4000))
    assert ob.refused_too_large == 1 and "refusing" in caplog.text and len(ob) == 0


# --------------------------------------------------------------- amqp helpers


def test_backoff_is_capped_exponential_with_jitter():
    b = Backoff(1.0, 30.0, random.Random(0))
    delays = [b.next() for _ in range(10)]
    for n, d in enumerate(delays):
        cap = min(30.0, 2**n)
        assert cap / 2 <= d <= cap
    assert max(delays) <= 30.0 and len(set(delays)) == 10
    b.reset()
    assert b.next() <= 1.0


def test_error_classification():
    import pika.exceptions as px

    assert classify(px.ProbableAuthenticationError("x")) is not None
    assert classify(px.ChannelClosedByBroker(403, "ACCESS_REFUSED")) is not None
    assert classify(px.ConnectionClosedByBroker(320, "CONNECTION_FORCED")) is None
    assert classify(px.AMQPConnectionError("refused")) is None
    assert classify(px.StreamLostError("lost")) is None


def test_settings_from_url_and_validation():
    s = AmqpSettings.from_url("amqps://node%201:pw@beehive.example:5671/train")
    assert (s.host, s.effective_port, s.vhost, s.username, s.password, s.tls) == (
        "beehive.example",
        5671,
        "train",
        "node 1",
        "pw",
        True,
    )
    assert AmqpSettings(tls=True, username=None).broker_user() is None  # no cert file here
    assert AmqpSettings(username="u").broker_user() == "u"
    with pytest.raises(ValueError):
        AmqpSettings(heartbeat_s=60)
