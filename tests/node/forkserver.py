"""Starts daemons quickly for the kill-loop test: this process imports torch and the
daemon once (no torch work, not even set_num_threads: an OpenMP pool made before a fork
hangs the child), then forks one child per request.
Each child is a separate process running the real ``run`` command; the test kills it
with SIGKILL.  Skipping the 2-3 s interpreter start per restart is what lets 50
kills fit in CI.

Protocol (one JSON object per line on stdin, one reply per line on stdout):
``{"start": [argv...], "log": path, "env": {...}}`` -> ``{"pid": n}``;
``{"wait": pid}`` -> ``{"status": waitpid status}``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch._dynamo
from standin import factories_from_env

from waggle_trainer.cli import build_parser
from waggle_trainer.common import setup_logging
from waggle_trainer.node import daemon as _daemon  # noqa: F401  (imported before fork)
from waggle_trainer.node.cli import run_command


def child(argv: list[str], log: str, env: dict[str, str]) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    torch.set_num_threads(1)  # here, not in the parent: no OpenMP pool exists before fork
    code = 1
    try:
        args = build_parser().parse_args(argv)
        setup_logging(args.log_level)
        code = run_command(args, **factories_from_env())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        if "start" in req:
            pid = os.fork()
            if pid == 0:
                child(req["start"], req["log"], req.get("env", {}))
            reply = {"pid": pid}
        else:
            _, status = os.waitpid(int(req["wait"]), 0)
            reply = {"status": status}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
