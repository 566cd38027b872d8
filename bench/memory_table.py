"""The study's ResNet training-memory table beside this machine's prediction and measurement.

Prediction: :func:`waggle_trainer.remat.memory.predict_step_memory` (parameters,
gradients, SGD-momentum state, input, activations counted on the meta device,
workspace).  Measurement (cells predicted below ``--measure-limit``): two real
plain training steps in a fresh process under the daemon's allocator settings;
RSS growth over the post-import, post-model baseline and the tensor-level peak, to
compare with the predicted *step growth* (the total without parameters and
buffers, which are resident at the baseline).

    .venv/bin/python bench/memory_table.py [--measure-limit 1.5GiB] [--no-measure]

Prints the table and writes ``bench/results/memory_table.md``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, write_report  # noqa: E402


def main() -> int:
    from waggle_trainer.common import Progress, parse_size
    from waggle_trainer.remat.allocator import DEFAULT_MODE
    from waggle_trainer.remat.memory import REFERENCE_CELLS, format_rows, reference_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--measure-limit",
        default="1.5GiB",
        help="measure cells whose predicted total is at most this (default 1.5GiB)",
    )
    ap.add_argument("--no-measure", action="store_true", help="prediction only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_table.md"))
    a = ap.parse_args()
    try:
        limit = parse_size(a.measure_limit)
    except ValueError as exc:
        print(f"memory_table: error: --measure-limit: {exc}", file=sys.stderr)
        return 2

    import torch

    t0 = time.time()
    bar, done = Progress("memory table", "cells"), itertools.count(1)
    rows = reference_rows(
        measure=not a.no_measure,
        measure_limit_bytes=limit,
        progress=lambda r: bar(next(done), len(REFERENCE_CELLS)),
    )
    head = [
        "# ResNet training memory: the study's table beside this machine",
        "",
        *provenance(torch.get_num_threads()),
        "",
        f"Allocator mode {DEFAULT_MODE!r}, SGD with momentum, fp32.  Reference: MB from the "
        "original study.  Predicted MB: parameters + buffers + gradients + momentum + input + "
        "activations (meta-device saved tensors) + workspace.  Step growth: predicted total "
        "minus parameters and buffers (resident before the step).  Measured: peak RSS growth "
        "and tensor-level peak of two real steps in a fresh process "
        f"(cells predicted at most {a.measure_limit}); "
        "meas/pred = RSS growth / predicted step growth.",
        "",
    ]
    write_report(Path(a.out), [*head, *format_rows(rows), "", f"({time.time() - t0:.0f} s)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
