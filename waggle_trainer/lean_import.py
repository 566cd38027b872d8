"""TorchDynamo only when something compiles: 75 MB less resident in every process.

Training in eager mode imports ``torch._dynamo`` without using it: every
``torch.optim`` step runs ``import torch._dynamo; torch._dynamo.graph_break()``,
optimiser methods are wrapped by ``torch._disable_dynamo`` (which calls
``torch._dynamo.disable`` once), and ``import torchvision`` runs ``from
torch._dynamo.utils import is_compile_supported`` (``torchvision.ops.roi_align``).
TorchDynamo pulls in sympy, triton, ``torch.export`` and about a thousand modules.
Measured (torch 2.14.1, torchvision 0.29, x86-64, a fresh process in a fresh
memory cgroup, its charge after ``import torch, torchvision`` and building
resnet50): 468 MiB with TorchDynamo, 393 MiB without.  On a 2 GB node those 75 MiB
are more than a third of resnet50's smallest checkpointing plan (batch 8, 224 px:
201 MiB), and they decide whether training fits in half of plain training's memory.

:func:`install` (run first by the ``waggle-trainer`` command, not on import)
registers a stand-in for ``torch._dynamo`` that answers what eager code asks of
it, with eager semantics:

* ``disable(fn)`` returns ``fn`` (outside ``torch.compile`` a disabled function is
  the function itself), ``graph_break()`` does nothing (it only marks a compiled
  graph), ``utils.is_compile_supported(device)`` is answered by the real function.

Anything else (``torch.compile``, ``torch._dynamo.config``, ``import
torch._dynamo.<anything>``) loads the real TorchDynamo on the spot and the stand-in
steps aside: ``sys.modules`` and ``torch._dynamo`` then hold the real module, and
every later use gets it.  One difference remains: an optimiser method that ran
before the real module was loaded stays un-disabled under a later
``torch.compile`` (TorchDynamo then traces into it instead of skipping it); the
daemon never compiles.

**sympy.**  ``torch.autograd.backward(out, grad)`` with an explicit gradient (what
the checkpointing executor runs for every stage's backward) imports
``torch.fx.experimental.symbolic_shapes`` for two helpers, ``sym_eq`` and
``expect_true``, and with it sympy and mpmath: 487 modules, 34 MiB resident (same
machine), paid by the first planned training step.  A second stand-in answers those
two for plain integers and booleans exactly as the real functions do; a symbolic
value (``torch.SymInt``/``SymBool``, only under tracing) or any other name loads the
real module, which then steps in the same way.

``WAGGLE_FULL_IMPORT=1`` in the environment switches both stand-ins off (the
ordinary imports).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import types

__all__ = ["install", "uninstall", "stand_in_active", "shapes_stand_in_active"]

_DYNAMO = "torch._dynamo"
_UTILS = "torch._dynamo.utils"
_SHAPES = "torch.fx.experimental.symbolic_shapes"
_lock = threading.RLock()


class _StandIn(types.ModuleType):
    """``torch._dynamo`` for eager code; any other use loads the real module."""

    __path__: list[str] = []  # a package: ``import torch._dynamo.x`` reaches the finder

    def disable(self, fn=None, recursive=True, **_kw):
        return fn if fn is not None else (lambda f: f)

    def graph_break(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_load_real(), name)


class _UtilsStandIn(types.ModuleType):
    """``torch._dynamo.utils``: only what torchvision imports by name."""

    @staticmethod
    def is_compile_supported(device_type):
        return _load_real().utils.is_compile_supported(device_type)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_load_real().utils, name)


_STAND_IN = _StandIn(_DYNAMO, "stand-in for torch._dynamo: see waggle_trainer.lean_import")
_UTILS_STAND_IN = _UtilsStandIn(_UTILS)
_STAND_IN.utils = _UTILS_STAND_IN  # type: ignore[attr-defined]


class _ShapesStandIn(types.ModuleType):
    """``torch.fx.experimental.symbolic_shapes`` for eager autograd: ``sym_eq`` and
    ``expect_true`` on plain values; anything symbolic or else loads the real module."""

    @staticmethod
    def sym_eq(x, y):
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            if len(x) != len(y):
                return False
            return all(_ShapesStandIn.sym_eq(a, b) for a, b in zip(x, y, strict=True))
        if type(x) is int and type(y) is int:  # bool and SymInt are not plain ints
            return x == y
        return _load_real_shapes().sym_eq(x, y)

    @staticmethod
    def expect_true(a, skip: int = 0):
        if type(a) is bool:
            return a
        return _load_real_shapes().expect_true(a, skip + 1)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_load_real_shapes(), name)


_SHAPES_STAND_IN = _ShapesStandIn(
    _SHAPES, "stand-in for torch.fx.experimental.symbolic_shapes: see waggle_trainer.lean_import"
)


def shapes_stand_in_active() -> bool:
    """True while the stand-in holds ``torch.fx.experimental.symbolic_shapes`` (sympy
    is not loaded by it)."""
    return sys.modules.get(_SHAPES) is _SHAPES_STAND_IN


def _load_real_shapes() -> types.ModuleType:
    with _lock:
        if sys.modules.get(_SHAPES) is _SHAPES_STAND_IN:
            del sys.modules[_SHAPES]
        return importlib.import_module(_SHAPES)


def stand_in_active() -> bool:
    """True while the stand-in holds ``torch._dynamo`` (the real one is not loaded)."""
    return sys.modules.get(_DYNAMO) is _STAND_IN


def _step_aside() -> None:
    if sys.modules.get(_UTILS) is _UTILS_STAND_IN:
        del sys.modules[_UTILS]
    if sys.modules.get(_DYNAMO) is _STAND_IN:
        del sys.modules[_DYNAMO]
    torch = sys.modules.get("torch")
    if torch is not None and torch.__dict__.get("_dynamo") is _STAND_IN:
        del torch._dynamo
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def _load_real() -> types.ModuleType:
    with _lock:
        _step_aside()
        return importlib.import_module(_DYNAMO)


class _Finder(importlib.abc.MetaPathFinder):
    """``import torch._dynamo.<sub>`` while the stand-in is active: load the real one."""

    def find_spec(self, fullname, path, target=None):
        if not (fullname.startswith(_DYNAMO + ".") and fullname != _UTILS and stand_in_active()):
            return None
        real = _load_real()
        if fullname in sys.modules:  # the real package imported it already
            return sys.modules[fullname].__spec__
        # ``path`` is the stand-in's (empty): search the real package's
        parent = sys.modules[fullname.rpartition(".")[0]]
        return importlib.machinery.PathFinder.find_spec(
            fullname, getattr(parent, "__path__", real.__path__)
        )


_FINDER = _Finder()


def install() -> None:
    """Put the stand-ins in place unless their module is loaded or the user opted out."""
    if os.environ.get("WAGGLE_FULL_IMPORT") == "1":
        return
    with _lock:
        if _SHAPES not in sys.modules:
            sys.modules[_SHAPES] = _SHAPES_STAND_IN
        if _DYNAMO in sys.modules:
            return
        sys.modules[_DYNAMO] = _STAND_IN
        sys.modules[_UTILS] = _UTILS_STAND_IN
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the stand-ins (the real modules load on their next import)."""
    with _lock:
        _step_aside()
        if sys.modules.get(_SHAPES) is _SHAPES_STAND_IN:
            del sys.modules[_SHAPES]
