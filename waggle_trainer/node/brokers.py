"""From the node config to broker connections: the update route and the telemetry route.

``[transport]`` is the connection to the server's broker (Beehive, or a test
broker): user and password, or TLS with the node's client certificate and SASL
EXTERNAL.  ``[telemetry] route`` picks where metrics go: ``"beehive"`` over that
same connection, or ``"node"`` to the node's own broker the way a pywaggle plugin
publishes (``[telemetry]`` host, port, username and password, filled from
``WAGGLE_PLUGIN_*`` when the file leaves them unset).
"""

from __future__ import annotations

from typing import Any

from waggle_trainer.config import Config
from waggle_trainer.transport import (
    AmqpSettings,
    Outbox,
    Telemetry,
    TelemetryPublisher,
    UpdatePublisher,
)
from waggle_trainer.transport.telemetry import TelemetryRoute


def _connection_name(cfg: Config) -> str:
    return f"waggle-trainer {cfg.node.id or ''}".strip()


def update_connection(cfg: Config) -> AmqpSettings:
    """The ``[transport]`` connection (with TLS: EXTERNAL, the user is the cert's CN)."""
    t = cfg.transport
    return AmqpSettings(
        host=t.host,
        port=t.port,
        vhost=t.vhost,
        username=None if t.tls else t.username,
        password=None if t.tls else t.password.get_secret_value(),
        tls=t.tls,
        cacert=str(t.cacert),
        cert=str(t.cert),
        key=str(t.key),
        heartbeat_s=t.heartbeat_s,
        connection_name=_connection_name(cfg),
    )


def telemetry_connection(cfg: Config) -> tuple[AmqpSettings, TelemetryRoute]:
    """Connection settings and route for the metrics of ``[telemetry]``."""
    tel = cfg.telemetry
    if tel.route == "beehive":
        return update_connection(cfg), TelemetryRoute.beehive(
            tel.exchange, declare_exchange=cfg.transport.declare_exchanges
        )
    amqp = AmqpSettings(
        host=tel.host,
        port=tel.port,
        username=tel.username,
        password=tel.password.get_secret_value(),
        heartbeat_s=cfg.transport.heartbeat_s,
        connection_name=_connection_name(cfg),
    )
    return amqp, TelemetryRoute.node(scope=tel.scope, app_id=tel.app_id)


def telemetry_publisher(cfg: Config, telemetry: Telemetry) -> TelemetryPublisher:
    amqp, route = telemetry_connection(cfg)
    return TelemetryPublisher(amqp, telemetry, route=route, interval_s=cfg.telemetry.interval_s)


def update_publisher(cfg: Config, outbox: Outbox, node_id: str, **kw: Any) -> UpdatePublisher:
    """The update publisher of ``[transport]`` (``kw`` go to :class:`UpdatePublisher`)."""
    t = cfg.transport
    return UpdatePublisher(
        update_connection(cfg),
        outbox,
        node_id=node_id,
        exchange=t.exchange,
        chunk_size=t.chunk_size,
        declare_exchange=t.declare_exchanges,
        **kw,
    )
