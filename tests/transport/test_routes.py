"""Telemetry routes: "beehive" (topic exchange, routing key = metric name) and "node"
(like a pywaggle plugin: exchange to-validator, routing key = scope, persistent,
user_id, app_id), configured from the node config file and pywaggle's environment
variables; every message decoded with pywagglemsg."""

from __future__ import annotations

import logging
import uuid

import pika
import pytest
import wagglemsg
from brokerutil import BROKER, wait_until
from tlsbroker import issue, make_ca

from waggle_trainer import config as cfgmod
from waggle_trainer.config import ConfigError, config_from_dict
from waggle_trainer.node.brokers import telemetry_connection, update_connection
from waggle_trainer.transport import AmqpSettings, Telemetry, TelemetryPublisher
from waggle_trainer.transport.telemetry import NODE_EXCHANGE, TelemetryRoute

PLUGIN_ENV = (
    "WAGGLE_PLUGIN_HOST",
    "WAGGLE_PLUGIN_PORT",
    "WAGGLE_PLUGIN_USERNAME",
    "WAGGLE_PLUGIN_PASSWORD",
    "WAGGLE_APP_ID",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(cfgmod, "WAGGLE_ETC", tmp_path / "etc-waggle")
    for var in (*PLUGIN_ENV, "WAGGLE_NODE_ID", "WAGGLE_NODE_VSN"):
        monkeypatch.delenv(var, raising=False)


def cfg(**telemetry):
    return config_from_dict(
        {"node": {"id": "NODE1", "vsn": "W01"}, "telemetry": {"enabled": True, **telemetry}}
    )


# ---------------------------------------------------------------- from config


def test_beehive_route_uses_the_transport_connection(tmp_path):
    ca = make_ca(tmp_path, "ca")
    cert, key = issue(ca, tmp_path, "node-NODE1")
    c = config_from_dict(
        {
            "node": {"id": "NODE1", "vsn": "W01"},
            "transport": {
                "host": "beehive.example",
                "port": 5671,
                "tls": True,
                "cacert": str(ca.path),
                "cert": str(cert),
                "key": str(key),
                "declare_exchanges": False,
            },
            "telemetry": {"enabled": True},
        }
    )
    amqp, route = telemetry_connection(c)
    assert amqp == update_connection(c)
    assert (amqp.host, amqp.port, amqp.tls, amqp.username) == ("beehive.example", 5671, True, None)
    assert route == TelemetryRoute.beehive("waggle.msg", declare_exchange=False)
    assert route.routing_key({"name": "train.loss"}) == "train.loss"


def test_node_route_like_pywaggle_with_its_defaults():
    amqp, route = telemetry_connection(cfg(route="node"))
    assert (amqp.host, amqp.port, amqp.username, amqp.password, amqp.tls) == (
        "rabbitmq",
        5672,
        "plugin",
        "plugin",
        False,
    )
    assert route.exchange == NODE_EXCHANGE == "to-validator" and not route.declare_exchange
    assert route.persistent and route.app_id is None
    assert route.routing_key({"name": "train.loss"}) == "all"


def test_node_route_from_pywaggle_environment(monkeypatch):
    monkeypatch.setenv("WAGGLE_PLUGIN_HOST", "10.31.81.1")
    monkeypatch.setenv("WAGGLE_PLUGIN_PORT", "5673")
    monkeypatch.setenv("WAGGLE_PLUGIN_USERNAME", "plugin.waggle-trainer")
    monkeypatch.setenv("WAGGLE_PLUGIN_PASSWORD", "s3cret")
    monkeypatch.setenv("WAGGLE_APP_ID", "3f2c9a10-uid")
    amqp, route = telemetry_connection(cfg(route="node", scope="beehive"))
    assert (amqp.host, amqp.port, amqp.username, amqp.password) == (
        "10.31.81.1",
        5673,
        "plugin.waggle-trainer",
        "s3cret",
    )
    assert route.app_id == "3f2c9a10-uid" and route.routing_key({"name": "x"}) == "beehive"
    # the config file wins over the environment
    amqp, route = telemetry_connection(cfg(route="node", host="127.0.0.1", app_id="mine"))
    assert amqp.host == "127.0.0.1" and amqp.port == 5673 and route.app_id == "mine"


@pytest.mark.parametrize(
    "telemetry,where,words",
    [
        ({"route": "edge"}, "telemetry.route", "one of 'beehive' or 'node'"),
        (
            {"route": "node", "scope": "everyone"},
            "telemetry.scope",
            "one of 'all', 'node' or 'beehive'",
        ),
        ({"route": "node", "exchange": "other"}, "telemetry.exchange", "to-validator"),
        ({"port": 0}, "telemetry.port", "out of range"),
    ],
)
def test_bad_route_settings_name_the_key(telemetry, where, words):
    with pytest.raises(ConfigError) as info:
        cfg(**telemetry)
    line = "\n".join(info.value.lines())
    assert where in line and words in line, line


def test_bad_port_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("WAGGLE_PLUGIN_PORT", "amqp")
    with pytest.raises(ConfigError) as info:
        cfg(route="node")
    assert "WAGGLE_PLUGIN_PORT" in str(info.value) and "'amqp'" in str(info.value)


# ----------------------------------------------------------------- on the wire


def _receive(ch, queue: str, n: int, node: str, timeout: float = 10.0):
    """Up to ``n`` messages of ``node`` (other test runs may share the exchange)."""
    got: list = []

    def pull():
        while True:
            m, props, body = ch.basic_get(queue, auto_ack=True)
            if m is None:
                return len(got) >= n
            msg = wagglemsg.load(body)
            if msg.meta.get("node") == node:
                got.append((m, props, msg))

    wait_until(pull, timeout, step=0.1)
    return got


def _record(t: Telemetry) -> list[tuple[str, object, int]]:
    sent = [
        ("train.loss", 0.3125, 1_764_169_200_123_456_789),
        ("train.round", 7, 0),
        ("sys.edge_training.state", "training", 0),
    ]
    out = []
    for name, val, ts in sent:
        t.record(name, val, ts_ns=ts or None, meta={"model": "resnet18"})
        out.append((name, val, t.peek(100)[-1]["ts"]))
    return out


@pytest.mark.broker
def test_node_route_delivers_what_pywagglemsg_reads(broker):
    node = f"N{uuid.uuid4().hex[:10]}"
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    # the node's broker owns to-validator (Waggle's data service declares it: fanout)
    ch.exchange_declare(NODE_EXCHANGE, "fanout", durable=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, NODE_EXCHANGE)
    t = Telemetry(node, "W01")
    sent = _record(t)
    pub = TelemetryPublisher(
        AmqpSettings(backoff_initial_s=0.2, connection_name="test"),
        t,
        route=TelemetryRoute.node(scope="node", app_id="pod-uid-1"),
        interval_s=60,
    )
    try:
        pub.start()
        got = _receive(ch, q, 3, node)
    finally:
        pub.stop()
        ch.queue_delete(q)
        try:
            ch.exchange_delete(NODE_EXCHANGE, if_unused=True)  # unless another run uses it
        except pika.exceptions.ChannelClosedByBroker:
            pass
        if conn.is_open:
            conn.close()
    assert [(m.name, m.value, m.timestamp) for _, _, m in got] == sent
    for method, props, msg in got:
        assert method.exchange == "to-validator" and method.routing_key == "node"
        assert props.delivery_mode == 2 and props.user_id == "guest"
        assert props.app_id == "pod-uid-1"
        assert msg.meta == {"node": node, "vsn": "W01", "model": "resnet18"}
    assert pub.fatal_error is None


@pytest.mark.broker
def test_beehive_route_delivers_what_pywagglemsg_reads(names):
    node = f"N{uuid.uuid4().hex[:10]}"
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    ch.exchange_declare(names.telemetry, "topic", durable=True)
    ch.queue_declare(names.tq)
    ch.queue_bind(names.tq, names.telemetry, "#")
    t = Telemetry(node, "W01")
    sent = _record(t)
    pub = TelemetryPublisher(
        AmqpSettings(backoff_initial_s=0.2, connection_name="test"),
        t,
        route=TelemetryRoute.beehive(names.telemetry),
        interval_s=60,
    )
    try:
        pub.start()
        got = _receive(ch, names.tq, 3, node)
    finally:
        pub.stop()
        conn.close()
    assert [(m.name, m.value, m.timestamp) for _, _, m in got] == sent
    for method, props, msg in got:
        assert method.routing_key == msg.name
        assert props.user_id == "guest" and props.app_id == "waggle-trainer"
        assert msg.meta == {"node": node, "vsn": "W01", "model": "resnet18"}


@pytest.mark.broker
def test_node_route_waits_for_the_node_broker_exchange(broker, caplog):
    """No to-validator on this broker: one clear warning while it is retried (quietly),
    not a crash, a fatal stop or a warning per retry."""
    route = TelemetryRoute.node()
    route = TelemetryRoute(**{**route.__dict__, "exchange": f"test.absent.{uuid.uuid4().hex}"})
    pub = TelemetryPublisher(
        AmqpSettings(backoff_initial_s=0.1, backoff_max_s=0.2, connection_name="test"),
        Telemetry("n", "v"),
        route=route,
        interval_s=60,
    )
    try:
        pub.start()
        with caplog.at_level(logging.INFO, logger="waggle_trainer.transport"):
            assert wait_until(lambda: pub.connect_attempts >= 3, 10)
    finally:
        pub.stop()
    assert pub.fatal_error is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"telemetry: exchange {route.exchange!r} does not exist yet; retrying at most 0.2 s apart"
    ]
