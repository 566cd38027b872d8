"""How small a memory cgroup can planned training of resnet50 (batch 8, 224 px) live in?

Each run is ``waggle-trainer bench --arch resnet50 --batch 8 --image 224 --steps 1
--json`` in a fresh memory cgroup (``tests/cgroup_util.py``), as
``tests/remat/test_cgroup_fit.py`` does:

1. plain training (``--strategy none --budget 16GiB``) without a limit: its cgroup
   peak is the reference;
2. per allocator, two measuring runs (``--fused-step``, no limit), at ``--budget
   240MiB`` and at the smallest plan's budget (``plan --json``'s minimum), record the
   step overhead, the first step's residue and each plan's growth beside the profile
   (``remat/overhead.py``), as a node's first runs of a configuration do;
3. at each fraction of the reference: plain training, then ``--strategy optimal
   --budget auto --fused-step --safety-margin M`` (under each allocator, for each
   margin); result, cgroup peak, and how the automatic budget was derived.

    .venv/bin/python bench/cgroup_fit.py --cpu 1     # 60/50/45 %, glibc, jemalloc, tcmalloc
    .venv/bin/python bench/cgroup_fit.py --fractions 0.5 --allocators glibc

``--cpu N`` pins every run to that core (``taskset``: one thread).  Writes
bench/results/cgroup_fit_runs.md, or cgroup_fit_runs-partial.md when fractions or
allocators or margins are restricted (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, results_path  # noqa: E402
from tests.cgroup_util import cgroup_unavailable_reason, run_in_memory_cgroup  # noqa: E402

MiB = 2**20
FRACTIONS = [0.6, 0.5, 0.45]
ALLOCATORS = ["glibc", "jemalloc", "tcmalloc"]
MARGINS = [0.1, 0.05]  # --safety-margin: the default, and what the 50% test uses


def bench_argv(cache: Path, cpu: int | None, *extra: str, command: str = "bench") -> list[str]:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    steps = ["--steps", "1"] if command == "bench" else []
    return [
        *pin,
        sys.executable,
        "-m",
        "waggle_trainer",
        command,
        "--arch",
        "resnet50",
        "--batch",
        "8",
        "--image",
        "224",
        *steps,
        "--json",
        "--cache-dir",
        str(cache),
        *extra,
    ]


def run(argv: list[str], limit: int | None) -> dict:
    r = run_in_memory_cgroup(argv, limit, timeout=1800, cwd=ROOT)
    out: dict = {"rc": r.returncode, "oom": r.oom_killed, "peak": r.peak_bytes}
    try:
        out["json"] = json.loads(r.stdout)
    except ValueError:
        out["json"] = None
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("waggle-trainer")]
    out["message"] = lines[-1] if lines else ""
    return out


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def outcome(r: dict) -> str:
    if r["oom"]:
        return "**OOM-killed**"
    if r["rc"] == 0:
        return "fits"
    if "below the minimum feasible" in r["message"]:
        return "refused in one line"
    return f"exit {r['rc']}: {r['message'][:120]}"


def accounting(r: dict) -> str:
    j = r["json"]
    if not j:
        return r["message"].replace("waggle-trainer bench: ", "")[:160]
    b = j["budget_breakdown"]
    to_come = b["training_state_bytes"] - b["training_state_resident_bytes"]
    return (
        f"free {mib(b['free_bytes'])} - margin {mib(b['safety_margin_bytes'])} - state to come "
        f"{mib(to_come)} - residue {mib(b['reserve_bytes'])} = {mib(j['budget_bytes'])}; "
        f"step overhead {mib(j['overhead_step_bytes'])}; plan {mib(j['predicted_peak_bytes'])} "
        f"(min {mib(j['min_feasible_bytes'])}); first-step residue here "
        f"{mib(j['first_step_residue_bytes'])}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    ap.add_argument("--allocators", nargs="+", default=ALLOCATORS)
    ap.add_argument("--margins", type=float, nargs="+", default=MARGINS)
    ap.add_argument("--cpu", type=int, default=None, help="pin every run to this core")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    partial = (
        args.fractions != FRACTIONS or args.allocators != ALLOCATORS or args.margins != MARGINS
    )
    out = results_path("cgroup_fit_runs", "md", partial=partial, out=args.out)
    reason = cgroup_unavailable_reason()
    if reason:
        print(f"cgroup_fit: {reason}", file=sys.stderr)
        return 2
    cache = Path(tempfile.mkdtemp(prefix="cgroup-fit-"))
    try:
        plain_argv = bench_argv(cache, args.cpu, "--strategy", "none", "--budget", "16GiB")
        plain = run(plain_argv, None)
        need = plain["peak"]
        if plain["rc"] != 0 or not need:
            print(f"cgroup_fit: plain training failed: {plain['message']}", file=sys.stderr)
            return 1
        print(f"plain training's cgroup peak: {mib(need)} MiB", flush=True)
        rows = [f"| plain, no limit | - | glibc | fits | {mib(need)} | |"]
        plan = run(
            bench_argv(cache, args.cpu, "--fused-step", "--budget", "1GiB", command="plan"), None
        )
        lowest = plan["json"]["min_feasible_bytes"]
        for alloc in args.allocators:
            for budget in (str(lowest), "240MiB"):  # the smallest plan first: see the doc
                m = run(
                    bench_argv(
                        cache, args.cpu, "--fused-step", "--budget", budget, "--allocator", alloc
                    ),
                    None,
                )
                j = m["json"] or {}
                rows.append(
                    f"| measuring run (`--budget {budget}`), no limit | - | {alloc} | "
                    f"{'done' if j else outcome(m)} | {mib(m['peak'])} | first-step residue "
                    f"{mib(j.get('first_step_residue_bytes'))}, step growth "
                    f"{mib(j.get('peak_rss_growth_bytes'))} over a plan of "
                    f"{mib(j.get('predicted_peak_bytes'))} |"
                )
                print(rows[-1], flush=True)
        for f in args.fractions:
            limit = int(f * need)
            killed = run(plain_argv, limit)
            rows.append(
                f"| plain | {f:.0%} ({mib(limit)}) | glibc | {outcome(killed)} | "
                f"{mib(killed['peak'])} | |"
            )
            print(rows[-1], flush=True)
            for alloc in args.allocators:
                for margin in args.margins:
                    fused = run(
                        bench_argv(
                            cache,
                            args.cpu,
                            "--strategy",
                            "optimal",
                            "--fused-step",
                            "--budget",
                            "auto",
                            "--safety-margin",
                            str(margin),
                            "--allocator",
                            alloc,
                        ),
                        limit,
                    )
                    rows.append(
                        f"| `--budget auto --fused-step --safety-margin {margin}` | "
                        f"{f:.0%} ({mib(limit)}) | {alloc} | {outcome(fused)} | "
                        f"{mib(fused['peak'])} | {accounting(fused)} |"
                    )
                    print(rows[-1], flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    threads = 1 if args.cpu is not None else 2
    text = "\n".join(
        [
            "# resnet50 b8 224 in a memory cgroup: runs (bench/cgroup_fit.py)",
            "",
            *provenance(threads),
            "",
            "MiB; peak = the cgroup's peak charge (v1 `memory.max_usage_in_bytes`, "
            "v2 `memory.peak`).",
            "",
            "| run | limit | allocator | result | peak | accounting |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
