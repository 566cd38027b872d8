"""A private RabbitMQ node with a TLS-only listener and SASL EXTERNAL, for tests.

The node runs beside the system broker without touching it: its own node name,
Erlang cookie (``HOME``), data, log, config and enabled-plugins files in a temp
dir, its own TLS and distribution ports; ``rabbitmq_auth_mechanism_ssl`` is
enabled for this node only.  Users, permissions, exchanges and queues come from a
definitions file loaded at boot, so no ``rabbitmqctl`` call is needed to set it up.

Certificates (ECDSA P-256, made with ``cryptography``): a CA, the server's
certificate for 127.0.0.1/localhost, and client certificates whose CN is the
broker user (``ssl_cert_login_from = common_name``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


# ------------------------------------------------------------------ certificates


@dataclass
class Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def make_ca(directory: Path, cn: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issuer(_name(cn), key, cert, path)


def issue(
    ca: Issuer, directory: Path, cn: str, *, server: bool = False, expired: bool = False
) -> tuple[Path, Path]:
    """A leaf certificate and key signed by ``ca``: ``(cert.pem, key.pem)`` paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(days=10), now - dt.timedelta(days=1))
        if expired
        else (now - dt.timedelta(hours=1), now + dt.timedelta(days=30))
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = b.sign(ca.key, hashes.SHA256())
    cert_path = directory / f"{cn}.cert.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, _write_key(key, directory / f"{cn}.key.pem")


# ------------------------------------------------------------------------ node


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies (even by
    SIGKILL), so a crashed test run never leaves the private node behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Client:
    """One identity: the CA to trust and a client certificate and key."""

    cacert: Path
    cert: Path
    key: Path


@dataclass
class PrivateBroker:
    """Handle to the running node (see :func:`start_private_broker`)."""

    root: Path
    nodename: str
    port: int
    dist_port: int
    env: dict[str, str]
    process: subprocess.Popen
    clients: dict[str, Client] = field(default_factory=dict)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*.log")):
            out += p.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Erlang stops the node cleanly), then SIGKILL the process group."""
        p = self.process
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl -n <this node> ...`` (its own cookie): only this node hears it."""
        r = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.nodename, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout


def start_private_broker(
    root: Path, definitions: dict, *, timeout: float = 90.0, probe: Client
) -> PrivateBroker:
    """Start the node under ``root`` with a TLS-only listener and SASL EXTERNAL;
    returns once ``probe`` completes a TLS handshake."""
    port = free_port()
    certs = root / "certs"
    conf = [
        "listeners.tcp = none",
        f"listeners.ssl.1 = 127.0.0.1:{port}",
        f"ssl_options.cacertfile = {certs / 'ca.pem'}",
        f"ssl_options.certfile = {certs / 'server.cert.pem'}",
        f"ssl_options.keyfile = {certs / 'server.key.pem'}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
        "auth_mechanisms.1 = EXTERNAL",
        "ssl_cert_login_from = common_name",
    ]
    return _start(
        root,
        "wt-tls",
        port,
        conf,
        definitions,
        "[rabbitmq_auth_mechanism_ssl].\n",
        lambda: _tls_handshake_ok(port, probe),
        timeout,
    )


def password_user(name: str, password: str, tags: list[str] | None = None) -> dict:
    """A definitions-file user who logs in with a password (salted SHA-256, as
    RabbitMQ stores it)."""
    import base64
    import hashlib

    salt = os.urandom(4)
    digest = hashlib.sha256(salt + password.encode()).digest()
    return {
        "name": name,
        "password_hash": base64.b64encode(salt + digest).decode(),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": tags or [],
    }


def start_plain_broker(
    root: Path,
    *,
    user: str = "test",
    password: str = "test",
    conf: list[str] | None = None,
    timeout: float = 90.0,
) -> PrivateBroker:
    """A private node with a plain TCP listener and one administrator ``user``, for
    tests that stop it, cut its connections or change its settings (``conf``: more
    rabbitmq.conf lines, e.g. ``max_message_size``): the shared broker is never
    restarted or reconfigured."""
    port = free_port()
    definitions = {
        "users": [password_user(user, password, ["administrator", "impersonator"])],
        "vhosts": [{"name": "/"}],
        "permissions": [
            {"user": user, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
        ],
    }
    lines = [f"listeners.tcp.1 = 127.0.0.1:{port}", *(conf or [])]
    return _start(
        root, "wt-plain", port, lines, definitions, "[].\n", lambda: _amqp_ok(port), timeout
    )


def _amqp_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return len(s.recv(8)) > 0  # connection.start: the broker is up
    except OSError:
        return False


def _start(
    root: Path,
    prefix: str,
    port: int,
    conf: list[str],
    definitions: dict,
    plugins: str,
    ready,
    timeout: float,
) -> PrivateBroker:
    dist_port = free_port()
    nodename = f"{prefix}-{uuid.uuid4().hex[:8]}@localhost"
    for d in ("mnesia", "log", "home"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "definitions.json").write_text(json.dumps(definitions))
    (root / "enabled_plugins").write_text(plugins)
    (root / "rabbitmq-env.conf").write_text("")  # not the system's /etc/rabbitmq one
    (root / "rabbitmq.conf").write_text(
        "\n".join(
            [
                *conf,
                f"load_definitions = {root / 'definitions.json'}",
                "log.console = false",
                "log.file.level = info",
            ]
        )
        + "\n"
    )
    env = {
        **os.environ,
        "HOME": str(root / "home"),  # its own Erlang cookie
        "RABBITMQ_NODENAME": nodename,
        "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
        "RABBITMQ_LOG_BASE": str(root / "log"),
        "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+S 1:1",
    }
    server = shutil.which("rabbitmq-server", path=str(RABBITMQ_BIN)) or "rabbitmq-server"
    with open(root / "log" / "stdout.txt", "wb") as out:
        proc = subprocess.Popen(
            [server],
            env=env,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    broker = PrivateBroker(root, nodename, port, dist_port, env, proc)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(
                f"private RabbitMQ node exited ({proc.returncode}):\n"
                + (root / "log" / "stdout.txt").read_text(errors="replace")[-3000:]
            )
        if ready():
            return broker
        time.sleep(0.3)
    broker.stop()
    raise RuntimeError(
        f"private RabbitMQ node did not listen within {timeout:.0f} s:\n" + broker.log_tail()
    )


def _tls_handshake_ok(port: int, client: Client) -> bool:
    ctx = ssl.create_default_context(cafile=str(client.cacert))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return len(s.recv(8)) > 0  # connection.start: the broker is up
    except OSError:
        return False
