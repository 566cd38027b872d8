"""The optimisers training may use: built one way, their state counted one way.

:func:`make_optimizer` builds every name of :data:`waggle_trainer.common.OPTIMIZER_NAMES`;
:func:`state_multiple` says how many copies of the trainable parameters' bytes its
state holds, which the memory budget (:func:`.budget.training_state_bytes`) and the
memory prediction subtract.  Keeping both here means the budget counts the
optimiser that actually runs.  torch is imported only when an optimiser is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from waggle_trainer.common import OPTIMIZER_NAMES

if TYPE_CHECKING:
    import torch

__all__ = ["STATE_NAMES", "make_optimizer", "state_multiple"]

#: Optimiser state as multiples of the trainable parameters' bytes.  ``sgd-momentum``
#: is ``sgd`` with a non-zero momentum (one buffer), as ``waggle-trainer memory`` names it.
_MULTIPLES: dict[str, int] = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}
#: Every name :func:`state_multiple` accepts.
STATE_NAMES: tuple[str, ...] = tuple(_MULTIPLES)
assert set(OPTIMIZER_NAMES) <= set(_MULTIPLES)


def state_multiple(name: str, momentum: float | None = None) -> tuple[str, int]:
    """``(key, multiple)``: ``sgd`` with a non-zero ``momentum`` is ``sgd-momentum``."""
    key = name.lower()
    if key == "sgd" and momentum:
        key = "sgd-momentum"
    if key not in _MULTIPLES:
        raise ValueError(f"unknown optimizer {name!r} (allowed: {', '.join(STATE_NAMES)})")
    return key, _MULTIPLES[key]


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """The optimiser ``name`` (``sgd``, ``adam``, ``adamw``) over ``params``.

    ``momentum`` applies to SGD only (0 = plain SGD, no state); Adam and AdamW use
    torch's defaults otherwise.  ``weight_decay`` (None: torch's default of the
    optimiser) applies to weights of two or more dimensions only: biases and
    BatchNorm's scales and shifts are not decayed (two parameter groups, the decayed
    first).  Raises ValueError for any other name.
    """
    import torch

    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r} (allowed: {', '.join(OPTIMIZER_NAMES)})")
    groups: list | Iterable[torch.nn.Parameter] = params
    if weight_decay is not None:
        params = list(params)
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)
