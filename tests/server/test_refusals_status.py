"""One server (in process) against the real broker: hostile and poison updates are
dead-lettered with their reason while good ones go through; the status page shows
it all in a real headless Chromium."""

from __future__ import annotations

import html.parser
import json
import pickle
import shutil
import subprocess
import time
import urllib.request

import pika
import pytest
import torch
from brokerutil import wait_consuming
from simnodes import (
    MODEL,
    _forge,
    _forge_raw,
    broker_sections,
    dead_letters,
    encoder,
    make_config,
    publish,
    random_delta,
)

from waggle_trainer.server.app import Server
from waggle_trainer.server.pipeline import UpdatePipeline
from waggle_trainer.server.signing import load_signing_key
from waggle_trainer.server.state import StateDB
from waggle_trainer.transport import metrics

pytestmark = pytest.mark.broker


def wait_for(pred, timeout: float, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def telemetry(params, exchange: str, node: str, values: dict[str, float]) -> None:
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.exchange_declare(exchange, exchange_type="topic", durable=True)
    for i, (name, val) in enumerate(values.items()):
        body = json.dumps(
            {
                "name": name,
                "ts": time.time_ns() + i,
                "val": val,
                "meta": {"node": node, "vsn": "W0T"},
            }
        )
        ch.basic_publish(
            exchange, name, body.encode(), pika.BasicProperties(content_type="application/json")
        )
    conn.close()


#: What the page's node columns need from a real daemon (registry names).
REAL_METRICS = {
    metrics.ROUND.name,
    metrics.AGREEMENT.name,
    metrics.MEMORY_BUDGET.name,
    metrics.PLAN_MEASURED_PEAK.name,
    metrics.OUTBOX_UPDATES.name,
    metrics.OUTBOX_BYTES.name,
}


def run_daemon(tmp_path, names, node_id: str, monkeypatch) -> None:
    """The node daemon (stand-in loop and frames, everything else real) for three
    rounds, the third rolled back, telemetry on the beehive route to the test's
    exchange; transport off, so its two updates stay in its outbox."""
    import signal

    from tests.node.nodeutil import make_daemon, write_config
    from waggle_trainer import config as cfgmod
    from waggle_trainer.config import load_config

    monkeypatch.setattr(cfgmod, "WAGGLE_ETC", tmp_path / "etc-waggle")
    for var in ("WAGGLE_NODE_ID", "WAGGLE_NODE_VSN", "NOTIFY_SOCKET", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    path = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": node_id, "vsn": "W0G"},
            "training": {"steps_per_round": 2},
            "telemetry": {"enabled": True, "exchange": names.telemetry, "interval_s": 0.5},
            "state": {"dir": str(tmp_path / f"{node_id}-state")},
        },
    )
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        d = make_daemon(load_config(path), path, reject_every=3, max_rounds=3)
        assert d.run() == 0 and len(d.outbox) == 2
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)


class DomRows(html.parser.HTMLParser):
    """Rows of the nodes table, the plot's series, as the browser rendered them."""

    def __init__(self):
        super().__init__()
        self.nodes: dict[str, list[str]] = {}
        self.series: list[str] = []
        self._row: str | None = None
        self._cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "node":
            self._row, self._cells = a["data-node"], []
        elif tag == "td" and self._row is not None:
            self._in_td = True
            self._cells.append("")
        elif tag in ("polyline", "circle") and a.get("class") == "series":
            self.series.append(a["data-node"])

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False
        elif tag == "tr" and self._row is not None:
            self.nodes[self._row] = self._cells
            self._row = None

    def handle_data(self, data):
        if self._in_td and self._cells:
            self._cells[-1] += data.strip()


def chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hostile_and_poison_updates_are_refused_and_the_status_page_shows_it(
    tmp_path, names, sim_user, monkeypatch
):
    nodes = ["good", "a", "b"]
    sections = broker_sections(names)
    sections["queue"]["delivery_limit"] = 2
    cfg = make_config(tmp_path, nodes, aggregation={"min_updates": 100}, **sections)
    ok = encoder("good").encode_delta(
        random_delta(0), base_version="1", round=3, samples=9, metrics={"agreement": 0.7}
    )
    poison = encoder("a").encode_delta(random_delta(1), base_version="1", round=1, samples=1)
    crashes = []
    real_complete = UpdatePipeline._complete

    def crashing(self, uid):
        if uid == poison.update_id:
            crashes.append(uid)
            raise RuntimeError("simulated crash in the handler")
        return real_complete(self, uid)

    monkeypatch.setattr(UpdatePipeline, "_complete", crashing)
    server = Server(cfg, load_signing_key(cfg.broadcast.signing_key_file))
    server.start()
    try:
        # consuming: their queues are declared and bound (``connected`` is set before)
        assert wait_for(lambda: server.consumer.connected and server.telemetry.connected, 60)
        assert wait_consuming(names.queue, 60), server.consumer.last_error
        pub = lambda u, node, **kw: publish(
            sim_user, names.exchange, u.blob, u.update_id, node, **kw
        )
        pub(poison, "a")
        pub(ok, "good")
        b = encoder("b")
        sent = {}
        replay = encoder("good").encode_delta(random_delta(2), base_version="1", round=3, samples=1)
        sent["replay"] = replay.update_id
        pub(replay, "good")
        t = bytearray(b.encode_delta(random_delta(3), base_version="1", round=1, samples=1).blob)
        t[-3] ^= 0x10
        publish(sim_user, names.exchange, bytes(t), "0d0a5a5e-0000-4000-8000-000000000001", "b")
        u = b.encode_delta(random_delta(4), base_version="1", round=2, samples=1)
        pickled = _forge_raw(u, pickle.dumps({"fc.bias": torch.ones(5)}))
        sent["format"] = u.update_id
        publish(sim_user, names.exchange, pickled, u.update_id, "b")
        u = b.encode_delta(random_delta(5), base_version="1", round=3, samples=1)
        nan = _forge(u, lambda ts: ts["fc.bias"].__setitem__(0, float("nan")))
        sent["nonfinite"] = u.update_id
        publish(sim_user, names.exchange, nan, u.update_id, "b")
        wrong = dict(random_delta(6), **{"fc.weight": torch.zeros(8, 5)})
        u = b.encode_delta(wrong, base_version="1", round=4, samples=1)
        sent["shape"] = u.update_id
        pub(u, "b")
        u = b.encode_delta(random_delta(7), base_version="9", round=5, samples=1)
        sent["base_version"] = u.update_id
        pub(u, "b")
        u = b.encode_delta(random_delta(8), base_version="1", round=6, samples=1)
        sent["user_id"] = u.update_id
        pub(u, "b", user_id="good")
        later = b.encode_delta(
            random_delta(9), base_version="1", round=7, samples=2, metrics={"agreement": 0.55}
        )
        pub(later, "b")
        # node "good" is a real daemon (stand-in loop): its own telemetry, through the
        # broker, into the server's view; node "b" only reports two values by hand
        run_daemon(tmp_path, names, "good", monkeypatch)

        def all_metrics_seen() -> bool:
            last = server.telemetry.snapshot()[0]
            return REAL_METRICS <= set(last.get("good", {})) and len(last.get("b", {})) == 2

        for _ in range(3):  # telemetry is transient: resent if another test cut the listener off
            telemetry(sim_user, names.telemetry, "b", {"train.agreement": 0.5, "train.round": 7})
            if wait_for(all_metrics_seen, 10):
                break
        assert all_metrics_seen(), server.telemetry.snapshot()[0]

        def pending() -> set[str]:  # a connection of the test's own (the worker uses its own)
            db = StateDB(server.pipeline.root / "state.sqlite", readonly=True)
            try:
                return {p.update_id for p in db.pending(MODEL)}
            finally:
                db.close()

        assert wait_for(lambda: pending() == {ok.update_id, later.update_id}, 30), pending()

        dl = []
        assert wait_for(lambda: dl.extend(dead_letters(sim_user, names.dlq)) or len(dl) >= 8, 20), [
            p.headers.get("x-waggle-reject-code") for p, _ in dl
        ]
        by_code = {}
        for props, _body in dl:
            h = props.headers
            by_code.setdefault(h["x-waggle-reject-code"], []).append(h)
        assert set(by_code) == {
            "poison",
            "replay",
            "signature",
            "format",
            "nonfinite",
            "shape",
            "base_version",
            "user_id",
        }, sorted(by_code)
        assert len(crashes) == 3  # delivered delivery_limit + 1 times, then dead-lettered
        assert "simulated crash" in by_code["poison"][0]["x-waggle-reject-reason"]
        assert "pickle" in by_code["format"][0]["x-waggle-reject-reason"]
        for code in ("replay", "format", "nonfinite", "shape", "base_version", "user_id"):
            assert by_code[code][0]["update_id"] == sent[code], code

        # the status page, as data and in a real browser
        base = f"http://127.0.0.1:{server.status.port}"
        api = json.load(urllib.request.urlopen(f"{base}/api/status", timeout=10))
        rows = {n["node"]: n for n in api["nodes"]}
        assert rows["good"]["accepted"] == 1 and rows["good"]["rejected"] == {"replay": 1}
        g = rows["good"]
        assert g["budget_bytes"] == 64 * 2**20 and g["peak_bytes"] == 3 * 2**20, g
        assert g["outbox_updates"] == 2 and g["outbox_bytes"] > 0 and g["round"] == 3, g
        assert rows["b"]["rejected"] == {
            "signature": 1,
            "nonfinite": 1,
            "shape": 1,
            "base_version": 1,
            "user_id": 1,
            "format": 1,
        }
        assert "password" not in json.dumps(api) and "guest" not in json.dumps(api)
        shot = tmp_path / "status.png"
        r = chromium("--window-size=1280,1400", f"--screenshot={shot}", base + "/")
        assert shot.exists() and shot.stat().st_size > 20_000, r.stderr[-2000:]
        r = chromium("--dump-dom", base + "/")
        dom = DomRows()
        dom.feed(r.stdout)
        assert set(dom.nodes) >= {"good", "b"}, r.stdout[:2000]
        good = dom.nodes["good"]  # memory budget, measured peak, outbox: the daemon's own
        assert good[2] == "3" and good[4] == "64.0 MiB" and good[5] == "3.0 MiB", good
        assert good[6] == "2" and good[8] == "1" and good[9] == "replay: 1", good
        assert dom.nodes["b"][8] == "1" and "shape: 1" in dom.nodes["b"][9]
        assert set(dom.series) >= {"good", "b"}
        print(f"status page screenshot: {shot}")
    finally:
        server.stop()


def test_a_first_start_logs_no_error_and_broadcasts_version_1(tmp_path, names, caplog):
    """Fresh state and fresh exchanges: version 1 is imported and broadcast once the
    consumer has declared the exchanges; nothing is logged as an error on the way."""
    import logging

    cfg = make_config(tmp_path, ["a"], **broker_sections(names))
    server = Server(cfg, load_signing_key(cfg.broadcast.signing_key_file))
    with caplog.at_level(logging.INFO, logger="waggle_trainer"):
        server.start()
        try:

            def broadcast() -> bool:
                db = StateDB(server.pipeline.root / "state.sqlite", readonly=True)
                try:
                    return db.unbroadcast() == []
                finally:
                    db.close()

            assert wait_for(broadcast, 20), caplog.text[-3000:]
            time.sleep(1.5)  # a tick or two after it
        finally:
            server.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert any("version 1 broadcast" in r.getMessage() for r in caplog.records)
