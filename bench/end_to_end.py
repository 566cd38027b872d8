"""End to end, as a user runs it: plain training vs planned training, one process each.

For each case (default: resnet50 batch 8 224 px and resnet18 batch 8 500 px) and an
activation budget of half of plain training's predicted activation memory, runs in
fresh processes, alternating (A B C ... A B C ...) so machine noise hits all alike:

* ``plain``: ``waggle-trainer bench --strategy none`` under glibc's defaults (what a
  node with memory to spare runs; the reference of every ratio);
* ``planned/<allocator>``: ``waggle-trainer bench --strategy optimal --budget B``
  under glibc with the fixed mmap threshold (``glibc``) and under each preloadable
  allocator that is installed (``jemalloc``, ``tcmalloc``, ``mimalloc``: the command
  line re-executes itself with ``LD_PRELOAD`` and their retention settings);
  ``planned/tcmalloc`` is the default (tcmalloc with the executor's release hook),
  ``planned/tcmalloc-keep`` the same without the hook (tcmalloc keeps what it frees);
* ``planned+fused/<allocator>``: the same with the optimiser step fused into the
  backward (``--fused-step``) under the allocator named by ``--fused-allocator``;
* ``torch-ckpt``: ``torch.utils.checkpoint.checkpoint_sequential`` at its best
  segment count for the same budget (the fastest segmentation whose predicted peak
  fits, from this project's ``sequential`` planner), same allocator settings as
  ``planned/glibc`` (otherwise its savings are not real), in a child of this script.

Every process takes 1 warm-up step (plus calibration where the run does it) and
``--steps`` measured steps; the table gives medians over rounds of each process's
median step, its CPU seconds per step (user + kernel, from ``getrusage``: far less
sensitive than wall time to other processes on a shared machine), the kernel's share
and the page faults (the allocator's tax), the peak RSS and the RSS growth of a step
over the process's baseline.
The header records CPU, threads, commit, command and the load average before and
after (the machine is shared: read ratios, not absolute times, when it is loaded).

    .venv/bin/python bench/end_to_end.py                       # 2 rounds, 3 steps
    .venv/bin/python bench/end_to_end.py --rounds 1 --cases resnet50:8:224

Writes bench/results/end_to_end.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
MiB = 2**20


# ------------------------------------------------------------------ child: torch's own


def torch_child(arch: str, batch: int, image: int, segments: int, steps: int) -> dict:
    """Train with ``checkpoint_sequential(segments)``; the same measurements as ``bench``."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the command line does
    from waggle_trainer.remat import allocator

    allocator.configure_allocator("mmap")
    import torch
    from torch.utils.checkpoint import checkpoint_sequential

    from waggle_trainer.learn.planned_training import RssSampler, StepUsage
    from waggle_trainer.remat.chain import build_resnet, chain_stages

    torch.manual_seed(0)
    model = build_resnet(arch, 1000).train()
    seq = torch.nn.Sequential(*chain_stages(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> float:
        x = torch.randn(batch, 3, image, image)
        y = torch.randint(0, 1000, (batch,))
        opt.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        out = checkpoint_sequential(seq, segments, x, use_reentrant=False)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        return time.perf_counter() - t0

    times = []
    usage = StepUsage()
    with RssSampler() as rss:
        step()  # warm-up: gradients and momentum become resident
        allocator.trim()
        baseline = rss.reset()
        for _ in range(steps):
            with usage:
                times.append(step())
        peak = rss.peak
    return {
        "median_step_s": statistics.median(times),
        "peak_rss_bytes": peak,
        "peak_rss_growth_bytes": peak - baseline,
        "segments": segments,
        "allocator": allocator.loaded_allocator(),
        "allocator_mode": "mmap",
        "cpu_s_per_step": usage.cpu_s / steps,
        "sys_s_per_step": usage.sys_s / steps,
        "page_faults_per_step": usage.faults / steps,
    }


# ------------------------------------------------------------------ parent


def plan_case(arch: str, batch: int, image: int, fraction: float, cache: Path) -> dict:
    """Budget (fraction of plain's predicted activations) and torch's best segment count."""
    from waggle_trainer.learn.planned_training import profiled_resnet
    from waggle_trainer.remat.planner import InfeasibleBudget, Planner

    _, _, costs = profiled_resnet(arch, 1000, batch, image, cache)
    planner = Planner(costs)
    plain = planner.plan(10**15, "none").predicted_peak_bytes
    budget = max(int(fraction * plain), planner.min_feasible_budget("optimal"))
    try:
        segments = planner.plan(budget, "sequential").detail["segments"]
    except InfeasibleBudget:
        segments = None
    return {"plain_predicted_bytes": plain, "budget_bytes": budget, "segments": segments}


def configs(case: dict, allocators: list[str], fused_allocator: str | None) -> list[tuple]:
    """(name, bench arguments or None for torch's own, extra environment) per run."""
    from waggle_trainer.remat.allocator import SLACK_ENV, find_allocator

    budget = str(case["budget_bytes"])
    planned = ["--strategy", "optimal", "--budget", budget]
    out = [("plain", ["--strategy", "none", "--budget", "16GiB", "--allocator", "glibc"], {})]
    for name in allocators:
        if name != "glibc" and find_allocator(name) is None:
            print(f"skipping {name}: not installed", file=sys.stderr)
            continue
        out.append((f"planned/{name}", [*planned, "--allocator", name], {}))
        if name == "tcmalloc":  # the same without the release hook: what it keeps
            out.append(
                ("planned/tcmalloc-keep", [*planned, "--allocator", name], {SLACK_ENV: "off"})
            )
    if fused_allocator:
        out.append(
            (
                f"planned+fused/{fused_allocator}",
                [*planned, "--allocator", fused_allocator, "--fused-step"],
                {},
            )
        )
    if case["segments"]:
        out.append(("torch-ckpt", None, {}))
    return out


def run_one(
    name: str,
    extra: list[str] | None,
    env_add: dict[str, str],
    arch: str,
    batch: int,
    image: int,
    steps: int,
    segments: int | None,
    cache: Path,
) -> dict:
    # Each process starts as the first run on this machine: the profile, but no overhead
    # measured by an earlier run (which would change its plan: see remat/overhead.py).
    fresh = Path(tempfile.mkdtemp(prefix="e2e-cache-"))
    for f in Path(cache).glob("profile-*.json"):
        shutil.copy(f, fresh / f.name)
    cache = fresh
    if extra is None:
        argv = [
            sys.executable,
            __file__,
            "--child-torch",
            arch,
            str(batch),
            str(image),
            str(segments),
            str(steps),
        ]
    else:
        argv = [
            sys.executable,
            "-m",
            "waggle_trainer",
            "bench",
            "--arch",
            arch,
            "--batch",
            str(batch),
            "--image",
            str(image),
            "--steps",
            str(steps),
            "--json",
            "--cache-dir",
            str(cache),
            *extra,
        ]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "LD_PRELOAD", "TCMALLOC_", "MIMALLOC_", "WAGGLE_"))
    }
    env.update(env_add)
    t0 = time.time()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    # exit 1 with a result: the run finished but a step outgrew the budget (recorded)
    if p.returncode not in (0, 1) or "{" not in p.stdout:
        raise SystemExit(f"{name} failed ({p.returncode}): {p.stderr[-2000:]}")
    shutil.rmtree(fresh, ignore_errors=True)
    out = json.loads(p.stdout[p.stdout.index("{") :])
    out["wall_s"] = time.time() - t0
    return out


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    plain = statistics.median(r["median_step_s"] for r in runs["plain"])
    plain_cpu = statistics.median(r["cpu_s_per_step"] for r in runs["plain"])
    rows = {}
    for name, rs in runs.items():
        step = statistics.median(r["median_step_s"] for r in rs)
        cpu = statistics.median(r["cpu_s_per_step"] for r in rs)
        rows[name] = {
            "step_s": step,
            "steps_s": [r["median_step_s"] for r in rs],
            "ratio": step / plain,
            "cpu_s": cpu,
            "cpu_ratio": cpu / plain_cpu,
            "sys_s": statistics.median(r["sys_s_per_step"] for r in rs),
            "faults": statistics.median(r["page_faults_per_step"] for r in rs),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs),
            "growth_bytes": statistics.median(r["peak_rss_growth_bytes"] for r in rs),
            "predicted_bytes": rs[0].get("predicted_peak_bytes"),
            "allocator": rs[0].get("allocator"),
            "allocator_mode": rs[0].get("allocator_mode"),
            "segments": rs[0].get("segments"),
            "budget_kept": all(r.get("budget_kept", True) for r in rs),
        }
    return rows


def markdown(header: list[str], cases: list[dict]) -> str:
    out = ["# End to end: plain vs planned training, one process each", "", *header, ""]
    for c in cases:
        out += [
            f"## {c['arch']} batch {c['batch']}, {c['image']} px: budget "
            f"{c['budget_bytes'] / MiB:.0f} MiB "
            f"({c['budget_bytes'] / c['plain_predicted_bytes']:.2f} of plain's predicted "
            f"{c['plain_predicted_bytes'] / MiB:.0f} MiB)",
            "",
            "| run | allocator (mode) | median step s (per round) | x plain "
            "| CPU s per step (x plain) | of it kernel s | page faults per step | peak RSS MiB "
            "| step growth MiB (predicted) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in c["rows"].items():
            pred = f" ({r['predicted_bytes'] / MiB:.0f})" if r["predicted_bytes"] else ""
            seg = f", {r['segments']} segments" if r.get("segments") else ""
            mode = f" ({r['allocator_mode']})" if r["allocator"] == "glibc" else ""
            over = "" if r["budget_kept"] else ", over budget"
            out.append(
                f"| {name}{seg} | {r['allocator']}{mode} "
                f"| {r['step_s']:.2f} ({', '.join(f'{s:.2f}' for s in r['steps_s'])}) "
                f"| {r['ratio']:.2f} | {r['cpu_s']:.2f} ({r['cpu_ratio']:.2f}) "
                f"| {r['sys_s']:.2f} | {r['faults']:.0f} | {r['peak_rss_bytes'] / MiB:.0f} "
                f"| {r['growth_bytes'] / MiB:.0f}{pred}{over} |"
            )
        out.append("")
    return "\n".join(out)


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for ax, c in zip(axes[0], cases, strict=True):
        for name, r in c["rows"].items():
            ax.scatter(r["peak_rss_bytes"] / MiB, r["ratio"], s=40)
            ax.scatter(
                r["peak_rss_bytes"] / MiB,
                r["cpu_ratio"],
                s=40,
                facecolors="none",
                edgecolors="grey",
            )
            ax.annotate(
                name,
                (r["peak_rss_bytes"] / MiB, r["ratio"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.axhline(1.25, color="grey", lw=0.8, ls="--")
        ax.set_title(
            f"{c['arch']} b{c['batch']} {c['image']}px, budget {c['budget_bytes'] / MiB:.0f} MiB"
        )
        ax.set_xlabel("peak RSS of the process (MiB)")
        ax.set_ylabel("step time / plain (filled: wall, hollow: CPU)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-torch":
        arch, batch, image, segments, steps = sys.argv[2:7]
        print(json.dumps(torch_child(arch, int(batch), int(image), int(segments), int(steps))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cases",
        nargs="+",
        default=["resnet50:8:224", "resnet18:8:500"],
        metavar="ARCH:BATCH:IMAGE",
    )
    ap.add_argument(
        "--fraction",
        type=float,
        default=0.5,
        help="activation budget as a fraction of plain's predicted (default 0.5)",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--allocators", nargs="+", default=["glibc", "jemalloc", "tcmalloc", "mimalloc"]
    )
    ap.add_argument(
        "--fused-allocator", default="glibc", help="allocator of the fused-step run ('' skips it)"
    )
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".bench-cache")
    ap.add_argument("--out", default="end_to_end", help="results file stem in bench/results/")
    args = ap.parse_args()
    import torch

    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cases = []
    for spec in args.cases:
        arch, batch, image = spec.split(":")
        batch, image = int(batch), int(image)
        case = {
            "arch": arch,
            "batch": batch,
            "image": image,
            **plan_case(arch, batch, image, args.fraction, args.cache_dir),
        }
        todo = configs(case, args.allocators, args.fused_allocator or None)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in todo}
        for rnd in range(args.rounds):
            for name, extra, env_add in todo:
                r = run_one(
                    name,
                    extra,
                    env_add,
                    arch,
                    batch,
                    image,
                    args.steps,
                    case["segments"],
                    args.cache_dir,
                )
                runs[name].append(r)
                print(
                    f"{spec} round {rnd} {name}: {r['median_step_s']:.2f} s, "
                    f"{r['cpu_s_per_step']:.2f} CPU s, peak "
                    f"{r['peak_rss_bytes'] / MiB:.0f} MiB ({r['wall_s']:.0f} s wall)",
                    flush=True,
                )
        case["rows"] = summarise(runs)
        case["runs"] = runs
        cases.append(case)
        write(args, cases, load_before, started, torch)  # after each case: partial results
    return 0


def write(args, cases: list[dict], load_before, started: str, torch) -> None:
    load_after = os.getloadavg()
    from bench.provenance import commit
    from waggle_trainer.common import cpu_model

    header = [
        f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- commit: {commit()}, run {started}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} CPUs, {platform.machine()}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        f"- load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/"
        f"{load_before[2]:.2f}, after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}",
        f"- {args.rounds} rounds of alternating fresh processes, {args.steps} measured steps each "
        "after 1 warm-up step; ratios against `plain` of the same case; CPU seconds and "
        "page faults from getrusage over the measured steps (the process's every thread)",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = markdown(header, cases)
    print(text)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"header": header, "cases": cases}, indent=1)
    )
    plot(cases, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / args.out}.md, .json, .png", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
