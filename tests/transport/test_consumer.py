"""The server's consumer against hostile and failing updates, on the real broker.

Whatever one update does, the consumer dead-letters it with a reason and goes on
with the next one on the same connection; a delivery that keeps ending the
consumer's session is dead-lettered after ``max_attempts``."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pika
import pika.exceptions as px
import pytest
import torch
from brokerutil import BROKER, Collector, dead_letters, fast, queue_depth, wait_until
from hostile import with_metrics_text, zstd_bomb

from waggle_trainer.transport import CodecSettings, TensorSpec, UpdateConsumer, UpdateEncoder, split

pytestmark = pytest.mark.broker

KEY = b"consumer-test-key-0123456789abcdef"
N = 5000
REF = {"w": TensorSpec((N,), torch.float32)}


def make_update(round: int = 1, metrics=None):
    enc = UpdateEncoder(
        node_id="n1", vsn="W0T", model="m", key=KEY, settings=CodecSettings("fp16", "zstd")
    )
    return enc.encode_delta(
        {"w": torch.randn(N)}, base_version="1", round=round, samples=8, metrics=metrics
    )


def publish(exchange: str, update_id: str, blob: bytes, **header_changes) -> None:
    """Publish ``blob`` as the chunks of ``update_id``, headers changed as given."""
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    ch.confirm_delivery()
    for c in split(update_id, blob, 64 * 1024):
        props = pika.BasicProperties(
            delivery_mode=2,
            message_id=c.message_id,
            headers={**c.headers(), **header_changes},
            user_id="guest",
        )
        ch.basic_publish(exchange, "update.n1", c.body, props, mandatory=True)
    conn.close()


def start(names, **kw) -> UpdateConsumer:
    kw.setdefault("reference", REF)
    kw.setdefault("on_update", Collector())
    c = UpdateConsumer(
        fast(),
        keys=KEY,
        exchange=names.exchange,
        queue=names.queue,
        dead_letter_exchange=names.dlx,
        dead_letter_queue=names.dlq,
        **kw,
    )
    c.start()
    assert wait_until(lambda: c.connected, 10), "consumer did not connect"
    time.sleep(0.3)  # queue declared and bound
    return c


def reject_codes(names) -> dict[str, tuple[str, str]]:
    """update_id -> (reject code, reason) of everything dead-lettered."""
    out = {}
    for props, _ in dead_letters(names):
        h = props.headers
        out[h["update_id"]] = (h["x-waggle-reject-code"], h["x-waggle-reject-reason"])
    return out


def test_three_hostile_updates_are_refused_and_a_valid_one_behind_them_is_accepted(names):
    got = Collector()
    cons = start(names, on_update=got)
    try:
        bomb = make_update(round=1)
        v2 = make_update(round=2)
        nan = make_update(round=3, metrics={"loss": 0.5})
        good = make_update(round=4)
        publish(names.exchange, bomb.update_id, zstd_bomb(bomb.blob, KEY))
        publish(names.exchange, v2.update_id, v2.blob, format="waggle-update-chunk/2")
        publish(names.exchange, nan.update_id, with_metrics_text(nan.blob, KEY, '{"loss":NaN}'))
        publish(names.exchange, good.update_id, good.blob)
        assert got.wait_for(1, 20), f"valid update not accepted; consumer {cons.stats()}"
        assert wait_until(lambda: queue_depth(names.dlq) >= 3, 10)
        assert wait_until(lambda: queue_depth(names.queue) == 0, 10)
    finally:
        cons.stop()
    assert got.ids() == [good.update_id]
    codes = reject_codes(names)
    assert codes[bomb.update_id][0] == "size" and str(2**50) in codes[bomb.update_id][1]
    assert codes[v2.update_id][0] == "format" and "waggle-update-chunk/2" in codes[v2.update_id][1]
    assert codes[nan.update_id] == (
        "nonfinite",
        "metric 'loss' is nan: only finite numbers are allowed",
    )
    # no crash: one connection all along, nothing fatal, no retry
    assert cons.connect_attempts == 1 and cons.fatal_error is None and cons.last_error is None
    assert cons.rejected == {"size": 1, "format": 1, "nonfinite": 1} and cons.accepted == 1


def test_an_unexpected_error_dead_letters_that_update_and_the_consumer_goes_on(names, caplog):
    got = Collector()
    broken = make_update(round=1)

    def reference(env):
        if env.update_id == broken.update_id:
            raise RuntimeError("model store is inconsistent")  # a bug, not a bad update
        return REF

    cons = start(names, reference=reference, on_update=got)
    try:
        with caplog.at_level(logging.ERROR, logger="waggle_trainer.transport"):
            good = make_update(round=2)
            publish(names.exchange, broken.update_id, broken.blob)
            publish(names.exchange, good.update_id, good.blob)
            assert got.wait_for(1, 20), f"valid update not accepted; consumer {cons.stats()}"
            assert wait_until(lambda: queue_depth(names.dlq) >= 1, 10)
    finally:
        cons.stop()
    assert got.ids() == [good.update_id]
    assert reject_codes(names) == {
        broken.update_id: ("internal", "RuntimeError: model store is inconsistent")
    }
    assert cons.connect_attempts == 1 and cons.last_error is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # the traceback, once
    assert broken.update_id in errors[0].getMessage()


def test_a_failing_handler_dead_letters_with_code_handler(names):
    def on_update(decoded):
        raise ValueError("cannot aggregate")

    cons = start(names, on_update=on_update)
    try:
        u = make_update()
        publish(names.exchange, u.update_id, u.blob)
        assert wait_until(lambda: queue_depth(names.dlq) >= 1, 10)
    finally:
        cons.stop()
    assert reject_codes(names) == {u.update_id: ("handler", "ValueError: cannot aggregate")}
    assert cons.connect_attempts == 1


def test_an_update_that_keeps_ending_the_session_is_dead_lettered_after_max_attempts(names):
    """The handler's broker connection fails on every try (an AMQP error: the session
    ends and the broker redelivers).  After max_attempts the update is dead-lettered;
    the update behind it is accepted."""
    tries = []
    got = Collector()
    failing = make_update(round=1)

    def on_update(decoded):
        if decoded.envelope.update_id == failing.update_id:
            tries.append(time.monotonic())
            raise px.AMQPConnectionError("model exchange unreachable")
        got(decoded)

    cons = start(names, on_update=on_update, max_attempts=3)
    try:
        good = make_update(round=2)
        publish(names.exchange, failing.update_id, failing.blob)
        publish(names.exchange, good.update_id, good.blob)
        assert got.wait_for(1, 30), f"valid update not accepted; consumer {cons.stats()}"
        assert wait_until(lambda: queue_depth(names.dlq) >= 1, 10)
        time.sleep(0.5)  # no further retry would happen now
    finally:
        cons.stop()
    assert len(tries) == 3
    code, reason = reject_codes(names)[failing.update_id]
    assert code == "redelivered" and "3 times" in reason
    assert got.ids() == [good.update_id]
    assert cons.connect_attempts == 4  # the first connection and one per failed try
    assert queue_depth(names.queue) == 0


# ---------------------------------------------------------------- without a broker


class FakeChannel:
    """Records acks and dead-letter publishes (a unit test beside the broker tests)."""

    def __init__(self):
        self.acked, self.dead = [], []

    def basic_ack(self, tag):
        self.acked.append(tag)

    def basic_publish(self, exchange, routing_key, body, props):
        self.dead.append((props.message_id, props.headers["x-waggle-reject-code"]))


def deliver(cons, ch, chunks, first_tag):
    """Deliver ``chunks`` as one session would; the tags are first_tag, first_tag + 1..."""
    for i, c in enumerate(chunks):
        method = SimpleNamespace(delivery_tag=first_tag + i, routing_key="update.n1")
        props = pika.BasicProperties(message_id=c.message_id, headers=c.headers())
        cons._handle(ch, method, props, c.body)


def new_session(cons):
    cons._reasm.clear()
    cons._deliveries.clear()


def test_all_chunks_of_an_update_that_keeps_ending_the_session_are_dead_lettered():
    calls = []

    def on_update(decoded):
        calls.append(decoded.envelope.update_id)
        raise px.AMQPConnectionError("model exchange unreachable")

    cons = UpdateConsumer(fast(), keys=KEY, reference=REF, on_update=on_update, max_attempts=2)
    ch = cons._dl_ch = FakeChannel()
    u = make_update()
    chunks = split(u.update_id, u.blob, 4096)
    assert len(chunks) == 3
    for attempt in range(2):
        new_session(cons)
        with pytest.raises(px.AMQPConnectionError):
            deliver(cons, ch, chunks, 10 * attempt)
    assert len(calls) == 2 and ch.acked == [] and ch.dead == []
    # the third time: the first chunk holds nothing yet, each chunk goes as it comes
    new_session(cons)
    deliver(cons, ch, chunks, 20)
    assert len(calls) == 2
    assert ch.dead == [(c.message_id, "redelivered") for c in chunks]
    assert ch.acked == [20, 21, 22] and cons._deliveries == {}


def test_an_unexpected_error_dead_letters_every_chunk_of_the_update():
    def reference(env):
        raise KeyError("no such model")

    cons = UpdateConsumer(fast(), keys=KEY, reference=reference, on_update=Collector())
    ch = cons._dl_ch = FakeChannel()
    u = make_update()
    chunks = split(u.update_id, u.blob, 4096)
    deliver(cons, ch, chunks, 1)
    assert ch.dead == [(c.message_id, "internal") for c in chunks]
    assert sorted(ch.acked) == [1, 2, 3] and cons._deliveries == {} and len(cons._reasm) == 0
    assert cons.rejected == {"internal": 1}


def test_a_message_that_cannot_even_be_dead_lettered_is_dropped_not_looped(caplog):
    def on_update(decoded):
        raise px.AMQPConnectionError("model exchange unreachable")

    cons = UpdateConsumer(fast(), keys=KEY, reference=REF, on_update=on_update, max_attempts=1)
    ch = cons._dl_ch = FakeChannel()
    u = make_update()
    (chunk,) = split(u.update_id, u.blob)
    with pytest.raises(px.AMQPConnectionError):
        deliver(cons, ch, [chunk], 1)

    def refused_by_broker(*args):
        raise px.ChannelClosedByBroker(505, "UNEXPECTED_FRAME")

    ch.basic_publish = refused_by_broker
    new_session(cons)
    with pytest.raises(px.ChannelClosedByBroker):
        deliver(cons, ch, [chunk], 2)  # dead-lettering fails: the session ends again
    new_session(cons)
    with caplog.at_level(logging.ERROR):
        deliver(cons, ch, [chunk], 3)
    assert ch.acked == [3] and cons._deliveries == {}
    assert cons.rejected == {"redelivered": 1, "dropped": 1}
    assert f"dead-lettering update {u.update_id} ended the session too" in caplog.text
