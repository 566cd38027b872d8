"""Publisher and consumer against the real RabbitMQ broker at 127.0.0.1:5672.

Every test uses its own exchange and queues (uuid suffix) and leaves the broker
running even when it fails.
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
    Collector,
    dead_letters,
    ensure_broker_running,
    fast,
    queue_depth,
    rabbitmqctl,
    wait_until,
)

from waggle_trainer.transport import (
    CodecSettings,
    Outbox,
    TensorSpec,
    UpdateConsumer,
    UpdateEncoder,
    UpdatePublisher,
    split,
)
from waggle_trainer.transport.codec import _split

pytestmark = pytest.mark.broker

KEY = b"integration-test-key-0123456789ab"
ROOT = Path(__file__).resolve().parents[2]


def encoder(node="n1") -> UpdateEncoder:
    return UpdateEncoder(node_id=node, vsn="W0T", model="m", key=KEY,
                         settings=CodecSettings("fp32", "none"))


def make_update(n: int, round: int = 1, node="n1", enc=None):
    delta = {"w": torch.randn(n)}
    u = (enc or encoder(node)).encode_delta(delta, base_version="1", round=round, samples=8)
    return u, delta


def consumer(names, collector, n: int, **kw) -> UpdateConsumer:
    c = UpdateConsumer(fast(), keys=KEY, reference={"w": TensorSpec((n,), torch.float32)},
                       on_update=collector, exchange=names.exchange, queue=names.queue,
                       dead_letter_exchange=names.dlx, dead_letter_queue=names.dlq, **kw)
    c.start()
    assert wait_until(lambda: c.connected, 10), "consumer did not connect"
    time.sleep(0.3)  # queue declared and bound
    return c


# ---------------------------------------------------------------------- (a)


def test_fifty_updates_through_closed_connections_and_a_broker_restart(names, tmp_path):
    n = 40_000  # ~160 KB per update, 3 chunks of 64 KiB
    got = Collector()
    cons = consumer(names, got, n)
    pub = UpdatePublisher(fast(), Outbox(tmp_path / "outbox", 1 << 30), node_id="n1",
                          exchange=names.exchange, chunk_size=64 * 1024, unroutable_retry_s=0.5)
    expected = {}
    chaos_done = threading.Event()
    chaos_log = []

    def chaos():
        try:
            for i in range(8):
                time.sleep(0.4)
                rabbitmqctl("close_all_connections", "test")
                chaos_log.append("close")
                if i == 3:
                    rabbitmqctl("stop_app")
                    chaos_log.append("stop")
                    time.sleep(1.0)
                    rabbitmqctl("start_app")
                    chaos_log.append("start")
        finally:
            chaos_done.set()

    t = threading.Thread(target=chaos, daemon=True)
    try:
        pub.start()
        t.start()
        for i in range(50):
            u, delta = make_update(n, round=i)
            expected[u.update_id] = delta
            pub.submit(u)  # returns at once (disk), whatever the broker is doing
            time.sleep(0.12)
        assert chaos_done.wait(120)
        assert got.wait_for(50, 90), f"only {len(got.ids())} of 50 arrived"
        assert pub.wait_idle(10)
        time.sleep(1.0)  # any late duplicate would arrive now
    finally:
        chaos_done.wait(120)
        ensure_broker_running()
        pub.stop()
        cons.stop()
    assert chaos_log.count("close") == 8 and "stop" in chaos_log and "start" in chaos_log
    ids = got.ids()
    assert sorted(ids) == sorted(expected) and len(ids) == 50  # each handled exactly once
    for u in got.updates:
        assert torch.equal(u.delta["w"], expected[u.envelope.update_id]["w"])
    assert cons.rejected == {}
    assert pub.connect_attempts > 2 and cons.connect_attempts > 2  # the chaos did hit both
    assert len(pub.outbox) == 0
    print(f"\npublisher {pub.stats()}\nconsumer {cons.stats()}")


# ---------------------------------------------------------------------- (b)


def test_sigkill_mid_update_is_republished_from_the_outbox(names, tmp_path):
    n = 512 * 1024  # a 2 MiB update in 33 chunks of 64 KiB
    got = Collector()
    cons = consumer(names, got, n)
    outbox_dir = tmp_path / "outbox"
    u, delta = make_update(n, node="child")
    Outbox(outbox_dir, 1 << 30).put(u.blob)
    count = len(split(u.update_id, u.blob, 64 * 1024))
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("publish_child.py")), str(outbox_dir),
         names.exchange, str(64 * 1024), "0.05"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
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
        assert got.ids() == []  # the consumer holds the partial update, unacked
        pub = UpdatePublisher(fast(), Outbox(outbox_dir, 1 << 30), node_id="child",
                              exchange=names.exchange, chunk_size=64 * 1024)
        pub.start()
        assert got.wait_for(1, 30)
        assert pub.wait_idle(10)
        pub.stop()
        time.sleep(0.5)
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
        cons.stop()
    assert got.ids() == [u.update_id]
    assert torch.equal(got.updates[0].delta["w"], delta["w"])
    assert cons.chunks >= count + 4  # the chunks sent before the kill arrived twice
    assert cons.rejected == {} and len(Outbox(outbox_dir, 1 << 30)) == 0
    assert queue_depth(names.queue) == 0


# ---------------------------------------------------------------------- (c)


def test_update_over_16_mib_travels_in_chunks(names, tmp_path):
    limit = 16 * 2**20
    before = rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).").strip()
    rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {limit}).")
    n = 5_000_000  # 20 MB of fp32
    got = Collector()
    cons = None
    try:
        # the broker really refuses one message of that size (RabbitMQ 4's default limit)
        conn = pika.BlockingConnection(BROKER)
        ch = conn.channel()
        ch.exchange_declare(names.exchange, "topic", durable=True)
        ch.confirm_delivery()
        with pytest.raises(px.ChannelClosedByBroker) as e:
            ch.basic_publish(names.exchange, "update.x", b"\0" * (limit + 1024))
        assert e.value.reply_code == 406 and "max size" in e.value.reply_text
        conn.close()

        cons = consumer(names, got, n)
        u, delta = make_update(n)
        assert len(u.blob) > limit
        pub = UpdatePublisher(fast(), Outbox(tmp_path, 1 << 30), node_id="n1",
                              exchange=names.exchange)  # default 8 MiB chunks
        pub.start()
        pub.submit(u)
        assert got.wait_for(1, 60)
        pub.stop()
    finally:
        if cons:
            cons.stop()
        value = before.split(",")[1].rstrip("}") if before.startswith("{ok,") else "134217728"
        rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {value}).")
    assert pub.published_chunks == 3 and cons.chunks == 3
    assert torch.equal(got.updates[0].delta["w"], delta["w"])


# ---------------------------------------------------------------------- (d)


def _publish_raw(exchange, chunks, routing_key="update.n1"):
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    ch.confirm_delivery()
    for c, body in chunks:
        ch.basic_publish(exchange, routing_key, body, pika.BasicProperties(
            delivery_mode=2, message_id=c.message_id, headers=c.headers(), user_id="guest"),
            mandatory=True)
    conn.close()


def test_flipped_byte_goes_to_the_dead_letter_queue_with_the_reason(names):
    n = 60_000
    got = Collector()
    cons = consumer(names, got, n)
    try:
        # 1) a byte flipped in transit: the reassembled update does not match its hash
        u, _ = make_update(n)
        chunks = split(u.update_id, u.blob, 100_000)
        assert len(chunks) == 3
        bad = bytearray(chunks[1].body)
        bad[777] ^= 0x01
        _publish_raw(names.exchange, [(c, bytes(bad) if c.index == 1 else c.body)
                                      for c in chunks])
        # 2) flipped and the chunk hash recomputed (a forger without the key): the HMAC fails
        u2, _ = make_update(n)
        blob2 = bytearray(u2.blob)
        blob2[len(_split(u2.blob)[0]) + 32 + 1000] ^= 0x01
        _publish_raw(names.exchange, [(c, c.body) for c in split(u2.update_id, bytes(blob2),
                                                                 100_000)])
        # 3) and a good update afterwards still goes through
        u3, d3 = make_update(n)
        _publish_raw(names.exchange, [(c, c.body) for c in split(u3.update_id, u3.blob,
                                                                 100_000)])
        assert got.wait_for(1, 20)
        assert wait_until(lambda: queue_depth(names.dlq) >= 6, 10)
    finally:
        cons.stop()
    assert got.ids() == [u3.update_id] and torch.equal(got.updates[0].delta["w"], d3["w"])
    dl = dead_letters(names)
    assert len(dl) == 6
    by_update = {}
    for props, _body in dl:
        h = props.headers
        by_update.setdefault(h["update_id"], set()).add(
            (h["x-waggle-reject-code"], h["x-waggle-reject-reason"]))
        assert h["x-waggle-original-user-id"] == "guest"
    assert by_update[u.update_id] == {
        ("sha256", "reassembled update does not match payload_sha256 header")}
    (code, reason), = by_update[u2.update_id]
    assert code == "signature" and "HMAC" in reason
    assert cons.rejected == {"sha256": 1, "signature": 1}
    assert queue_depth(names.queue) == 0


# ---------------------------------------------------------------------- (e)


def test_unroutable_update_stays_in_the_outbox_and_is_logged(names, tmp_path, caplog):
    outbox = Outbox(tmp_path, 1 << 30)
    pub = UpdatePublisher(fast(), outbox, node_id="n1", exchange=names.exchange,
                          unroutable_retry_s=0.5)
    u, _ = make_update(1000)
    try:
        with caplog.at_level(logging.ERROR, logger="waggle_trainer.transport"):
            pub.start()
            pub.submit(u)
            assert wait_until(lambda: pub.unroutable >= 2, 10)  # retried, not dropped
        assert u.update_id in outbox and len(outbox) == 1
        assert pub.published_updates == 0 and pub.fatal_error is None
        assert any("unroutable" in r.getMessage() and u.update_id in r.getMessage()
                   for r in caplog.records if r.levelno == logging.ERROR)
        # once something is bound, the kept update goes out
        conn = pika.BlockingConnection(BROKER)
        ch = conn.channel()
        ch.queue_declare(names.queue, durable=True)
        ch.queue_bind(names.queue, names.exchange, "update.*")
        assert pub.wait_idle(10)
        m, props, body = ch.basic_get(names.queue, auto_ack=True)
        conn.close()
        assert props.message_id == f"{u.update_id}:0" and body == u.blob
        assert props.user_id == "guest" and props.delivery_mode == 2
    finally:
        pub.stop()


# ---------------------------------------------------------------------- (f)


def test_wrong_credentials_give_a_clear_error_and_no_busy_loop(names, tmp_path, caplog):
    outbox = Outbox(tmp_path, 1 << 30)
    pub = UpdatePublisher(fast(password="not-the-password"), outbox, node_id="n1",
                          exchange=names.exchange)
    u, _ = make_update(1000)
    pub.submit(u)
    with caplog.at_level(logging.ERROR):
        pub.start()
        time.sleep(4.0)  # with 0.2 s backoff a retry loop would have tried ~10 times
    assert pub.connect_attempts == 1
    assert not pub.running
    assert pub.fatal_error is not None and "authentication refused" in str(pub.fatal_error)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "username/password" in errors[0]
    assert u.update_id in outbox  # kept for when the configuration is fixed
    pub.stop()


def test_user_id_must_match_the_broker_user(names, tmp_path, caplog):
    got = Collector()
    cons = consumer(names, got, 1000)
    pub = UpdatePublisher(fast(user_id="someone-else"), Outbox(tmp_path, 1 << 30),
                          node_id="n1", exchange=names.exchange)
    try:
        pub.submit(make_update(1000)[0])
        with caplog.at_level(logging.ERROR):
            pub.start()
            assert wait_until(lambda: not pub.running, 10)
    finally:
        pub.stop()
        cons.stop()
    assert "user_id" in str(pub.fatal_error) and pub.connect_attempts == 1
    assert got.ids() == []


def test_consumer_collapses_duplicate_whole_updates(names):
    n = 10_000
    got = Collector()
    cons = consumer(names, got, n)
    try:
        u, _ = make_update(n)
        chunks = [(c, c.body) for c in split(u.update_id, u.blob, 16_000)]
        _publish_raw(names.exchange, chunks)
        _publish_raw(names.exchange, chunks[:1])  # a partial resend...
        _publish_raw(names.exchange, chunks)       # ...and a whole one
        assert got.wait_for(1, 10)
        assert wait_until(lambda: cons.duplicates >= 1, 10)
        assert wait_until(lambda: queue_depth(names.queue) == 0, 10)
    finally:
        cons.stop()
    assert got.ids() == [u.update_id] and cons.rejected == {}
    assert hashlib.sha256(u.blob).hexdigest() == chunks[0][0].payload_sha256
