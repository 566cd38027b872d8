"""amqp.py without a broker: error classification, certificate reading, logging, the
worker loop's retry-or-stop decision (pika's connection replaced by a stand-in)."""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
import time

import pika.exceptions as px
import pytest
from tlsbroker import issue, make_ca

from waggle_trainer.common import setup_logging
from waggle_trainer.transport import amqp
from waggle_trainer.transport.amqp import AmqpSettings, AmqpWorker, FatalAmqpError, classify

# ------------------------------------------------------------------- logging


def test_importing_the_transport_leaves_pika_logging_alone():
    code = (
        "import logging, waggle_trainer.transport, waggle_trainer.transport.amqp; "
        "print(logging.getLogger('pika').level)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(logging.NOTSET)


def test_logging_setup_quiets_pika_except_at_debug():
    root, pika_log = logging.getLogger(), logging.getLogger("pika")
    saved = (list(root.handlers), root.level, pika_log.level)
    try:
        setup_logging("info")
        assert pika_log.level == logging.CRITICAL  # our workers log one line per event
        setup_logging("debug")
        assert pika_log.level == logging.NOTSET  # everything, pika's own lines too
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        pika_log.setLevel(saved[2])


# -------------------------------------------------------------- certificates


def test_broker_user_is_the_certificate_cn_read_without_private_ssl_api(tmp_path, monkeypatch):
    ca = make_ca(tmp_path, "ca")
    cert, key = issue(ca, tmp_path, "node-000048b02d15bc7c")
    # the private CPython helper must not be needed
    monkeypatch.delattr(ssl._ssl, "_test_decode_cert", raising=False)
    s = AmqpSettings(
        tls=True, username=None, password=None, cacert=str(ca.path), cert=str(cert), key=str(key)
    )
    assert s.broker_user() == "node-000048b02d15bc7c"
    info = amqp.certificate_info(str(cert))
    assert info.common_name == "node-000048b02d15bc7c" and info.issuer == "ca"
    assert info.not_after.year >= 2026


def test_unreadable_certificate_has_no_user(tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert (
        AmqpSettings(tls=True, username=None, cert=str(tmp_path / "junk.pem")).broker_user() is None
    )
    assert (
        AmqpSettings(tls=True, username=None, cert=str(tmp_path / "none.pem")).broker_user() is None
    )


def test_tls_files_are_checked_before_any_connection(tmp_path):
    ca = make_ca(tmp_path, "ca")
    cert, key = issue(ca, tmp_path, "node-1")
    other_cert, _ = issue(ca, tmp_path, "node-2")
    ok = dict(
        tls=True, username=None, password=None, cacert=str(ca.path), cert=str(cert), key=str(key)
    )
    AmqpSettings(**ok).check_tls_files()  # fine
    with pytest.raises(FatalAmqpError, match=r"key .*missing\.pem.*not found"):
        AmqpSettings(**{**ok, "key": str(tmp_path / "missing.pem")}).check_tls_files()
    with pytest.raises(FatalAmqpError, match=r"does not match"):
        AmqpSettings(**{**ok, "cert": str(other_cert)}).check_tls_files()
    (tmp_path / "bad-ca.pem").write_text("garbage")
    with pytest.raises(FatalAmqpError, match=r"cacert .*bad-ca\.pem"):
        AmqpSettings(**{**ok, "cacert": str(tmp_path / "bad-ca.pem")}).check_tls_files()


# ------------------------------------------------------------ classification


def _stream_lost_with(alert: str) -> px.IncompatibleProtocolError:
    # what pika raises when the broker ends the TLS handshake with an alert (seen with
    # RabbitMQ 3.10 and TLS 1.3: the alert arrives as the protocol header is read)
    return px.IncompatibleProtocolError(
        f"StreamLostError: (\"Stream connection lost: SSLError(1, '[SSL: {alert}] "
        f"sslv3 alert (_ssl.c:2580)')\",)"
    )


@pytest.mark.parametrize(
    "alert,words",
    [
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "expired"),
        ("TLSV1_ALERT_UNKNOWN_CA", "does not trust the CA"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "refused"),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "refused"),
        ("SSLV3_ALERT_CERTIFICATE_REVOKED", "revoked"),
    ],
)
def test_broker_refusing_the_client_certificate_is_fatal(alert, words):
    err = classify(
        _stream_lost_with(alert),
        AmqpSettings(tls=True, username=None, cert="/nonexistent/cert.pem"),
    )
    assert isinstance(err, FatalAmqpError)
    assert words in str(err) and "/nonexistent/cert.pem" in str(err)
    assert "\n" not in str(err)


def test_untrusted_broker_certificate_is_fatal_but_a_clock_problem_is_not():
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_code, untrusted.verify_message = 19, "self-signed certificate in chain"
    err = classify(untrusted, AmqpSettings(tls=True, username=None, cacert="/etc/x/ca.pem"))
    assert isinstance(err, FatalAmqpError) and "/etc/x/ca.pem" in str(err)
    # the node's clock may be wrong right after boot: keep trying
    for code, text in ((9, "certificate is not yet valid"), (10, "certificate has expired")):
        clock = ssl.SSLCertVerificationError(1, "certificate verify failed")
        clock.verify_code, clock.verify_message = code, text
        assert classify(clock, AmqpSettings(tls=True, username=None)) is None


def test_network_trouble_is_retryable_and_unknown_errors_are_not_amqp_errors():
    assert classify(px.StreamLostError("lost")) is None
    assert classify(_stream_lost_with("SOMETHING_ELSE")) is None
    assert classify(ConnectionRefusedError(111, "refused")) is None
    assert not amqp.is_retryable(KeyError("x"))
    assert not amqp.is_retryable(TypeError("x"))
    assert amqp.is_retryable(px.StreamLostError("x"))
    assert amqp.is_retryable(TimeoutError())


# --------------------------------------------------------------- worker loop


class _FakeConnection:
    is_open = False


class _Worker(AmqpWorker):
    purpose = "test"

    def __init__(self, settings, error: BaseException):
        super().__init__(settings)
        self.error = error

    def _session(self, conn):
        raise self.error


@pytest.fixture
def fake_connection(monkeypatch):
    monkeypatch.setattr(amqp.pika, "BlockingConnection", lambda params: _FakeConnection())


def _fast() -> AmqpSettings:
    return AmqpSettings(backoff_initial_s=0.01, backoff_max_s=0.02)


def test_programming_error_stops_the_worker_once_with_a_traceback(fake_connection, caplog):
    w = _Worker(_fast(), KeyError("no such key"))
    with caplog.at_level(logging.ERROR, logger="waggle_trainer.transport.amqp"):
        w.start()
        w._thread.join(5)  # type: ignore[union-attr]
    assert not w.running and w.connect_attempts == 1
    assert isinstance(w.fatal_error, FatalAmqpError) and "KeyError" in str(w.fatal_error)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # a bug shows where it is


def test_network_error_is_retried_with_backoff(fake_connection, caplog):
    w = _Worker(_fast(), px.StreamLostError("Stream connection lost"))
    with caplog.at_level(logging.WARNING, logger="waggle_trainer.transport.amqp"):
        w.start()
        end = time.monotonic() + 5
        while w.connect_attempts < 4 and time.monotonic() < end:
            time.sleep(0.01)
        w.stop()
    assert w.connect_attempts >= 4 and w.fatal_error is None
    assert all(r.exc_info is None for r in caplog.records)  # one plain line per attempt
    assert "retrying in" in caplog.text
