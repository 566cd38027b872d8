"""The optimiser step fused into the backward pass: whole-model gradients never coexist.

A plain training step keeps every parameter's gradient until ``optimizer.step()``
runs after the backward: for resnet50 that is 98 MiB resident for the whole of
training, on top of the parameters and the optimiser state.  :class:`FusedStep`
registers a ``register_post_accumulate_grad_hook`` on every parameter of an
optimiser: as soon as the backward has accumulated a parameter's gradient, the
optimiser steps *that parameter alone* and its gradient is dropped.  At any moment
at most the gradients of the parameters the backward is working on exist.

Exactness.  The step is the optimiser's own ``step()``, called with a parameter
group narrowed to the one parameter, so every per-parameter update (SGD with or
without momentum and weight decay, Adam, AdamW, ...) is the same arithmetic as the
unfused step; weights and optimiser state after N steps are bitwise identical
(``tests/remat/test_fused_step.py``, plain and checkpointed).  The optimiser object
stays the real one: ``state_dict()``/``load_state_dict()``, ``state``, learning-rate
schedulers and ``param_groups`` work as before.

Pitfalls (read before use):

* Call ``loss.backward()`` and *not* ``optimizer.step()``: the backward is the step.
  Gradients are ``None`` after it.  Clipping by the global gradient norm, gradient
  accumulation over several backwards and anything else that needs all gradients at
  once cannot be combined with the fused step.
* A parameter that receives no gradient in a step is not stepped, as with
  ``zero_grad(set_to_none=True)`` (PyTorch's default); with resident zero gradients
  momentum would still move it.
* A parameter is updated in place during the backward, once the gradients of every
  use of it have been accumulated.  Nothing else may read it later in the same
  backward: true for chains (a stage's parameters belong to that stage only, and
  recomputation never re-runs a stage already backwarded), false for a parameter that
  is also used without a gradient path (under ``detach()`` or ``no_grad``).
* Only optimisers whose ``step()`` treats parameters independently (all of
  ``torch.optim``'s single-tensor and ``foreach`` implementations; not LBFGS, which
  needs a closure).

Memory.  The step's temporaries are parameter-shaped: 0 for SGD with momentum, 1x
the parameter with weight decay, 2x for Adam/AdamW (``sqrt`` and the division), 3x
for Adam with L2 weight decay.  :func:`step_transient_multiple` measures the multiple
for the optimiser at hand on a scratch parameter (so it is right for any torch
version), and :func:`stage_step_bytes` turns it into each stage's extra backward
transient, which :meth:`waggle_trainer.remat.costs.ChainCosts.with_step_bytes` adds to
the profile so that the planners and the simulator count it.  The memory budget
counts no resident gradients (``training_state_bytes(..., fused_step=True)``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn

from .costs import ChainCosts
from .profiler import LiveBytes

__all__ = [
    "FusedStep",
    "step_transient_multiple",
    "stage_step_bytes",
    "costs_with_fused_step",
]

_SCRATCH_NUMEL = 4096


class FusedStep:
    """Run ``optimizer``'s step per parameter inside the backward (see the module doc).

    ``FusedStep(optimizer)`` registers the hooks; from then on ``loss.backward()``
    updates the parameters.  :meth:`remove` takes the hooks away (the optimiser is
    then an ordinary one again).  ``steps`` counts parameter updates, e.g. to check
    that a backward updated every parameter.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.steps = 0
        self._handles = []
        seen: set[int] = set()
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))
        self.parameters = len(seen)

    def _hook(self, index: int):
        def step_one(p: torch.Tensor) -> None:
            self._step(index, p)

        return step_one

    def _step(self, index: int, p: torch.Tensor) -> None:
        if p.grad is None:
            # A second call with nothing accumulated: the executor's autograd Function
            # hands its parameters a None gradient after their stages' own backwards.
            return
        opt = self.optimizer
        groups = opt.param_groups
        group = groups[index]
        params = group["params"]
        # The optimiser's own step over a group narrowed to this one parameter:
        # the same arithmetic as the unfused step, without touching the others.
        group["params"] = [p]
        opt.param_groups = [group]
        try:
            opt.step()
        finally:
            group["params"] = params
            opt.param_groups = groups
        p.grad = None
        self.steps += 1

    def remove(self) -> None:
        """Remove the hooks: ``optimizer.step()`` is needed again after a backward."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return (
            f"FusedStep({type(self.optimizer).__name__}, parameters={self.parameters}, "
            f"active={bool(self._handles)})"
        )


def step_transient_multiple(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of temporaries one parameter's step allocates, as a multiple of its size.

    Measured on a scratch parameter with each parameter group's hyper-parameters
    (the largest multiple wins), over two steps: the first creates the state
    (counted by the budget as optimiser state, not here), the second is a steady one.
    """
    worst = 0
    accepted = inspect.signature(type(optimizer).__init__).parameters
    for group in optimizer.param_groups:
        # a group also holds derived keys (AdamW: decoupled_weight_decay) that the
        # constructor does not take
        hyper = {k: v for k, v in group.items() if k != "params" and k in accepted}
        scratch = nn.Parameter(torch.zeros(_SCRATCH_NUMEL))
        probe = type(optimizer)([scratch], **hyper)
        nbytes = scratch.numel() * scratch.element_size()
        for _ in range(2):
            scratch.grad = torch.randn(_SCRATCH_NUMEL)
            live = LiveBytes()
            with live:
                probe.step()
            worst = max(worst, math.ceil((live.peak - live.live) / nbytes))
    return worst


def stage_step_bytes(stages: Sequence[nn.Module], optimizer: torch.optim.Optimizer) -> list[int]:
    """Each stage's extra backward transient under the fused step: the largest of its
    parameters' bytes times :func:`step_transient_multiple`.

    The gradient itself is already in the profile (``backward_peak_bytes`` counts the
    largest weight gradient as a transient); here come the optimiser's temporaries.
    """
    multiple = step_transient_multiple(optimizer)
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
    out = []
    for stage in stages:
        sizes = [p.numel() * p.element_size() for p in stage.parameters() if id(p) in stepped]
        out.append(multiple * max(sizes, default=0))
    return out


def costs_with_fused_step(
    costs: ChainCosts, stages: Sequence[nn.Module], optimizer: torch.optim.Optimizer
) -> ChainCosts:
    """``costs`` with the fused step's temporaries in each stage's backward peak."""
    return costs.with_step_bytes(stage_step_bytes(stages, optimizer))
