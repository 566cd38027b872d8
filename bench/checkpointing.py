"""Checkpointing strategies side by side: measured step time and peak memory.

For each case (architecture, batch, image size) and budgets from the minimum
feasible to no checkpointing, runs real training steps of: plain training (none),
PyTorch's ``checkpoint_sequential`` for each segment count, and this project's
``sequential``, ``revolve`` and ``optimal`` plans.  Configurations are interleaved
(A B C A B C ...) in one process so machine noise hits them alike; step time is
reported relative to plain training measured in the same run.

Memory is the RSS growth of the process during a step over its level just before
the step (sampled every millisecond), with the allocator configured as the daemon
does (``remat.allocator.configure_allocator``), so freed activations go back to
the kernel and each step's peak is its own.

    .venv/bin/python bench/checkpointing.py             # r18, r50 at b1/b8, 224/500 px
                                                        # (r50 b8 500 px only via --cases)
    .venv/bin/python bench/checkpointing.py --quick     # r18, r50 at b8, 224 px
    .venv/bin/python bench/checkpointing.py --cases resnet101:8:224

Writes bench/results/checkpointing.{md,json,png} for the full run; a run restricted
by --cases, --quick, --archs or --end-to-end-rounds 0 writes checkpointing-partial.*
instead, so that it never replaces the committed full results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI does, before torch is imported

from waggle_trainer.remat.allocator import configure_allocator, trim  # noqa: E402

configure_allocator()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint_sequential  # noqa: E402

from bench.provenance import provenance, results_path  # noqa: E402
from waggle_trainer.common import STRATEGIES  # noqa: E402
from waggle_trainer.learn.planned_training import RssSampler, profiled_resnet  # noqa: E402
from waggle_trainer.remat.executor import run_schedule  # noqa: E402
from waggle_trainer.remat.planner import InfeasibleBudget, Planner  # noqa: E402

DEFAULT_ARCHS = ["resnet18", "resnet50"]
MiB = 2**20


@dataclass
class Config:
    label: str
    kind: str  # none | torch | plan
    budget: int | None = None
    schedule: tuple | None = None
    segments: int | None = None
    predicted_peak: int | None = None
    predicted_ratio: float | None = None
    times: list[float] = field(default_factory=list)
    growth: list[int] = field(default_factory=list)


def budgets_for(planner: Planner, fractions: list[float]) -> list[int]:
    """Budgets as fractions of plain training's predicted activation peak, from the
    minimum feasible one up."""
    none_peak = planner.plan(10**15, "none").predicted_peak_bytes
    low = planner.min_feasible_budget("optimal")
    out = {low}
    for f in fractions:
        b = int(f * none_peak)
        if b > low:
            out.add(b)
    return sorted(out)


def build_configs(
    planner: Planner, n_stages: int, fractions: list[float], segments: list[int]
) -> list[Config]:
    configs = [Config("none", "none")]
    for k in segments:
        if k < n_stages:
            configs.append(Config(f"torch-seq k={k}", "torch", segments=k))
    seen = set()
    for budget in budgets_for(planner, fractions):
        for strategy in [s for s in reversed(STRATEGIES) if s != "none"]:
            try:
                p = planner.plan(budget, strategy)
            except InfeasibleBudget:
                continue
            if p.schedule in seen and strategy != "optimal":
                continue
            seen.add(p.schedule)
            configs.append(
                Config(
                    f"{strategy} @{budget / MiB:.0f}MiB",
                    "plan",
                    budget=budget,
                    schedule=p.schedule,
                    predicted_peak=p.predicted_peak_bytes,
                    predicted_ratio=p.time_ratio,
                )
            )
    return configs


def one_step(
    cfg: Config,
    model: nn.Module,
    stages: list[nn.Module],
    opt,
    batch: int,
    image: int,
    classes: int,
    sampler: RssSampler,
) -> None:
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, classes, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    opt.zero_grad(set_to_none=False)
    trim()
    base = sampler.reset()
    t0 = time.perf_counter()
    if cfg.kind == "none":
        out = model(x)
    elif cfg.kind == "torch":
        out = checkpoint_sequential(nn.Sequential(*stages), cfg.segments, x, use_reentrant=False)
    else:
        out = run_schedule(stages, cfg.schedule, x)
    loss_fn(out, y).backward()
    opt.step()
    cfg.times.append(time.perf_counter() - t0)
    cfg.growth.append(sampler.peak - base)
    del out, x, y


def run_case(
    arch: str, batch: int, image: int, reps: int, fractions, segments, cache: Path
) -> dict:
    torch.manual_seed(0)
    classes = 1000
    model, stages, costs = profiled_resnet(arch, classes, batch, image, cache)
    planner = Planner(costs)
    configs = build_configs(planner, len(stages), fractions, segments)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with RssSampler() as sampler:
        for cfg in configs:  # warm-up: grads and momentum buffers exist afterwards
            one_step(cfg, model, stages, opt, batch, image, classes, sampler)
            cfg.times.clear()
            cfg.growth.clear()
        for _ in range(reps):
            for cfg in configs:
                one_step(cfg, model, stages, opt, batch, image, classes, sampler)
    base_t = statistics.median(configs[0].times)
    rows = []
    for cfg in configs:
        t = statistics.median(cfg.times)
        g = statistics.median(cfg.growth)
        rows.append(
            {
                "config": cfg.label,
                "kind": cfg.kind,
                "budget_bytes": cfg.budget,
                "segments": cfg.segments,
                "predicted_peak_bytes": cfg.predicted_peak,
                "predicted_ratio": cfg.predicted_ratio,
                "median_step_s": t,
                "time_ratio": t / base_t,
                "peak_growth_bytes": g,
                "max_growth_bytes": max(cfg.growth),
                "growth_vs_predicted": (g / cfg.predicted_peak) if cfg.predicted_peak else None,
            }
        )
    none_pred = planner.plan(10**15, "none").predicted_peak_bytes
    rows[0]["predicted_peak_bytes"] = none_pred
    rows[0]["growth_vs_predicted"] = rows[0]["peak_growth_bytes"] / none_pred
    return {
        "arch": arch,
        "batch": batch,
        "image": image,
        "reps": reps,
        "min_feasible_bytes": planner.min_feasible_budget("optimal"),
        "none_predicted_bytes": none_pred,
        "rows": rows,
    }


def fmt_mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.0f}"


def markdown(cases: list[dict], header: bool = True) -> str:
    out = (
        [
            "# Checkpointing benchmark",
            "",
            *provenance(torch.get_num_threads()),
            "",
            "Time ratio = median step time / plain training's, measured interleaved in the "
            "same run; growth = RSS peak during a step over the level before it (MiB).",
            "",
        ]
        if header
        else []
    )
    for c in cases:
        out += [
            f"## {c['arch']}, batch {c['batch']}, {c['image']} px ({c['reps']} interleaved reps)",
            "",
            f"plain training predicted activations {fmt_mib(c['none_predicted_bytes'])} MiB; "
            f"minimum feasible budget (optimal) {fmt_mib(c['min_feasible_bytes'])} MiB",
            "",
            "| config | budget MiB | predicted peak MiB | measured growth MiB | growth / predicted "
            "| predicted time ratio | measured time ratio | median step s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            gp = "-" if r["growth_vs_predicted"] is None else f"{r['growth_vs_predicted']:.2f}"
            pr = "-" if r["predicted_ratio"] is None else f"{r['predicted_ratio']:.2f}"
            out.append(
                f"| {r['config']} | {fmt_mib(r['budget_bytes'])} "
                f"| {fmt_mib(r['predicted_peak_bytes'])} "
                f"| {fmt_mib(r['peak_growth_bytes'])} | {gp} | {pr} | {r['time_ratio']:.2f} "
                f"| {r['median_step_s']:.3f} |"
            )
        out.append("")
    return "\n".join(out)


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cases)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    styles = {
        "none": ("k", "*"),
        "torch": ("tab:gray", "x"),
        "sequential": ("tab:blue", "s"),
        "revolve": ("tab:orange", "^"),
        "optimal": ("tab:green", "o"),
    }
    for ax, c in zip(axes.flat, cases, strict=False):  # more axes than cases
        for key, (color, marker) in styles.items():
            pts = [
                r
                for r in c["rows"]
                if (r["kind"] if r["kind"] != "plan" else r["config"].split()[0]) == key
            ]
            if pts:
                ax.scatter(
                    [r["peak_growth_bytes"] / MiB for r in pts],
                    [r["time_ratio"] for r in pts],
                    c=color,
                    marker=marker,
                    label=key if key != "torch" else "torch checkpoint_sequential",
                )
        ax.set_title(f"{c['arch']} b{c['batch']} {c['image']}px")
        ax.set_xlabel("measured peak memory growth per step (MiB)")
        ax.set_ylabel("step time / plain")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def end_to_end(arch: str, fraction: float, rounds: int, steps: int, cache: Path) -> dict:
    """Plain training (its own process, glibc defaults: what a node that needs no
    checkpointing runs) against ``waggle-trainer bench`` at ``fraction`` of plain's
    activation memory (fixed mmap threshold), in alternating fresh processes."""
    _, _, costs = profiled_resnet(arch, 1000, 8, 224, cache)
    planner = Planner(costs)
    none_peak = planner.plan(10**15, "none").predicted_peak_bytes
    budget = max(int(fraction * none_peak), planner.min_feasible_budget("optimal"))
    runs = {"plain": [], "optimal": []}
    argv = [
        sys.executable,
        "-m",
        "waggle_trainer",
        "bench",
        "--arch",
        arch,
        "--batch",
        "8",
        "--image",
        "224",
        "--steps",
        str(steps),
        "--json",
        "--cache-dir",
        str(cache),
    ]
    for _ in range(rounds):
        for name, extra in (
            ("plain", ["--strategy", "none", "--budget", "16GiB"]),
            ("optimal", ["--strategy", "optimal", "--budget", str(budget)]),
        ):
            out = subprocess.run(
                argv + extra,
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
                env={**os.environ},
            )
            runs[name].append(json.loads(out.stdout))
    med = {k: statistics.median(r["median_step_s"] for r in v) for k, v in runs.items()}
    grow = {k: statistics.median(r["peak_rss_growth_bytes"] for r in v) for k, v in runs.items()}
    return {
        "arch": arch,
        "budget_bytes": budget,
        "fraction_of_plain": budget / none_peak,
        "plain_predicted_bytes": none_peak,
        "plain_step_s": med["plain"],
        "optimal_step_s": med["optimal"],
        "time_ratio": med["optimal"] / med["plain"],
        "plain_growth_bytes": grow["plain"],
        "optimal_growth_bytes": grow["optimal"],
        "optimal_predicted_bytes": runs["optimal"][0]["predicted_peak_bytes"],
        "allocators": {k: v[0]["allocator_mode"] for k, v in runs.items()},
    }


def end_to_end_markdown(rows: list[dict]) -> str:
    out = [
        "## End to end: planned training vs plain training, separate processes",
        "",
        "Plain training runs with glibc's defaults (fastest, what a node that needs no "
        "checkpointing runs); the planned run at about half of plain's activation memory runs "
        "with the fixed mmap "
        "threshold that makes its savings real. Alternating fresh processes (A B A B), medians.",
        "",
        "| arch b8 224 | budget MiB (x plain) | plain step s | planned step s | time ratio "
        "| plain growth MiB | planned growth MiB (predicted) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['arch']} | {fmt_mib(r['budget_bytes'])} ({r['fraction_of_plain']:.2f}) "
            f"| {r['plain_step_s']:.3f} | {r['optimal_step_s']:.3f} | {r['time_ratio']:.2f} "
            f"| {fmt_mib(r['plain_growth_bytes'])} | {fmt_mib(r['optimal_growth_bytes'])} "
            f"({fmt_mib(r['optimal_predicted_bytes'])}) |"
        )
    return "\n".join(out) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="only resnet18 and resnet50 at batch 8, 224 px"
    )
    ap.add_argument("--archs", nargs="+", default=DEFAULT_ARCHS)
    ap.add_argument("--cases", nargs="+", metavar="ARCH:BATCH:IMAGE", help="e.g. resnet101:8:224")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".bench-cache")
    ap.add_argument(
        "--end-to-end-rounds",
        type=int,
        default=2,
        help="rounds of the plain-vs-planned process comparison (0 skips it)",
    )
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    fractions = [0.3, 0.5, 0.7, 1.0]
    segments = [2, 3, 4, 6, 8]
    if args.cases:
        grid = [(a, int(b), int(s)) for a, b, s in (c.split(":") for c in args.cases)]
    elif args.quick:
        grid = [(a, 8, 224) for a in args.archs]
    else:  # resnet50 at batch 8 and 500 px (~1 min a step here) only when asked with --cases
        grid = [
            (a, b, s)
            for a in args.archs
            for b in (1, 8)
            for s in (224, 500)
            if not (a != "resnet18" and b == 8 and s == 500)
        ]
    cases = []
    for arch, batch, image in grid:
        t0 = time.time()
        reps = args.reps if batch * image * image <= 8 * 224 * 224 else max(1, args.reps - 1)
        c = run_case(arch, batch, image, reps, fractions, segments, args.cache_dir)
        cases.append(c)
        print(markdown([c], header=False), flush=True)
        print(f"({time.time() - t0:.0f} s)\n", flush=True)
    e2e = (
        [end_to_end(a, 0.5, args.end_to_end_rounds, 3, args.cache_dir) for a in args.archs]
        if args.end_to_end_rounds > 0
        else []
    )
    if e2e:
        print(end_to_end_markdown(e2e), flush=True)
    partial = is_partial(args)
    md, js, png = (
        results_path("checkpointing", ext, partial=partial) for ext in ("md", "json", "png")
    )
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(markdown(cases) + "\n" + (end_to_end_markdown(e2e) if e2e else ""))
    js.write_text(json.dumps({"cases": cases, "end_to_end": e2e}, indent=1))
    plot(cases, png)
    print(f"wrote {md}, {js.name}, {png.name}")
    return 0


def is_partial(args: argparse.Namespace) -> bool:
    """A run restricted by options: its results must not replace the full table."""
    return bool(
        args.cases or args.quick or args.archs != DEFAULT_ARCHS or args.end_to_end_rounds == 0
    )


if __name__ == "__main__":
    raise SystemExit(main())
