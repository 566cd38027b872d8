"""The daemon and the server's model broadcast, against the real broker (stand-in loop):
signed versions adopted between rounds, the outbox rule (updates on a base the server
still accepts stay, the others are dropped and counted), a forged version refused
while training goes on, and a version received before a stop adopted at the next start.
"""

from __future__ import annotations

import logging
import uuid

import pika
import pytest
import torch
from brokerutil import BROKER

from tests.node.nodeutil import make_daemon
from tests.node.standin import StandInLoop, StandInSource
from waggle_trainer.server.signing import generate_signing_key, load_signing_key
from waggle_trainer.transport.chunks import split
from waggle_trainer.transport.model_wire import encode_model
from waggle_trainer.transport.wire import MODEL_MESSAGE_TYPE, model_routing_key

pytestmark = pytest.mark.broker
MODEL = "resnet18"  # [student] arch: the model name on the wire


@pytest.fixture
def broadcast(tmp_path, names):
    """The operator's objects (exchange, the node's queue, its binding) and a way to
    publish signed versions like the server does; deleted afterwards."""
    s = uuid.uuid4().hex[:10]
    x, q = f"test.models.{s}", f"test.models.{s}.nodem"
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    ch.exchange_declare(x, exchange_type="topic", durable=True)
    ch.queue_declare(q, durable=True)
    ch.queue_bind(q, x, routing_key=model_routing_key(MODEL))
    generate_signing_key(tmp_path / "server.pem")
    generate_signing_key(tmp_path / "forger.pem")
    keys = {
        "server": load_signing_key(tmp_path / "server.pem"),
        "forger": load_signing_key(tmp_path / "forger.pem"),
    }

    def publish(state, version, accepts, key="server"):
        env, blob = encode_model(
            state, model=MODEL, version=version, parent=None, accepts=accepts, key=keys[key]
        )
        for c in split(env.broadcast_id, blob, 4096):  # several chunks
            props = pika.BasicProperties(
                delivery_mode=2,
                message_id=c.message_id,
                headers=c.headers(),
                type=MODEL_MESSAGE_TYPE,
            )
            ch.basic_publish(x, model_routing_key(MODEL), c.body, props)

    publish.exchange, publish.queue = x, q
    publish.public_key = tmp_path / "server.pem.pub"
    publish.sign = keys
    try:
        yield publish
    finally:
        ch.queue_delete(q)
        ch.exchange_delete(x)
        conn.close()


def global_state(node_cfg, tmp_path, seed):
    """Weights of the stand-in student's shape, as the server would send them."""
    torch.manual_seed(seed)
    sd = StandInLoop(node_cfg, tmp_path).student.state_dict()
    return {k: (v + torch.randn_like(v) if v.is_floating_point() else v) for k, v in sd.items()}


def test_versions_adopted_between_rounds_with_the_outbox_rule(node, tmp_path, broadcast, caplog):
    path, cfg = node(
        node={"id": "nodem"},
        transport={"declare_exchanges": False},  # the queue is the operator's: only checked
        models={
            "enabled": True,
            "server_public_key": str(broadcast.public_key),
            "exchange": broadcast.exchange,
            "queue": broadcast.queue,
        },
    )
    v1, v2 = global_state(cfg, tmp_path, 1), global_state(cfg, tmp_path, 2)
    d = None

    def frames():
        # steps_per_round = 2: round k ends with frame 2k - 1
        for frame in StandInSource():
            i = frame.index
            if i == 4:  # after rounds 1, 2 on the node's own base
                broadcast(v1, "1", ["1"])
                assert d.models.wait_for("1", 15)
            if i == 10:  # rounds 3 (old base: dropped), 4, 5 on base 1
                broadcast(v1, "2", ["2", "1"], key="forger")
                assert wait(lambda: d.models.rejected.get("signature") == 1)
            if i == 12:
                broadcast(v2, "2", ["2", "1"])
                assert d.models.wait_for("2", 15)
            yield frame

    loops: list = []
    d = make_daemon(cfg, path, reject_every=0, loops=loops, max_rounds=8)
    d.source_factory = lambda c: frames()
    with caplog.at_level(logging.INFO):
        assert d.run() == 0
    loop = loops[0]
    assert loop.adopted == ["1", "2"] and d.base_version == "2"
    # the forged version was refused and training went on through it
    assert d.models.rejected == {"signature": 1} and d.round == 8
    refused = [r.getMessage() for r in caplog.records if "refused: signature" in r.getMessage()]
    assert len(refused) == 1
    # outbox rule: rounds 1-3 were on the node's first base (not accepted by version 1):
    # dropped; rounds 4-7 on base 1 are kept by version 2 (accepts 1); round 8 on 2
    bases = {e.round: e.base_version for e in d.outbox.pending()}
    assert bases == {4: "1", 5: "1", 6: "1", 7: "1", 8: "2"}
    assert d.counters.stale_dropped == 3 and d.counters.adopted == 2
    # the adopted weights became the base the updates are computed against
    assert all(torch.equal(d.base[k], v2[k]) for k in d.base)
    assert list((cfg.state.dir / "models").glob("*.wgm")) == []  # adopted: not kept

    # A version received and acknowledged just before a stop is adopted at the next
    # start (it is no longer in the queue), and the rule runs for it too.
    _, blob = encode_model(
        global_state(cfg, tmp_path, 3),
        model=MODEL,
        version="3",
        parent="2",
        accepts=["3"],
        key=broadcast.sign["server"],
    )
    (cfg.state.dir / "models" / f"{MODEL}-3.wgm").write_bytes(blob)
    loops.clear()
    d = make_daemon(cfg, path, reject_every=0, loops=loops, max_rounds=1)
    assert d.run() == 0
    assert loops[0].adopted == ["3"] and d.base_version == "3"
    assert {e.base_version for e in d.outbox.pending()} == {"3"}
    assert d.counters.stale_dropped == 3 + 5  # counted across restarts (saved state)
    from waggle_trainer.node.cli import read_status

    st = read_status(cfg.state.dir)["state"]
    assert (st["base_version"], st["adopted"], st["stale_dropped"]) == ("3", 3, 8)
    assert list((cfg.state.dir / "models").glob("*.wgm")) == []


def wait(pred, timeout=15.0):
    from brokerutil import wait_until

    return wait_until(pred, timeout)


def test_models_config_is_checked_at_load(tmp_path):
    from waggle_trainer.config import ConfigError, config_from_dict

    def problems(models, **more):
        data = {"node": {"id": "nodem"}, "models": {"enabled": True, **models}, **more}
        with pytest.raises(ConfigError) as info:
            config_from_dict(data, "node.toml")
        return info.value.lines()

    missing = tmp_path / "nope.pub"
    [line] = problems({"server_public_key": str(missing)})
    assert line.startswith(f"node.toml: models.server_public_key: {missing}: not found")
    assert "server-keygen" in line
    (tmp_path / "junk.pub").write_text("not a key\n")
    [line] = problems({"server_public_key": str(tmp_path / "junk.pub")})
    assert "not a PEM public key" in line
    generate_signing_key(tmp_path / "k.pem")
    pub = str(tmp_path / "k.pem.pub")
    [line] = problems({"server_public_key": pub, "queue": "a queue"})
    assert line.startswith("node.toml: models.queue: 'a queue' is not a queue name")
    [line] = problems(
        {"server_public_key": pub}, daemon={"global_model_file": str(tmp_path / "g.st")}
    )
    assert line.startswith("node.toml: daemon.global_model_file: not with models.enabled")
    cfg = config_from_dict(
        {"node": {"id": "n"}, "models": {"enabled": True, "server_public_key": pub}}
    )
    assert cfg.models.queue == "" and cfg.models.exchange == "waggle.train.models"
