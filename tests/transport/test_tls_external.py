"""TLS with client certificates and SASL EXTERNAL, Waggle's node authentication, against
a private RabbitMQ node (see tlsbroker.py) with Beehive-like permissions: the node
user ``node-<id>`` (no password) may write only the update and metrics exchanges
and read only its own model queue.  The system broker is not touched."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pika
import pika.exceptions as px
import pytest
import torch
import wagglemsg
from brokerutil import wait_until
from tlsbroker import Client, issue, make_ca, start_private_broker

from waggle_trainer.config import ConfigError, config_from_dict
from waggle_trainer.node.brokers import telemetry_publisher, update_publisher
from waggle_trainer.transport import (
    AmqpSettings,
    CodecSettings,
    Outbox,
    Telemetry,
    UpdateEncoder,
    UpdatePublisher,
)
from waggle_trainer.transport.chunks import parse_headers, split
from waggle_trainer.transport.model_subscriber import ModelSubscriber
from waggle_trainer.transport.wire import (
    MODEL_EXCHANGE,
    MODEL_MESSAGE_TYPE,
    model_routing_key,
    node_model_queue,
)

pytestmark = pytest.mark.broker

NODE_ID = "000048B02D15BC7C"
NODE_USER = f"node-{NODE_ID}"
UPDATES, METRICS, OTHER = "waggle.train.updates", "waggle.msg", "other.exchange"
MODEL_QUEUE = node_model_queue(NODE_ID)  # the queue the daemon's subscriber reads
OTHER_MODEL_QUEUE = node_model_queue("0000000000000002")
ROOT = Path(__file__).resolve().parents[2]


def _definitions() -> dict:
    def user(name: str) -> dict:  # no password: only a certificate logs in
        return {
            "name": name,
            "password_hash": "",
            "tags": [],
            "hashing_algorithm": "rabbit_password_hashing_sha256",
        }

    def exchange(name: str) -> dict:
        return {
            "name": name,
            "vhost": "/",
            "type": "topic",
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }

    def queue(name: str) -> dict:
        return {"name": name, "vhost": "/", "durable": True, "auto_delete": False, "arguments": {}}

    def bind(x: str, q: str, key: str) -> dict:
        return {
            "source": x,
            "vhost": "/",
            "destination": q,
            "destination_type": "queue",
            "routing_key": key,
            "arguments": {},
        }

    return {
        "users": [user(NODE_USER), user("test-admin")],
        "vhosts": [{"name": "/"}],
        "permissions": [
            {"user": "test-admin", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
            # like Beehive: nothing to configure, two exchanges to write, one queue to read
            {
                "user": NODE_USER,
                "vhost": "/",
                "configure": "^$",
                "write": r"^(waggle\.train\.updates|waggle\.msg)$",
                "read": f"^{MODEL_QUEUE.replace('.', chr(92) + '.')}$",
            },
        ],
        "exchanges": [
            exchange(UPDATES),
            exchange(METRICS),
            exchange(OTHER),
            exchange(MODEL_EXCHANGE),
        ],
        "queues": [
            queue("server.updates"),
            queue("beehive.metrics"),
            queue("other.q"),
            queue(MODEL_QUEUE),
            queue(OTHER_MODEL_QUEUE),
        ],
        "bindings": [
            bind(UPDATES, "server.updates", "update.*"),
            bind(METRICS, "beehive.metrics", "#"),
            bind(OTHER, "other.q", "#"),
            bind(MODEL_EXCHANGE, MODEL_QUEUE, model_routing_key("m")),
        ],
    }


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory):
    """The private node, its certificates and clients; stopped at the end whatever
    happened (and with the test process, should that die)."""
    root = tmp_path_factory.mktemp("tls-broker")
    certs = root / "certs"
    certs.mkdir()
    ca = make_ca(certs, "ca")
    issue(ca, certs, "server", server=True)
    other_ca = make_ca(certs, "other-ca")

    def client(issuer, cn: str, **kw) -> Client:
        cert, key = issue(issuer, certs, cn, **kw)
        return Client(ca.path, cert, key)

    admin = client(ca, "test-admin")
    clients = {
        "node": client(ca, NODE_USER),
        "admin": admin,
        "other_ca": client(other_ca, f"{NODE_USER}.other"),
        "expired": client(ca, f"{NODE_USER}.expired", expired=True),
        "wrong_trust": Client(other_ca.path, *issue(ca, certs, f"{NODE_USER}.trust")),
        "unknown_user": client(ca, "node-0000000000000003"),  # no such broker user
    }
    broker = start_private_broker(root, _definitions(), probe=admin)
    broker.clients = clients
    try:
        yield broker
    finally:
        broker.stop()


def settings(broker, who: str = "node", **kw) -> AmqpSettings:
    c = broker.clients[who]
    return AmqpSettings(
        host="127.0.0.1",
        port=broker.port,
        tls=True,
        username=None,
        password=None,
        cacert=str(c.cacert),
        cert=str(c.cert),
        key=str(c.key),
        server_hostname="localhost",
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
        connection_name="test",
        **kw,
    )


def connect(broker, who: str) -> pika.BlockingConnection:
    s = settings(broker, who)
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            broker.port,
            credentials=pika.credentials.ExternalCredentials(),
            ssl_options=pika.SSLOptions(s.ssl_context(), "localhost"),
            connection_attempts=1,
            socket_timeout=5,
        )
    )


def node_config(broker, **transport):
    c = broker.clients["node"]
    return config_from_dict(
        {
            "node": {"id": NODE_ID, "vsn": "W0T"},
            "transport": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": broker.port,
                "tls": True,
                "cacert": str(c.cacert),
                "cert": str(c.cert),
                "key": str(c.key),
                "declare_exchanges": False,
                **transport,
            },
            "telemetry": {"enabled": True, "route": "beehive", "interval_s": 60},
        }
    )


def drain(broker, queue: str, n: int, timeout: float = 10.0) -> list:
    conn = connect(broker, "admin")
    ch = conn.channel()
    got: list = []

    def pull():
        while True:
            m, props, body = ch.basic_get(queue, auto_ack=True)
            if m is None:
                return len(got) >= n
            got.append((m, props, body))

    try:
        wait_until(pull, timeout, step=0.1)
    finally:
        conn.close()
    return got


def small_update() -> bytes:
    enc = UpdateEncoder(
        node_id=NODE_ID, vsn="W0T", model="m", key=b"k" * 32, settings=CodecSettings("fp32", "none")
    )
    return enc.encode_delta({"w": torch.randn(64)}, base_version="1", round=1, samples=4).blob


# ------------------------------------------------------------------ delivery


def test_update_publisher_delivers_with_external(tls_broker, tmp_path):
    cfg = node_config(tls_broker)
    pub = update_publisher(cfg, Outbox(tmp_path / "outbox", 1 << 20), NODE_ID)
    assert pub.amqp.username is None and pub.user_id == NODE_USER  # EXTERNAL, CN
    blob = small_update()
    pub.submit(blob)
    try:
        pub.start()
        assert pub.wait_idle(15), pub.last_error
    finally:
        pub.stop()
    [(method, props, body)] = drain(tls_broker, "server.updates", 1)
    assert method.routing_key == f"update.{NODE_ID}"
    assert props.user_id == NODE_USER  # the broker checked it against the certificate
    update_id, index, count, _ = parse_headers(props.headers, props.message_id)
    assert (index, count) == (0, 1) and body == blob
    assert pub.fatal_error is None and pub.connect_attempts == 1


def test_telemetry_publisher_delivers_with_external(tls_broker):
    cfg = node_config(tls_broker)
    t = Telemetry(NODE_ID, "W0T")
    t.record("train.loss", 0.5, ts_ns=1_764_169_200_000_000_001)
    t.record("train.round", 3, ts_ns=1_764_169_200_000_000_002)
    pub = telemetry_publisher(cfg, t)
    try:
        pub.start()
        assert wait_until(lambda: pub.sent >= 2 or pub.fatal_error is not None, 15)
    finally:
        pub.stop()
    got = drain(tls_broker, "beehive.metrics", 2)
    msgs = [wagglemsg.load(body) for _, _, body in got]
    assert [(m.name, m.value, m.timestamp) for m in msgs] == [
        ("train.loss", 0.5, 1_764_169_200_000_000_001),
        ("train.round", 3, 1_764_169_200_000_000_002),
    ]
    assert all(m.meta == {"node": NODE_ID, "vsn": "W0T"} for m in msgs)
    assert all(props.user_id == NODE_USER for _, props, _ in got)


# ------------------------------------------------------------ refused, once


def our_errors(caplog) -> list[logging.LogRecord]:
    """ERROR lines of this program (the command line's logging set-up silences pika's
    own multi-line reports: see common.setup_logging)."""
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("waggle_trainer")
    ]


def run_until_stopped(pub, timeout: float = 15.0):
    try:
        pub.start()
        assert wait_until(lambda: not pub.running, timeout), f"still running: {pub.last_error}"
        time.sleep(0.5)  # nothing more happens: no second attempt
    finally:
        pub.stop()


@pytest.mark.parametrize(
    "who,words",
    [
        ("other_ca", "the broker does not trust the CA that signed the client certificate"),
        ("expired", "it has expired (valid until"),
        ("unknown_user", "authentication refused by the broker (certificate"),
        ("wrong_trust", "the broker's certificate is not trusted with cacert"),
    ],
)
def test_refused_certificate_is_one_fatal_line(tls_broker, tmp_path, caplog, who, words):
    ob = Outbox(tmp_path / "outbox", 1 << 20)
    ob.put(small_update())
    pub = UpdatePublisher(settings(tls_broker, who), ob, node_id=NODE_ID, declare_exchange=False)
    with caplog.at_level(logging.INFO, logger="waggle_trainer.transport"):
        run_until_stopped(pub)
    assert pub.connect_attempts == 1 and len(ob) == 1
    errors = our_errors(caplog)
    assert len(errors) == 1, caplog.text
    line = errors[0].getMessage()
    assert words in line and "\n" not in line and errors[0].exc_info is None
    assert (
        str(
            tls_broker.clients[who].cert if who != "wrong_trust" else tls_broker.clients[who].cacert
        )
        in line
    )


def test_missing_key_file_is_a_config_error_at_start(tls_broker, tmp_path):
    c = tls_broker.clients["node"]
    missing = tmp_path / "key.pem"
    with pytest.raises(ConfigError) as info:
        node_config(tls_broker, key=str(missing))
    [line] = info.value.lines()
    assert f"transport.key: {missing}: not found" in line
    # the same from the command line: one line, non-zero exit, no traceback
    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nid = "{NODE_ID}"\n[transport]\nenabled = true\ntls = true\n'
        f'cacert = "{c.cacert}"\ncert = "{c.cert}"\nkey = "{missing}"\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "waggle_trainer", "check-config", str(toml)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode != 0 and len(out) == 1 and "transport.key" in out[0], out
    assert "Traceback" not in r.stderr


# -------------------------------------------------------- Beehive permissions


def test_node_user_may_publish_only_to_its_exchanges(tls_broker, tmp_path, caplog):
    ob = Outbox(tmp_path / "outbox", 1 << 20)
    ob.put(small_update())
    pub = UpdatePublisher(
        settings(tls_broker), ob, node_id=NODE_ID, exchange=OTHER, declare_exchange=False
    )
    with caplog.at_level(logging.ERROR, logger="waggle_trainer.transport"):
        run_until_stopped(pub)
    [err] = [r.getMessage() for r in our_errors(caplog)]
    assert "403" in err and "ACCESS_REFUSED" in err and OTHER in err and NODE_USER in err
    assert "lacks this permission" in err
    assert pub.connect_attempts == 1 and len(ob) == 1  # kept for a fixed configuration
    assert drain(tls_broker, "other.q", 0, timeout=0.5) == []


def test_node_user_may_not_declare_the_exchanges(tls_broker, tmp_path, caplog):
    pub = UpdatePublisher(
        settings(tls_broker),
        Outbox(tmp_path / "outbox", 1 << 20),
        node_id=NODE_ID,
        declare_exchange=True,
    )
    with caplog.at_level(logging.ERROR, logger="waggle_trainer.transport"):
        run_until_stopped(pub)
    [err] = [r.getMessage() for r in our_errors(caplog)]
    assert f"cannot declare exchange '{UPDATES}'" in err and "declare_exchanges = false" in err
    assert pub.connect_attempts == 1


def test_node_user_reads_only_its_own_model_queue(tls_broker):
    admin = connect(tls_broker, "admin")
    admin.channel().basic_publish("", MODEL_QUEUE, b"model v2")
    admin.close()
    conn = connect(tls_broker, "node")
    try:
        ch = conn.channel()
        assert wait_until(lambda: ch.basic_get(MODEL_QUEUE, auto_ack=True)[2] == b"model v2", 5)
        with pytest.raises(px.ChannelClosedByBroker) as info:
            conn.channel().basic_get(OTHER_MODEL_QUEUE)
        assert info.value.reply_code == 403
        with pytest.raises(px.ChannelClosedByBroker) as info:
            conn.channel().queue_declare("node.made.this")
        assert info.value.reply_code == 403
    finally:
        conn.close()


def test_model_subscriber_checks_its_queue_and_receives_versions(tls_broker, tmp_path, caplog):
    """configure ^$: the daemon's subscriber (declare_exchanges = false) only checks
    the exchange and its queue, which the operator's definitions created and bound."""
    from waggle_trainer.server.signing import generate_signing_key, load_signing_key
    from waggle_trainer.transport.model_wire import encode_model, load_verify_key

    generate_signing_key(tmp_path / "server.pem")
    state = {"w": torch.randn(8, 4), "b": torch.zeros(8)}
    env, blob = encode_model(
        state,
        model="m",
        version="2",
        parent="1",
        accepts=["2", "1"],
        key=load_signing_key(tmp_path / "server.pem"),
    )
    admin = connect(tls_broker, "admin")
    for c in split(env.broadcast_id, blob, 1000):
        admin.channel().basic_publish(
            MODEL_EXCHANGE,
            model_routing_key("m"),
            c.body,
            pika.BasicProperties(
                delivery_mode=2,
                message_id=c.message_id,
                headers=c.headers(),
                type=MODEL_MESSAGE_TYPE,
            ),
        )
    admin.close()

    def subscriber(declare: bool) -> ModelSubscriber:
        return ModelSubscriber(
            settings(tls_broker),
            node_id=NODE_ID,
            model="m",
            verify_key=load_verify_key(tmp_path / "server.pem.pub"),
            current_version="1",
            declare=declare,
        )

    sub = subscriber(declare=False)
    assert sub.queue == MODEL_QUEUE
    try:
        sub.start()
        assert sub.wait_for("2", 15), sub.last_error
    finally:
        sub.stop()
    mv = sub.take()
    assert mv.version == "2" and torch.equal(mv.state["w"], state["w"])
    assert sub.fatal_error is None and sub.connect_attempts == 1
    # declaring (declare_exchanges = true) is refused: one fatal line that says what to set
    sub = subscriber(declare=True)
    with caplog.at_level(logging.ERROR, logger="waggle_trainer.transport"):
        run_until_stopped(sub)
    [err] = [r.getMessage() for r in our_errors(caplog)]
    assert "403" in err and "declare_exchanges = false" in err
    assert sub.connect_attempts == 1


def test_private_node_is_isolated(tls_broker):
    """Its own name, ports and files: nothing of it in /etc/rabbitmq or on 5672."""
    b = SimpleNamespace(**tls_broker.__dict__)
    assert b.nodename != "rabbit@localhost" and b.port not in (5671, 5672)
    assert str(b.root) in b.env["RABBITMQ_CONFIG_FILE"]
    assert str(b.root) in b.env["RABBITMQ_ENABLED_PLUGINS_FILE"]
    assert "rabbitmq_auth_mechanism_ssl" in Path(b.env["RABBITMQ_ENABLED_PLUGINS_FILE"]).read_text()


def test_tls_refusal_asks_the_broker_again(tls_broker):
    """pika may see a bare EOF where the broker sent an alert (TLS 1.3 and a reset):
    the second, silent handshake reads the broker's verdict every time."""
    from waggle_trainer.transport.amqp import tls_refusal

    for _ in range(3):
        assert "expired" in str(tls_refusal(settings(tls_broker, "expired")))
        assert "does not trust the CA" in str(tls_refusal(settings(tls_broker, "other_ca")))
    assert tls_refusal(settings(tls_broker, "node"), wait_s=0.3) is None  # accepted
