"""Predictions without calibration: a planned step's measured memory growth against the
growth predicted before its first step (the plan's peak + the machine's step model).

Per allocator (default glibc; ``--allocators glibc tcmalloc jemalloc``):

1. the machine probe (``python -m waggle_trainer.learn.overhead_probe --machine``,
   a few small resnet18 runs in fresh processes) fits the step model once and caches it
   in the cache directory, as ``bench`` does on a machine's first run;
2. every case of the grid (default resnet18/resnet50 x batch 1/8 x 224/500 px) runs in
   a fresh process, ``waggle-trainer bench --strategy optimal --budget B --steps N
   --no-calibrate --json``, with a cache holding the profiles and the step model but no
   record of that configuration, so the plan is made from the model's prediction alone.
   ``B`` is half of plain training's predicted activations, raised to the smallest
   budget the prediction says fits (minimum feasible plan + predicted overhead) when
   half is below it (the table says so).

Verdicts (issue 11): ``within 10%`` of the predicted growth; else ``within budget +
5 MiB`` (the bar for small plans); else ``missed``.  Every process is pinned with
``taskset -c CPU`` and runs ``--threads`` threads (``OMP_NUM_THREADS``).

    .venv/bin/python bench/predictions.py                   # glibc, the whole grid
    .venv/bin/python bench/predictions.py --allocators glibc tcmalloc jemalloc
    .venv/bin/python bench/predictions.py --cases resnet18:1:224 --allocators tcmalloc

Writes bench/results/predictions.{md,json} (``predictions-partial.*`` for a restricted
grid; ``--append`` keeps the other allocators' tables of an earlier run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, results_path  # noqa: E402

MiB = 2**20
GRID = [f"{a}:{b}:{i}" for a in ("resnet18", "resnet50") for b in (1, 8) for i in (224, 500)]
TOLERANCE = 0.10
SMALL_SLACK = 5 * MiB


def _env(allocator: str, threads: int) -> dict[str, str]:
    from waggle_trainer.remat.allocator import plan_preload

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LD_PRELOAD"))}
    base.pop("WAGGLE_PRELOADED", None)
    base.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    plan = plan_preload(allocator, base)
    if plan.note:
        raise SystemExit(plan.note)
    return plan.env if plan.env is not None else base


def _run(argv: list[str], env: dict[str, str], cpu: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["taskset", "-c", cpu, sys.executable, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=7200,
    )


def plain_and_minimum(case: str, cache: Path, env: dict, cpu: str) -> tuple[int, int]:
    """Plain training's predicted activations and the smallest feasible plan (profiles
    the case into ``cache`` on first use)."""
    arch, batch, image = case.split(":")
    p = _run(
        ["-m", "waggle_trainer", "plan", "--arch", arch, "--batch", batch, "--image", image]
        + ["--budget", "64GiB", "--json", "--cache-dir", str(cache)],
        env,
        cpu,
    )
    if p.returncode != 0:
        raise SystemExit(f"plan {case} failed ({p.returncode}): {p.stderr[-2000:]}")
    d = json.loads(p.stdout)
    return d["strategies"]["none"]["predicted_peak_bytes"], d["min_feasible_bytes"]


def probe(cache: Path, env: dict, cpu: str, threads: int, allocator: str) -> dict:
    p = _run(
        ["-m", "waggle_trainer.learn.overhead_probe", "--machine", "--allocator", allocator]
        + ["--cache-dir", str(cache), "--threads", str(threads)],
        env,
        cpu,
    )
    if p.returncode != 0:
        raise SystemExit(f"probe failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout)


def run_case(
    case: str, budget: int, steps: int, cache: Path, env: dict, cpu: str, allocator: str
) -> dict:
    """One fresh ``bench`` process with the profiles and the step model, no record of
    this configuration; its JSON (or why it refused)."""
    arch, batch, image = case.split(":")
    fresh = Path(tempfile.mkdtemp(prefix="pred-cache-"))
    try:
        for f in [*cache.glob("profile-*.json"), *cache.glob("machine-*.json")]:
            shutil.copy(f, fresh / f.name)
        t0 = time.time()
        p = _run(
            ["-m", "waggle_trainer", "bench", "--arch", arch, "--batch", batch]
            + ["--image", image, "--strategy", "optimal", "--budget", str(budget)]
            + ["--steps", str(steps), "--no-calibrate", "--json", "--cache-dir", str(fresh)]
            + ["--allocator", allocator],
            env,
            cpu,
        )
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    if p.returncode in (0, 1) and "{" in p.stdout:
        out = json.loads(p.stdout[p.stdout.index("{") :])
        out["wall_s"] = time.time() - t0
        return out
    return {"refused": (p.stderr.strip().splitlines() or ["no output"])[-1], "code": p.returncode}


def verdict(r: dict) -> tuple[str, float | None]:
    if "refused" in r:
        return "refused", None
    predicted, growth = r["predicted_growth_bytes"], r["peak_rss_growth_bytes"]
    error = (growth - predicted) / predicted
    if abs(error) <= TOLERANCE:
        return "within 10%", error
    if growth <= r["budget_bytes"] + SMALL_SLACK:
        return "within budget + 5 MiB", error
    return "missed", error


def markdown(header: list[str], blocks: list[dict]) -> str:
    out = [
        "# Predicted vs measured step growth, no calibration (issue 11, item 2)",
        "",
        *header,
        "",
        "Each row is a fresh `waggle-trainer bench --strategy optimal --budget B --steps "
        "N --no-calibrate --json` process whose cache holds the profiles and the machine's "
        "step model, but no record of its own configuration: the plan is made before the "
        "first step for B minus the predicted step overhead. Predicted growth = the plan's "
        "predicted peak + the predicted overhead; measured = the largest RSS growth of a "
        "measured step over the baseline after the warm-up step. Verdict: within 10% of "
        "the prediction, else within the budget + 5 MiB (small plans), else missed. "
        "(raised): half of plain's activations is below the smallest plan plus the "
        "predicted overhead, where bench refuses before its first step, so B is that sum.",
        "",
    ]
    for b in blocks:
        pts = ", ".join(f"{s / MiB:.0f} MiB: {o / MiB:.1f}" for s, o in b["model"]["points"])
        k = b["model"]["key"]
        probed = (
            f"torch {k['torch']}, {k['threads']} thread(s), allocator {k['allocator']} "
            f"({k['allocator_mode']} mode), THP_MEM_ALLOC_ENABLE={k['huge_pages'] or 'unset'}"
        )
        out += [
            f"## {b['allocator']}",
            "",
            *b.get("header", []),
            "",
            f"Step model ({probed}), probed in {b['probe_s']:.0f} s; points "
            f"(plain's predicted activations: measured step overhead, MiB): {pts}.",
            "",
            "| case | plain MiB | budget B MiB | plan peak MiB | + overhead MiB "
            "| predicted growth MiB | measured growth MiB | error | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in b["cases"]:
            r = c["result"]
            raised = " (raised)" if c["raised"] else ""
            head = (
                f"| {c['case']} | {c['plain_bytes'] / MiB:.0f} "
                f"| {c['budget_bytes'] / MiB:.0f}{raised} "
            )
            if "refused" in r:
                out.append(head + f"| - | - | - | - | - | refused: {r['refused']} |")
                continue
            out.append(
                head
                + f"| {r['predicted_peak_bytes'] / MiB:.1f} | {r['overhead_step_bytes'] / MiB:.1f} "
                f"| {r['predicted_growth_bytes'] / MiB:.1f} "
                f"| {r['peak_rss_growth_bytes'] / MiB:.1f} | {100 * c['error']:+.1f}% "
                f"| {c['verdict']} |"
            )
        counts: dict[str, int] = {}
        for c in b["cases"]:
            counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
        out += ["", "Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=GRID, metavar="ARCH:BATCH:IMAGE")
    ap.add_argument("--allocators", nargs="+", default=["glibc"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu", default="1", help="taskset -c CPU for every process (default 1)")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".bench-cache")
    ap.add_argument("--out", default=None, help="results file stem (default by the run)")
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the tables of other allocators already in the results file",
    )
    args = ap.parse_args()
    from waggle_trainer.remat.overhead import StepModel

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    partial = args.cases != GRID
    note = (
        f"Every process pinned to CPU {args.cpu} (`taskset -c {args.cpu}`), "
        f"OMP_NUM_THREADS={args.threads}; budget B = {args.fraction} x plain's predicted "
        f"activations; {args.steps} measured steps after 1 warm-up step."
    )
    md = results_path("predictions", "md", partial=partial, out=args.out and f"{args.out}.md")

    kept: list[dict] = []
    if args.append and md.with_suffix(".json").exists():
        old = json.loads(md.with_suffix(".json").read_text())
        kept = [b for b in old["allocators"] if b["allocator"] not in args.allocators]

    def write(blocks: list[dict]) -> None:
        """The tables so far (rewritten after every case: a long run keeps its rows)."""
        header = provenance(args.threads, note, load_before=load_before)
        blocks = [*kept, *({**b, "header": header} for b in blocks)]
        md.write_text(markdown(header, blocks) + "\n")
        data = {"header": header, "allocators": blocks}
        md.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")

    load_before = os.getloadavg()[0]
    blocks: list[dict] = []
    for name in args.allocators:
        env = _env(name, args.threads)
        # a probe per run: an old model in the cache is replaced, not reused
        for f in args.cache_dir.glob("machine-*.json"):
            data = json.loads(f.read_text())
            if data["key"].get("allocator") == name:
                f.unlink()
        t0 = time.time()
        model = probe(args.cache_dir, env, args.cpu, args.threads, name)
        probe_s = time.time() - t0
        step = StepModel(tuple((s, o) for s, o in model["points"]))
        print(f"{name}: step model {model['points']} ({probe_s:.0f} s)", file=sys.stderr)
        cases = []
        for case in args.cases:
            plain, lowest = plain_and_minimum(case, args.cache_dir, env, args.cpu)
            half = int(args.fraction * plain)
            need = lowest + step.predict(plain)
            budget = max(half, need)
            r = run_case(case, budget, args.steps, args.cache_dir, env, args.cpu, name)
            v, err = verdict(r)
            cases.append(
                {
                    "case": case,
                    "plain_bytes": plain,
                    "min_feasible_bytes": lowest,
                    "budget_bytes": budget,
                    "raised": budget > half,
                    "verdict": v,
                    "error": err,
                    "result": r,
                }
            )
            print(f"  {case}: {v} ({'' if err is None else f'{100 * err:+.1f}%'})", file=sys.stderr)
            write(
                [*blocks, {"allocator": name, "model": model, "probe_s": probe_s, "cases": cases}]
            )
        blocks.append({"allocator": name, "model": model, "probe_s": probe_s, "cases": cases})
        write(blocks)
    print(f"wrote {md} and {md.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
