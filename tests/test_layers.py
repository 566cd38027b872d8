"""Layers only look down, and each shared fact has one home (read from the source)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from waggle_trainer.common import ARCHES, STRATEGIES

PKG = Path(__file__).resolve().parents[1] / "waggle_trainer"
DP_MODULES = ("costs", "schedule", "revolve", "sequential", "optimal", "simulate", "planner")


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of the file."""
    pkg = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                out.add(f"{base}.{node.module}" if node.module else base)
            else:
                out.add(node.module or "")
    return out


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("module", DP_MODULES)
def test_dynamic_programs_import_only_the_standard_library(module):
    allowed = {f"waggle_trainer.remat.{m}" for m in DP_MODULES} | {"waggle_trainer.common"}
    for name in imports(PKG / "remat" / f"{module}.py"):
        assert top(name) in sys.stdlib_module_names or name in allowed, (module, name)


def test_common_imports_only_the_standard_library():
    assert all(top(n) in sys.stdlib_module_names for n in imports(PKG / "common.py"))


@pytest.mark.parametrize("path", sorted((PKG / "remat").glob("*.py")), ids=lambda p: p.name)
def test_remat_does_not_import_upper_layers(path):
    for name in imports(path):
        assert not name.startswith(
            (
                "waggle_trainer.config",
                "waggle_trainer.cli",
                "waggle_trainer.learn",
                "waggle_trainer.node",
            )
        ), name


@pytest.mark.parametrize("path", sorted((PKG / "learn").glob("*.py")), ids=lambda p: p.name)
def test_learn_does_not_import_the_top_level_cli(path):
    assert "waggle_trainer.cli" not in imports(path)


def _literal_sequences(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            yield node.lineno, values


@pytest.mark.parametrize("fact", [STRATEGIES, ARCHES], ids=["strategies", "architectures"])
def test_name_lists_are_written_once(fact):
    homes = []
    for path in [*PKG.rglob("*.py"), *(PKG.parent / "bench").glob("*.py")]:
        if path == PKG / "common.py":
            continue
        for line, values in _literal_sequences(path):
            if len(set(values) & set(fact)) >= 3:
                homes.append(f"{path.relative_to(PKG.parent)}:{line}")
    assert homes == [], f"a list of {fact} outside common.py's Literal: {homes}"


@pytest.mark.parametrize(
    "definition, home",
    [
        ("WAGGLE_ETC =", "common.py"),
        ("def make_optimizer(", "remat/optim.py"),
        ("def input_needs_grad(", "remat/chain.py"),
        ("def parse_size(", "common.py"),
        ("def setup_logging(", "common.py"),
    ],
)
def test_one_home_per_definition(definition, home):
    found = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if definition in p.read_text()]
    assert found == [home]


def test_the_needs_grad_loop_has_one_home():
    loop = "any(p.requires_grad for p in stage.parameters())"
    found = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if loop in p.read_text()]
    assert found == ["remat/chain.py"]


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("node", ("waggle_trainer.server", "waggle_trainer.demo")),
        ("server", ("waggle_trainer.node", "waggle_trainer.learn", "waggle_trainer.demo")),
        ("transport", ("waggle_trainer.node", "waggle_trainer.server", "waggle_trainer.demo")),
    ],
)
def test_node_and_server_meet_only_at_the_top(layer, forbidden):
    """The node and the server never import each other; only the top level (the demo)
    composes both."""
    for path in sorted((PKG / layer).glob("*.py")):
        bad = sorted(n for n in imports(path) if n.startswith(forbidden))
        assert bad == [], (path.name, bad)
