"""``waggle-trainer demo`` (what ``make run`` runs): the whole loop on one machine.

From the repository's root, with ``deploy/demo.toml`` (the node) and
``deploy/demo-server.toml`` (the server):

1. keys, made on the first run and kept: the server's Ed25519 model-signing pair
   (by ``waggle-trainer server-keygen``) and the node's HMAC key;
2. a clean start: the node's state (its profile cache kept), the server's state
   and, on the broker, the demo's own queues (``waggle.demo.*``) are reset, so
   every run shows the same story from round 1;
3. when a broker answers: the node's key is registered in the server's
   ``keys_dir``, the node daemon starts (in this process), its student at start
   becomes the server's version 1, and ``waggle-trainer server`` runs in a process
   of its own (its output in ``<server state dir>.log``; the lines that tell the
   loop are repeated in the node's log).  The node adopts version 1, trains, sends
   updates; the server verifies and aggregates them (``min_updates = 1``) and
   broadcasts each new version; the node verifies and adopts it.  The run ends
   once a round has trained on a version aggregated from the node's updates (or
   at ``--duration``), then the server is stopped;
4. without a broker: the node runs alone and one line says why nothing was
   delivered;
5. the learning curve, from the node's round history, is written beside the
   node's state (:mod:`waggle_trainer.node.curve`).

Ctrl-C stops the node after its current frame and then the server; a second
Ctrl-C ends the node at once, and the server (in its own session, so the
terminal's signal does not reach it directly) is ended by the kernel when this
process goes (``PR_SET_PDEATHSIG``).  This module is at the top of the layers:
it composes the node (in-process) and the server (a subprocess); neither imports
the other.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from waggle_trainer.config import Config
    from waggle_trainer.node.daemon import Daemon
    from waggle_trainer.server.config import ServerConfig

log = logging.getLogger("waggle_trainer.demo")

NODE_CONFIG = Path("deploy/demo.toml")
SERVER_CONFIG = Path("deploy/demo-server.toml")
#: With a broker the run ends once the loop is closed, at the latest after this.
LOOP_DURATION_S = 200.0
#: ... and not before this many rounds: enough to see the student learn.
MIN_ROUNDS = 20
#: Without a broker the node runs alone this long.
ALONE_DURATION_S = 100.0
#: Time for the server to start and its version 1 to reach the node.
FIRST_VERSION_WAIT_S = 120.0
CURVE_FILE = "learning-curve.svg"
#: The node state kept across runs: the per-machine profile cache.
KEPT_NODE_STATE = {"profiles"}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class DemoError(Exception):
    """A reason the demo cannot run (one line)."""


def register(sub) -> None:
    from waggle_trainer.learn.cli import positive_int
    from waggle_trainer.node.cli import positive_seconds

    p = sub.add_parser(
        "demo",
        help="the whole loop on this machine: node, server, broker (what `make run` runs)",
        description="From the repository's root: the node daemon on deploy/demo.toml and, "
        "when a broker answers at its [transport] address, the server on "
        "deploy/demo-server.toml, until the node has adopted a version aggregated from its "
        f"updates and trained at least {MIN_ROUNDS} rounds (at most {LOOP_DURATION_S:g} s of "
        f"training; {ALONE_DURATION_S:g} s without a broker).  Every run starts clean (keys "
        "and the profile cache are kept) and ends with the learning curve as an SVG file "
        "beside the node's state.",
    )
    p.add_argument(
        "--duration",
        type=positive_seconds,
        default=None,
        metavar="S",
        help=f"stop after S seconds of training (default {LOOP_DURATION_S:g} with a broker, "
        f"{ALONE_DURATION_S:g} without)",
    )
    p.add_argument(
        "--max-rounds", type=positive_int, default=None, metavar="N", help="stop after N rounds"
    )
    p.add_argument(
        "--full-duration",
        action="store_true",
        help="keep training after the loop is closed, until --duration or --max-rounds",
    )
    p.set_defaults(handler=demo_command)


def demo_command(args, **factories: Any) -> int:
    """``waggle-trainer demo``; ``factories`` (loop_factory, source_factory) for tests."""
    return run_demo(
        NODE_CONFIG,
        SERVER_CONFIG,
        duration_s=args.duration,
        max_rounds=args.max_rounds,
        stop_at_loop=not args.full_duration,
        reexec_argv=getattr(args, "reexec_argv", None),
        **factories,
    )


# ------------------------------------------------------------------ set-up


@dataclass
class Setup:
    """The two configs and what the demo derives from them."""

    node_config: Path
    server_config: Path
    cfg: Config
    scfg: ServerConfig

    @property
    def node_id(self) -> str:
        return self.cfg.node.id or "local"  # as the daemon names itself

    @property
    def model(self) -> str:
        return self.cfg.student.arch

    @property
    def server_log(self) -> Path:
        return Path(self.scfg.server.state_dir).with_suffix(".log")

    @property
    def curve(self) -> Path:
        return Path(self.cfg.state.dir).parent / CURVE_FILE


def load_setup(node_config: Path, server_config: Path) -> Setup:
    """Both configs, the keys they name (made when missing), checked to fit together."""
    from waggle_trainer.config import load_config
    from waggle_trainer.server.config import load_server_config

    for path in (node_config, server_config):
        if not path.is_file():
            raise DemoError(
                f"{path}: not found (run the demo from the repository's root, as `make run` does)"
            )
    scfg = load_server_config(server_config)
    signing = Path(scfg.broadcast.signing_key_file)
    if not signing.exists():
        make_signing_key(signing)
    cfg = load_config(node_config)  # after the key: [models] needs the public key now
    pub = signing.with_name(signing.name + ".pub")
    if not cfg.models.enabled or Path(cfg.models.server_public_key) != pub:
        raise DemoError(
            f"{node_config}: [models] must be enabled with server_public_key = "
            f'"{pub}" (the public half of {server_config}\'s broadcast.signing_key_file)'
        )
    if cfg.student.arch not in scfg.models:
        raise DemoError(
            f"{server_config}: no [models.{cfg.student.arch}] (the model {node_config} trains)"
        )
    ensure_hmac_key(Path(cfg.transport.hmac_key_file))
    return Setup(node_config, server_config, cfg, scfg)


def make_signing_key(path: Path) -> None:
    """The server's key pair, by the command an operator runs: ``server-keygen``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    r = subprocess.run(
        [sys.executable, "-m", "waggle_trainer", "server-keygen", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    said = (r.stdout.strip() or r.stderr.strip() or f"exit {r.returncode}").splitlines()[-1]
    if r.returncode != 0:
        raise DemoError(f"waggle-trainer server-keygen {path}: {said}")
    log.info("made the demo's model-signing key pair (waggle-trainer server-keygen): %s", said)


def ensure_hmac_key(path: Path) -> None:
    """The node's HMAC key: 32 random bytes, mode 600, made once."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    log.info("made the node's HMAC key %s", path)


def start_clean(s: Setup) -> None:
    """The node's state (but its profile cache), the server's state and log, the
    last picture: gone, so that the run starts at round 1 and version 1."""
    state = Path(s.cfg.state.dir)
    if state.is_dir():
        for child in state.iterdir():
            if child.name not in KEPT_NODE_STATE:
                _remove(child)
    for path in (Path(s.scfg.server.state_dir), s.server_log, s.curve):
        _remove(path)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise DemoError(f"{path}: cannot be removed for a clean start ({exc.strerror})") from None


def register_node_key(s: Setup) -> None:
    """The node's HMAC key in the server's ``keys_dir`` as ``<node id>.key``."""
    keys = Path(s.scfg.verify.keys_dir)
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = keys / f"{s.node_id}.key"
    tmp = keys / f".{target.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(Path(s.cfg.transport.hmac_key_file).read_bytes())
    os.replace(tmp, target)


# ------------------------------------------------------------------ broker


def prepare_broker(s: Setup) -> str | None:
    """None when the node's broker answers (and the demo's queues are then reset:
    the server's work and dead-letter queues deleted, the node's model queue made
    empty and bound, before anything is broadcast); else why not, in a few words."""
    import pika

    from waggle_trainer.node.brokers import update_connection
    from waggle_trainer.transport.amqp import classify, connection_parameters, describe
    from waggle_trainer.transport.wire import model_routing_key, node_model_queue

    amqp = replace(update_connection(s.cfg), socket_timeout_s=5.0)
    where = f"{amqp.host}:{amqp.effective_port}"
    try:
        socket.create_connection((amqp.host, amqp.effective_port), timeout=5.0).close()
    except OSError as exc:
        return f"no broker answers at {where} ({(exc.strerror or str(exc)).lower()})"
    try:
        conn = pika.BlockingConnection(connection_parameters(amqp, "demo"))
    except Exception as exc:  # noqa: BLE001 - pika's errors, described in one line
        fatal = classify(exc, amqp)
        return f"the broker at {where} refused the demo: {fatal or describe(exc)}"
    try:
        ch = conn.channel()
        q = s.scfg.queue
        for name in (q.queue, q.dead_letter_queue):
            ch.queue_delete(name)
        m = s.cfg.models
        queue = m.queue or node_model_queue(s.node_id)
        ch.queue_delete(queue)
        ch.exchange_declare(m.exchange, exchange_type="topic", durable=True)
        ch.queue_declare(queue, durable=True)
        ch.queue_bind(queue, m.exchange, routing_key=model_routing_key(s.model))
    except Exception as exc:  # noqa: BLE001 - pika's errors, described in one line
        raise DemoError(f"the broker at {where}: resetting the demo's queues: {exc}") from None
    finally:
        if conn.is_open:
            conn.close()
    return None


def node_alone(cfg: Config) -> Config:
    """The node config without anything that needs a broker."""
    return cfg.model_copy(
        update={
            "transport": cfg.transport.model_copy(update={"enabled": False}),
            "telemetry": cfg.telemetry.model_copy(update={"enabled": False}),
            "models": cfg.models.model_copy(update={"enabled": False}),
        }
    )


# ------------------------------------------------------------------ server


#: Server log lines repeated in the node's log: they tell the loop.
_TELLING = re.compile(r"version \d+ (imported|stored|broadcast)|accepted update")
_LOG_LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")
_STATUS_PAGE = re.compile(r"status page on (http://\S+)")
_LEVELS = {
    name: getattr(logging, name) for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
}


class DemoServer:
    """``waggle-trainer server`` in a process and session of its own, its output in
    a log file; a thread follows the file and repeats the lines that tell the loop
    (and every warning or error) in this process's log.  What the server prints
    before it runs (a start-up problem, one line) is kept as :attr:`problem` for the
    caller to report instead."""

    def __init__(self, config: Path, log_path: Path):
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.status_url: str | None = None
        self.running = False  # said "server running"
        self.problem = ""  # the last line it printed, or its last warning or error
        self._stop = threading.Event()
        self._tail: threading.Thread | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "waggle_trainer.demo",
                    "server-child",
                    str(os.getpid()),
                    str(self.config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the node; the server is stopped after
            )
        self._tail = threading.Thread(target=self._follow, name="demo-server-log", daemon=True)
        self._tail.start()

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (if it still runs), SIGKILL after ``timeout``; the rest of its output
        read; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("server: still running %g s after SIGTERM; killed", timeout)
                self.proc.kill()
                self.proc.wait()
        self._stop.set()
        if self._tail is not None:
            self._tail.join(5.0)
        return self.proc.returncode

    def _follow(self) -> None:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            pending = ""
            while True:
                chunk = f.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith("\n"):
                        self._line(pending.rstrip("\n"))
                        pending = ""
                    continue
                if self._stop.is_set():
                    if pending:
                        self._line(pending)
                    return
                time.sleep(0.2)

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        m = _LOG_LINE.match(line)
        if m is None:  # printed, not logged: a start-up problem or a traceback
            self.problem = line.strip()
            if self.running:
                log.warning("server: %s", line)
            return
        level, message = _LEVELS[m.group(1)], m.group(3)
        if level >= logging.WARNING:
            self.problem = message
        self.running = self.running or message.startswith("server running")
        page = _STATUS_PAGE.search(message)
        if page is not None:
            self.status_url = page.group(1)
            log.info("server status page: %s (while the demo runs)", self.status_url)
        elif level >= logging.WARNING or _TELLING.search(message):
            log.log(level, "server: %s", message)


def _server_child(parent_pid: int, config: str) -> int:
    """The server process: it ends with the demo's process (SIGTERM on its death)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the demo stops the server itself
    if os.getppid() != parent_pid:
        return 0  # the demo ended before this line
    from waggle_trainer.cli import main

    return main(["server", "--config", config])


# ------------------------------------------------------------------ the run


class LoopHooks:
    """The daemon's ``before_training`` and ``stop_when`` for a run with the server."""

    def __init__(
        self, setup: Setup, server: DemoServer, stop_at_loop: bool, min_rounds: int = MIN_ROUNDS
    ):
        self.setup = setup
        self.server = server
        self.stop_at_loop = stop_at_loop
        self.min_rounds = min_rounds

    def before_training(self, daemon: Daemon) -> None:
        """Version 1 = the node's student now; start the server; adopt version 1."""
        from waggle_trainer.node.daemon import StartupError

        assert daemon.loop is not None and daemon.models is not None
        if daemon.stop_requested:  # Ctrl-C while the node was starting
            return
        s = self.setup
        write_initial_weights(daemon.loop.student, Path(s.scfg.models[s.model].initial_weights))
        self.server.start()
        log.info("server started (waggle-trainer server --config %s)", s.server_config)
        deadline = time.monotonic() + FIRST_VERSION_WAIT_S
        while not daemon.models.wait_for("1", 0.5):
            if daemon.stop_requested:
                return
            code = self.server.exit_code
            if code is not None:
                self.server.stop()  # ended: this reads the rest of its output
                raise StartupError(
                    f"the demo's server stopped (exit {code}): {self.server.problem} "
                    f"(log: {self.server.log_path})"
                )
            if time.monotonic() > deadline:
                raise StartupError(
                    f"the demo's server sent no version 1 within {FIRST_VERSION_WAIT_S:g} s "
                    f"(log: {self.server.log_path})"
                )
        daemon.adopt_received()

    def stop_when(self, daemon: Daemon) -> str | None:
        """The loop is closed: the last round trained on a version (2 or later) that
        the server aggregated from this node's updates, after at least ``min_rounds``
        rounds.  Or the server has ended."""
        code = self.server.exit_code
        if code is not None:
            return f"the demo's server ended (exit {code}; its log: {self.server.log_path})"
        enough = len(daemon.history) >= self.min_rounds
        if self.stop_at_loop and enough and closes_the_loop(daemon.history[-1]):
            last = daemon.history[-1]
            return (
                f"the loop is closed (round {last['round']} trained on global version "
                f"{last['base_version']})"
            )
        return None


def closes_the_loop(entry: dict[str, Any]) -> bool:
    """A round of the history trained on a server version aggregated from updates
    (2 or later: version 1 is the node's own student at start)."""
    base = str(entry.get("base_version") or "")
    return base.isdigit() and int(base) >= 2


def write_initial_weights(student, path: Path) -> None:
    """The server's version 1: the node's student as it starts (its whole state dict)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = student.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"source": "waggle-trainer demo: the node's student"})
    os.replace(tmp, path)


def run_demo(
    node_config: Path,
    server_config: Path,
    *,
    duration_s: float | None = None,
    max_rounds: int | None = None,
    stop_at_loop: bool = True,
    min_rounds: int = MIN_ROUNDS,
    reexec_argv: list[str] | None = None,
    **factories: Any,
) -> int:
    """The demo (module docstring); the exit code.  ``factories`` go to the daemon."""
    from waggle_trainer.config import ConfigError

    try:
        setup = load_setup(node_config, server_config)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except (DemoError, OSError) as exc:
        print(f"waggle-trainer demo: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    from waggle_trainer.remat.allocator import reexec_under

    reexec_under(setup.cfg.memory.allocator, reexec_argv)  # before torch is imported
    from waggle_trainer.node.daemon import Daemon

    try:
        start_clean(setup)
        alone = prepare_broker(setup)
        if alone is None:
            register_node_key(setup)
    except (DemoError, OSError) as exc:
        print(f"waggle-trainer demo: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    server = None
    cfg = setup.cfg
    if alone is None:
        server = DemoServer(server_config, setup.server_log)
        hooks = LoopHooks(setup, server, stop_at_loop, min_rounds)
        extra: dict[str, Any] = {
            "before_training": hooks.before_training,
            "stop_when": hooks.stop_when,
        }
        default_duration = LOOP_DURATION_S
    else:
        cfg = node_alone(cfg)
        extra = {}
        default_duration = ALONE_DURATION_S
    daemon = Daemon(
        cfg,
        config_path=node_config,
        max_rounds=max_rounds,
        duration_s=duration_s if duration_s is not None else default_duration,
        command="waggle-trainer demo",
        **extra,
        **factories,
    )
    try:
        code = daemon.run()
    finally:
        server_code = server.stop() if server is not None else None
    if code != 0:
        return code
    report(setup, daemon, alone, server, server_code)
    return EXIT_OK


def _one_line(exc: Exception) -> str:
    """A DemoError's text; an OSError as ``path: reason`` (a file the demo makes)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def report(
    s: Setup,
    daemon: Daemon,
    alone: str | None,
    server: DemoServer | None,
    server_code: int | None,
) -> None:
    """The node's summary, what the server made, the one line of a run without a
    broker, the picture."""
    from waggle_trainer.node.cli import summary_lines
    from waggle_trainer.node.curve import adoptions, write_learning_curve

    summary = daemon.summary()
    lines = summary_lines(summary)
    if server is not None:
        lines.append(server_line(s, server_code))
        if not any(closes_the_loop(h) for h in daemon.history):
            lines.append(
                "the loop did not close: "
                + (
                    "no round was accepted, so the node sent no update (the drift guard "
                    "judges a round once the held-out frames give evidence; a longer "
                    "--duration gives it time)"
                    if not summary["updates"]
                    else f"the run ended before a round trained on a version aggregated "
                    f"from the node's {summary['published']} delivered update(s)"
                )
            )
    if alone is not None:
        lines.append(
            f"{alone}, so the node ran alone and delivered nothing "
            f"({summary['outbox_updates']} update(s) left in {Path(s.cfg.state.dir) / 'outbox'});"
            " with a broker there the demo also runs the server and shows the whole loop"
        )
    history = list(daemon.history)
    try:
        write_learning_curve(history, s.curve, daemon.node_id)
    except OSError as exc:
        lines.append(f"learning curve: not written: {s.curve}: {exc.strerror}")
    else:
        marks = [v for _, v in adoptions(history)]
        adopted = (
            f"; adoption of version{'s' if len(marks) > 1 else ''} {', '.join(marks)} marked"
            if marks
            else ""
        )
        first = history[0]["round"] if history else None
        span = f"rounds {first}-{history[-1]['round']}" if history else "no round"
        lines.append(f"learning curve: {s.curve} ({span}{adopted})")
    print("\n".join(lines))


def server_line(s: Setup, server_code: int | None) -> str:
    """What the server stored this run, from its model store."""
    from waggle_trainer.server.store import ModelStore

    root = Path(s.scfg.server.state_dir)
    try:
        versions = ModelStore(root / "models", create=False).versions(s.model)
    except Exception:  # noqa: BLE001 - a store the server never wrote
        versions = []
    made = [v for v in versions if v.manifest.get("contributors")]
    updates = sum(len(v.manifest["contributors"]) for v in made)
    stopped = "stopped" if server_code == 0 else f"ended with exit code {server_code}"
    return (
        f"server: {len(versions)} version(s) of {s.model}, {len(made)} aggregated from "
        f"{updates} update(s); {stopped} (its log: {s.server_log}; its versions: "
        f"waggle-trainer models --config {s.server_config} list)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "server-child":
        sys.exit(_server_child(int(sys.argv[2]), sys.argv[3]))
    sys.exit("usage: python -m waggle_trainer.demo server-child PARENT_PID SERVER_CONFIG")
