"""``python pipeline_child.py CONFIG MESSAGES KILL_AT``: an active server's pipeline
that handles pickled chunk messages in order and SIGKILLs itself at one point.

It prints ``acked <i>`` once message ``i`` was handled and its effects finished (when
the real consumer would acknowledge it).  ``KILL_AT``:

* ``staging``      - while staging the fifth chunk: its body written, its header
  sidecar not (the chunk is not acknowledged);
* ``manifest``     - once a new version's manifest is written, before the database
  records its contributors as aggregated;
* ``aggregation``  - in the middle of combining the pool (no manifest yet).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from pathlib import Path

from waggle_trainer.server import pipeline as pl
from waggle_trainer.server.config import load_server_config
from waggle_trainer.server.state import StateDB


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(config: str, messages: str, kill_at: str) -> None:
    cfg = load_server_config(config)
    msgs = pickle.loads(Path(messages).read_bytes())
    if kill_at == "manifest":
        real_mark = StateDB.mark_aggregated

        def mark(self, model, seq, ids):
            if seq >= 2:
                die()
            return real_mark(self, model, seq, ids)

        StateDB.mark_aggregated = mark  # type: ignore[method-assign]
    elif kill_at == "staging":
        from waggle_trainer.server import staging as st

        real_write = st.write_atomic
        sidecars = []

        def write(path, data, *a, **kw):
            if path.suffix == ".json" and path.name != "meta.json":
                sidecars.append(path)
                if len(sidecars) == 5:
                    die()
            return real_write(path, data, *a, **kw)

        st.write_atomic = write
    elif kill_at == "aggregation":
        real_combine = pl._combine_in_slices
        calls = []

        def combine(*args, **kw):
            calls.append(1)
            if len(calls) == 2:  # one tensor combined, the next not
                die()
            return real_combine(*args, **kw)

        pl._combine_in_slices = combine
    p = pl.UpdatePipeline(cfg)
    p.startup()
    for i, m in enumerate(msgs):
        with p.lock.held():
            out = p.handle(m)
            out.finish()
        print(f"acked {i}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
