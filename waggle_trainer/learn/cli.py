"""Subcommands that measure training: ``plan`` and ``bench`` (``run`` is the node daemon:
:mod:`waggle_trainer.node.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from waggle_trainer.common import (
    ARCHES,
    DEFAULT_CLASSES,
    GRANULARITIES,
    IMAGE_SIZE_MAX,
    IMAGE_SIZE_MIN,
    STRATEGIES,
    Progress,
    format_size,
    format_sizes_apart,
    parse_budget,
    usable_directory,
)
from waggle_trainer.remat.allocator import ALLOCATORS, DEFAULT_ALLOCATOR

EXIT_USAGE = 2
#: The budget was not met: no plan fits it, the measured peak broke it, or the loss
#: diverged (the run did not do what it promised).
EXIT_DOES_NOT_FIT = 1

DATA_NOTE = (
    "data: synthetic (random images and random labels each step, no camera or "
    "teacher): the loss measures nothing, the run measures memory and time"
)


class UsageError(Exception):
    """A bad command-line value: printed as one line, exit 2."""


def _budget_arg(value: str) -> int | str:
    try:
        return parse_budget(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(value: str) -> int:
    """argparse type: a whole number >= 1, else one clear line."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 1")
    return n


def _model_args(p: argparse.ArgumentParser, *, strategy: bool) -> None:
    p.add_argument("--arch", choices=ARCHES, default="resnet18")
    p.add_argument("--batch", type=positive_int, default=8, help="batch size (default 8)")
    p.add_argument(
        "--image",
        type=positive_int,
        default=224,
        help=f"image side in pixels, {IMAGE_SIZE_MIN}..{IMAGE_SIZE_MAX} (default 224)",
    )
    p.add_argument(
        "--classes",
        type=positive_int,
        default=DEFAULT_CLASSES,
        help=f"output classes, >= 2 (default {DEFAULT_CLASSES}, as the config)",
    )
    p.add_argument(
        "--budget",
        type=_budget_arg,
        default="auto",
        help='activation memory: "auto" (free memory here) or a size such as 800MiB',
    )
    p.add_argument(
        "--safety-margin",
        type=float,
        default=0.1,
        help="fraction of free memory left untouched with --budget auto (default 0.1)",
    )
    if strategy:
        p.add_argument("--strategy", choices=STRATEGIES, default="optimal")
    p.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default="block",
        help="stages of the ResNet: its residual blocks, or each block split at its "
        "convolutions with the skip tensor carried beside (a smaller smallest plan; "
        "default block)",
    )
    p.add_argument(
        "--fused-step",
        action="store_true",
        help="step the optimiser inside the backward, one parameter at a time: "
        "no whole-model gradients (same results)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where profiles are cached (default: the state directory's profiles/)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def register(sub) -> None:
    p = sub.add_parser("plan", help="predicted peak memory and time of each strategy at a budget")
    _model_args(p, strategy=False)
    p.set_defaults(handler=_plan)

    p = sub.add_parser("bench", help="real training steps under a plan: step time, peak RSS")
    _model_args(p, strategy=True)
    p.add_argument("--steps", type=positive_int, default=5, help="measured steps (default 5)")
    p.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default=DEFAULT_ALLOCATOR,
        help="malloc to run under: glibc's, or a distribution library loaded by "
        f"re-executing with LD_PRELOAD (default {DEFAULT_ALLOCATOR})",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="no calibration step: the plan made before the first step (with the overhead "
        "known for this machine) runs as it is",
    )
    p.add_argument(
        "--probe-overhead",
        action="store_true",
        help="when this machine's step-overhead model is not cached yet, measure it first "
        "(a few small runs, once per machine, threads and allocator) so that a "
        "configuration's first run plans for its overhead",
    )
    p.set_defaults(handler=_bench)


def _cache_dir(args) -> Path:
    """``--cache-dir`` (an existing directory, or a new one in an existing directory),
    else the state directory's ``profiles/``; ValueError naming the problem."""
    if args.cache_dir is not None:
        return usable_directory(args.cache_dir, "--cache-dir")
    from waggle_trainer.config import default_state_dir

    return usable_directory(default_state_dir() / "profiles", "profile cache", create_parents=True)


def _spec(args, **over):
    from waggle_trainer.learn.planned_training import RunSpec

    fields = dict(
        arch=args.arch,
        batch=args.batch,
        image=args.image,
        classes=args.classes,
        budget=args.budget,
        safety_margin=args.safety_margin,
        fused_step=args.fused_step,
        granularity=args.granularity,
    )
    fields.update(over)
    spec = RunSpec(**fields)  # checks the values before the cache directory is touched
    return dataclasses.replace(spec, cache_dir=_cache_dir(args))


def _profiling_progress(spec) -> Progress:
    return Progress(f"profiling {spec.arch} (batch {spec.batch}, {spec.image} px)", "stages")


def strategy_table(costs, budget_bytes: int) -> dict:
    """Each strategy's plan at ``budget_bytes`` (or why it does not fit), from plain
    training to the fastest."""
    from waggle_trainer.remat.planner import InfeasibleBudget, Planner

    planner = Planner(costs)
    rows: dict[str, dict[str, Any]] = {}
    for strategy in reversed(STRATEGIES):
        minimum = planner.min_feasible_budget(strategy)
        try:
            p = planner.plan(budget_bytes, strategy)
        except InfeasibleBudget:
            rows[strategy] = {"feasible": False, "min_feasible_bytes": minimum}
            continue
        rows[strategy] = {
            "feasible": True,
            "min_feasible_bytes": minimum,
            "predicted_peak_bytes": p.predicted_peak_bytes,
            "predicted_time_s": p.predicted_time_s,
            "time_ratio": p.time_ratio,
            "detail": p.detail,
        }
    return rows


def _print_table(rows: dict, mark: str | None = None, out=None) -> None:
    """The strategy table; the row of ``mark`` (the plan that runs) starts with ``*``."""
    out = sys.stdout if out is None else out
    print(
        f"  {'strategy':<12}{'fits':<6}{'predicted peak':>16}{'time ratio':>12}"
        f"{'min feasible':>15}  detail",
        file=out,
    )
    for name, r in rows.items():
        star = "* " if name == mark else "  "
        if r["feasible"]:
            detail = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in (r["detail"] or {}).items()
            )
            print(
                f"{star}{name:<12}{'yes':<6}{format_size(r['predicted_peak_bytes']):>16}"
                f"{r['time_ratio']:>11.2f}x{format_size(r['min_feasible_bytes']):>15}  {detail}",
                file=out,
            )
        else:
            print(
                f"{star}{name:<12}{'no':<6}{'-':>16}{'-':>12}"
                f"{format_size(r['min_feasible_bytes']):>15}",
                file=out,
            )


def _plan(args) -> int:
    try:
        spec = _spec(args)
    except (UsageError, ValueError) as exc:
        print(f"waggle-trainer plan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from waggle_trainer.learn.planned_training import profiled_resnet, resolve_budget

    model, stages, costs = profiled_resnet(
        spec.arch,
        spec.classes,
        spec.batch,
        spec.image,
        spec.cache_dir,
        progress=_profiling_progress(spec),
        granularity=spec.granularity,
    )
    if spec.fused_step:
        from waggle_trainer.remat.fused_step import costs_with_fused_step
        from waggle_trainer.remat.optim import make_optimizer

        optimizer = make_optimizer(
            model.parameters(), spec.optimizer, lr=spec.learning_rate, momentum=spec.momentum
        )
        costs = costs_with_fused_step(costs, stages, optimizer)
    budget = resolve_budget(model, spec)
    rows = strategy_table(costs, budget.activation_budget_bytes)
    chosen = "optimal" if rows["optimal"]["feasible"] else None
    if args.json:
        print(
            json.dumps(
                {
                    "arch": spec.arch,
                    "batch": spec.batch,
                    "image": spec.image,
                    "granularity": spec.granularity,
                    "stages": len(costs),
                    "budget_bytes": budget.activation_budget_bytes,
                    "budget": budget.to_dict(),
                    "strategies": rows,
                    "chosen": chosen,
                    "min_feasible_bytes": rows["optimal"]["min_feasible_bytes"],
                },
                indent=2,
            )
        )
    else:
        split = "split at their convolutions" if spec.granularity == "conv" else "as stages"
        print(
            f"{spec.arch}, batch {spec.batch}, {spec.image} px, {len(costs)} stages "
            f"(residual blocks {split})"
        )
        if spec.budget == "auto":
            print("\n".join(budget.lines()))
        print(f"activation budget {format_size(budget.activation_budget_bytes)}\n")
        _print_table(rows, mark=chosen)
        print()
        if chosen:
            r = rows[chosen]
            print(
                f"would use: {chosen} (predicted peak {format_size(r['predicted_peak_bytes'])}, "
                f"{r['time_ratio']:.2f}x the time of plain training)"
            )
        else:
            budget_s, min_s = format_sizes_apart(
                budget.activation_budget_bytes, rows["optimal"]["min_feasible_bytes"]
            )
            print(f"nothing fits: the budget {budget_s} is below the minimum feasible {min_s}")
    return 0 if chosen else EXIT_DOES_NOT_FIT


def _train(spec, steps: int, as_json: bool, prog: str, *, calibrate: bool = True) -> int:
    from waggle_trainer.learn.planned_training import PlannedTraining, measure
    from waggle_trainer.remat.planner import InfeasibleBudget

    try:
        training = PlannedTraining.build(spec, progress=_profiling_progress(spec))
    except InfeasibleBudget as exc:
        print(f"waggle-trainer {prog}: {exc}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    r = measure(training, steps, calibrate=calibrate)
    failures = _failures(r)
    if as_json:
        print(json.dumps(r.to_dict(), indent=2))
    else:
        _report(r, training, spec)
    for line in failures:
        print(f"waggle-trainer {prog}: {line}", file=sys.stderr)
    return EXIT_DOES_NOT_FIT if failures else 0


def _failures(r) -> list[str]:
    """What the run promised and did not do, one line each."""
    out = []
    if not r.budget_kept:
        growth, budget = format_sizes_apart(r.peak_rss_growth_bytes, r.budget_bytes)
        out.append(
            f"the budget was not kept: a step's memory grew by {growth}, more than the "
            f"activation budget {budget}"
        )
    if r.diverged_at is not None:
        out.append(
            f"training diverged: the loss is {r.losses[r.diverged_at - 1]} at measured "
            f"step {r.diverged_at} (lower the learning rate)"
        )
    return out


def _report(r, training, spec) -> None:
    print(
        f"{r.arch}, batch {r.batch}, {r.width or r.image}x{r.image} px: strategy {r.strategy}, "
        f"activation budget {format_size(r.budget_bytes)}"
    )
    print(DATA_NOTE)
    if spec.budget == "auto":
        print("\n".join(training.budget.lines()))
    print()
    if r.plan_budget_bytes != r.budget_bytes:
        print(
            f"strategies at {format_size(r.plan_budget_bytes)}, the budget the plan that ran "
            f"was made for (* marks it):"
        )
    else:
        print("strategies at this budget (* marks the plan that ran):")
    _print_table(strategy_table(training.chain.costs, r.plan_budget_bytes), mark=r.strategy)
    print()
    print(
        f"plan that ran: {r.strategy}, predicted peak {format_size(r.predicted_peak_bytes)}, "
        f"{r.predicted_time_ratio:.2f}x the time of plain training "
        f"(minimum feasible {format_size(r.min_feasible_bytes)})"
    )
    print(
        f"measured over {r.steps} steps: median step {r.median_step_s:.3f} s, "
        f"peak RSS {format_size(r.peak_rss_bytes)}, growth over baseline "
        f"{format_size(r.peak_rss_growth_bytes)} "
        f"({r.peak_rss_growth_bytes / max(1, r.predicted_peak_bytes):.2f}x predicted, "
        f"{'within' if r.budget_kept else 'OVER'} the budget)"
    )
    print(
        f"per step: {r.cpu_s_per_step:.2f} CPU s ({r.sys_s_per_step:.2f} s in the kernel), "
        f"{r.page_faults_per_step:.0f} page faults"
    )
    known = {
        "cache": "measured before for this configuration",
        "machine": "predicted by this machine's step model",
    }.get(r.overhead_source)
    print(
        "step overhead planned for before the first step: "
        + (f"{format_size(r.overhead_step_bytes)} ({known})" if known else "none known yet")
    )
    if r.calibration == "off":
        print("calibration: off (--no-calibrate): the plan made before the first step ran")
    elif r.calibration_bytes:
        need = (
            f"calibration: a measured step needed {format_size(r.calibration_bytes)} beyond "
            f"the prediction; "
        )
        print(
            need
            + {
                "re-planned": "re-planned for the budget minus that "
                f"({format_size(r.plan_budget_bytes)})",
                "no smaller plan": "no smaller plan exists, the plan was kept",
                "infeasible": "no plan fits the budget minus that, so the smallest plan ran",
            }.get(r.calibration, r.calibration)
        )
    if not r.overhead_recorded:
        print(
            "overhead not cached: this process profiled the model, and the profiler's "
            "leftovers in its heap are not a training process's; the next run measures it"
        )
    print(
        f"loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f} (synthetic data); re-plans {r.replans}; "
        f"allocator {r.allocator} ({r.allocator_mode}); optimiser step "
        f"{'fused into the backward' if r.fused_step else 'after the backward'}"
    )


def _bench(args) -> int:
    from waggle_trainer.remat.allocator import reexec_under

    reexec_under(args.allocator, getattr(args, "reexec_argv", None))  # before torch is imported
    try:
        spec = _spec(args, strategy=args.strategy, probe_overhead=args.probe_overhead)
    except (UsageError, ValueError) as exc:
        print(f"waggle-trainer bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _train(spec, args.steps, args.json, "bench", calibrate=not args.no_calibrate)
