"""``waggle-trainer memory``: what a plain training step needs, predicted and measured."""

from __future__ import annotations

import json
import sys

from waggle_trainer.common import (
    ARCHES,
    IMAGE_SIZE_MAX,
    IMAGE_SIZE_MIN,
    Progress,
    parse_size,
    usable_directory,
)


def register_memory(sub) -> None:
    p = sub.add_parser(
        "memory",
        help="memory of one training step without checkpointing (predicted, measured)",
        description=(
            "Parameters, gradients, optimiser state, activations and workspace of one "
            "plain training step: predicted, with --measure measured in a fresh process, "
            "with --table the study's reference table beside this machine's numbers."
        ),
    )
    p.add_argument(
        "--arch",
        default="resnet18",
        help=f"{', '.join(ARCHES)} (default resnet18; 1000 classes, as the study)",
    )
    p.add_argument("--batch", default="8", help="batch size, >= 1 (default 8)")
    p.add_argument(
        "--image",
        default="224",
        help=f"image side in pixels, {IMAGE_SIZE_MIN}..{IMAGE_SIZE_MAX} (default 224)",
    )
    p.add_argument(
        "--optimizer",
        default="sgd-momentum",
        help="sgd, sgd-momentum, adam or adamw (default sgd-momentum)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="also run two real training steps in a fresh process and measure",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="the reference table (ResNet 18..152 x batch 1..50, image sizes) "
        "beside this machine's prediction (and measurement with --measure)",
    )
    p.add_argument(
        "--measure-limit",
        default="1.5GiB",
        help="with --table --measure: measure only cells predicted below this "
        "size (default 1.5GiB)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="take activations from the profiler (runs the chain here, "
        "cached in --cache-dir) instead of the meta-device count",
    )
    p.add_argument("--cache-dir", default=None, help="profile cache directory (with --profile)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_memory)


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--{name} must be an integer, got {value!r}") from None


def _memory(args) -> int:
    try:
        batch = _int("batch", args.batch)
        image = _int("image", args.image)
        try:
            limit = parse_size(args.measure_limit)
        except ValueError:
            raise ValueError(
                f"--measure-limit must be a size like 1.5GiB or 512MiB, got {args.measure_limit!r}"
            ) from None
        from waggle_trainer.remat.memory import check_shape

        check_shape(args.arch, batch, image, args.optimizer)
        cache_dir = usable_directory(args.cache_dir, "--cache-dir") if args.cache_dir else None
    except ValueError as exc:
        print(f"waggle-trainer memory: error: {exc}", file=sys.stderr)
        return 2

    from waggle_trainer.remat.memory import (
        REFERENCE_CELLS,
        describe,
        format_rows,
        measure_step_memory,
        predict_step_memory,
        reference_rows,
    )

    if args.table:
        bar = Progress("memory table", "cells")
        done = [0]

        def progress(row: dict) -> None:
            done[0] += 1
            bar(done[0], len(REFERENCE_CELLS))

        rows = reference_rows(
            measure=args.measure,
            measure_limit_bytes=limit,
            optimizer=args.optimizer,
            progress=progress,
        )
        if args.json:
            print(json.dumps({"rows": rows}, indent=2))
        else:
            print("\n".join(format_rows(rows)))
        return 0

    costs = None
    if args.profile:
        from waggle_trainer.remat.memory import profile_costs

        costs = profile_costs(
            args.arch,
            batch,
            image,
            cache_dir=cache_dir,
            progress=Progress(f"profiling {args.arch}", "stages"),
        )
    pred = predict_step_memory(args.arch, batch, image, args.optimizer, costs=costs)
    measured = None
    if args.measure:
        try:
            measured = measure_step_memory(args.arch, batch, image, args.optimizer)
        except RuntimeError as exc:
            print(f"waggle-trainer memory: error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(
            json.dumps(
                {"predicted": pred.to_dict(), "measured": measured.to_dict() if measured else None},
                indent=2,
            )
        )
    else:
        print("\n".join(describe(pred, measured)))
    return 0
