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
    p.add_argument(
        "--slots",
        type=int,
        required=True,
        metavar="C",
        help="checkpoint slots, the input's included (>= 1)",
    )
    p.add_argument("--uf", type=float, default=1.0, help="cost of a forward step (default 1)")
    p.add_argument("--ub", type=float, default=1.0, help="cost of an adjoint step (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_revolve)

    from waggle_trainer.remat.memory_cli import register_memory

    register_memory(sub)


#: The largest Revolve table (and one-slot schedule) the command computes: about a
#: second on a small machine; the table grows as l^2 c.
MAX_TABLE_WORK = 5_000_000


def table_work(length: int, slots: int) -> int:
    """Additions of the Revolve table (or actions of the one-slot schedule)."""
    return length * length * max(1, slots - 1) // 2


def max_length(slots: int) -> int:
    """The largest ``--length`` whose table stays within :data:`MAX_TABLE_WORK`."""
    n = math.isqrt(2 * MAX_TABLE_WORK // max(1, slots - 1))
    while n > 0 and table_work(n, min(slots, n + 1)) > MAX_TABLE_WORK:
        n -= 1
    return n


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
    if table_work(args.length, slots) > MAX_TABLE_WORK:
        return _fail(
            "--length",
            f"at most {max_length(slots)} with --slots {args.slots} "
            f"(the table takes length^2 x (slots - 1) / 2 steps, and with one slot the "
            f"schedule has length^2 / 2 actions; the limit is {MAX_TABLE_WORK:,})",
            args.length,
        )
    table = RevolveTable(args.length, slots, args.uf, args.ub)
    schedule = table.schedule()
    cost = table.cost()
    steps = forward_steps(schedule)
    if args.json:
        print(
            json.dumps(
                {
                    "length": args.length,
                    "slots": args.slots,
                    "uf": args.uf,
                    "ub": args.ub,
                    "cost": cost,
                    "forward_steps": steps,
                    "actions": [[op, j] for op, j in schedule],
                }
            )
        )
        return 0
    print(f"Opt[{args.length}, {args.slots}] = {cost:g}  (uf={args.uf:g}, ub={args.ub:g})")
    print(f"forward steps: {steps}")
    print(f"schedule ({len(schedule)} actions):")
    print(" ".join(f"{op}{j}" for op, j in schedule))
    return 0
