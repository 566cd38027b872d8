"""Memory-bounded training: chains, profiles, checkpointing planners and the executor.

The public names are listed in ``__all__``.  The planners (``revolve``, ``optimal``,
``sequential``, ``simulate``, ``planner``) are pure Python and imported here; the
torch-side names are imported lazily, on first use, so that importing the package or
a planner never imports torch.

Typical use: :class:`CheckpointedSequential` (an ``nn.Sequential`` or torchvision
ResNet trained under the plan that fits a budget); :class:`Planner` and :class:`Plan`
to compare strategies on a profiled chain (:func:`profile_chain`).  Stages may pass
tuples of tensors (skip connections): :class:`ApplyToFirst`, :class:`KeepInput`,
:class:`MergeSkip` (:mod:`.chain`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from waggle_trainer.common import STRATEGIES, Strategy

from .planner import InfeasibleBudget, Plan, Planner
from .schedule import Action, Op, Schedule

if TYPE_CHECKING:
    from .allocator import configure_allocator
    from .budget import activation_budget, free_memory, training_state_bytes
    from .chain import (
        ApplyToFirst,
        KeepInput,
        MergeSkip,
        build_resnet,
        chain_stages,
        named_stages,
    )
    from .executor import CheckpointedSequential, run_schedule
    from .optim import make_optimizer
    from .profiler import profile_chain

__all__ = [
    "CheckpointedSequential",
    "InfeasibleBudget",
    "Plan",
    "Planner",
    "STRATEGIES",
    "Strategy",
    "Schedule",
    "Action",
    "Op",
    "run_schedule",
    "profile_chain",
    "named_stages",
    "chain_stages",
    "build_resnet",
    "ApplyToFirst",
    "KeepInput",
    "MergeSkip",
    "activation_budget",
    "free_memory",
    "training_state_bytes",
    "make_optimizer",
    "configure_allocator",
]

_LAZY = {
    "CheckpointedSequential": "executor",
    "run_schedule": "executor",
    "profile_chain": "profiler",
    "named_stages": "chain",
    "chain_stages": "chain",
    "build_resnet": "chain",
    "ApplyToFirst": "chain",
    "KeepInput": "chain",
    "MergeSkip": "chain",
    "activation_budget": "budget",
    "free_memory": "budget",
    "training_state_bytes": "budget",
    "make_optimizer": "optim",
    "configure_allocator": "allocator",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
