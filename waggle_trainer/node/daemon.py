"""The node daemon: frames -> adaptation loop -> updates -> outbox -> broker.

One process, four threads at most: the main thread runs the frame source, the
adaptation loop, encoding and state saves (torch work stays on one thread of
control); an :class:`~waggle_trainer.transport.UpdatePublisher` thread drains the
outbox; a :class:`~waggle_trainer.transport.TelemetryPublisher` sends metrics; a
:class:`~waggle_trainer.transport.model_subscriber.ModelSubscriber` receives the
server's signed global models (``[models]``), which the main thread adopts between
rounds.
The network never blocks training: with the broker down the daemon trains and
queues.

**Order of durable writes after an accepted round** (why nothing is lost or sent
twice under two ids):

1. the update ``weights - base`` is encoded with a deterministic id
   ``<node>-<epoch>-r<round>`` (``epoch``: random, chosen when the state is first
   created) and written to the outbox (atomic);
2. the training state of that round is saved (atomic, :mod:`.state`);
3. only then may the publisher send the update (``releasable``: its round is at
   most the saved round).

A crash between 1 and 2 leaves an update in the outbox whose round is newer than
the saved state: at start the daemon moves its round counter past every round in
the outbox, so the next round gets a new id, and releases the update.  Updates
are cumulative deltas from the base, so the retrained round's update carries the
lost round's work too.  A crash before 1 loses only unsaved training (at most one
round).  When the outbox write fails (a full disk) the state is not saved either:
the disk never says "round done" for a round whose update is not spooled.

Signals: SIGTERM (or SIGINT) ends the loop after the current frame (an
unfinished round is abandoned: state is saved at round boundaries only), saves
what is unsaved, gives the publisher ``[daemon] stop_flush_s`` to deliver, and
exits 0; a second SIGTERM kills the process at once (default action).  SIGHUP
re-reads the config file: the keys that can change live are applied, the others
are logged and kept.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from waggle_trainer.common import format_size
from waggle_trainer.config import Config, ConfigError, load_config
from waggle_trainer.node import brokers
from waggle_trainer.node.sdnotify import Notifier, watchdog_interval_s
from waggle_trainer.node.state import NodeState, StateError, StateStore
from waggle_trainer.remat.allocator import loaded_allocator
from waggle_trainer.transport import (
    CodecSettings,
    ErrorFeedback,
    Outbox,
    OutboxFull,
    Telemetry,
    TelemetryPublisher,
    UpdateEncoder,
    UpdatePublisher,
    load_key,
    metrics,
)
from waggle_trainer.transport.outbox import OutboxEntry
from waggle_trainer.transport.wire import update_id_for
from waggle_trainer.writable import PathProblem, node_state_targets, prepare

if TYPE_CHECKING:
    from waggle_trainer.learn.adaptation import RoundResult
    from waggle_trainer.transport.model_subscriber import ModelSubscriber

log = logging.getLogger("waggle_trainer.daemon")

EXIT_OK = 0
EXIT_CONFIG = 2  # a user's mistake: config, files, devices (one line on stderr)
PROGRESS_FILE = "progress"  # its mtime: the last frame or step (health checks)
PROGRESS_EVERY_S = 30.0
HISTORY = 50  # rounds kept in the state's history for `status`
MODELS_DIR = "models"  # verified versions received from the server, until adopted
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StartupError(Exception):
    """Something the operator must fix before the daemon can start (one line)."""


# ------------------------------------------------------------------- the seam


class FrameSource(Protocol):
    def __iter__(self) -> Iterator[Any]: ...
    def close(self) -> None: ...


class Loop(Protocol):
    """The adaptation loop contract (``waggle_trainer.learn.adaptation``)."""

    student: torch.nn.Module

    def feed(self, frame: Any) -> RoundResult | None: ...
    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]: ...
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...
    def adopt_base(self, weights: dict[str, torch.Tensor], version: str) -> None: ...
    def close(self) -> None: ...


LoopFactory = Callable[[Config, Path], Loop]
SourceFactory = Callable[[Config], FrameSource]
#: ``before_training(daemon)``: after start-up, before the first frame (may raise
#: StartupError); ``stop_when(daemon)``: after every round, an exit reason to stop.
Hook = Callable[["Daemon"], None]
StopCondition = Callable[["Daemon"], str | None]


def default_loop(cfg: Config, state_dir: Path) -> Loop:
    """The real adaptation loop with the configured teacher."""
    from waggle_trainer.learn.adaptation import AdaptationLoop
    from waggle_trainer.learn.student import StudentError
    from waggle_trainer.learn.teachers import TeacherError, load_teacher
    from waggle_trainer.remat.planner import InfeasibleBudget

    try:
        teacher = load_teacher(cfg)
        return AdaptationLoop(cfg, teacher, state_dir=state_dir)
    except (TeacherError, StudentError, InfeasibleBudget) as exc:
        raise StartupError(str(exc)) from None


def default_source(cfg: Config) -> FrameSource:
    """The configured camera (device, URL, video file or image folder)."""
    from waggle_trainer.vision.frames import SourceError, open_source

    try:
        # The frozen config section has read-only attributes; the protocol names plain ones.
        return open_source(cfg.camera)  # type: ignore[arg-type]
    except SourceError as exc:
        raise StartupError(str(exc)) from None


# ------------------------------------------------------------------ helpers


def floating(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy of the floating-point tensors of a state dict."""
    return {
        k: v.detach().to("cpu").clone()
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point()
    }


def file_version(path: Path, meta: dict[str, str] | None) -> str:
    """A model file's version: its metadata ``version``, else a SHA-256 prefix."""
    if meta and meta.get("version"):
        return str(meta["version"])[:64]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256-" + h.hexdigest()[:16]


def hmac_key(cfg: Config, state_dir: Path) -> bytes:
    """The node's signing key.  With transport enabled the configured file must be
    valid; without it, a missing file is replaced by a key kept in the state dir
    (updates then only fill the local outbox)."""
    path = cfg.transport.hmac_key_file
    try:
        return load_key(path)
    except FileNotFoundError:
        if cfg.transport.enabled:
            raise StartupError(
                f"transport.hmac_key_file: {path}: not found (a file of at least "
                "16 random bytes, mode 600, shared with the server)"
            ) from None
    except PermissionError:
        raise StartupError(f"transport.hmac_key_file: {path}: not readable by this user") from None
    except ValueError as exc:
        raise StartupError(f"transport.hmac_key_file: {exc}") from None
    local = state_dir / "node" / "local-hmac.key"
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        log.info("transport disabled and %s missing: signing local updates with %s", path, local)
    return load_key(local)


# Keys the daemon applies on SIGHUP; every other change waits for a restart.
LIVE_KEYS = {
    ("node", "log_level"),
    ("telemetry", "interval_s"),
    ("daemon", "global_model_file"),
    ("daemon", "stop_flush_s"),
}


def config_changes(old: Config, new: Config) -> list[tuple[str, str]]:
    out = []
    for section in type(old).model_fields:
        a, b = getattr(old, section), getattr(new, section)
        for key in type(a).model_fields:
            if getattr(a, key) != getattr(b, key):
                out.append((section, key))
    return out


# ------------------------------------------------------------------ progress


@dataclass
class Counters:
    rounds: int = 0  # this run
    accepted_run: int = 0
    rolled_back_run: int = 0
    not_judged_run: int = 0  # no held-out evidence either way (weights kept, no update)
    accepted: int = 0  # since the state began (saved with it)
    rolled_back: int = 0
    not_judged: int = 0
    updates: int = 0
    update_bytes: int = 0
    disk_full_events: int = 0
    adopted: int = 0
    adopted_run: list[str] = field(default_factory=list)  # versions adopted this run, in order
    stale_dropped: int = 0  # updates dropped: their base is no longer accepted by the server
    first_agreement: float | None = None
    last_agreement: float | None = None
    teacher_calls: int = 0  # the loop's count since it started (this run)
    loop_frames: int = 0  # frames the loop counted (fed and skipped by its stride)
    frames_seen: int = 0  # frames the daemon fed this run


@dataclass
class Progress:
    """One rewritten line on a terminal's stderr; silent when stderr is not a TTY."""

    stream: Any = field(default_factory=lambda: sys.stderr)
    last: float = 0.0

    def __post_init__(self) -> None:
        self._filter: logging.Filter | None = None
        if self.live:  # a log line first clears the progress line, then prints
            self._filter = _ClearBefore(self)
            for h in logging.getLogger().handlers:
                h.addFilter(self._filter)

    @property
    def live(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.live or (not force and now - self.last < 0.5):
            return
        self.last = now
        width = 150
        self.stream.write("\r" + text[:width].ljust(width) + "\r")
        self.stream.flush()

    def clear(self) -> None:
        if self.live and self.last:
            self.stream.write("\r" + " " * 150 + "\r")
            self.stream.flush()

    def close(self) -> None:
        self.clear()
        if self._filter is not None:
            for h in logging.getLogger().handlers:
                h.removeFilter(self._filter)


class _ClearBefore(logging.Filter):
    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


# ------------------------------------------------------------------ the daemon


class Daemon:
    """Composition of the node: build with a config, call :meth:`run`.

    An orchestrator that runs other processes beside the node (``waggle-trainer
    demo``) passes ``before_training``, called once start-up is done and before the
    first frame (it may raise :class:`StartupError`: the daemon then stops as for a
    failed start, exit 2), and ``stop_when``, called after every round: a string
    ends the run with that exit reason.  ``command`` names the command in the one
    line a failed start prints."""

    def __init__(
        self,
        cfg: Config,
        *,
        config_path: Path | None = None,
        loop_factory: LoopFactory = default_loop,
        source_factory: SourceFactory = default_source,
        max_rounds: int | None = None,
        duration_s: float | None = None,
        notifier: Notifier | None = None,
        progress: Progress | None = None,
        before_training: Hook | None = None,
        stop_when: StopCondition | None = None,
        command: str = "waggle-trainer run",
    ):
        self.cfg = cfg
        self.before_training = before_training
        self.stop_when = stop_when
        self.command = command
        self.config_path = config_path
        self.loop_factory = loop_factory
        self.source_factory = source_factory
        self.max_rounds = max_rounds
        self.duration_s = duration_s
        self.notifier = notifier or Notifier()
        self.progress = progress or Progress()
        self.node_id = cfg.node.id or "local"
        self.vsn = cfg.node.vsn or "unknown"
        self.state_dir = Path(cfg.state.dir)
        self.store = StateStore(self.state_dir / "node")
        self.counters = Counters()
        self._stop_requested = False
        self._reload_requested = False
        self._saved_round = 0  # the publisher may send updates of rounds <= this
        self._unsaved = False
        self._pending: list[Any] = []  # encoded updates not yet in the outbox (disk full)
        self._disk_full_logged = False
        self._last_published = 0
        self._last_publish_ns: int | None = None
        self._last_result: RoundResult | None = None
        self._longest_feed_s = 0.0
        self._watchdog_s = watchdog_interval_s()
        self._last_ping = 0.0
        self._last_touch = -PROGRESS_EVERY_S
        self._progress_since_ping = False
        self._model_file_seen: tuple[int, int] | None = None
        self.loop: Loop | None = None
        self.source: FrameSource | None = None
        self.publisher: UpdatePublisher | None = None
        self.telemetry: Telemetry | None = None
        self.telemetry_publisher: TelemetryPublisher | None = None
        self.models: ModelSubscriber | None = None
        self.exit_reason = ""
        #: The malloc this process runs under (``/proc/self/maps``): the one
        #: ``[memory] allocator`` asked for, one preloaded by the environment (a
        #: systemd unit's ``LD_PRELOAD``), or glibc's when the library is missing.
        self.allocator = loaded_allocator()

    # ----------------------------------------------------------------- startup
    def start(self) -> None:
        """Everything up to READY=1; raises StartupError for an operator's mistake."""
        cfg = self.cfg
        try:  # every directory the daemon writes, before anything is loaded or written
            prepare(node_state_targets(self.state_dir))
        except PathProblem as exc:
            raise StartupError(str(exc)) from None
        key = hmac_key(cfg, self.state_dir)
        self.outbox = Outbox(self.state_dir / "outbox", cfg.transport.outbox_max_bytes)
        t = cfg.transport
        self.encoder = UpdateEncoder(
            node_id=self.node_id,
            vsn=self.vsn,
            model=cfg.student.arch,
            key=key,
            settings=CodecSettings(dtype=t.codec, compression=t.compression, topk=t.topk),
            feedback=ErrorFeedback(),
        )
        self.loop = self.loop_factory(cfg, self.state_dir)
        self._restore()
        self._maybe_adopt()  # a newer global model waiting since the last run
        if cfg.models.enabled:
            self.models = self._model_subscriber()
            self._adopt_saved_version()  # received and acknowledged, not yet adopted
            self.models.start()
        self.source = self.source_factory(cfg)
        if t.enabled:
            self.publisher = brokers.update_publisher(
                cfg, self.outbox, self.node_id, releasable=self._releasable
            )
            self.publisher.start()
        if cfg.telemetry.enabled:
            self.telemetry = Telemetry(
                self.node_id, self.vsn, max_buffered=cfg.telemetry.buffer_messages
            )
            self._register_gauges(self.telemetry)
            self.telemetry_publisher = brokers.telemetry_publisher(cfg, self.telemetry)
            self.telemetry_publisher.start()

    def _restore(self) -> None:
        assert self.loop is not None
        try:
            state = self.store.load()
        except StateError as exc:
            moved = self.store.set_aside()
            log.error("%s; moved to %s, starting from the configured student", exc, moved)
            state = None
        outbox_rounds = [e.round for e in self.outbox.pending()]
        if state is None:
            self.epoch = secrets.token_hex(4)
            self.round = max(outbox_rounds, default=0)
            self.base = floating(self.loop.student.state_dict())
            self.base_version = self._initial_base_version()
            self.history: list[dict[str, Any]] = []
            self._unsaved = True
            self._save_state()
            log.info(
                "new state in %s: epoch %s, base %s", self.store.dir, self.epoch, self.base_version
            )
        else:
            m = state.meta
            self.loop.load_state(state.section("loop"), m.get("loop", {}))
            self.epoch = str(m["epoch"])
            self.round = int(m["round"])
            self.base = state.section("base")
            self.base_version = str(m["base_version"])
            self.history = list(m.get("history", []))
            c = m.get("counters", {})
            for name in (
                "accepted",
                "rolled_back",
                "not_judged",
                "updates",
                "update_bytes",
                "adopted",
                "stale_dropped",
            ):
                setattr(self.counters, name, int(c.get(name, 0)))
            self._last_publish_ns = m.get("last_publish_ns")
            if self.encoder.feedback is not None:
                self.encoder.feedback.load_state_dict(state.section("ef"), m.get("ef_pending_base"))
            later = max(outbox_rounds, default=0)
            if later > self.round:
                log.warning(
                    "outbox holds round %d, state is at round %d (stopped between "
                    "spooling and saving): continuing at round %d",
                    later,
                    self.round,
                    later + 1,
                )
                self.round = later
                self._unsaved = True
                self._save_state()
            log.info(
                "resumed at round %d (base %s) from %s",
                self.round,
                self.base_version,
                self.store.path,
            )
        self._saved_round = self.round
        model_file = self.cfg.daemon.global_model_file
        if model_file is not None and state is not None:
            self._model_file_seen = tuple(state.meta.get("model_file_seen") or ()) or None

    def _initial_base_version(self) -> str:
        path = self.cfg.student.weights
        if path is not None and Path(path).is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata()
            except Exception:  # noqa: BLE001 - the loop has loaded it already; only naming here
                meta = None
            return file_version(Path(path), meta)
        return f"local-{self.epoch}"

    # ---------------------------------------------------------------- running
    def run(self) -> int:
        """Start, train until stopped or bounded, shut down cleanly; the exit code."""
        self._install_signals()
        try:
            self.start()
            if self.before_training is not None:
                self.before_training(self)
        except StartupError as exc:
            print(f"{self.command}: {exc}", file=sys.stderr)
            self.notifier.notify(STATUS=f"failed: {exc}")
            self._shutdown(flush=False)
            return EXIT_CONFIG
        self._t0 = time.monotonic()
        self.notifier.ready(self.status_line())
        log.info(
            "ready: node %s, state %s, transport %s, telemetry %s, allocator %s%s",
            self.node_id,
            self.state_dir,
            "on" if self.publisher is not None else "off",
            "on" if self.telemetry is not None else "off",  # (empty Telemetry is falsy)
            self.allocator,
            ", optimiser step fused" if self.cfg.memory.fused_step else "",
        )
        try:
            self._main_loop()
        finally:
            self.progress.close()
            self._shutdown(flush=True)
        return EXIT_OK

    def _main_loop(self) -> None:
        assert self.loop is not None and self.source is not None
        frames = iter(self.source)
        rounds_this_run = 0
        while not self._stop_requested:
            if self.duration_s is not None and time.monotonic() - self._t0 >= self.duration_s:
                self.exit_reason = f"--duration {self.duration_s:g} s reached"
                break
            try:
                frame = next(frames)
            except StopIteration:
                self.exit_reason = "the frame source ended"
                break
            t0 = time.monotonic()
            result = self.loop.feed(frame)
            self._longest_feed_s = max(self._longest_feed_s, time.monotonic() - t0)
            self.counters.frames_seen += 1
            self._progress_since_ping = True
            if result is not None:
                self._on_round(result)
                rounds_this_run += 1
                self._between_rounds()
                reason = self.stop_when(self) if self.stop_when is not None else None
                if reason:
                    self.exit_reason = reason
                    break
            self._watchdog()
            self._touch_progress()
            self._note_publishes()
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            self.progress.show(self.status_line())
            if self.max_rounds is not None and rounds_this_run >= self.max_rounds:
                self.exit_reason = f"--max-rounds {self.max_rounds} reached"
                break
        if self._stop_requested:
            self.exit_reason = "stop requested (signal)"

    # ------------------------------------------------------------ one round
    def _on_round(self, r: RoundResult) -> None:
        assert self.loop is not None
        self.round += 1
        self._last_result = r
        c = self.counters
        c.rounds += 1
        c.teacher_calls = int(r.teacher_calls)  # the loop's totals since it started
        c.loop_frames = int(r.frames_seen)
        if r.agreement is not None:  # measured on the held-out slice
            if c.first_agreement is None and r.agreement_before is not None:
                c.first_agreement = float(r.agreement_before)
            c.last_agreement = float(r.agreement)
        entry = {
            "round": self.round,
            "accepted": bool(r.accepted),
            "judged": bool(r.judged),
            "why_not_judged": str(r.why_not_judged),
            "holdout_labels": int(r.holdout_labels),
            "holdout_labels_needed": int(r.holdout_labels_needed),
            "agreement_before": _maybe_float(r.agreement_before),
            "agreement_after": _maybe_float(r.agreement_after),
            "loss": float(r.loss),
            "samples": int(r.samples),
            "base_version": self.base_version,  # the base this round trained on
            "teacher_calls": int(r.teacher_calls),
            "frames_seen": int(r.frames_seen),
            "frames_skipped": int(r.frames_skipped),
            "step_time_s": float(r.step_time_s),
            "strategy": str(r.strategy),
            "budget_bytes": int(r.budget_bytes),
            "predicted_peak_bytes": int(r.predicted_peak_bytes),
            "measured_peak_bytes": int(r.measured_peak_bytes),
            "ts_ns": time.time_ns(),
        }
        self.history = (self.history + [_finite(entry)])[-HISTORY:]
        if r.accepted:
            c.accepted += 1
            c.accepted_run += 1
            update = self.encoder.encode(
                self.loop.student.state_dict(),
                self.base,
                base_version=self.base_version,
                round=self.round,
                samples=int(r.samples),
                metrics=_finite(dict(r.metrics())),
                update_id=update_id_for(self.node_id, self.epoch, self.round),
            )
            c.updates += 1
            c.update_bytes = len(update.blob)
            self._pending.append(update)
        elif r.rolled_back:
            c.rolled_back += 1
            c.rolled_back_run += 1
        else:
            c.not_judged += 1
            c.not_judged_run += 1
        self._unsaved = True
        spooled = self._spool()
        saved = spooled and self._save_state()
        what = r.verdict
        if r.accepted:
            what += f", update {format_size(c.update_bytes)}" + (
                " spooled" if spooled else " waiting (disk full)"
            )
        elif not r.judged:
            what += ", no update"
        log.info(
            "round %d %s; loss %.4f, %d samples, teacher %.2f "
            "calls/frame, step %.2f s, %s plan, peak %s of %s%s",
            self.round,
            what,
            r.loss,
            r.samples,
            r.teacher_calls / max(1, r.frames_seen),
            r.step_time_s,
            r.strategy,
            format_size(max(1, int(r.measured_peak_bytes))),
            format_size(max(1, int(r.budget_bytes))),
            "" if saved else "; state not saved",
        )
        self.notifier.status(self.status_line())

    def _spool(self) -> bool:
        """Move encoded updates into the outbox; False if some could not be written."""
        while self._pending:
            update = self._pending[0]
            try:
                self.outbox.put(update.blob)
            except OutboxFull:
                log.error(
                    "update %s (%s) is larger than transport.outbox_max_bytes (%s): not kept",
                    update.update_id,
                    format_size(len(update.blob)),
                    format_size(self.outbox.max_bytes),
                )
            except OSError as exc:
                self._disk_trouble("outbox", exc)
                # A newer update of the same base supersedes older ones (cumulative).
                newest = {}
                for u in self._pending:
                    newest[u.envelope.base_version] = u
                self._pending = list(newest.values())
                return False
            self._pending.pop(0)
        return True

    def _save_state(self) -> bool:
        if not self._unsaved:
            return True
        assert self.loop is not None
        tensors, loop_meta = self.loop.export_state()
        state = NodeState(
            meta={
                "node_id": self.node_id,
                "epoch": self.epoch,
                "round": self.round,
                "base_version": self.base_version,
                "loop": loop_meta,
                "history": self.history,
                "counters": {
                    "accepted": self.counters.accepted,
                    "rolled_back": self.counters.rolled_back,
                    "not_judged": self.counters.not_judged,
                    "updates": self.counters.updates,
                    "update_bytes": self.counters.update_bytes,
                    "adopted": self.counters.adopted,
                    "stale_dropped": self.counters.stale_dropped,
                },
                "last_publish_ns": self._last_publish_ns,
                "allocator": self.allocator,
                "model_file_seen": list(self._model_file_seen) if self._model_file_seen else None,
            }
        )
        state.put_section("loop", tensors)
        state.put_section("base", self.base)
        if self.encoder.feedback is not None:
            ef, pending_base = self.encoder.feedback.state_dict()
            state.put_section("ef", ef)
            state.meta["ef_pending_base"] = pending_base
        try:
            self.store.save(state)
        except OSError as exc:
            self._disk_trouble("state", exc)
            return False
        self._unsaved = False
        self._saved_round = self.round
        if self._disk_full_logged:
            log.info("disk writable again: state saved at round %d", self.round)
            self._disk_full_logged = False
        return True

    def _disk_trouble(self, what: str, exc: OSError) -> None:
        self.counters.disk_full_events += 1
        if exc.errno not in _DISK_FULL:
            log.error(
                "writing the %s failed: %s; keeping the last saved state, retrying after "
                "the next round",
                what,
                exc,
            )
            return
        if not self._disk_full_logged:  # once per episode: no flood of the journal
            self._disk_full_logged = True
            log.error(
                "disk full writing the %s in %s: keeping the last saved state (round %d), "
                "training on, retrying after every round",
                what,
                self.state_dir,
                self._saved_round,
            )

    def _releasable(self, entry: OutboxEntry) -> bool:
        """Publisher thread: an update may leave once the state of its round is saved."""
        return entry.round <= self._saved_round

    # ------------------------------------------------------- between rounds
    def _between_rounds(self) -> None:
        if self._pending or self._unsaved:  # retry after a full disk
            if self._spool():
                self._save_state()
        self._maybe_adopt()

    @property
    def stop_requested(self) -> bool:
        """A stop signal (SIGTERM, SIGINT) arrived: hooks waiting on something end."""
        return self._stop_requested

    def adopt_received(self) -> bool:
        """Adopt a global model that is waiting (received from the server, or a changed
        ``global_model_file``) now rather than after the next round; whether the base
        changed.  For ``before_training`` hooks."""
        before = self.base_version
        self._maybe_adopt()
        return self.base_version != before

    def _maybe_adopt(self) -> None:
        if self.models is not None:
            mv = self.models.take()
            if mv is not None and self._adopt(
                mv.state, mv.version, "the server's broadcast", mv.envelope.accepts
            ):
                self._remove_saved_versions()
            return
        path = self.cfg.daemon.global_model_file
        if path is None or self.loop is None:
            return
        try:
            st = path.stat()
        except OSError:
            return
        seen = (st.st_mtime_ns, st.st_size)
        if seen == self._model_file_seen:
            return
        self._model_file_seen = seen
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            weights = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            log.error(
                "daemon.global_model_file: %s: not a safetensors model (%s); keeping base %s",
                path,
                exc,
                self.base_version,
            )
            return
        problem = _mismatch(weights, self.loop.student.state_dict())
        if problem:
            log.error(
                "daemon.global_model_file: %s: does not fit the student (%s); keeping base %s",
                path,
                problem,
                self.base_version,
            )
            return
        version = file_version(path, meta)
        if version == self.base_version:
            return
        self._adopt(weights, version, str(path), None)

    def _adopt(
        self,
        weights: dict[str, torch.Tensor],
        version: str,
        source: str,
        accepts: list[str] | None,
    ) -> bool:
        """Make ``weights`` the base (between rounds).  ``accepts``: the bases the
        server still takes updates against; waiting updates on other bases are
        dropped (None: a model file, nothing is known, all are kept)."""
        assert self.loop is not None
        try:
            self.loop.adopt_base(weights, version)
        except Exception as exc:  # noqa: BLE001 - the loop's refusal, e.g. StudentError
            log.error(
                "global model %s from %s not adopted (%s); keeping base %s",
                version,
                source,
                exc,
                self.base_version,
            )
            return False
        if accepts is not None:
            self._drop_unaccepted(accepts)  # before the save: a crash re-adopts, drops again
        self.base = floating(weights)
        old, self.base_version = self.base_version, version
        self.counters.adopted += 1
        self.counters.adopted_run.append(version)
        self._unsaved = True
        self._save_state()
        log.info("adopted global model %s (was %s) from %s", version, old, source)
        return True

    def _drop_unaccepted(self, accepts: list[str]) -> None:
        """The outbox rule after a new base: an update waiting on a base the server
        still accepts stays; the others go (the server would refuse them as stale)."""
        from waggle_trainer.transport.model_subscriber import drop_unaccepted

        dropped = drop_unaccepted(self.outbox, self.cfg.student.arch, accepts)
        waiting = [u for u in self._pending if u.envelope.base_version in accepts]
        dropped_waiting = len(self._pending) - len(waiting)
        self._pending = waiting
        n = len(dropped) + dropped_waiting
        self.counters.stale_dropped += n
        kept = len(self.outbox) + len(self._pending)
        log.info(
            "outbox after the new base: %d update(s) dropped (bases no longer accepted), "
            "%d kept (accepted bases %s)",
            n,
            kept,
            ", ".join(accepts) or "none",
        )

    # ------------------------------------------------------ server broadcast
    def _model_subscriber(self) -> ModelSubscriber:
        from waggle_trainer.transport import reference_spec
        from waggle_trainer.transport.model_subscriber import ModelSubscriber
        from waggle_trainer.transport.model_wire import load_verify_key
        from waggle_trainer.transport.wire import node_model_queue

        assert self.loop is not None
        m = self.cfg.models
        try:
            key = load_verify_key(m.server_public_key)
        except (OSError, ValueError) as exc:
            raise StartupError(f"models.server_public_key: {exc}") from None
        return ModelSubscriber(
            brokers.update_connection(self.cfg),
            node_id=self.node_id,
            model=self.cfg.student.arch,
            verify_key=key,
            expected=reference_spec(self.loop.student.state_dict()),
            current_version=self.base_version,
            save_dir=self.state_dir / MODELS_DIR,
            exchange=m.exchange,
            queue=m.queue or node_model_queue(self.node_id),
            max_bytes=m.max_bytes,
            declare=self.cfg.transport.declare_exchanges,
        )

    def _adopt_saved_version(self) -> None:
        """A version the subscriber saved and acknowledged before the last stop but the
        daemon never adopted: verify it again and adopt it; remove the older files."""
        from waggle_trainer.transport import UpdateRejected
        from waggle_trainer.transport.model_subscriber import newer_version
        from waggle_trainer.transport.model_wire import decode_model

        assert self.models is not None
        d = self.state_dir / MODELS_DIR
        prefix = f"{self.cfg.student.arch}-"
        files = sorted(d.glob(f"{prefix}*.wgm")) if d.is_dir() else []
        newest = None
        for f in files:
            version = f.name[len(prefix) : -len(".wgm")]
            if newer_version(version, self.base_version) and (
                newest is None or newer_version(version, newest[0])
            ):
                newest = (version, f)
        if newest is not None:
            version, f = newest
            try:
                mv = decode_model(
                    f.read_bytes(),
                    self.models.verify_key,
                    expected=self.models.expected,
                    max_bytes=self.models.max_bytes,
                )
            except (OSError, UpdateRejected) as exc:
                log.error("saved global model %s: %s; not adopted", f, exc)
            else:
                if self._adopt(mv.state, mv.version, str(f), mv.envelope.accepts):
                    self.models.current_version = mv.version
        self._remove_saved_versions()

    def _remove_saved_versions(self) -> None:
        """Saved versions up to the current base are no longer needed."""
        from waggle_trainer.transport.model_subscriber import newer_version

        d = self.state_dir / MODELS_DIR
        prefix = f"{self.cfg.student.arch}-"
        for f in d.glob(f"{prefix}*.wgm") if d.is_dir() else []:
            if not newer_version(f.name[len(prefix) : -len(".wgm")], self.base_version):
                try:
                    f.unlink()
                except OSError:
                    pass

    # -------------------------------------------------------------- watchdog
    def _watchdog(self) -> None:
        if self._watchdog_s is None or not self._progress_since_ping:
            return
        # A frame's work (teacher call + step) longer than a third of the watchdog: ask
        # for more room (systemd >= 236).  Waiting for the camera never counts here, so
        # a hung camera still runs into the watchdog.
        wanted = 3.0 * self._longest_feed_s
        if wanted > self._watchdog_s:
            self._watchdog_s = wanted
            self.notifier.extend_watchdog(wanted)
            log.info(
                "watchdog extended to %.0f s (longest frame+step %.1f s)",
                wanted,
                self._longest_feed_s,
            )
        now = time.monotonic()
        if now - self._last_ping >= self._watchdog_s / 4:
            self.notifier.watchdog()
            self._last_ping = now
            self._progress_since_ping = False

    def _touch_progress(self, every_s: float = PROGRESS_EVERY_S) -> None:
        """Mark progress in the state dir (mtime of ``node/progress``) for container
        health checks: ``waggle-trainer status --progress-within S``."""
        now = time.monotonic()
        if now - self._last_touch < every_s:
            return
        self._last_touch = now
        path = self.store.dir / PROGRESS_FILE
        try:
            path.touch(mode=0o600)
            os.utime(path)
        except OSError:
            pass  # a full disk: the state writes report it

    def _publish_age_s(self) -> float | None:
        self._note_publishes()
        if self._last_publish_ns is None:
            return None
        return round((time.time_ns() - self._last_publish_ns) / 1e9, 1)

    def _note_publishes(self) -> None:
        if self.publisher is None:
            return
        n = self.publisher.published_updates
        if n != self._last_published:
            self._last_published = n
            self._last_publish_ns = time.time_ns()

    # ---------------------------------------------------------------- status
    def status_line(self) -> str:
        c = self.counters
        parts = [f"round {self.round}" if hasattr(self, "round") else "starting"]
        if c.rounds:
            parts.append(f"{c.accepted} accepted/{c.rolled_back} rolled back")
            if c.not_judged:
                parts[-1] += f"/{c.not_judged} not judged"
        r = self._last_result
        if r is not None and r.agreement is None:  # too few held-out labels to measure
            parts.append(f"held-out {r.holdout_labels}/{r.holdout_labels_needed} labels")
        elif c.last_agreement is not None:
            parts.append(f"agreement {c.last_agreement:.3f}")
        if r is not None:
            peak = format_size(max(1, int(r.measured_peak_bytes)))
            parts.append(
                f"{r.strategy} plan, peak {peak} of budget "
                f"{format_size(max(1, int(r.budget_bytes)))}"
            )
            parts.append(f"teacher {r.teacher_calls / max(1, r.frames_seen):.2f}/frame")
        if hasattr(self, "outbox"):
            parts.append(f"outbox {len(self.outbox)} ({format_size(self.outbox.bytes)})")
        if self.publisher is not None:
            parts.append("broker " + ("up" if self.publisher.connected else "down"))
        if self._disk_full_logged:
            parts.append("DISK FULL")
        return ", ".join(parts)

    def _register_gauges(self, t: Telemetry) -> None:
        """Every gauge of :mod:`waggle_trainer.transport.metrics`, under its name."""
        M = metrics

        def last(attr: str):
            return lambda: None if self._last_result is None else getattr(self._last_result, attr)

        def finite_loss():
            r = self._last_result
            return None if r is None or not math.isfinite(r.loss) else float(r.loss)

        t.gauge(M.ROUND.name, lambda: self.round)
        t.gauge(M.AGREEMENT.name, lambda: self.counters.last_agreement)
        t.gauge(M.LOSS.name, finite_loss)
        t.gauge(M.ROUNDS_ACCEPTED.name, lambda: self.counters.accepted)
        t.gauge(M.ROLLBACKS.name, lambda: self.counters.rolled_back)
        t.gauge(M.ROUNDS_NOT_JUDGED.name, lambda: self.counters.not_judged)
        t.gauge(M.HOLDOUT_LABELS.name, last("holdout_labels"))
        t.gauge(
            M.TEACHER_CALLS_PER_FRAME.name,
            lambda: (
                None
                if self._last_result is None
                else self._last_result.teacher_calls / max(1, self._last_result.frames_seen)
            ),
        )
        t.gauge(M.FRAMES_SEEN.name, last("frames_seen"))
        t.gauge(M.FRAMES_SKIPPED.name, last("frames_skipped"))
        t.gauge(M.SAMPLES.name, last("samples"))
        t.gauge(M.MEMORY_BUDGET.name, last("budget_bytes"))
        t.gauge(M.MEMORY_ALLOCATOR.name, lambda: self.allocator)
        t.gauge(M.PLAN_STRATEGY.name, last("strategy"))
        t.gauge(M.PLAN_PREDICTED_PEAK.name, last("predicted_peak_bytes"))
        t.gauge(M.PLAN_MEASURED_PEAK.name, last("measured_peak_bytes"))
        t.gauge(M.STEP_TIME.name, last("step_time_s"))
        t.gauge(M.OUTBOX_UPDATES.name, lambda: len(self.outbox))
        t.gauge(M.OUTBOX_BYTES.name, lambda: self.outbox.bytes)
        t.gauge(
            M.OUTBOX_DROPPED.name,
            lambda: sum(
                v for k, v in self.outbox.stats().items() if k.startswith(("dropped", "refused"))
            ),
        )
        t.gauge(M.PUBLISH_AGE.name, self._publish_age_s)
        t.gauge(
            M.PUBLISH_UNROUTABLE.name,
            lambda: None if self.publisher is None else self.publisher.unroutable,
        )
        t.gauge(M.UPDATE_BYTES.name, lambda: self.counters.update_bytes or None)
        t.gauge(M.DISK_FULL_EVENTS.name, lambda: self.counters.disk_full_events)
        t.gauge(M.BASE_ADOPTIONS.name, lambda: self.counters.adopted)
        t.gauge(M.OUTBOX_DROPPED_STALE.name, lambda: self.counters.stale_dropped)
        if self.models is not None:
            models = self.models
            t.gauge(M.MODELS_RECEIVED.name, lambda: models.received)
            t.gauge(M.MODELS_REFUSED.name, lambda: sum(models.rejected.values()))

    # --------------------------------------------------------------- signals
    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum, frame) -> None:
        self._stop_requested = True
        # The second one kills at once (state on disk is consistent: writes are atomic).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def _on_hup(self, signum, frame) -> None:
        self._reload_requested = True

    def _reload(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP: no config file to re-read (running on embedded defaults)")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running config: %s", "; ".join(exc.lines()))
            return
        changes = config_changes(self.cfg, new)
        if not changes:
            log.info("SIGHUP: %s unchanged", self.config_path)
            return
        live = [c for c in changes if c in LIVE_KEYS]
        kept = [c for c in changes if c not in LIVE_KEYS]
        applied = self.cfg
        for section, key in live:
            value = getattr(getattr(new, section), key)
            sec = getattr(applied, section).model_copy(update={key: value})
            applied = applied.model_copy(update={section: sec})
        self.cfg = applied
        if ("node", "log_level") in live:
            logging.getLogger().setLevel(self.cfg.node.log_level.upper())
        if ("telemetry", "interval_s") in live and self.telemetry_publisher is not None:
            self.telemetry_publisher.interval_s = self.cfg.telemetry.interval_s
        if ("daemon", "global_model_file") in live:
            self._model_file_seen = None
        if live:
            log.info("SIGHUP: applied %s", ", ".join(f"{s}.{k}" for s, k in live))
        if kept:
            log.warning(
                "SIGHUP: %s cannot change while running; kept (restart to apply)",
                ", ".join(f"{s}.{k}" for s, k in kept),
            )

    # -------------------------------------------------------------- shutdown
    def _shutdown(self, flush: bool) -> None:
        self.notifier.stopping(f"stopping at round {getattr(self, 'round', 0)}")
        if self.source is not None:
            self.source.close()
        if flush and self.loop is not None and hasattr(self, "round"):
            if self._spool():
                self._save_state()
        if self.publisher is not None:
            budget = self.cfg.daemon.stop_flush_s if flush else 0.0
            if budget > 0 and len(self.outbox) and self.publisher.fatal_error is None:
                delivered = self.publisher.wait_idle(budget)
                if not delivered:
                    log.info(
                        "stop: %d update(s) stay in the outbox for the next start", len(self.outbox)
                    )
            self.publisher.stop(timeout=5.0)
        if self.telemetry_publisher is not None:
            if self.telemetry is not None and flush:
                self.telemetry.sample_gauges()  # the final values, sent if the broker is up
                end = time.monotonic() + min(2.0, self.cfg.daemon.stop_flush_s)
                while (
                    len(self.telemetry)
                    and self.telemetry_publisher.connected
                    and time.monotonic() < end
                ):
                    time.sleep(0.05)
            self.telemetry_publisher.stop(timeout=5.0)
        if self.models is not None:
            self.models.stop(timeout=5.0)
        if self.loop is not None:
            self.loop.close()
        self.notifier.close()

    # --------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        c = self.counters
        r = self._last_result
        out: dict[str, Any] = {
            "node": self.node_id,
            "round": getattr(self, "round", 0),
            "rounds_this_run": c.rounds,
            "accepted": c.accepted_run,
            "rolled_back": c.rolled_back_run,
            "not_judged": c.not_judged_run,
            "accepted_total": c.accepted,
            "rolled_back_total": c.rolled_back,
            "not_judged_total": c.not_judged,
            "agreement_first": c.first_agreement,
            "agreement_last": c.last_agreement,
            "frames_seen": c.frames_seen,
            "teacher_calls": c.teacher_calls,
            "teacher_calls_per_frame": c.teacher_calls / max(1, c.loop_frames),
            "updates": c.updates,
            "last_update_bytes": c.update_bytes,
            "outbox_updates": len(self.outbox) if hasattr(self, "outbox") else 0,
            "outbox_bytes": self.outbox.bytes if hasattr(self, "outbox") else 0,
            "published": self.publisher.published_updates if self.publisher else 0,
            "base_version": getattr(self, "base_version", None),
            "adopted_versions": list(c.adopted_run),
            "disk_full_events": c.disk_full_events,
            "exit_reason": self.exit_reason,
            "allocator": self.allocator,
            "wall_s": round(time.monotonic() - self._t0, 1) if hasattr(self, "_t0") else 0.0,
        }
        if r is not None:
            out.update(
                strategy=r.strategy,
                budget_bytes=int(r.budget_bytes),
                predicted_peak_bytes=int(r.predicted_peak_bytes),
                measured_peak_bytes=int(r.measured_peak_bytes),
                step_time_s=float(r.step_time_s),
            )
        return out


def _maybe_float(v: float | None) -> float | None:
    return None if v is None else float(v)


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: non-finite floats become None (and are left out of metrics)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return out


def _mismatch(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str:
    ref = {k: v for k, v in reference.items() if v.is_floating_point()}
    missing = sorted(set(ref) - set(weights))
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}"
    for k, v in ref.items():
        w = weights[k]
        if tuple(w.shape) != tuple(v.shape):
            return f"{k}: shape {tuple(w.shape)}, the student has {tuple(v.shape)}"
        if not w.is_floating_point():
            return f"{k}: dtype {w.dtype} is not floating point"
        if not bool(torch.isfinite(w).all()):
            return f"{k}: non-finite values"
    return ""
