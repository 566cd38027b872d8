"""``waggle-trainer server``: the pieces put together and run until a signal.

Threads: the consumer's I/O thread and worker (``consumer.py``), the telemetry
listener (``telemetry_view.py``) and the status page (``status.py``).  SIGTERM
or SIGINT stops them in order; unacknowledged work is redelivered to the next
server (or to a standby already waiting on the queue).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from waggle_trainer.config import ConfigError
from waggle_trainer.transport.model_wire import load_signing_key

from .config import ServerConfig
from .consumer import ServerConsumer, amqp_settings
from .pipeline import UpdatePipeline

log = logging.getLogger(__name__)


def check_files(cfg: ServerConfig, source: str):
    """Files the config names, checked before anything starts; returns the signing
    key (or None) or raises ConfigError naming each key at fault."""
    problems: list[tuple[str, str]] = []
    for name, m in cfg.models.items():
        p = Path(m.initial_weights)
        if not p.is_file():
            problems.append((f"models.{name}.initial_weights",
                             f"{str(p)!r} not found (a safetensors file of the model's weights)"))
    if not cfg.models:
        problems.append(("models", "no model to serve (add [models.NAME] with initial_weights)"))
    if not Path(cfg.verify.keys_dir).is_dir():
        problems.append(("verify.keys_dir", f"{str(cfg.verify.keys_dir)!r} is not a directory "
                                            "(one <node_id>.key file per node)"))
    key = None
    if cfg.broadcast.enabled:
        try:
            key = load_signing_key(cfg.broadcast.signing_key_file)
        except FileNotFoundError:
            problems.append(("broadcast.signing_key_file",
                             f"{str(cfg.broadcast.signing_key_file)!r} not found (create one with "
                             "'waggle-trainer server-keygen PATH', or set broadcast.enabled = "
                             "false)"))
        except (OSError, ValueError) as e:
            problems.append(("broadcast.signing_key_file", str(e)))
    try:
        Path(cfg.server.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        problems.append(("server.state_dir", f"cannot be created: {e.strerror}"))
    if problems:
        raise ConfigError(source, problems)
    return key


class Server:
    def __init__(self, cfg: ServerConfig, signing_key=None):
        self.cfg = cfg
        self.pipeline = UpdatePipeline(cfg)
        self.consumer = ServerConsumer(cfg, self.pipeline, signing_key=signing_key)
        self.telemetry = None
        self.status = None
        self.stopped = threading.Event()

    def start(self) -> None:
        self.pipeline.startup()
        if self.cfg.telemetry.enabled:
            from .telemetry_view import TelemetryView

            self.telemetry = TelemetryView(amqp_settings(self.cfg, "waggle-trainer-server"),
                                           exchange=self.cfg.telemetry.exchange,
                                           history=self.cfg.telemetry.history_points)
            self.telemetry.start()
        if self.cfg.status.enabled:
            from .status import StatusServer

            self.status = StatusServer(self.cfg, self.pipeline.root / "state.sqlite",
                                       self.pipeline.store, self.telemetry, self.consumer)
            self.status.start()
            log.info("status page on http://%s:%d/", self.cfg.status.bind, self.status.port)
        self.consumer.start()

    def stop(self) -> None:
        self.consumer.stop()
        if self.telemetry is not None:
            self.telemetry.stop()
        if self.status is not None:
            self.status.stop()
        self.stopped.set()


def run(cfg: ServerConfig, source: str) -> int:
    try:
        key = check_files(cfg, source)
    except ConfigError as e:
        for line in e.lines():
            print(line)
        return 2
    server = Server(cfg, key)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("server running: queue %s, models %s", cfg.queue.queue, ", ".join(cfg.models))
    while not stop.wait(0.5):
        if server.consumer.fatal_error is not None:
            log.error("stopping: %s", server.consumer.fatal_error)
            server.stop()
            return 1
    server.stop()
    return 0
