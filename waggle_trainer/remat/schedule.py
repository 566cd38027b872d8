"""The schedule language shared by the planners, the simulator and the executor.

A schedule is a flat tuple of ``(op, j)`` actions over stages ``0 .. n-1``:

``FN`` forward-nograd(j)  run stage j without autograd on ``a[j]``; ``a[j]`` may be
                           freed afterwards unless it is a stored checkpoint.
``FC`` forward-check(j)    run stage j without autograd; keep ``a[j]`` stored as a
                           checkpoint (until ``BW j`` consumes it).
``FA`` forward-all(j)      run stage j with autograd on ``a[j]``, keeping its tape
                           (``saved_bytes``), which holds ``a[j+1]``.
``LOSS`` (j = n)           the boundary between the forward phase (everything before
                           it runs in the module's forward) and the backward phase:
                           ``a[n]`` is handed to the loss, ``delta[n]`` comes back.
``BW`` backward(j)         backward through stage j's tape: needs ``delta[j+1]``,
                           produces ``delta[j]`` and parameter gradients, frees the
                           tape, ``a[j]`` and ``delta[j+1]``.

Every stage is backwarded exactly once, in the order n-1 .. 0, and each ``BW j`` is
directly preceded by ``FA j`` somewhere after the previous ``BW``.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

#: The five actions (see above).
Op = Literal["FN", "FC", "FA", "LOSS", "BW"]
FN: Final = "FN"
FC: Final = "FC"
FA: Final = "FA"
LOSS: Final = "LOSS"
BW: Final = "BW"

OPS: tuple[Op, ...] = get_args(Op)

Action = tuple[Op, int]
Schedule = tuple[Action, ...]


def recomputes(schedule: Schedule) -> bool:
    """Whether ``schedule`` does anything beyond plain training: a forward without
    autograd (FN/FC) or a stage forwarded more than once."""
    forwards = [j for op, j in schedule if op in (FN, FC, FA)]
    return any(op in (FN, FC) for op, _ in schedule) or len(forwards) != len(set(forwards))
