"""Residual blocks as stages, or split at their convolutions: the smallest plan, and the
plan's predicted peak beside a real step's.

For each architecture and granularity (``block``: one stage per residual block;
``conv``: each block split at its convolutions, the identity carried beside the main
tensor as a second one): the number of stages, plain training's predicted peak, the
smallest feasible plan and the stage whose backward sets it.  With ``--measure``, one
real training step (SGD, batch of random data) of the chain under the smallest plan
and under the plan for half of plain training's peak, its peak of live tensors
measured at the aten level (the profiler's ``LiveBytes``: the planner's units, no
allocator slack), beside the plan's prediction (both without the input batch).

    .venv/bin/python bench/granularity.py [--archs resnet18,resnet50] [--batch 8]
        [--image 224] [--measure] [--cache-dir DIR]

Prints the table and writes ``bench/results/granularity.md`` (``-partial`` for other
archs or shapes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, results_path, write_report  # noqa: E402

MiB = 2**20
ARCHS = ("resnet18", "resnet50")


def binding_stage(costs) -> str:
    """The stage whose F-all + backward alone needs the most (input, its checkpoint,
    tape, both gradients and transients): what the smallest plan cannot go below."""
    x = costs.sizes()
    n = len(costs)
    worst, name = -1, ""
    for j, s in enumerate(costs.stages):
        after = x[n] if j + 1 < n else 0  # delta[n] lives through the backward
        need = (x[j] if j else 0) + s.saved_bytes + x[j + 1] + x[j] + s.backward_peak_bytes + after
        if need > worst:
            worst, name = need, s.name
    return name


def measured_peak(chain, shape) -> int:
    """Peak live tensor bytes of one step of ``chain`` (gradients already resident)."""
    import torch
    import torch.nn.functional as F

    from waggle_trainer.remat.profiler import LiveBytes

    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    for p in chain.parameters():
        p.grad = torch.zeros_like(p)
    live = LiveBytes()
    with live:
        F.cross_entropy(chain(x), y).backward()
    return live.peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--measure", action="store_true", help="also run one step per plan")
    ap.add_argument("--cache-dir", type=Path, default=None, help="profile cache")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    archs = [s for s in a.archs.split(",") if s]

    import torch

    from waggle_trainer.remat.chain import build_resnet
    from waggle_trainer.remat.executor import CheckpointedSequential
    from waggle_trainer.remat.planner import Planner

    shape = (a.batch, 3, a.image, a.image)
    rows = [
        "| arch | granularity | stages | carried skips | plain peak | smallest plan | "
        "set by | plan (budget) | predicted | measured | meas/pred |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    t0 = time.time()
    for arch in archs:
        for granularity in ("block", "conv"):
            torch.manual_seed(0)
            model = build_resnet(arch, 10).train()
            chain = CheckpointedSequential(
                model,
                budget_bytes=1 << 40,
                sample_input=torch.empty(*shape),
                cache_dir=a.cache_dir,
                granularity=granularity,
            )
            costs = chain.costs
            assert costs is not None
            planner = Planner(costs)
            plain, low = planner.min_feasible_budget("none"), planner.min_feasible_budget()
            head = (
                f"| {arch} | {granularity} | {len(costs)} | {len(costs.carried)} | "
                f"{plain / MiB:.1f} MiB | {low / MiB:.1f} MiB | {binding_stage(costs)} |"
            )
            budgets = [("smallest", low), ("plain / 2", max(low, plain // 2))]
            for label, budget in budgets if a.measure else budgets[:1]:
                plan = chain.replan(budget)
                assert plan is not None
                predicted = plan.predicted_peak_bytes - costs.input_bytes
                if a.measure:
                    measured = measured_peak(chain, shape)
                    cells = f"{measured / MiB:.1f} MiB | {measured / predicted:.3f}"
                else:
                    cells = "- | -"
                rows.append(
                    f"{head} {label} ({budget / MiB:.1f} MiB) | {predicted / MiB:.1f} MiB | "
                    f"{cells} |"
                )
                head = "| | | | | | | |"
    partial = tuple(archs) != ARCHS or (a.batch, a.image) != (8, 224)
    lines = [
        "# Residual blocks as stages, or split at their convolutions",
        "",
        *provenance(torch.get_num_threads()),
        "",
        f"Batch {a.batch}, {a.image} px, fp32, optimal strategy.  Peaks include activations, "
        "tapes, gradients of activations and transients, not the input batch, parameters, "
        "their gradients or optimiser state.  *Set by*: the stage whose forward-all and "
        "backward alone need the most, the floor of every plan.  *Measured*: one real step "
        "under that plan, peak of live tensors at the aten level (no allocator slack, no "
        "oneDNN scratch).",
        "",
        *rows,
        "",
        f"({time.time() - t0:.0f} s)",
    ]
    write_report(results_path("granularity", "md", partial=partial, out=a.out), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
