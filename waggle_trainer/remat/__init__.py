"""Memory-bounded training: chains, profiles, checkpointing planners and the executor.

The planners (``revolve``, ``optimal``, ``sequential``, ``simulate``, ``planner``)
are pure Python; the torch-side names below are imported lazily so that importing
a planner never imports torch.
"""

_LAZY = {
    "CheckpointedSequential": "executor",
    "run_schedule": "executor",
    "profile_chain": "profiler",
    "named_stages": "chain",
    "chain_stages": "chain",
    "build_resnet": "chain",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
