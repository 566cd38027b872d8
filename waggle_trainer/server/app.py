"""``waggle-trainer server``: the pieces put together and run until a signal.

Threads: the consumer's I/O thread and worker (``consumer.py``), the telemetry
listener (``telemetry_view.py``) and the status page (``status.py``).  SIGTERM
or SIGINT stops them in order; unacknowledged work is redelivered to the next
server (or to a standby already waiting on the queue).
"""

from __future__ import annotations

import errno
import logging
import signal
import threading

from .config import ServerConfig
from .consumer import ServerConsumer, amqp_settings
from .pipeline import InitialWeightsError, UpdatePipeline
from .status import StatusServer
from .telemetry_view import TelemetryView

log = logging.getLogger(__name__)


class Server:
    def __init__(self, cfg: ServerConfig, signing_key=None):
        self.cfg = cfg
        self.pipeline = UpdatePipeline(cfg)
        self.consumer = ServerConsumer(cfg, self.pipeline, signing_key=signing_key)
        self.telemetry: TelemetryView | None = None
        self.status: StatusServer | None = None
        self.stopped = threading.Event()

    def start(self) -> None:
        self.pipeline.startup()
        if self.cfg.telemetry.enabled:
            self.telemetry = TelemetryView(
                amqp_settings(self.cfg, "waggle-trainer-server"),
                exchange=self.cfg.telemetry.exchange,
                history=self.cfg.telemetry.history_points,
            )
            self.telemetry.start()
        if self.cfg.status.enabled:
            status = StatusServer(
                self.cfg,
                self.pipeline.root / "state.sqlite",
                self.pipeline.store,
                self.telemetry,
                self.consumer,
            )
            status.start()
            self.status = status
            log.info("status page on http://%s:%d/", self.cfg.status.bind, status.port)
        self.consumer.start()

    def stop(self) -> None:
        self.consumer.stop()
        if self.telemetry is not None:
            self.telemetry.stop()
        if self.status is not None:
            self.status.stop()
        self.stopped.set()


def run(cfg: ServerConfig, key, source: str) -> int:
    """Run until SIGTERM/SIGINT (0), a fatal broker error (1) or a start-up
    problem the operator must fix (2, one line naming the config key)."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        return _serve(Server(cfg, key), cfg, source, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(server: Server, cfg: ServerConfig, source: str, stop: threading.Event) -> int:
    try:
        server.start()
    except InitialWeightsError as e:
        print(f"{source}: models.{e.model}.initial_weights: {e}")
        return 2
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        print(
            f"{source}: status.port: cannot listen on {cfg.status.bind}:{cfg.status.port}: "
            f"{e.strerror} (choose another port, or 0 for any free one)"
        )
        server.stop()
        return 2
    log.info("server running: queue %s, models %s", cfg.queue.queue, ", ".join(cfg.models))
    while not stop.wait(0.5):
        if server.consumer.fatal_error is not None:
            log.error("stopping: %s", server.consumer.fatal_error)
            server.stop()
            return 1
    server.stop()
    return 0
