"""A node's publisher to the server's consumer through the real broker.

Moved here from ``tests/transport`` with the consumer itself (it is the server's
now): the same guarantees, checked against :class:`ServerConsumer` and its
pipeline.  Every test uses its own exchange and queues.  The tests that restart a
broker, cut every connection or change the message size limit do it to a private
RabbitMQ node of their own (``private_broker``): the shared broker at
127.0.0.1:5672 is never restarted or reconfigured.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pika
import pika.exceptions as px
import pytest
import torch
from brokerutil import (
    BROKER,
    dead_letters,
    fast,
    queue_depth,
    wait_consuming,
    wait_until,
)
from hostile import with_metrics_text, zstd_bomb
from simnodes import Receiver
from tlsbroker import start_plain_broker

from waggle_trainer.server.consumer import ServerConsumer
from waggle_trainer.server.pipeline import UpdatePipeline
from waggle_trainer.transport import CodecSettings, Outbox, UpdateEncoder, UpdatePublisher, split
from waggle_trainer.transport.codec import _split

pytestmark = pytest.mark.broker

KEY = b"integration-test-key-0123456789ab"
TRANSPORT_TESTS = Path(__file__).resolve().parents[1] / "transport"
ROOT = Path(__file__).resolve().parents[2]


def encoder(node="n1", settings=None) -> UpdateEncoder:
    return UpdateEncoder(
        node_id=node,
        vsn="W0T",
        model="m",
        key=KEY,
        settings=settings or CodecSettings("fp32", "none"),
    )


def make_update(n: int, round: int = 1, node="n1", enc=None, metrics=None):
    delta = {"w": torch.randn(n)}
    u = (enc or encoder(node)).encode_delta(
        delta, base_version="1", round=round, samples=8, metrics=metrics
    )
    return u, delta


def receiver(tmp_path, names, n: int, nodes=("n1",), **sections) -> Receiver:
    r = Receiver(tmp_path, names, n, KEY, nodes=nodes, amqp=fast(), **sections)
    # consuming: its queue is declared and bound (``connected`` is set before that)
    assert wait_consuming(names.queue, 60), f"server not consuming: {r.consumer.last_error}"
    return r


def _publish_raw(exchange, chunks, routing_key="update.n1", **header_changes):
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    ch.confirm_delivery()
    for c, body in chunks:
        ch.basic_publish(
            exchange,
            routing_key,
            body,
            pika.BasicProperties(
                delivery_mode=2,
                message_id=c.message_id,
                headers={**c.headers(), **header_changes},
                user_id="guest",
            ),
            mandatory=True,
        )
    conn.close()


def publish(exchange, update_id, blob, chunk_size=64 * 1024, **header_changes):
    _publish_raw(
        exchange, [(c, c.body) for c in split(update_id, blob, chunk_size)], **header_changes
    )


# ---------------------------------------------------------------------- (a)

PRIVATE_USER, PRIVATE_PASSWORD = "test", "test-private"


@pytest.fixture(scope="module")
def private_broker(tmp_path_factory):
    """A RabbitMQ node of this module's own (plain TCP, RabbitMQ 4's 16 MiB message
    limit set explicitly): the tests here stop it and cut its connections."""
    broker = start_plain_broker(
        tmp_path_factory.mktemp("private-broker"),
        user=PRIVATE_USER,
        password=PRIVATE_PASSWORD,
        conf=[f"max_message_size = {16 * 2**20}"],
    )
    try:
        yield broker
    finally:
        broker.stop()


def private(broker, **kw):
    return fast(port=broker.port, username=PRIVATE_USER, password=PRIVATE_PASSWORD, **kw)


def private_params(broker) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        "127.0.0.1",
        broker.port,
        "/",
        pika.PlainCredentials(PRIVATE_USER, PRIVATE_PASSWORD),
        connection_attempts=1,
        socket_timeout=5,
    )


def private_receiver(tmp_path, names, n: int, broker, nodes=("n1",)) -> Receiver:
    r = Receiver(tmp_path, names, n, KEY, nodes=nodes, amqp=private(broker))
    # consuming: its queue is declared and bound (``connected`` is set before that)
    assert wait_consuming(names.queue, 60, private_params(broker)), (
        f"server not consuming: {r.consumer.last_error}"
    )
    return r


def wait_private_up(broker, timeout: float = 90) -> None:
    def up() -> bool:
        try:
            pika.BlockingConnection(private_params(broker)).close()
            return True
        except Exception:  # noqa: BLE001
            return False

    assert wait_until(up, timeout, 0.5), broker.log_tail()


def test_fifty_updates_through_closed_connections_and_a_broker_restart(
    names, tmp_path, private_broker
):
    n = 40_000  # ~160 KB per update, 3 chunks of 64 KiB
    nodes = [f"n{i}" for i in range(50)]  # one node each: no update supersedes another
    recv = private_receiver(tmp_path, names, n, private_broker, nodes=nodes)
    pub = UpdatePublisher(
        private(private_broker),
        Outbox(tmp_path / "outbox", 1 << 30),
        node_id="n1",
        exchange=names.exchange,
        chunk_size=64 * 1024,
        unroutable_retry_s=0.5,
    )
    expected = {}
    chaos_done = threading.Event()
    chaos_log = []

    def chaos():
        try:
            for i in range(8):
                time.sleep(0.4)
                private_broker.ctl("close_all_connections", "test chaos")
                chaos_log.append("close")
                if i == 3:
                    private_broker.ctl("stop_app")
                    chaos_log.append("stop")
                    time.sleep(1.0)
                    private_broker.ctl("start_app")
                    chaos_log.append("start")
        finally:
            chaos_done.set()

    t = threading.Thread(target=chaos, daemon=True)
    try:
        pub.start()
        t.start()
        for i, node in enumerate(nodes):
            u, delta = make_update(n, round=i, node=node)
            expected[u.update_id] = delta
            pub.submit(u)  # returns at once (disk), whatever the broker is doing
            time.sleep(0.12)
        assert chaos_done.wait(180)
        assert recv.wait_for(50, 90), f"only {len(recv.ids())} of 50 arrived"
        assert pub.wait_idle(10)
        time.sleep(1.0)  # any late duplicate would arrive now
    finally:
        chaos_done.wait(180)
        wait_private_up(private_broker)
        pub.stop()
        recv.stop()
    assert chaos_log.count("close") == 8 and "stop" in chaos_log and "start" in chaos_log
    ids = recv.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == 50  # each accepted exactly once
    for uid in ids:
        assert torch.equal(recv.delta(uid)["w"], expected[uid]["w"])
    assert recv.rejected == {}
    assert pub.connect_attempts > 2 and recv.consumer.connect_attempts > 2  # chaos hit both
    assert len(pub.outbox) == 0


# ---------------------------------------------------------------------- (b)


def test_sigkill_mid_update_is_republished_from_the_outbox(names, tmp_path):
    n = 512 * 1024  # a 2 MiB update in 33 chunks of 64 KiB
    recv = receiver(tmp_path, names, n, nodes=("child",))
    outbox_dir = tmp_path / "outbox"
    u, delta = make_update(n, node="child")
    Outbox(outbox_dir, 1 << 30).put(u.blob)
    count = len(split(u.update_id, u.blob, 64 * 1024))
    child = subprocess.Popen(
        [
            sys.executable,
            str(TRANSPORT_TESTS / "publish_child.py"),
            str(outbox_dir),
            names.exchange,
            str(64 * 1024),
            "0.05",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    watchdog = threading.Timer(60, child.kill)  # never hang on a child that says nothing
    watchdog.start()
    try:
        for line in child.stderr:
            if f"chunk 4/{count} confirmed" in line:
                child.send_signal(signal.SIGKILL)
                break
        child.wait(10)
        assert child.returncode == -signal.SIGKILL
        assert u.update_id in Outbox(outbox_dir, 1 << 30)  # still spooled after the kill
        time.sleep(0.3)
        assert recv.ids() == []  # the server holds the partial update, staged on disk
        pub = UpdatePublisher(
            fast(),
            Outbox(outbox_dir, 1 << 30),
            node_id="child",
            exchange=names.exchange,
            chunk_size=64 * 1024,
        )
        pub.start()
        assert recv.wait_for(1, 30)
        assert pub.wait_idle(10)
        pub.stop()
        time.sleep(0.5)
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
        recv.stop()
    assert recv.ids() == [u.update_id]
    assert torch.equal(recv.delta(u.update_id)["w"], delta["w"])
    assert recv.consumer.handled >= count + 4  # the chunks sent before the kill arrived twice
    assert recv.rejected == {} and len(Outbox(outbox_dir, 1 << 30)) == 0
    assert queue_depth(names.queue) == 0


# ---------------------------------------------------------------------- (c)


def test_update_over_16_mib_travels_in_chunks(names, tmp_path, private_broker):
    limit = 16 * 2**20  # the private node's max_message_size (RabbitMQ 4's default)
    n = 5_000_000  # 20 MB of fp32
    recv = None
    wait_private_up(private_broker)
    try:
        # the broker really refuses one message of that size
        conn = pika.BlockingConnection(private_params(private_broker))
        ch = conn.channel()
        ch.exchange_declare(names.exchange, "topic", durable=True)
        ch.confirm_delivery()
        with pytest.raises(px.ChannelClosedByBroker) as e:
            ch.basic_publish(names.exchange, "update.x", b"\0" * (limit + 1024))
        assert e.value.reply_code == 406 and "max size" in e.value.reply_text
        conn.close()

        recv = private_receiver(tmp_path, names, n, private_broker)
        u, delta = make_update(n)
        assert len(u.blob) > limit
        pub = UpdatePublisher(
            private(private_broker),
            Outbox(tmp_path / "outbox", 1 << 30),
            node_id="n1",
            exchange=names.exchange,
        )  # default 8 MiB chunks
        pub.start()
        pub.submit(u)
        assert recv.wait_for(1, 60)
        pub.stop()
    finally:
        if recv:
            recv.stop()
    assert pub.published_chunks == 3 and recv.consumer.handled == 3
    assert torch.equal(recv.delta(u.update_id)["w"], delta["w"])


# ---------------------------------------------------------------------- (d)


def test_flipped_byte_goes_to_the_dead_letter_queue_with_the_reason(names, tmp_path):
    n = 60_000
    recv = receiver(tmp_path, names, n)
    try:
        # 1) a byte flipped in transit: the reassembled update does not match its hash
        u, _ = make_update(n)
        chunks = split(u.update_id, u.blob, 100_000)
        assert len(chunks) == 3
        bad = bytearray(chunks[1].body)
        bad[777] ^= 0x01
        _publish_raw(names.exchange, [(c, bytes(bad) if c.index == 1 else c.body) for c in chunks])
        # 2) flipped and the chunk hash recomputed (a forger without the key): the HMAC fails
        u2, _ = make_update(n, round=2)
        blob2 = bytearray(u2.blob)
        blob2[len(_split(u2.blob)[0]) + 32 + 1000] ^= 0x01
        _publish_raw(
            names.exchange, [(c, c.body) for c in split(u2.update_id, bytes(blob2), 100_000)]
        )
        # 3) and a good update afterwards still goes through
        u3, d3 = make_update(n, round=3)
        _publish_raw(names.exchange, [(c, c.body) for c in split(u3.update_id, u3.blob, 100_000)])
        assert recv.wait_for(1, 20)
        assert wait_until(lambda: queue_depth(names.dlq) >= 6, 10)
    finally:
        recv.stop()
    assert recv.ids() == [u3.update_id] and torch.equal(recv.delta(u3.update_id)["w"], d3["w"])
    dl = dead_letters(names)
    assert len(dl) == 6
    by_update: dict[str, set] = {}
    for props, _body in dl:
        h = props.headers
        by_update.setdefault(h["update_id"], set()).add(
            (h["x-waggle-reject-code"], h["x-waggle-reject-reason"])
        )
        assert h["x-waggle-original-user-id"] == "guest"
    assert by_update[u.update_id] == {
        ("sha256", "reassembled update does not match payload_sha256 header")
    }
    ((code, reason),) = by_update[u2.update_id]
    assert code == "signature" and "HMAC" in reason
    assert recv.rejected == {"sha256": 1, "signature": 1}
    assert queue_depth(names.queue) == 0


def test_user_id_must_match_the_broker_user(names, tmp_path, caplog):
    recv = receiver(tmp_path, names, 1000)
    pub = UpdatePublisher(
        fast(user_id="someone-else"),
        Outbox(tmp_path / "outbox", 1 << 30),
        node_id="n1",
        exchange=names.exchange,
    )
    try:
        pub.submit(make_update(1000)[0])
        with caplog.at_level(logging.ERROR):
            pub.start()
            assert wait_until(lambda: not pub.running, 10)
    finally:
        pub.stop()
        recv.stop()
    assert "user_id" in str(pub.fatal_error) and pub.connect_attempts == 1
    assert recv.ids() == []


def test_duplicate_whole_updates_are_collapsed(names, tmp_path):
    n = 10_000
    recv = receiver(tmp_path, names, n)
    try:
        u, _ = make_update(n)
        chunks = [(c, c.body) for c in split(u.update_id, u.blob, 16_000)]
        _publish_raw(names.exchange, chunks)
        _publish_raw(names.exchange, chunks[:1])  # a partial resend...
        _publish_raw(names.exchange, chunks)  # ...and a whole one
        assert recv.wait_for(1, 10)
        # every resent chunk is absorbed (more if another test's broker chaos forced a
        # redelivery); the queue's message count does not show unacknowledged ones
        dups = lambda: recv.counters().get("duplicate_chunks", 0)
        assert wait_until(lambda: dups() >= 1 + len(chunks), 10), dups()
        assert wait_until(lambda: queue_depth(names.queue) == 0, 10)
    finally:
        recv.stop()
    assert recv.ids() == [u.update_id] and recv.rejected == {}
    assert hashlib.sha256(u.blob).hexdigest() == chunks[0][0].payload_sha256


# ------------------------------------------------------- hostile and failing updates


def test_three_hostile_updates_are_refused_and_a_valid_one_behind_them_is_accepted(names, tmp_path):
    n = 5000
    recv = receiver(tmp_path, names, n)
    enc = encoder(settings=CodecSettings("fp16", "zstd"))
    try:
        bomb, _ = make_update(n, round=1, enc=enc)
        v2, _ = make_update(n, round=2, enc=enc)
        nan, _ = make_update(n, round=3, enc=enc, metrics={"loss": 0.5})
        good, _ = make_update(n, round=4, enc=enc)
        publish(names.exchange, bomb.update_id, zstd_bomb(bomb.blob, KEY))
        publish(names.exchange, v2.update_id, v2.blob, format="waggle-update-chunk/2")
        publish(names.exchange, nan.update_id, with_metrics_text(nan.blob, KEY, '{"loss":NaN}'))
        publish(names.exchange, good.update_id, good.blob)
        assert recv.wait_for(1, 20), "valid update not accepted"
        assert wait_until(lambda: queue_depth(names.dlq) >= 3, 10)
        assert wait_until(lambda: queue_depth(names.queue) == 0, 10)
    finally:
        recv.stop()
    assert recv.ids() == [good.update_id]
    codes = {
        p.headers["update_id"]: (
            p.headers["x-waggle-reject-code"],
            p.headers["x-waggle-reject-reason"],
        )
        for p, _ in dead_letters(names)
    }
    assert codes[bomb.update_id][0] == "size" and str(2**50) in codes[bomb.update_id][1]
    assert codes[v2.update_id][0] == "format" and "waggle-update-chunk/2" in codes[v2.update_id][1]
    assert codes[nan.update_id] == (
        "nonfinite",
        "metric 'loss' is nan: only finite numbers are allowed",
    )
    # refused, not crashed: no handling failed, nothing requeued, nothing fatal (reconnects
    # are not counted: other tests on the shared broker close every connection at times)
    assert recv.consumer.requeued == 0 and recv.consumer.worker_error is None
    assert recv.consumer.fatal_error is None
    assert recv.rejected == {"size": 1, "format": 1, "nonfinite": 1}


def test_a_message_that_cannot_even_be_dead_lettered_is_dead_lettered_by_the_broker(
    names, tmp_path, monkeypatch
):
    """Handling fails every time and so does the server's own dead-lettering: the
    quorum queue's delivery limit ends the loop (the broker dead-letters it, with
    its x-death header) and the update behind it is accepted."""
    n = 2000
    broken, _ = make_update(n, round=1)
    real_complete = UpdatePipeline._complete
    real_dead_letters = ServerConsumer._publish_dead_letters
    tries = []

    def complete(self, uid):
        if uid == broken.update_id:
            tries.append(uid)
            raise RuntimeError("disk on fire")
        return real_complete(self, uid)

    def dead_letters_fail(self, letters):
        if any(dl.msg.headers.get("update_id") == broken.update_id for dl in letters):
            raise px.AMQPConnectionError("dead-letter exchange unreachable")
        return real_dead_letters(self, letters)

    monkeypatch.setattr(UpdatePipeline, "_complete", complete)
    monkeypatch.setattr(ServerConsumer, "_publish_dead_letters", dead_letters_fail)
    recv = receiver(tmp_path, names, n, queue={"delivery_limit": 1})
    try:
        good, _ = make_update(n, round=2)
        publish(names.exchange, broken.update_id, broken.blob)
        publish(names.exchange, good.update_id, good.blob)
        assert recv.wait_for(1, 30), "the update behind it was not accepted"
        assert wait_until(lambda: queue_depth(names.dlq) >= 1, 10)
        assert wait_until(lambda: queue_depth(names.queue) == 0, 10)
    finally:
        recv.stop()
    assert recv.ids() == [good.update_id] and len(tries) == 2  # delivery_limit + 1
    ((props, body),) = dead_letters(names)
    assert body == broken.blob and props.headers["x-death"][0]["reason"] == "delivery_limit"
