"""Connection settings, error classification and reconnect backoff for pika.

pika is not thread-safe: every thread that talks to the broker opens its own
``BlockingConnection`` from :func:`connection_parameters` and nobody else
touches it.  Errors fall in four kinds:

* **fatal** - retrying cannot help and a human must act: wrong credentials,
  access refused, a precondition the broker refuses (``user_id`` mismatch,
  message over the broker's size limit, exchange of another type), TLS files
  that cannot be read, a client certificate the broker refuses (unknown CA,
  expired, revoked), a broker certificate our CA does not vouch for.  The
  thread logs one clear error line and stops; it does not loop.
* **retryable** - network and broker trouble (:func:`is_retryable`: pika's
  AMQP errors and ``OSError``: connection refused or lost, broker restarting,
  missed heartbeats, resource alarm, a broker certificate that looks expired or
  not yet valid - a node's clock may be wrong right after boot): reconnect
  after a capped exponential backoff with jitter.
* **not there yet** - an exchange or queue this side only checks
  (``declare=False``: the operator's definitions create it) is missing
  (:class:`NotThereYet`): one WARNING, quiet retries after the backoff, one
  INFO line when it is there.
* **a bug** - anything else (``TypeError``, ``KeyError``, ...): logged once
  with its traceback, and the thread stops like for a fatal error.  Retrying a
  programming error forever would only hide it.

pika's own loggers are left alone here: :func:`waggle_trainer.common.setup_logging`
quiets them for the command line.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlparse

import pika
import pika.exceptions as px

from waggle_trainer.common import WAGGLE_ETC

log = logging.getLogger(__name__)


class FatalAmqpError(Exception):
    """Retrying will not help (credentials, permissions, configuration)."""


class NotThereYet(Exception):
    """A broker object this side only checks (``declare=False``) is missing: the
    operator's definitions create it, so it is waited for.  :class:`AmqpWorker`
    says so once per episode (WARNING), retries quietly (DEBUG) and says when it
    is there (INFO).  The message names the object: ``the model queue 'q'``."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"{what} does not exist yet")


def missing_object(e: px.ChannelClosedByBroker, what: str, declare: bool) -> Exception:
    """What a failed declare of ``what`` means: :class:`NotThereYet` for a passive
    check that found nothing (404), a :class:`FatalAmqpError` with the setting to
    change for a declare the broker refuses (403), else ``e`` itself."""
    if e.reply_code == 404 and not declare:
        return NotThereYet(what)
    if e.reply_code == 403 and declare:
        return FatalAmqpError(
            f"cannot declare {what}: {e.reply_code} {e.reply_text} (a broker that owns "
            "its exchanges and queues, like Beehive, lets a node only check them and "
            "read its own queue: set declare_exchanges = false)"
        )
    return e


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
    def from_url(cls, url: str, **kw) -> AmqpSettings:
        """``amqp://user:pass@host:port/vhost`` or ``amqps://...`` (TLS)."""
        u = urlparse(url)
        if u.scheme not in ("amqp", "amqps"):
            raise ValueError(f"not an AMQP URL: {url!r}")
        vhost = unquote(u.path[1:]) if len(u.path) > 1 else "/"
        return cls(
            host=u.hostname or "127.0.0.1",
            port=u.port,
            vhost=vhost,
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            tls=u.scheme == "amqps",
            **kw,
        )

    @property
    def effective_port(self) -> int:
        return self.port or (5671 if self.tls else 5672)

    def broker_user(self) -> str | None:
        """The user the broker will see: ``user_id``, ``username``, or the CN of
        the client certificate (SASL EXTERNAL); None if none can be told."""
        if self.user_id:
            return self.user_id
        if self.username:
            return self.username
        info = certificate_info(self.cert)
        return info.common_name if info else None

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context (CA, client certificate and key), built from the files now;
        raises :class:`TlsFileError` (see :func:`tls_context`)."""
        return tls_context(self.cacert, self.cert, self.key)

    def check_tls_files(self) -> None:
        """With TLS, fail now (:class:`FatalAmqpError`) if the files cannot be used."""
        if self.tls:
            self.ssl_context()


class TlsFileError(FatalAmqpError):
    """A TLS file that cannot be used; ``field`` is ``cacert``, ``cert`` or ``key``."""

    def __init__(self, field: str, path: str, detail: str):
        self.field, self.path, self.detail = field, path, detail
        super().__init__(f"TLS {field} {path}: {detail}")


def tls_context(cacert: str, cert: str, key: str) -> ssl.SSLContext:
    """A client TLS context trusting ``cacert`` and presenting ``cert``/``key``.

    Raises :class:`TlsFileError` naming the file when one is missing, unreadable,
    not PEM, or when the key does not belong to the certificate.
    """
    for field, path in (("cacert", cacert), ("cert", cert), ("key", key)):
        if not os.path.isfile(path):
            raise TlsFileError(
                field, path, "not found" if not os.path.exists(path) else "not a file"
            )
        if not os.access(path, os.R_OK):
            raise TlsFileError(field, path, "not readable by this user")
    try:
        ctx = ssl.create_default_context(cafile=cacert)
    except ssl.SSLError as e:
        raise TlsFileError(
            "cacert", cacert, f"not a PEM CA certificate ({e.reason or e})"
        ) from None
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError("key", key, f"does not match the certificate {cert}") from None
        if certificate_info(cert) is None:
            raise TlsFileError("cert", cert, "not a PEM certificate") from None
        raise TlsFileError(
            "key", key, f"cannot be loaded ({e.reason or e}; a PEM private key, not encrypted)"
        ) from None
    return ctx


@dataclass(frozen=True)
class CertificateInfo:
    """What an error message needs to say about a certificate."""

    common_name: str | None
    issuer: str
    not_before: datetime
    not_after: datetime


def certificate_info(path: str) -> CertificateInfo | None:
    """Subject CN, issuer and validity of the first certificate in a PEM (or DER)
    file; None when the file cannot be read or holds no certificate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        cert = (
            x509.load_pem_x509_certificate(data)
            if b"-----BEGIN" in data
            else x509.load_der_x509_certificate(data)
        )
    except ValueError:
        return None

    def cn(name: Any) -> str | None:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else None

    return CertificateInfo(
        common_name=cn(cert.subject),
        issuer=cn(cert.issuer) or cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def connection_parameters(s: AmqpSettings, purpose: str) -> pika.ConnectionParameters:
    """pika parameters for one connection; ``purpose`` goes in its name.
    Raises :class:`FatalAmqpError` when the TLS files cannot be used."""
    ssl_options = None
    if s.tls:
        ssl_options = pika.SSLOptions(s.ssl_context(), s.server_hostname or s.host)
    if s.tls and not s.username:
        credentials: pika.credentials.VALID_TYPES = pika.credentials.ExternalCredentials()
    else:
        credentials = pika.PlainCredentials(s.username or "", s.password or "")
    return pika.ConnectionParameters(
        host=s.host,
        port=s.effective_port,
        virtual_host=s.vhost,
        credentials=credentials,
        ssl_options=ssl_options,
        heartbeat=s.heartbeat_s,
        blocked_connection_timeout=s.blocked_connection_timeout_s,
        socket_timeout=s.socket_timeout_s,
        connection_attempts=1,
        client_properties={
            "connection_name": f"{s.connection_name} {purpose}",
            "product": "waggle-trainer",
        },
    )


# -------------------------------------------------------------- classification

_FATAL_REPLY_CODES = {403, 406, 530}  # ACCESS_REFUSED, PRECONDITION_FAILED, NOT_ALLOWED

# TLS alerts a broker sends when it refuses the client certificate.  pika reports
# them only as text (the stream is lost while it reads the protocol header), so they
# are found by name in the error's text.
_ALERT = re.compile(r"ALERT_([A-Z0-9_]+)")
_CERT_ALERTS = {
    "UNKNOWN_CA",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_REQUIRED",
    "ACCESS_DENIED",
    "HANDSHAKE_FAILURE",
    "DECRYPT_ERROR",
    "INSUFFICIENT_SECURITY",
    "PROTOCOL_VERSION",
}
# OpenSSL verify codes for a broker certificate outside its validity period: the
# node's clock may be wrong (right after boot), so these are retried.
_CLOCK_VERIFY_CODES = {9, 10}  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED


def _chain(exc: BaseException, depth: int = 0) -> list[BaseException]:
    """``exc`` and the exceptions it wraps (pika nests them in args and .exceptions)."""
    out = [exc]
    if depth > 4:
        return out
    inner: list[Any] = [
        exc.__cause__,
        exc.__context__,
        *exc.args,
        *(getattr(exc, "exceptions", None) or ()),
    ]
    for e in inner:
        if isinstance(e, BaseException) and e is not exc:
            out += _chain(e, depth + 1)
    return out


def _text(exc: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}" for e in _chain(exc))


def _client_cert_refused(alert: str, s: AmqpSettings) -> FatalAmqpError:
    info = certificate_info(s.cert)
    what = f"the client certificate {s.cert}"
    if alert == "UNKNOWN_CA":
        issuer = f" (issuer {info.issuer!r})" if info else ""
        return FatalAmqpError(
            f"the broker does not trust the CA that signed {what}{issuer}; "
            "install a certificate issued by the broker's CA"
        )
    if alert == "CERTIFICATE_EXPIRED":
        until = f" (valid until {info.not_after:%Y-%m-%d %H:%M} UTC)" if info else ""
        return FatalAmqpError(
            f"the broker refused {what}: it has expired{until}; install a renewed certificate"
        )
    if alert == "CERTIFICATE_REVOKED":
        return FatalAmqpError(f"the broker refused {what}: it has been revoked")
    return FatalAmqpError(
        f"the broker refused the TLS handshake with {what} (alert {alert.lower()})"
    )


def classify(exc: BaseException, settings: AmqpSettings | None = None) -> FatalAmqpError | None:
    """A one-line :class:`FatalAmqpError` describing ``exc`` if it is fatal, else None
    (retry if :func:`is_retryable`, otherwise it is a bug)."""
    s = settings or AmqpSettings()
    if isinstance(exc, FatalAmqpError):
        return exc
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            if e.verify_code in _CLOCK_VERIFY_CODES:
                return None
            return FatalAmqpError(
                f"the broker's certificate is not trusted with cacert "
                f"{s.cacert}: {e.verify_message or e}"
            )
    if s.tls or "SSL" in _text(exc):
        for alert in _ALERT.findall(_text(exc)):
            if alert in _CERT_ALERTS:
                return _client_cert_refused(alert, s)
    if isinstance(exc, (px.ProbableAuthenticationError, px.AuthenticationError)):
        who = s.broker_user()
        how = (
            f"certificate {s.cert}, user {who!r}"
            if s.tls and not s.username
            else f"user {who!r}: check username/password"
        )
        return FatalAmqpError(f"authentication refused by the broker ({how}): {exc}")
    if isinstance(exc, px.ProbableAccessDeniedError):
        return FatalAmqpError(
            f"access to virtual host {s.vhost!r} refused for user {s.broker_user()!r}: {exc}"
        )
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return FatalAmqpError(f"cannot read TLS files: {exc}")
    code = None
    if isinstance(exc, (px.ChannelClosedByBroker, px.ConnectionClosedByBroker)):
        code = exc.reply_code
    if code in _FATAL_REPLY_CODES:
        text = getattr(exc, "reply_text", "")
        hint = " (the broker user lacks this permission)" if code == 403 else ""
        return FatalAmqpError(f"broker refused: {code} {text}{hint}")
    return None


def tls_refusal(s: AmqpSettings, wait_s: float = 2.0) -> FatalAmqpError | None:
    """Ask the broker again why a TLS connection ended, and return its refusal if any.

    With TLS 1.3 a broker checks the client certificate after the client's side of
    the handshake is done; pika has by then sent the AMQP header, and the broker's
    close can reset the connection before its alert is read (a bare "EOF").  Here
    the handshake is repeated and nothing is sent, so the alert arrives intact.  A
    broker that accepts the certificate says nothing: None after ``wait_s``.
    """
    try:
        ctx = s.ssl_context()
        with socket.create_connection(
            (s.host, s.effective_port), timeout=s.socket_timeout_s
        ) as raw:
            with ctx.wrap_socket(raw, server_hostname=s.server_hostname or s.host) as tls:
                tls.settimeout(wait_s)
                tls.recv(1)
    except FatalAmqpError as e:
        return e
    except ssl.SSLError as e:
        return classify(e, s)
    except OSError:
        return None
    return None


def is_retryable(exc: BaseException) -> bool:
    """Network or broker trouble (pika's AMQP errors, OSError), unless :func:`classify`
    calls it fatal.  Anything else is a programming error."""
    return isinstance(exc, (px.AMQPError, OSError))


def describe(exc: BaseException) -> str:
    """One line for the log about a retryable error."""
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError) and e.verify_code in _CLOCK_VERIFY_CODES:
            return (
                f"the broker's certificate {e.verify_message} by this node's clock "
                f"({datetime.now().astimezone():%Y-%m-%d %H:%M %Z}); is the clock set?"
            )
    if isinstance(exc, (px.ChannelClosedByBroker, px.ConnectionClosedByBroker)):
        what = "channel" if isinstance(exc, px.ChannelClosedByBroker) else "connection"
        return f"broker closed the {what}: {exc.reply_code} {exc.reply_text}"
    text = str(exc) or type(exc).__name__
    return " ".join(f"{type(exc).__name__}: {text}".split())[:300]


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
    failures reconnect after :class:`Backoff`; fatal ones (and bugs) set
    ``fatal_error``, log one ERROR line and end the thread.
    """

    purpose = "worker"

    def __init__(self, amqp: AmqpSettings):
        self.amqp = amqp
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = Backoff(amqp.backoff_initial_s, amqp.backoff_max_s)
        self.connect_attempts = 0
        self.connected = False
        self.fatal_error: FatalAmqpError | None = None
        self.last_error: str | None = None
        self._waiting: NotThereYet | None = None  # the missing object of this episode
        self._waiting_attempts = 0
        self._waiting_since = 0.0
        self._log = logging.getLogger(f"{__name__}.{self.purpose}")

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name=f"amqp-{self.purpose}", daemon=True)
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
                self._log.log(
                    logging.DEBUG if self._waiting else logging.INFO,  # said once already
                    "connected to %s:%d%s",
                    self.amqp.host,
                    self.amqp.effective_port,
                    "" if self.amqp.vhost == "/" else f" vhost {self.amqp.vhost}",
                )
                self._session(conn)
            except Exception as e:  # noqa: BLE001 - classified: retry, fatal, or a bug
                if not self._handle_failure(e, connecting=not self.connected):
                    break
            finally:
                self.connected = False
                if conn is not None and conn.is_open:
                    try:
                        conn.close()
                    except (px.AMQPError, OSError):  # closing a broken connection
                        pass

    def _handle_failure(self, e: Exception, connecting: bool = False) -> bool:
        """Log ``e`` once; True to reconnect after the backoff, False to stop."""
        if isinstance(e, NotThereYet):
            self._note_waiting(e)
            self._stop.wait(self._backoff.next())
            return True
        if isinstance(e, FatalAmqpError) or is_retryable(e):
            fatal = classify(e, self.amqp)
            if fatal is None and connecting and self.amqp.tls:
                fatal = tls_refusal(self.amqp)
            if fatal is None:
                delay = self._backoff.next()
                self.last_error = describe(e)
                self._log.warning(
                    "%s: %s; retrying in %.1f s", self.purpose, self.last_error, delay
                )
                self._stop.wait(delay)
                return True
            self._log.error("%s stopped: %s", self.purpose, fatal)
        else:
            fatal = FatalAmqpError(
                f"internal error in the {self.purpose} thread: {type(e).__name__}: {e}"
            )
            self._log.error(
                "%s stopped by an internal error (a bug; please report it with this traceback)",
                self.purpose,
                exc_info=e,
            )
        self.last_error = str(fatal)
        self.fatal_error = fatal
        self._on_fatal(fatal)
        return False

    def _note_waiting(self, e: NotThereYet) -> None:
        """One WARNING per missing object (an episode), DEBUG for its retries."""
        self.last_error = str(e)
        if self._waiting is None or self._waiting.what != e.what:
            self._waiting, self._waiting_attempts = e, 0
            self._waiting_since = time.monotonic()
            self._log.warning(
                "%s: %s; retrying at most %g s apart", self.purpose, e, self.amqp.backoff_max_s
            )
        else:
            self._log.debug("%s: %s (attempt %d)", self.purpose, e, self._waiting_attempts + 1)
        self._waiting_attempts += 1

    def _connected_ok(self) -> None:
        """Call once the session is set up: the next failure starts backoff afresh,
        and a wait for a missing object (:class:`NotThereYet`) is over."""
        self._backoff.reset()
        if self._waiting is not None:
            self._log.info(
                "%s: %s is there now (waited %.0f s, %d failed check(s))",
                self.purpose,
                self._waiting.what,
                time.monotonic() - self._waiting_since,
                self._waiting_attempts,
            )
            self._waiting = None
            self.last_error = None

    def _confirmed_channel(self, conn: pika.BlockingConnection, exchange: str, declare: bool):
        """A channel with publisher confirms on the durable topic ``exchange``
        (declared, or only checked with ``declare=False``); marks the session up."""
        ch = conn.channel()
        try:
            ch.exchange_declare(exchange, exchange_type="topic", durable=True, passive=not declare)
        except px.ChannelClosedByBroker as e:
            raise missing_object(e, f"exchange {exchange!r}", declare) from e
        ch.confirm_delivery()
        self._connected_ok()
        return ch

    def _session(self, conn: pika.BlockingConnection) -> None:
        raise NotImplementedError

    def _on_fatal(self, err: FatalAmqpError) -> None:
        """Hook for subclasses (e.g. to count the error in telemetry)."""
