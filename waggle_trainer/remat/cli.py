"""Subcommands of the memory-bounded training layer: revolve, plan, bench, memory."""
from __future__ import annotations


def register(sub) -> None:
    """Filled in by the memory-bounded training work (issue 3)."""
    from waggle_trainer.remat.memory_cli import register_memory

    register_memory(sub)
