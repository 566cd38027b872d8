"""What the torch runtime keeps resident before and after the first training step.

Runs, in fresh processes (each in a fresh memory cgroup when one can be created, else
just the process), the start of a planned training run step by step and records the
process's anonymous RSS (and the cgroup's charge) after: Python, ``import torch``,
``import torchvision``, the model, the first training step, a later step.  Twice:
with TorchDynamo and sympy left out (``waggle_trainer.lean_import``, the default) and
with the ordinary imports (``WAGGLE_FULL_IMPORT=1``).  The first step's residue is what the
process keeps after it beyond the optimiser state it created (and the gradients, when
unfused): what ``remat/overhead.py`` reserves.

    .venv/bin/python bench/runtime_memory.py                  # resnet50 b8 224, fused SGD
    .venv/bin/python bench/runtime_memory.py --arch resnet18 --batch 1 --image 64

Writes bench/results/runtime_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, write_report  # noqa: E402

MiB = 2**20

CHILD = r"""
import json, os, re, sys, time
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
rows = []
def mark(stage):
    st = open("/proc/self/status").read()
    anon = int(re.search(r"RssAnon:\s+(\d+)", st).group(1)) * 1024
    charge = None
    try:
        from waggle_trainer.remat.budget import read_cgroup_memory
        cg = read_cgroup_memory()
        charge = cg.levels[0].usage_bytes if cg else None
    except Exception:
        pass
    rows.append({"stage": stage, "anon": anon, "charge": charge,
                 "sympy": "sympy" in sys.modules,
                 "dynamo": "torch._dynamo" in sys.modules and not getattr(
                     sys.modules["torch._dynamo"], "__doc__", "") .startswith("stand-in")})
mark("python")
from waggle_trainer import lean_import
lean_import.install()  # what the command line does first (WAGGLE_FULL_IMPORT=1: nothing)
import torch
mark("import torch")
import torchvision
mark("import torchvision")
from pathlib import Path
from waggle_trainer.learn.planned_training import PlannedTraining, RunSpec
from waggle_trainer.remat import allocator
arch, batch, image, budget, cache, fused = sys.argv[1:7]
spec = RunSpec(arch=arch, batch=int(batch), image=int(image), budget=int(budget),
               cache_dir=Path(cache), fused_step=fused == "1")
t = PlannedTraining.build(spec)
allocator.trim()
mark("model, plan")
t.step(*t.batch())
allocator.trim()
mark("first step")
t.step(*t.batch())
allocator.trim()
mark("second step")
created = t.state_bytes_created_by_first_step()
print(json.dumps({"rows": rows, "state_created": created,
                  "predicted_peak": t.chain.plan.predicted_peak_bytes}))
"""


def run(args, full_import: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WAGGLE_FULL_IMPORT"}
    if full_import:
        env["WAGGLE_FULL_IMPORT"] = "1"
    argv = [
        sys.executable,
        "-c",
        CHILD,
        args.arch,
        str(args.batch),
        str(args.image),
        str(args.budget_mib * MiB),
        str(args.cache_dir),
        "1" if args.fused else "0",
    ]
    try:
        from tests.cgroup_util import cgroup_unavailable_reason, run_in_memory_cgroup

        if cgroup_unavailable_reason() is None:
            r = run_in_memory_cgroup(argv, None, env=env, timeout=1800, cwd=ROOT)
            if r.returncode != 0:
                raise SystemExit(r.stderr[-2000:])
            return json.loads(r.stdout.strip().splitlines()[-1])
    except ImportError:
        pass
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--budget-mib", type=int, default=240)
    ap.add_argument("--unfused", dest="fused", action="store_false")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".bench-cache")
    args = ap.parse_args()
    results = {name: run(args, full) for name, full in (("lean", False), ("full", True))}
    lines = [
        "# Runtime memory: what a training process keeps besides its tensors",
        "",
        *provenance(
            None,
            f"{args.arch} batch {args.batch} {args.image} px, SGD momentum, "
            f"{'fused step' if args.fused else 'unfused step'}, budget {args.budget_mib} MiB.",
        ),
        "",
        "Anonymous RSS (the cgroup's charge) in MiB after each stage; 'lean' leaves "
        "TorchDynamo and sympy out (`waggle_trainer.lean_import`, default), 'full' imports "
        "as usual (`WAGGLE_FULL_IMPORT=1`).",
        "",
        "| stage | lean | full | difference |",
        "|---|---|---|---|",
    ]
    for a, b in zip(results["lean"]["rows"], results["full"]["rows"], strict=True):

        def fmt(r):
            charge = f" ({r['charge'] / MiB:.0f})" if r["charge"] is not None else ""
            return f"{r['anon'] / MiB:.0f}{charge}"

        lines.append(
            f"| {a['stage']} | {fmt(a)} | {fmt(b)} | {(b['anon'] - a['anon']) / MiB:.0f} |"
        )
    lines.append("")
    for name, r in results.items():
        rows = {x["stage"]: x["anon"] for x in r["rows"]}
        residue = rows["first step"] - rows["model, plan"] - r["state_created"]
        lines.append(
            f"- {name}: the first step left {residue / MiB:.0f} MiB resident beyond the "
            f"{r['state_created'] / MiB:.0f} MiB of optimiser state it created; "
            f"TorchDynamo loaded at the end: {r['rows'][-1]['dynamo']}, "
            f"sympy: {r['rows'][-1]['sympy']}"
        )
    write_report(ROOT / "bench" / "results" / "runtime_memory.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
