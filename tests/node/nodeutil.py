"""Helpers for the daemon tests: config files, a daemon around the stand-in loop."""

from __future__ import annotations

import io
from pathlib import Path

from tests.node.standin import StandInLoop, StandInSource
from waggle_trainer.node.daemon import Daemon, Progress


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v) + '"'


def write_config(path: Path, sections: dict) -> Path:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_daemon(cfg, path=None, *, reject_every=4, not_judged=0, loops=None, **kw) -> Daemon:
    def loop_factory(c, d):
        loop = StandInLoop(c, d, reject_every=reject_every, not_judged=not_judged)
        if loops is not None:
            loops.append(loop)
        return loop

    return Daemon(
        cfg,
        config_path=path,
        loop_factory=loop_factory,
        source_factory=lambda c: StandInSource(),
        progress=Progress(io.StringIO()),
        **kw,
    )
