"""The status page: what every node is doing, the versions, agreement over time.

Standard library only (``http.server``), bound to 127.0.0.1 by default:

* ``/``               HTML: nodes table, versions table, recent refusals, the plot
* ``/agreement.svg``  agreement over time per node, drawn here (no JavaScript)
* ``/api/status``     the same data as JSON

Nothing secret is shown (no keys, no passwords, no payloads).  Data comes from
the state database (read-only connection per request), the model store and
the telemetry listener's memory.
"""

from __future__ import annotations

import html
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from waggle_trainer.transport import metrics

from .config import ServerConfig
from .state import StateDB
from .store import ModelStore

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
#: Status page column -> the metric it shows (one home for names: transport/metrics.py).
NODE_METRICS = {
    "round": metrics.ROUND.name,
    "agreement": metrics.AGREEMENT.name,
    "loss": metrics.LOSS.name,
    "budget_bytes": metrics.MEMORY_BUDGET.name,
    "peak_bytes": metrics.PLAN_MEASURED_PEAK.name,
    "outbox_updates": metrics.OUTBOX_UPDATES.name,
    "outbox_bytes": metrics.OUTBOX_BYTES.name,
}


def collect(db_path: Path, store: ModelStore, telemetry, consumer=None) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-able data."""
    db = StateDB(db_path, readonly=True)
    try:
        summary = db.node_summary()
        series = db.agreement_series()
        rejections = db.recent_rejections()
        counters = db.counters()
        pending = {m: len(db.pending(m)) for m in store.models()}
    finally:
        db.close()
    last, tel_series = telemetry.snapshot() if telemetry is not None else ({}, {})
    nodes = []
    for node in sorted(set(summary) | set(last)):
        s = summary.get(node, {"accepted": 0, "rejected": {}, "last_update": None})
        metrics = last.get(node, {})
        lu = s["last_update"] or {}
        row: dict[str, Any] = {
            "node": node,
            "accepted": s["accepted"],
            "rejected": s["rejected"],
            "rejected_total": sum(s["rejected"].values()),
            "last_update": lu or None,
            "last_metric_ns": max((ts for ts, _ in metrics.values()), default=None),
        }
        for key, name in NODE_METRICS.items():
            row[key] = metrics[name][1] if name in metrics else None
        if row["round"] is None and lu:
            row["round"] = lu.get("round")
        if row["agreement"] is None and lu:
            row["agreement"] = lu.get("metrics", {}).get("agreement")
        nodes.append(row)
    merged: dict[str, list[tuple[int, float]]] = {}
    for src in (series, tel_series):
        for node, pts in src.items():
            merged.setdefault(node, []).extend(pts)
    versions = []
    for model in store.models():
        for v in reversed(store.versions(model)):
            m = v.manifest
            versions.append(
                {
                    "model": model,
                    "version": v.version,
                    "parent": m.get("parent"),
                    "created_ns": m.get("created_ns"),
                    "rule": m.get("rule", {}).get("rule"),
                    "updates": len(m.get("contributors", [])),
                    "nodes": m.get("nodes", []),
                    "samples": m.get("samples", 0),
                    "retired": v.retired,
                }
            )
    out = {
        "generated_ns": time.time_ns(),
        "nodes": nodes,
        "versions": versions,
        "pending": pending,
        "recent_rejections": rejections,
        "counters": counters,
        "agreement": {n: sorted(set(p)) for n, p in merged.items()},
    }
    if consumer is not None:
        out["server"] = {
            "connected": consumer.connected,
            "handled": consumer.handled,
            "dead_lettered": consumer.dead_lettered,
            "requeued": consumer.requeued,
        }
    return out


def agreement_svg(
    series: dict[str, list[tuple[int, float]]], width: int = 720, height: int = 260
) -> str:
    """Agreement (0..1) over time, one line and legend entry per node."""
    left, right, top, bottom = 48, 150, 16, 32
    pw, ph = width - left - right, height - top - bottom
    pts = [t for s in series.values() for t, _ in s]
    t0, t1 = (min(pts), max(pts)) if pts else (0, 1)
    span = max(t1 - t0, 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="agreement-plot" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="teacher agreement over time per node">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>',
    ]
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + ph * (1 - frac)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
            f'stroke="#ddd"/><text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
            f'text-anchor="end">{frac:.2f}</text>'
        )
    if pts:
        minutes = span / 60e9
        parts.append(
            f'<text x="{left}" y="{height - 8}" font-size="11">'
            f"{html.escape(time.strftime('%H:%M:%S', time.gmtime(t0 / 1e9)))} UTC</text>"
            f'<text x="{left + pw}" y="{height - 8}" font-size="11" text-anchor="end">'
            f"+{minutes:.1f} min</text>"
        )
    else:
        parts.append(
            f'<text x="{left + pw / 2}" y="{top + ph / 2}" font-size="13" '
            'text-anchor="middle">no agreement reported yet</text>'
        )
    for i, (node, s) in enumerate(sorted(series.items())):
        color = PALETTE[i % len(PALETTE)]
        xy = [(left + pw * (t - t0) / span, top + ph * (1 - min(max(v, 0.0), 1.0))) for t, v in s]
        if len(xy) == 1:
            x, y = xy[0]
            parts.append(
                f'<circle class="series" data-node="{html.escape(node)}" cx="{x:.1f}" '
                f'cy="{y:.1f}" r="3" fill="{color}"/>'
            )
        else:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            parts.append(
                f'<polyline class="series" data-node="{html.escape(node)}" '
                f'points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>'
            )
        ly = top + 12 + 14 * i
        if ly < top + ph:
            parts.append(
                f'<rect x="{left + pw + 10}" y="{ly - 8}" width="10" height="10" '
                f'fill="{color}"/><text x="{left + pw + 24}" y="{ly + 1}" '
                f'font-size="11">{html.escape(node)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_time(ns: Any) -> str:
    if not isinstance(ns, int):
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9))


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    if isinstance(v, bool) or v is None:
        return "–"
    if isinstance(v, float):
        return fmt.format(v)
    return html.escape(str(v))


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def render_html(data: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for n in data["nodes"]:
        lu = n["last_update"] or {}
        rej = ", ".join(f"{e(k)}: {v}" for k, v in sorted(n["rejected"].items())) or "–"
        rows.append(
            f'<tr class="node" data-node="{e(n["node"])}"><td>{e(n["node"])}</td>'
            f'<td>{_fmt_time(n["last_metric_ns"])}</td><td class="round">{_num(n["round"])}</td>'
            f'<td class="agreement">{_num(n["agreement"])}</td>'
            f"<td>{_fmt_bytes(n['budget_bytes'])}</td><td>{_fmt_bytes(n['peak_bytes'])}</td>"
            f"<td>{_num(n['outbox_updates'])}</td>"
            f"<td>{_fmt_time(lu.get('received_ns'))} {e(str(lu.get('status', '')))}</td>"
            f'<td class="accepted">{n["accepted"]}</td>'
            f'<td class="rejected" data-total="{n["rejected_total"]}">{rej}</td></tr>'
        )
    vrows = []
    for v in data["versions"][:50]:
        vrows.append(
            f'<tr class="version"><td>{e(v["model"])}</td><td>{e(v["version"])}</td>'
            f"<td>{e(str(v['parent'] or '–'))}</td><td>{_fmt_time(v['created_ns'])}</td>"
            f'<td>{e(str(v["rule"]))}</td><td class="updates">{v["updates"]}</td>'
            f"<td>{v['samples']}</td><td>{e(', '.join(v['nodes'])) or '–'}</td>"
            f"<td>{'retired' if v['retired'] else 'kept'}</td></tr>"
        )
    rejs = "".join(
        f'<tr class="rejection"><td>{_fmt_time(r["ns"])}</td><td>{e(str(r["node"] or "?"))}</td>'
        f"<td>{e(r['code'])}</td><td>{e(r['reason'][:200])}</td></tr>"
        for r in data["recent_rejections"]
    )
    pending = ", ".join(f"{e(m)}: {n}" for m, n in sorted(data["pending"].items())) or "–"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>waggle-trainer server</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; text-align: left; }}
th {{ background: #eee; }}
</style></head><body>
<h1>waggle-trainer server</h1>
<p id="summary">{_count(len(data["nodes"]), "node")}, {_count(len(data["versions"]), "version")},
updates waiting for the next round: {pending}.
Generated {_fmt_time(data["generated_ns"])} UTC.</p>
<h2>Nodes</h2>
<table id="nodes"><thead><tr><th>node</th><th>last metric (UTC)</th><th>round</th>
<th>agreement</th><th>memory budget</th><th>measured peak</th><th>outbox</th>
<th>last update (UTC)</th><th>accepted</th><th>rejected (reasons)</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<h2>Agreement with the teacher over time</h2>
{agreement_svg(data["agreement"])}
<h2>Model versions</h2>
<table id="versions"><thead><tr><th>model</th><th>version</th><th>parent</th>
<th>created (UTC)</th><th>rule</th><th>updates</th><th>samples</th><th>contributors</th>
<th>weights</th></tr></thead><tbody>{"".join(vrows)}</tbody></table>
<h2>Recent refusals</h2>
<table id="rejections"><thead><tr><th>time (UTC)</th><th>node</th><th>code</th>
<th>reason</th></tr></thead><tbody>{rejs}</tbody></table>
<p><a href="/api/status">/api/status</a> (JSON)</p>
</body></html>
"""


class StatusServer:
    """The page in a thread of its own (``ThreadingHTTPServer``)."""

    def __init__(
        self, cfg: ServerConfig, db_path: Path, store: ModelStore, telemetry, consumer=None
    ):
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    path = self.path.split("?", 1)[0]
                    data = collect(db_path, store, telemetry, consumer)
                    if path == "/api/status":
                        self._send(200, "application/json", json.dumps(data, indent=1).encode())
                    elif path == "/agreement.svg":
                        self._send(200, "image/svg+xml", agreement_svg(data["agreement"]).encode())
                    elif path in ("/", "/index.html"):
                        self._send(200, "text/html; charset=utf-8", render_html(data).encode())
                    else:
                        self._send(404, "text/plain", b"not found\n")
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the page
                    page.errors += 1
                    self._send(500, "text/plain", f"status unavailable: {e!r}\n".encode())

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass  # requests are not worth a log line each

        self.errors = 0
        self.httpd = ThreadingHTTPServer((cfg.status.bind, cfg.status.port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="status-page", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
