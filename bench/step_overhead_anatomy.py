"""What a planned step's resident growth beyond the plan's prediction consists of.

For each case, in this process (run it pinned: ``taskset -c 1``, ``OMP_NUM_THREADS=1``),
a planned resnet trains at half of plain training's predicted activations under glibc
with the fixed mmap threshold (what ``bench`` runs), no calibration; after two warm-up
steps and ``malloc_trim``, one step runs under a dispatch mode that, after every aten
op, reads the RSS and, whenever the RSS is the highest so far, ``/proc/self/smaps``
and glibc's ``mallinfo2``.  At that peak op the growth over the step's baseline is
split into:

* **new mappings**: anonymous mappings created during the step (glibc's mmapped
  chunks: tensors of at least the 1 MiB threshold; their transparent huge pages);
* **heap**: the resident growth of ``[heap]`` (blocks below the threshold and
  anything glibc served from free heap chunks), beside what glibc says is in use
  there (``mallinfo2().uordblks`` growth) and the heap's size growth (``arena``);
* **other**: the rest (existing mappings, stacks, libraries).

``live tensors`` is what the plan counts: bytes of storages created by aten ops in
the step and alive at the peak op (the profiler's ``LiveBytes``).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/step_overhead_anatomy.py

Writes bench/results/step_overhead_anatomy.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20
CASES = ["resnet18:1:224", "resnet18:4:192", "resnet18:2:500", "resnet50:8:224"]


class _MallInfo2(ctypes.Structure):
    _names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in _names.split()]


def _mallinfo() -> tuple[int, int]:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return m.arena, m.uordblks


def _smaps() -> dict[tuple[int, int, str], dict[str, int]]:
    out: dict[tuple[int, int, str], dict[str, int]] = {}
    cur: tuple[int, int, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                a, b = (int(x, 16) for x in parts[0].split("-"))
                cur = (a, b, parts[5] if len(parts) > 5 else "")
                out[cur] = {}
            elif cur is not None and parts[0] in ("Rss:", "AnonHugePages:"):
                out[cur][parts[0][:-1]] = int(parts[1]) * 1024
    return out


def anatomy(arch: str, batch: int, image: int, cache: Path) -> dict:
    from waggle_trainer.learn.overhead_probe import half_budget_spec
    from waggle_trainer.learn.planned_training import (
        PlannedTraining,
        RssSampler,
    )
    from waggle_trainer.remat import allocator
    from waggle_trainer.remat.profiler import LiveBytes

    spec, plain = half_budget_spec(arch, batch, image, cache, 10)
    t = PlannedTraining.build(spec)

    class Peak(LiveBytes):
        def __init__(self, base: int) -> None:
            super().__init__()
            self.base, self.best, self.snap = base, 0, None
            self.live_at, self.malloc_at = 0, (0, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            rss = rss_sampler.current()
            if rss > self.best:
                self.best, self.snap = rss, _smaps()
                self.live_at, self.malloc_at = self.live, _mallinfo()
            return out

    with RssSampler() as rss_sampler:
        for _ in range(2):
            t.step(*t.batch())
        allocator.trim()
        x, y = t.batch()
        before = _smaps()
        base = rss_sampler.reset()
        m0 = _mallinfo()
        with Peak(base) as peak:
            t.step(x, y)
        sampled = rss_sampler.peak - base
    assert peak.snap is not None
    new = heap = other = huge = 0
    for k in set(before) | set(peak.snap):
        a, b = before.get(k, {}), peak.snap.get(k, {})
        d = b.get("Rss", 0) - a.get("Rss", 0)
        if k[2] == "[heap]":
            heap += d
        elif k not in before and k[2] == "":
            new += d
            huge += b.get("AnonHugePages", 0)
        else:
            other += d
    return {
        "case": f"{arch}:{batch}:{image}",
        "plain": plain,
        "predicted": t.chain.plan.predicted_peak_bytes if t.chain.plan else 0,
        "sampled_growth": sampled,
        "peak_op_growth": peak.best - base,
        "live_tensors": peak.live_at,
        "new_mappings": new,
        "new_mappings_huge": huge,
        "heap": heap,
        "heap_in_use": peak.malloc_at[1] - m0[1],
        "heap_size": peak.malloc_at[0] - m0[0],
        "other": other,
    }


def main() -> int:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the command line does
    from waggle_trainer import lean_import

    lean_import.install()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=CASES, metavar="ARCH:BATCH:IMAGE")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from bench.provenance import provenance, results_path

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="anatomy-"))
    rows = []
    for case in args.cases:
        arch, batch, image = case.split(":")
        rows.append(anatomy(arch, int(batch), int(image), cache))
        print(rows[-1], file=sys.stderr)
    lines = [
        "# What a planned step's growth beyond the prediction consists of",
        "",
        *provenance(torch.get_num_threads(), "glibc, fixed 1 MiB mmap threshold (mmap mode)."),
        "",
        "One step per case at half of plain's predicted activations, no calibration; the "
        "split is taken at the aten op after which the RSS was highest (MiB over the "
        "step's baseline after `malloc_trim`). See the script's docstring.",
        "",
        "| case | plan's predicted peak | measured growth (sampled) | at the peak op "
        "| live tensors | new mappings (of it THP) | heap resident | heap in use "
        "| heap size | other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['predicted'] / MiB:.1f} | {r['sampled_growth'] / MiB:.1f} "
            f"| {r['peak_op_growth'] / MiB:.1f} | {r['live_tensors'] / MiB:.1f} "
            f"| {r['new_mappings'] / MiB:.1f} ({r['new_mappings_huge'] / MiB:.0f}) "
            f"| {r['heap'] / MiB:.1f} | {r['heap_in_use'] / MiB:+.1f} "
            f"| {r['heap_size'] / MiB:+.1f} | {r['other'] / MiB:+.1f} |"
        )
    path = results_path("step_overhead_anatomy", "md", partial=args.cases != CASES)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
