"""The public API of ``waggle_trainer.remat``: its names, the documented entry point,
``budget_bytes="auto"`` and the README's example, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import waggle_trainer.remat as remat
from waggle_trainer.remat import CheckpointedSequential, InfeasibleBudget, Plan, Planner

ROOT = Path(__file__).resolve().parents[2]


def test_all_names_resolve_and_the_planner_types_are_exported():
    assert {"CheckpointedSequential", "Plan", "Planner", "InfeasibleBudget"} <= set(remat.__all__)
    for name in remat.__all__:
        assert getattr(remat, name) is not None, name
    from waggle_trainer.remat import planner

    assert (Plan, Planner, InfeasibleBudget) == (
        planner.Plan,
        planner.Planner,
        planner.InfeasibleBudget,
    )


def test_importing_the_package_does_not_import_torch():
    code = "import sys, waggle_trainer.remat as r; r.Planner; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == "False"


def test_the_docstring_documents_args_raises_example_and_the_cpu_caveat():
    doc = CheckpointedSequential.__doc__
    for part in (
        "Args:",
        "Raises:",
        "Example::",
        "budget_bytes",
        '"auto"',
        "InfeasibleBudget",
        "configure_allocator",
    ):
        assert part in doc, part


def _tiny() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def test_auto_budget_is_the_free_memory_minus_margin_and_state():
    chain = CheckpointedSequential(_tiny(), budget_bytes="auto", sample_input=torch.empty(8, 16))
    b = chain.budget
    assert b is not None and b.activation_budget_bytes == chain.budget_bytes > 0
    assert b.safety_margin_bytes >= 0.1 * b.free_bytes - 1
    assert chain.plan is not None and chain.plan.budget_bytes == chain.budget_bytes


def test_a_budget_that_is_neither_bytes_nor_auto_is_refused():
    with pytest.raises(TypeError, match="'lots'"):
        CheckpointedSequential(_tiny(), budget_bytes="lots")  # type: ignore[arg-type]


def test_readme_example_runs_as_written(capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Checkpointing in your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    chain = scope["chain"]
    assert chain.plan.predicted_peak_bytes <= 12 * 2**20
    assert all(p.grad is not None for p in scope["model"].parameters())
    strategy, peak, ratio = capsys.readouterr().out.split()
    assert (strategy, int(peak)) == ("optimal", chain.plan.predicted_peak_bytes)
