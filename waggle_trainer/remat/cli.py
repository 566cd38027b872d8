"""Subcommands of the memory-bounded training layer: revolve, plan, bench, memory."""
from __future__ import annotations

import json
import math
import sys


def register(sub) -> None:
    """Add this layer's subcommands to the ``waggle-trainer`` subparsers."""
    p = sub.add_parser(
        "revolve",
        help="Revolve: optimal cost and schedule for a chain of equal steps",
        description="Print Opt[L, C] of the Revolve dynamic program, the number of forward "
        "(advance) steps and the schedule (FN/FC advance, FA+BW adjoint, LOSS terminal).",
    )
    p.add_argument("--length", type=int, required=True, metavar="L", help="number of steps (>= 0)")
    p.add_argument("--slots", type=int, required=True, metavar="C",
                   help="checkpoint slots, the input's included (>= 1)")
    p.add_argument("--uf", type=float, default=1.0, help="cost of a forward step (default 1)")
    p.add_argument("--ub", type=float, default=1.0, help="cost of an adjoint step (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_revolve)

    from waggle_trainer.remat.memory_cli import register_memory

    register_memory(sub)


def _fail(flag: str, allowed: str, value) -> int:
    print(f"waggle-trainer revolve: error: {flag} must be {allowed} (got {value})", file=sys.stderr)
    return 2


def _revolve(args) -> int:
    from waggle_trainer.remat.revolve import RevolveTable, forward_steps

    if args.length < 0:
        return _fail("--length", "an integer >= 0", args.length)
    if args.slots < 1:
        return _fail("--slots", "an integer >= 1", args.slots)
    for flag, v in (("--uf", args.uf), ("--ub", args.ub)):
        if not (math.isfinite(v) and v >= 0):
            return _fail(flag, "a finite number >= 0", v)
    # slots beyond length+1 cannot be used: Opt[l, c] is the same for every c >= l+1
    slots = min(args.slots, args.length + 1)
    table = RevolveTable(args.length, slots, args.uf, args.ub)
    schedule = table.schedule()
    cost = table.cost()
    steps = forward_steps(schedule)
    if args.json:
        print(json.dumps({
            "length": args.length, "slots": args.slots, "uf": args.uf, "ub": args.ub,
            "cost": cost, "forward_steps": steps, "actions": [[op, j] for op, j in schedule],
        }))
        return 0
    print(f"Opt[{args.length}, {args.slots}] = {cost:g}  (uf={args.uf:g}, ub={args.ub:g})")
    print(f"forward steps: {steps}")
    print(f"schedule ({len(schedule)} actions):")
    print(" ".join(f"{op}{j}" for op, j in schedule))
    return 0

