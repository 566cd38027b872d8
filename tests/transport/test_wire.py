"""The wire's names and limits have one home (transport/wire.py) that the node,
the server and the config file share."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from waggle_trainer.config import ConfigError, config_from_dict
from waggle_trainer.transport import AmqpSettings, Outbox, UpdatePublisher
from waggle_trainer.transport.wire import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, UPDATE_EXCHANGE

TRANSPORT = Path(__file__).resolve().parents[2] / "waggle_trainer" / "transport"


def publisher(tmp_path, chunk_size: int) -> UpdatePublisher:
    return UpdatePublisher(
        AmqpSettings(), Outbox(tmp_path, 1 << 20), node_id="n1", chunk_size=chunk_size
    )


def config_chunk_size(value: int) -> int:
    return config_from_dict({"transport": {"chunk_size": value}}).transport.chunk_size


@pytest.mark.parametrize("size", [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE])
def test_config_and_publisher_accept_the_same_chunk_sizes(tmp_path, size):
    assert config_chunk_size(size) == size
    assert publisher(tmp_path, size).chunk_size == size


@pytest.mark.parametrize("size", [MIN_CHUNK_SIZE - 1, MAX_CHUNK_SIZE + 1])
def test_config_and_publisher_refuse_the_same_chunk_sizes(tmp_path, size):
    with pytest.raises(ConfigError, match=r"transport\.chunk_size: .* \(64KiB\.\.15MiB"):
        config_chunk_size(size)
    with pytest.raises(ValueError, match=f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes"):
        publisher(tmp_path, size)


def test_config_defaults_are_the_wire_defaults(tmp_path):
    cfg = config_from_dict({})
    assert cfg.transport.exchange == UPDATE_EXCHANGE
    assert publisher(tmp_path, cfg.transport.chunk_size).exchange == UPDATE_EXCHANGE


def test_reading_the_config_loads_neither_torch_nor_pika():
    code = (
        "import sys, waggle_trainer.config; "
        "print(sorted(m for m in ('torch', 'pika') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    found |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    return found


def test_the_server_side_does_not_import_the_node_side():
    server = TRANSPORT.parent / "server"
    for path in server.glob("*.py"):
        assert not {m for m in imports_of(path) if m.endswith((".publisher", ".outbox"))}, path
    assert "waggle_trainer.transport.wire" in imports_of(server / "consumer.py")
    assert "wire" in imports_of(TRANSPORT / "publisher.py")
    for path in TRANSPORT.glob("*.py"):  # and the node side never imports the server
        assert not {m for m in imports_of(path) if "server" in m}, path


def test_the_package_exports_its_classes_on_first_use():
    from waggle_trainer import transport

    for name in transport.__all__:
        assert getattr(transport, name).__module__.startswith("waggle_trainer.transport."), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        transport.nothing  # noqa: B018
