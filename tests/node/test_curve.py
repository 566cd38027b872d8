"""The learning curve picture (node/curve.py) from a round history like the daemon's."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from waggle_trainer.node.curve import adoptions, learning_curve_svg

SVG = "{http://www.w3.org/2000/svg}"


def entry(r, verdict, before, after, base):
    return {
        "round": r,
        "accepted": verdict == "accepted",
        "judged": verdict != "not judged",
        "agreement_before": before,
        "agreement_after": after,
        "base_version": base,
    }


HISTORY = [
    entry(1, "not judged", 0.0, 0.0, "1"),
    entry(2, "accepted", 0.0, 0.3, "1"),
    entry(3, "rolled back", 0.3, 0.2, "1"),
    entry(4, "accepted", 0.3, 0.35, "2"),  # version 2 adopted after round 3
    entry(5, "not judged", None, None, "2"),  # too few held-out labels to measure
    entry(6, "accepted", 0.35, 0.4, "2"),
    entry(7, "accepted", 0.4, 0.42, "3"),
]


def test_rounds_verdicts_and_adoptions_are_marked():
    root = ET.fromstring(learning_curve_svg(HISTORY, node="n1"))
    assert root.tag == f"{SVG}svg"

    def marks(tag, cls):
        return root.findall(f"{SVG}{tag}[@class='{cls}']")

    assert len(marks("circle", "accepted")) == 4
    assert len(marks("path", "rolled-back")) == 1
    assert len(marks("circle", "not-judged")) == 2
    assert adoptions(HISTORY) == [(4, "2"), (7, "3")]
    lines = marks("line", "adopted")
    assert len(lines) == 2
    labels = [t.text for t in root.iter(f"{SVG}text") if (t.text or "").startswith("v")]
    assert labels == ["v2", "v3"]
    # the line of the kept student breaks where a round has no measurement (round 5):
    # rounds 1-4, then 6-7; a rolled-back round keeps the agreement before it
    polylines = root.findall(f"{SVG}polyline")
    assert [len(p.get("points", "").split()) for p in polylines] == [4, 2]
    y = [float(p.split(",")[1]) for p in polylines[0].get("points", "").split()]
    assert y[2] == y[1]  # round 3 rolled back: the student of round 2 stays
    assert "node n1" in ET.tostring(root, encoding="unicode")


def test_an_empty_history_says_so():
    root = ET.fromstring(learning_curve_svg([]))
    assert "no round completed" in [t.text for t in root.iter(f"{SVG}text")]
