"""Probe this machine's step overhead once, so that a configuration's first run plans
right without calibration (:class:`waggle_trainer.remat.overhead.StepModel`).

The probe trains a few small resnet18 configurations (:data:`PROBE`), each in a fresh
process under this process's allocator (the environment, ``LD_PRELOAD`` included, is
inherited), thread count and huge-page setting, at half of plain training's predicted
activations, with no calibration; each gives one point: its activation scale (plain
training's predicted peak) and its step overhead (measured growth beyond the plan's
prediction).  The model is cached in the profile directory, keyed by
:func:`machine_key`.

    python -m waggle_trainer.learn.overhead_probe --machine --cache-dir DIR [--threads N]
        probe this machine under the allocator of the environment; the model as JSON
    python -m waggle_trainer.learn.overhead_probe ARCH BATCH IMAGE --cache-dir DIR
        one probe point as JSON (what :func:`probe_machine` runs per point)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

from waggle_trainer.common import DEFAULT_CLASSES
from waggle_trainer.remat.overhead import StepModel, load_step_model, save_step_model

log = logging.getLogger(__name__)

#: (arch, batch, image): activation scales from 11 to about 160 MiB, where the
#: overhead has reached its highest on the x86-64 test machine
#: (bench/results/predictions.md).  None of them is a configuration of that
#: benchmark's grid.  Each runs :data:`PROBE_REPEATS` times (the largest counts).
PROBE: tuple[tuple[str, int, int], ...] = (
    ("resnet18", 1, 64),
    ("resnet18", 1, 128),
    ("resnet18", 1, 160),
    ("resnet18", 4, 192),
    ("resnet18", 8, 192),
)
PROBE_REPEATS = 2
PROBE_STEPS = 4


def machine_key(allocator_mode: str) -> dict:
    """What a probe's result holds for: this machine, torch, threads, allocator."""
    import torch

    from waggle_trainer.common import cpu_model
    from waggle_trainer.remat import allocator

    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": allocator.loaded_allocator(),
        "allocator_mode": allocator_mode,
        "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        # the release hook changes what a reusing allocator keeps (allocator.release_hook)
        "release_slack": os.environ.get(allocator.SLACK_ENV, ""),
    }


def activation_scale(costs) -> int:
    """Plain training's predicted peak for ``costs``: the scale the model is indexed by."""
    from waggle_trainer.remat.planner import Planner

    return Planner(costs).plan(2**62, "none").predicted_peak_bytes


def half_budget_spec(arch: str, batch: int, image: int, cache_dir: Path, classes: int):
    """``(RunSpec, scale)``: a planned run at half of plain's predicted activations (at
    least the smallest plan) with no overhead known before it, and that scale."""
    from waggle_trainer.learn.planned_training import RunSpec, profiled_resnet
    from waggle_trainer.remat.planner import Planner

    _, _, costs = profiled_resnet(arch, classes, batch, image, cache_dir)
    scale = activation_scale(costs)
    budget = max(scale // 2, Planner(costs).min_feasible_budget("optimal"))
    spec = RunSpec(
        arch=arch,  # type: ignore[arg-type]
        batch=batch,
        image=image,
        budget=budget,
        cache_dir=cache_dir,
        known_overhead=False,
    )
    return spec, scale


def probe_point(arch: str, batch: int, image: int, cache_dir: Path) -> dict:
    """One planned run at half of plain's predicted activations, no calibration, no
    overhead known before it; ``{"scale", "predicted", "growth", "overhead"}`` bytes."""
    from waggle_trainer.learn.planned_training import PlannedTraining, measure

    spec, scale = half_budget_spec(arch, batch, image, cache_dir, DEFAULT_CLASSES)
    r = measure(PlannedTraining.build(spec), PROBE_STEPS, calibrate=False)
    overhead = max(0, r.peak_rss_growth_bytes - r.predicted_peak_bytes)
    return {
        "arch": arch,
        "batch": batch,
        "image": image,
        "scale": scale,
        "predicted": r.predicted_peak_bytes,
        "growth": r.peak_rss_growth_bytes,
        "overhead": overhead,
        "allocator": r.allocator,
        "allocator_mode": r.allocator_mode,
    }


def probe_machine(
    cache_dir: Path,
    allocator_mode: str,
    points: tuple[tuple[str, int, int], ...] = PROBE,
    repeats: int = PROBE_REPEATS,
) -> StepModel | None:
    """Run ``points`` (default :data:`PROBE`) ``repeats`` times each in fresh processes,
    fit and cache the model (None: no point could be measured; logged)."""
    import torch

    key = machine_key(allocator_mode)
    log.info(
        "measuring this machine's step overhead once (%d small runs, cached in %s)",
        len(points) * repeats,
        cache_dir,
    )
    measured = []
    for arch, batch, image in [p for p in points for _ in range(repeats)]:
        argv = [
            sys.executable,
            "-m",
            "waggle_trainer.learn.overhead_probe",
            arch,
            str(batch),
            str(image),
            "--cache-dir",
            str(cache_dir),
            "--threads",
            str(torch.get_num_threads()),
        ]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        try:
            point = json.loads(p.stdout)
        except ValueError:
            point = None
        if p.returncode != 0 or point is None:
            log.warning(
                "overhead probe %s batch %d %d px failed (exit %d): %s",
                arch,
                batch,
                image,
                p.returncode,
                p.stderr.strip().splitlines()[-1:] or "no output",
            )
            continue
        if point["allocator"] != key["allocator"] or point["allocator_mode"] != allocator_mode:
            log.warning(
                "overhead probe ran under %s (%s), not %s (%s): point dropped",
                point["allocator"],
                point["allocator_mode"],
                key["allocator"],
                allocator_mode,
            )
            continue
        measured.append((point["scale"], point["overhead"]))
    if not measured:
        return None
    model = StepModel.fit(measured)
    save_step_model(cache_dir, key, model)
    return model


def step_model(cache_dir: Path | None, allocator_mode: str, *, probe: bool) -> StepModel | None:
    """The cached model for this machine; with ``probe``, measured now if missing."""
    if cache_dir is None:
        return None
    key = machine_key(allocator_mode)
    model = load_step_model(cache_dir, key)
    if model is None and probe:
        model = probe_machine(cache_dir, allocator_mode)
    return model


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the command line does
    from waggle_trainer import lean_import

    lean_import.install()
    ap = argparse.ArgumentParser(prog="python -m waggle_trainer.learn.overhead_probe")
    ap.add_argument("--machine", action="store_true", help="probe the machine, cache the model")
    ap.add_argument("arch", nargs="?", default="resnet18")
    ap.add_argument("batch", nargs="?", type=int, default=1)
    ap.add_argument("image", nargs="?", type=int, default=64)
    ap.add_argument("--cache-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--points",
        nargs="+",
        default=None,
        metavar="ARCH:BATCH:IMAGE",
        help="with --machine: the configurations probed (default: PROBE)",
    )
    ap.add_argument("--repeats", type=int, default=PROBE_REPEATS, help="runs per point")
    ap.add_argument(
        "--allocator",
        default=None,
        help="with --machine: the malloc to probe (default: the training default, "
        "loaded by re-executing with LD_PRELOAD as the command line does)",
    )
    args = ap.parse_args(argv)
    if args.machine:
        # measured, and keyed, for the allocator training runs under (re-executing
        # this probe with LD_PRELOAD before torch is imported, as the command line does)
        from waggle_trainer.remat import allocator

        allocator.reexec_under(
            args.allocator or allocator.DEFAULT_ALLOCATOR,
            sys.argv[1:] if argv is None else None,
            module="waggle_trainer.learn.overhead_probe",
        )
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.machine:
        print(json.dumps(probe_point(args.arch, args.batch, args.image, args.cache_dir)))
        return 0
    from waggle_trainer.remat import allocator

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mode = allocator.DEFAULT_MODE  # what a checkpointing plan runs with
    points = PROBE
    if args.points:
        points = tuple((a, int(b), int(i)) for a, b, i in (p.split(":") for p in args.points))
    model = probe_machine(args.cache_dir, mode, points, args.repeats)
    if model is None:
        print("overhead probe: no point could be measured", file=sys.stderr)
        return 1
    print(json.dumps({"key": machine_key(mode), "points": [list(p) for p in model.points]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
