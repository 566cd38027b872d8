"""The learning curve of a node as an SVG picture, from the round history the daemon
keeps in its state (``history`` entries: ``round``, ``accepted``, ``judged``,
``agreement_before``, ``agreement_after``, ``base_version``).  Standard library only,
so it draws wherever the daemon runs.

What it shows, per round: the held-out agreement with the teacher of the student the
node kept (a line), accepted rounds (green dots), rolled-back rounds (a red cross at
the agreement of the student that was thrown away), rounds the drift guard could not
judge (grey rings), and a dashed vertical line where the node adopted a new global
version (its base changed between two rounds).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ACCEPTED, ROLLED_BACK, NOT_JUDGED, KEPT, ADOPTED = (
    "#2ca02c",
    "#d62728",
    "#7f7f7f",
    "#1f77b4",
    "#9467bd",
)


def _kept(h: dict[str, Any]) -> float | None:
    """Agreement of the student the node kept after the round."""
    if h.get("judged") is not False and not h.get("accepted"):
        return h.get("agreement_before")  # rolled back: the previous student stays
    return h.get("agreement_after")


def adoptions(history: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    """``(round, version)`` for each round that trained on a newer base than the
    round before it: the node adopted ``version`` just before that round."""
    out = []
    for prev, h in zip(history, history[1:], strict=False):
        a, b = prev.get("base_version"), h.get("base_version")
        if a is not None and b is not None and a != b:
            out.append((int(h["round"]), str(b)))
    return out


def _nice_top(v: float) -> float:
    """The y-axis top: 1, 2 or 5 times a power of ten, at least 0.1, at most 1 (five
    grid steps of round numbers)."""
    if v <= 0.1:
        return 0.1
    exp = 10 ** math.floor(math.log10(v))
    for m in (1.0, 2.0, 5.0, 10.0):
        if v <= m * exp:
            return min(1.0, m * exp)
    return 1.0


def learning_curve_svg(
    history: Sequence[dict[str, Any]], node: str = "", width: int = 760, height: int = 320
) -> str:
    """The picture described in the module docstring, as an SVG document."""
    left, right, top, bottom = 56, 190, 40, 46
    pw, ph = width - left - right, height - top - bottom
    rounds = [int(h["round"]) for h in history]
    values = [
        float(v)
        for h in history
        for v in (h.get("agreement_before"), h.get("agreement_after"))
        if isinstance(v, (int, float)) and math.isfinite(v)
    ]
    ymax = _nice_top(max(values, default=0.0) * 1.1)
    r0, r1 = (min(rounds), max(rounds)) if rounds else (1, 1)

    def x(r: float) -> float:
        return left + pw * (r - r0 + 0.5) / (r1 - r0 + 1)

    def y(v: float) -> float:
        return top + ph * (1 - min(max(v, 0.0), ymax) / ymax)

    title = "Held-out agreement with the teacher per round" + (f", node {node}" if node else "")
    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{left}" y="22" font-family="sans-serif" font-size="14">{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>',
    ]
    for i in range(6):
        v = ymax * i / 5
        parts.append(
            f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + pw}" y2="{y(v):.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-family="sans-serif" font-size="11" '
            f'text-anchor="end">{v:.2f}</text>'
        )
    step = max(1, math.ceil((r1 - r0 + 1) / 12))
    for r in range(r0, r1 + 1, step):
        parts.append(
            f'<text x="{x(r):.1f}" y="{top + ph + 16}" font-family="sans-serif" font-size="11" '
            f'text-anchor="middle">{r}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2}" y="{height - 8}" font-family="sans-serif" font-size="12" '
        'text-anchor="middle">round</text>'
    )
    if not history:
        parts.append(
            f'<text x="{left + pw / 2}" y="{top + ph / 2}" font-family="sans-serif" '
            'font-size="13" text-anchor="middle">no round completed</text>'
        )
    for r, version in adoptions(history):
        xa = x(r - 0.5)
        parts.append(
            f'<line class="adopted" x1="{xa:.1f}" y1="{top}" x2="{xa:.1f}" y2="{top + ph}" '
            f'stroke="{ADOPTED}" stroke-dasharray="5,4" stroke-width="1.5"/>'
            f'<text x="{xa + 3:.1f}" y="{top + 12}" font-family="sans-serif" font-size="11" '
            f'fill="{ADOPTED}">v{e(version)}</text>'
        )
    segment: list[str] = []
    segments = [segment]
    for h in history:
        kept = _kept(h)
        if kept is None:
            segment = []
            segments.append(segment)
        else:
            segment.append(f"{x(int(h['round'])):.1f},{y(float(kept)):.1f}")
    for seg in segments:
        if len(seg) > 1:
            parts.append(
                f'<polyline points="{" ".join(seg)}" fill="none" stroke="{KEPT}" '
                'stroke-width="1.5"/>'
            )
    for h in history:
        cx = x(int(h["round"]))
        after = h.get("agreement_after")
        cy = y(float(after)) if isinstance(after, (int, float)) else y(0.0)
        if h.get("judged") is False:
            parts.append(
                f'<circle class="not-judged" cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="none" '
                f'stroke="{NOT_JUDGED}"/>'
            )
        elif h.get("accepted"):
            parts.append(
                f'<circle class="accepted" cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{ACCEPTED}"/>'
            )
        else:
            parts.append(
                f'<path class="rolled-back" d="M{cx - 4:.1f},{cy - 4:.1f}L{cx + 4:.1f},'
                f'{cy + 4:.1f}M{cx - 4:.1f},{cy + 4:.1f}L{cx + 4:.1f},{cy - 4:.1f}" '
                f'stroke="{ROLLED_BACK}" stroke-width="2"/>'
            )
    lx = left + pw + 14
    legend = [
        (
            f'<line x1="{lx}" y1="{{y}}" x2="{lx + 14}" y2="{{y}}" stroke="{KEPT}" '
            'stroke-width="1.5"/>',
            "student kept",
        ),
        (f'<circle cx="{lx + 7}" cy="{{y}}" r="4" fill="{ACCEPTED}"/>', "accepted"),
        (
            f'<path d="M{lx + 3},{{y0}}L{lx + 11},{{y1}}M{lx + 3},{{y1}}L{lx + 11},{{y0}}" '
            f'stroke="{ROLLED_BACK}" stroke-width="2"/>',
            "rolled back",
        ),
        (
            f'<circle cx="{lx + 7}" cy="{{y}}" r="3.5" fill="none" stroke="{NOT_JUDGED}"/>',
            "not judged",
        ),
        (
            f'<line x1="{lx + 7}" y1="{{y0}}" x2="{lx + 7}" y2="{{y1}}" stroke="{ADOPTED}" '
            'stroke-dasharray="3,2" stroke-width="1.5"/>',
            "global version adopted",
        ),
    ]
    for i, (mark, label) in enumerate(legend):
        ly = top + 10 + 20 * i
        parts.append(mark.format(y=ly, y0=ly - 4, y1=ly + 4))
        parts.append(
            f'<text x="{lx + 22}" y="{ly + 4}" font-family="sans-serif" font-size="12">'
            f"{label}</text>"
        )
    first_base = history[0].get("base_version") if history else None
    if first_base is not None:
        parts.append(
            f'<text x="{lx}" y="{top + 10 + 20 * len(legend) + 8}" font-family="sans-serif" '
            f'font-size="11" fill="#555">round {r0} trained on base {e(str(first_base))}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_learning_curve(history: Sequence[dict[str, Any]], path: Path, node: str = "") -> Path:
    """Write :func:`learning_curve_svg` to ``path`` (replaced atomically)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(learning_curve_svg(history, node))
    os.replace(tmp, path)
    return path
