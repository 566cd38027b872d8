"""Connection settings, error classification and reconnect backoff for pika.

pika is not thread-safe: every thread that talks to the broker opens its own
``BlockingConnection`` from :func:`connection_parameters` and nobody else
touches it.  Errors fall in two kinds:

* **fatal** - retrying cannot help and a human must act: wrong credentials,
  access refused, a precondition the broker refuses (``user_id`` mismatch,
  message over the broker's size limit, exchange of another type).  The thread
  logs one clear error and stops; it does not loop.
* **retryable** - everything else (connection refused or lost, broker
  restarting, missed heartbeats, resource alarm, TLS handshake failures - a
  node's clock may be wrong right after boot): reconnect after a capped
  exponential backoff with jitter.
"""

from __future__ import annotations

import logging
import random
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import pika
import pika.exceptions as px

from waggle_trainer.common import WAGGLE_ETC

log = logging.getLogger(__name__)

# pika logs every failed or dropped connection at ERROR, with tracebacks, several
# lines per event; the workers below log one clear line per event instead.  An
# explicit level set by the operator for "pika" is left alone.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)



class FatalAmqpError(Exception):
    """Retrying will not help (credentials, permissions, configuration)."""


@dataclass
class AmqpSettings:
    """Where and how to connect.

    With ``tls=True`` the client presents ``cert``/``key`` and, when no
    ``username`` is given, authenticates with SASL EXTERNAL (the broker maps
    the certificate to a user).  ``user_id`` is put in every message's
    ``user_id`` property so the broker itself vouches for the sender; it must
    equal the broker user (default: ``username``, or the certificate's CN).
    """

    host: str = "127.0.0.1"
    port: int | None = None  # 5672, or 5671 with TLS
    vhost: str = "/"
    username: str | None = "guest"
    password: str | None = "guest"
    tls: bool = False
    cacert: str = f"{WAGGLE_ETC}/cacert.pem"
    cert: str = f"{WAGGLE_ETC}/cert.pem"
    key: str = f"{WAGGLE_ETC}/key.pem"
    server_hostname: str | None = None
    user_id: str | None = None
    connection_name: str = "waggle-trainer"
    heartbeat_s: int = 15
    blocked_connection_timeout_s: float = 60.0
    socket_timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        if not 10 <= self.heartbeat_s <= 20:
            raise ValueError("heartbeat_s must be within 10..20 s")
        if not self.tls and not self.username:
            raise ValueError("username is required without TLS")

    @classmethod
    def from_url(cls, url: str, **kw) -> "AmqpSettings":
        """``amqp://user:pass@host:port/vhost`` or ``amqps://...`` (TLS)."""
        u = urlparse(url)
        if u.scheme not in ("amqp", "amqps"):
            raise ValueError(f"not an AMQP URL: {url!r}")
        vhost = unquote(u.path[1:]) if len(u.path) > 1 else "/"
        return cls(host=u.hostname or "127.0.0.1", port=u.port, vhost=vhost,
                   username=unquote(u.username) if u.username else None,
                   password=unquote(u.password) if u.password else None,
                   tls=u.scheme == "amqps", **kw)

    @property
    def effective_port(self) -> int:
        return self.port or (5671 if self.tls else 5672)

    def broker_user(self) -> str | None:
        if self.user_id:
            return self.user_id
        if self.username:
            return self.username
        return _certificate_cn(self.cert)


def _certificate_cn(path: str) -> str | None:
    try:
        info = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except (OSError, ssl.SSLError, AttributeError):
        return None
    for rdn in info.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


def connection_parameters(s: AmqpSettings, purpose: str) -> pika.ConnectionParameters:
    """pika parameters for one connection; ``purpose`` goes in its name."""
    ssl_options = None
    if s.tls:
        ctx = ssl.create_default_context(cafile=s.cacert)
        ctx.load_cert_chain(s.cert, s.key)
        ssl_options = pika.SSLOptions(ctx, s.server_hostname or s.host)
    if s.tls and not s.username:
        credentials: pika.credentials.VALID_TYPES = pika.credentials.ExternalCredentials()
    else:
        credentials = pika.PlainCredentials(s.username or "", s.password or "")
    return pika.ConnectionParameters(
        host=s.host, port=s.effective_port, virtual_host=s.vhost, credentials=credentials,
        ssl_options=ssl_options, heartbeat=s.heartbeat_s,
        blocked_connection_timeout=s.blocked_connection_timeout_s,
        socket_timeout=s.socket_timeout_s, connection_attempts=1,
        client_properties={"connection_name": f"{s.connection_name} {purpose}",
                           "product": "waggle-trainer"},
    )


_FATAL_REPLY_CODES = {403, 406, 530}  # ACCESS_REFUSED, PRECONDITION_FAILED, NOT_ALLOWED


def classify(exc: BaseException) -> FatalAmqpError | None:
    """A FatalAmqpError describing ``exc`` if it is fatal, else None."""
    if isinstance(exc, FatalAmqpError):
        return exc
    if isinstance(exc, (px.ProbableAuthenticationError, px.AuthenticationError)):
        return FatalAmqpError(f"authentication refused by the broker (check username/password "
                              f"or client certificate): {exc!r}")
    if isinstance(exc, px.ProbableAccessDeniedError):
        return FatalAmqpError(f"access to the virtual host refused: {exc!r}")
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return FatalAmqpError(f"cannot read TLS files: {exc}")
    code = None
    if isinstance(exc, (px.ChannelClosedByBroker, px.ConnectionClosedByBroker)):
        code = exc.reply_code
    if code in _FATAL_REPLY_CODES:
        return FatalAmqpError(f"broker refused: {code} {getattr(exc, 'reply_text', '')}")
    return None


class Backoff:
    """Capped exponential backoff with jitter: attempt n waits a random time in
    ``[d/2, d]`` where ``d = min(cap, initial * 2**n)``."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None):
        self.initial, self.max = initial_s, max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        d = min(self.max, self.initial * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        self.attempt = 0


class AmqpWorker:
    """A thread that owns one BlockingConnection and keeps it up.

    Subclasses implement :meth:`_session`, which uses the connection until
    ``self._stop`` is set (returning) or something fails (raising).  Retryable
    failures reconnect after :class:`Backoff`; fatal ones set ``fatal_error``,
    log one ERROR line and end the thread.
    """

    purpose = "worker"

    def __init__(self, amqp: AmqpSettings):
        import threading

        self.amqp = amqp
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = Backoff(amqp.backoff_initial_s, amqp.backoff_max_s)
        self.connect_attempts = 0
        self.connected = False
        self.fatal_error: FatalAmqpError | None = None
        self.last_error: str | None = None
        self._log = logging.getLogger(f"{__name__}.{self.purpose}")

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        import threading

        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name=f"amqp-{self.purpose}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop -------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            conn = None
            try:
                self.connect_attempts += 1
                conn = pika.BlockingConnection(connection_parameters(self.amqp, self.purpose))
                self.connected = True
                self._log.info("connected to %s:%d%s", self.amqp.host, self.amqp.effective_port,
                               "" if self.amqp.vhost == "/" else f" vhost {self.amqp.vhost}")
                self._session(conn)
            except Exception as e:  # noqa: BLE001 - every failure is classified below
                fatal = classify(e)
                self.last_error = repr(e)
                if fatal is not None:
                    self.fatal_error = fatal
                    self._log.error("%s stopped: %s", self.purpose, fatal)
                    self._on_fatal(fatal)
                    break
                delay = self._backoff.next()
                if isinstance(e, (px.AMQPError, OSError)):
                    self._log.warning("broker connection failed or lost (%r); retrying in %.1f s",
                                      e, delay)
                else:
                    self._log.exception("unexpected error; retrying in %.1f s", delay)
                self._stop.wait(delay)
            finally:
                self.connected = False
                if conn is not None and conn.is_open:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass

    def _connected_ok(self) -> None:
        """Call once the session is set up: the next failure starts backoff afresh."""
        self._backoff.reset()

    def _confirmed_channel(self, conn: pika.BlockingConnection, exchange: str, declare: bool):
        """A channel with publisher confirms on the durable topic ``exchange``
        (declared, or only checked with ``declare=False``); marks the session up."""
        ch = conn.channel()
        ch.exchange_declare(exchange, exchange_type="topic", durable=True, passive=not declare)
        ch.confirm_delivery()
        self._connected_ok()
        return ch

    def _session(self, conn: pika.BlockingConnection) -> None:
        raise NotImplementedError

    def _on_fatal(self, err: FatalAmqpError) -> None:
        """Hook for subclasses (e.g. to count the error in telemetry)."""
