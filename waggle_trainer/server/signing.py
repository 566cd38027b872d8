"""The server's Ed25519 model-signing key and the start-up file checks, without torch.

Nodes hold only the public key (``PATH.pub``) and verify with
:func:`waggle_trainer.transport.model_wire.load_verify_key`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from waggle_trainer.config import ConfigError

from .config import ServerConfig


def generate_signing_key(path: str | os.PathLike) -> Path:
    """Write a new Ed25519 private key (PEM, mode 0600) at ``path`` and its public
    key beside it (``path`` + ``.pub``); returns the public key's path.  Refuses
    to overwrite (FileExistsError)."""
    p = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = p.with_name(p.name + ".pub")
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pub


def load_signing_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The server's private key (PEM); refused when group or others can read it."""
    p = Path(path)
    st = p.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"{p}: signing key must not be accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}; chmod 600)"
        )
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except ValueError as e:
        raise ValueError(f"{p}: not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{p}: not an Ed25519 key")
    return key


def _not_safetensors(path: Path) -> str | None:
    """None if ``path`` starts with a readable safetensors header, else why not
    (the header is parsed as JSON; no tensor is loaded)."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = path.stat().st_size
            if len(head) < 8:
                return "is not a safetensors file (too short)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                return "is not a safetensors file (bad header length)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    except ValueError:
        return "is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        return "is not a safetensors file with tensors"
    return None


def check_files(cfg: ServerConfig, source: str):
    """Files the config names, checked before anything starts; returns the signing
    key (or None) or raises ConfigError naming each key at fault."""
    problems: list[tuple[str, str]] = []
    for name, m in cfg.models.items():
        p = Path(m.initial_weights)
        if not p.is_file():
            problems.append(
                (
                    f"models.{name}.initial_weights",
                    f"{str(p)!r} not found (a safetensors file of the model's weights)",
                )
            )
        elif (why := _not_safetensors(p)) is not None:
            problems.append((f"models.{name}.initial_weights", f"{str(p)!r} {why}"))
    if not cfg.models:
        problems.append(("models", "no model to serve (add [models.NAME] with initial_weights)"))
    if not Path(cfg.verify.keys_dir).is_dir():
        problems.append(
            (
                "verify.keys_dir",
                f"{str(cfg.verify.keys_dir)!r} is not a directory "
                "(one <node_id>.key file per node)",
            )
        )
    key = None
    if cfg.broadcast.enabled:
        try:
            key = load_signing_key(cfg.broadcast.signing_key_file)
        except FileNotFoundError:
            problems.append(
                (
                    "broadcast.signing_key_file",
                    f"{str(cfg.broadcast.signing_key_file)!r} not found (create one with "
                    "'waggle-trainer server-keygen PATH', or set broadcast.enabled = "
                    "false)",
                )
            )
        except (OSError, ValueError) as e:
            problems.append(("broadcast.signing_key_file", str(e)))
    from waggle_trainer.writable import problems as path_problems
    from waggle_trainer.writable import server_state_targets

    for pp in path_problems(server_state_targets(Path(cfg.server.state_dir)))[:1]:
        problems.append((pp.target.what, f"{pp.target.path}: {pp.why} ({pp.target.need})"))
    if problems:
        raise ConfigError(source, problems)
    return key
