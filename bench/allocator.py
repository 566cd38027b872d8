"""Does checkpointing lower a CPU training process's memory? Allocator settings compared.

For each (architecture, variant, allocator configuration) a fresh subprocess builds
the model (weights=None), runs ``--steps`` SGD-momentum training steps on fresh
random data, and reports:

* ``rss_growth``: peak RSS (``VmHWM``) minus RSS just before the first step
  (after import, model and optimiser construction);
* ``cg_peak``: the peak charge of a fresh memory cgroup the process ran in
  (``memory.max_usage_in_bytes``), what decides an OOM kill (needs root; else -);
* ``step_s``: median step time of steps 2..N (step 1 allocates gradients and
  momentum buffers).

Variants: ``plain`` (no checkpointing); ``ckpt``, this project's
``CheckpointedSequential`` with the ``sequential`` strategy at ``--fraction`` of
plain training's predicted activation peak (or its minimum feasible budget, if
higher); ``torch-ckpt``, ``torch.utils.checkpoint.checkpoint_sequential`` with
``--segments`` segments (``use_reentrant=False``).  Configurations run interleaved,
round by round, and are reported as ratios to plain training under glibc's defaults
in the same round (medians over rounds), because step times vary by up to 30%
between processes here.

    .venv/bin/python bench/allocator.py --arch resnet18 resnet50 --rounds 2 --steps 5

Writes ``bench/results/allocator.md`` for the default set of architectures,
variants and configurations, else ``allocator-partial.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, results_path, write_report  # noqa: E402

MB = 2**20

VARIANTS = ("plain", "ckpt", "torch-ckpt")
DEFAULT_ARCHS = ["resnet18", "resnet50"]

# name -> (environment, in-process mode, trim after each step)
CONFIGS: dict[str, dict] = {
    "glibc": {},
    "env-mmap128k": {"env": {"MALLOC_MMAP_THRESHOLD_": "131072"}},
    "mallopt-128k": {"mallopt": 128 << 10},
    "mallopt-1m": {"mallopt": 1 << 20},
    "mallopt-4m": {"mallopt": 4 << 20},
    "arena2": {"env": {"MALLOC_ARENA_MAX": "2"}},
    "trim": {"trim": True},
    "jemalloc": {"jemalloc": ""},
    "jemalloc-decay0": {"jemalloc": "dirty_decay_ms:0,muzzy_decay_ms:0"},
    "jemalloc-nodecay": {"jemalloc": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
}


# ------------------------------------------------------------------ worker


def _flat_resnet(arch: str):
    import torch.nn as nn
    import torchvision

    m = getattr(torchvision.models, arch)(weights=None)
    # The stem ReLU is in-place: a recomputed segment starting right after it
    # would fail in backward, so it is replaced by an out-of-place one.
    return nn.Sequential(
        m.conv1,
        m.bn1,
        nn.ReLU(inplace=False),
        m.maxpool,
        *m.layer1,
        *m.layer2,
        *m.layer3,
        *m.layer4,
        m.avgpool,
        nn.Flatten(1),
        m.fc,
    )


def worker(args) -> None:
    import psutil
    import torch
    import torch.nn.functional as F

    from waggle_trainer.remat import allocator
    from waggle_trainer.remat.memory import peak_rss_bytes

    cfg = CONFIGS[args.config]
    if cfg.get("mallopt"):
        allocator.configure_allocator("mmap", mmap_threshold=cfg["mallopt"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _flat_resnet(args.arch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    forward = model
    impl = "plain"
    if args.variant == "ckpt":
        from waggle_trainer.remat.executor import CheckpointedSequential
        from waggle_trainer.remat.planner import Planner

        x0 = torch.empty(args.batch, 3, args.image, args.image)
        chain = CheckpointedSequential(
            model, budget_bytes=2**62, strategy="sequential", sample_input=x0
        )
        plain_peak = chain.plan.baseline_peak_bytes
        lowest = Planner(chain.costs).min_feasible_budget("sequential")
        plan = chain.replan(max(int(args.fraction * plain_peak), lowest))
        forward = chain
        impl = (
            f"CheckpointedSequential(sequential, {plan.detail['segments']} segments, "
            f"{plan.budget_bytes / plain_peak:.2f}x plain's predicted peak)"
        )
    elif args.variant == "torch-ckpt":
        from torch.utils.checkpoint import checkpoint_sequential

        def forward(x):
            return checkpoint_sequential(model, args.segments, x, use_reentrant=False)

        impl = f"checkpoint_sequential({args.segments})"

    proc = psutil.Process()
    rss_base = proc.memory_info().rss
    times = []
    for _ in range(args.steps):
        x = torch.randn(args.batch, 3, args.image, args.image)
        y = torch.randint(0, 1000, (args.batch,))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        del loss, x, y
        if cfg.get("trim"):
            allocator.trim()
    peak = peak_rss_bytes()
    print(
        json.dumps(
            {
                "rss_base": rss_base,
                "rss_peak": peak,
                "rss_growth": peak - rss_base,
                "step_s": statistics.median(times[1:] if len(times) > 1 else times),
                "impl": impl,
            }
        )
    )


# ------------------------------------------------------------------ driver


def _env_for(name: str) -> dict[str, str]:
    from waggle_trainer.remat.allocator import allocator_env

    cfg = CONFIGS[name]
    env = dict(os.environ)
    for k in (
        "LD_PRELOAD",
        "MALLOC_CONF",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_ARENA_MAX",
    ):
        env.pop(k, None)
    env.update(cfg.get("env", {}))
    if "jemalloc" in cfg:
        env.update(allocator_env("default", jemalloc=True, jemalloc_conf=cfg["jemalloc"] or None))
    env["OMP_NUM_THREADS"] = "2"
    return env


def _in_cgroup(argv: list[str], env: dict[str, str]):
    """Run ``argv`` in a fresh memory cgroup (needs root), or None where there is none."""
    from tests.cgroup_util import CgroupUnavailable, run_in_memory_cgroup

    try:
        return run_in_memory_cgroup(argv, None, env=env, timeout=900)
    except CgroupUnavailable:
        return None


def run_one(arch, variant, config, a) -> dict:
    argv = [
        sys.executable,
        __file__,
        "--worker",
        "--arch",
        arch,
        "--variant",
        variant,
        "--config",
        config,
        "--batch",
        str(a.batch),
        "--image",
        str(a.image),
        "--steps",
        str(a.steps),
        "--segments",
        str(a.segments),
        "--threads",
        str(a.threads),
        "--fraction",
        str(a.fraction),
    ]
    env = _env_for(config)
    cg_peak = None
    r = _in_cgroup(argv, env)
    if r is not None:
        rc, out, err, cg_peak = r.returncode, r.stdout, r.stderr, r.peak_bytes
    else:
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        rc, out, err = p.returncode, p.stdout, p.stderr
    if rc != 0:
        raise RuntimeError(f"{arch} {variant} {config} failed ({rc}): {err[-2000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["cg_peak"] = cg_peak
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arch", nargs="+", default=DEFAULT_ARCHS)
    ap.add_argument("--variant", default="plain", choices=VARIANTS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument(
        "--fraction",
        type=float,
        default=0.5,
        help="ckpt: budget as a fraction of plain training's predicted peak",
    )
    ap.add_argument("--config", default="glibc", choices=list(CONFIGS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="results file (default: see the module doc)")
    a = ap.parse_args()
    if a.worker:
        a.arch = a.arch[0]
        worker(a)
        return 0

    results: dict[tuple, list[dict]] = {}
    for rnd in range(a.rounds):
        for arch in a.arch:
            for config in a.configs:
                for variant in a.variants:
                    r = run_one(arch, variant, config, a)
                    r["round"] = rnd
                    results.setdefault((arch, variant, config), []).append(r)
                    print(
                        f"round {rnd} {arch:9s} {variant:10s} {config:16s} "
                        f"growth {r['rss_growth'] / MB:7.0f} MB  "
                        f"peak {r['rss_peak'] / MB:7.0f} MB  "
                        f"cg {(r['cg_peak'] or 0) / MB:7.0f} MB  step {r['step_s']:.3f} s  "
                        f"[{r['impl']}]",
                        flush=True,
                    )

    def med(key, rs):
        vals = [r[key] for r in rs if r[key] is not None]
        return statistics.median(vals) if vals else None

    def ratio(arch, variant, config, key):
        # per round, against glibc plain of the same round, then the median
        ref = {r["round"]: r for r in results.get((arch, "plain", "glibc"), [])}
        vals = [
            r[key] / ref[r["round"]][key]
            for r in results[(arch, variant, config)]
            if r["round"] in ref and r[key] and ref[r["round"]][key]
        ]
        return statistics.median(vals) if vals else None

    lines = [
        f"# Allocator settings vs. checkpointing (batch {a.batch}, {a.image} px, "
        f"{a.threads} threads, {a.steps} steps, {a.rounds} rounds, interleaved)",
        "",
        *provenance(a.threads),
        "",
        "Ratios are to plain training under glibc defaults in the same round (median over rounds).",
        *[
            f"{v} = "
            + ", ".join(sorted({r["impl"] for k, rs in results.items() if k[1] == v for r in rs}))
            + "."
            for v in a.variants
            if v != "plain"
        ],
        "",
        "| arch | variant | allocator | RSS growth MB | x | cgroup peak MB | x | step s | x |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in a.arch:
        for variant in a.variants:
            for config in a.configs:
                rs = results[(arch, variant, config)]
                g, c, s = med("rss_growth", rs), med("cg_peak", rs), med("step_s", rs)
                rg, rc, rs_ = (
                    ratio(arch, variant, config, k) for k in ("rss_growth", "cg_peak", "step_s")
                )
                f = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"
                lines.append(
                    f"| {arch} | {variant} | {config} | {f(g / MB)} | {f(rg, 2)} | "
                    f"{f(c / MB if c else None)} | {f(rc, 2)} | {f(s, 3)} | {f(rs_, 2)} |"
                )
    print()
    partial = a.arch != DEFAULT_ARCHS or a.configs != list(CONFIGS) or a.variants != list(VARIANTS)
    write_report(results_path("allocator", "md", partial=partial, out=a.out), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
