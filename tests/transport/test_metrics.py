"""One home for metric names: the daemon sends exactly the registry's names, the
status page reads only names from it, and the docs are held to it."""

from __future__ import annotations

import re
from pathlib import Path

from waggle_trainer.server.status import NODE_METRICS
from waggle_trainer.transport import metrics

ROOT = Path(__file__).resolve().parents[2]


def test_the_deploy_guide_table_is_the_registry():
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert metrics.markdown_table() in text, (
        "docs/deploy.md's metrics table differs from waggle_trainer/transport/metrics.py: "
        "paste `python -m waggle_trainer.transport.metrics`"
    )


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_the_protocol_names_only_metrics_that_are_sent():
    telemetry = _section((ROOT / "docs" / "protocol.md").read_text(), "Telemetry (Beehive)")
    not_metrics = {"waggle.msg", "meta.node", "meta.vsn", "wagglemsg.load"}
    names = set(re.findall(r"`([a-z0-9_]+(?:\.[a-z0-9_]+)+)`", telemetry))
    names |= set(re.findall(r'"name": "([^"]+)"', telemetry))
    names -= not_metrics
    names = {n for n in names if not n.endswith((".py", ".md"))}
    assert names and names <= metrics.NAMES, sorted(names - metrics.NAMES)


def test_the_status_page_reads_registry_names():
    assert set(NODE_METRICS.values()) <= metrics.NAMES


def test_the_daemon_registers_every_metric_under_its_name(tmp_path):
    from types import SimpleNamespace

    from waggle_trainer.node.daemon import Daemon
    from waggle_trainer.transport import Telemetry

    d = Daemon.__new__(Daemon)  # the gauges only, without starting anything
    d.models = SimpleNamespace(received=0, rejected={})
    t = Telemetry("n1", "W0T")
    d._register_gauges(t)
    assert set(t._gauges) == metrics.NAMES
