"""Run a chain of stages under a checkpointing schedule (the torch side of remat/).

:class:`CheckpointedSequential` wraps an ``nn.Sequential`` or a torchvision ResNet
(split by :mod:`.chain`), profiles it (:mod:`.profiler`), asks the planner for the
schedule that fits ``budget_bytes`` of activation memory and interprets that
schedule: the actions before ``LOSS`` in the forward, the rest in the backward of
one custom ``torch.autograd.Function`` (calling ``torch.autograd.backward`` once per
stage, so parameters' ``.grad`` accumulate as usual).  Memory follows the model
documented in :mod:`.schedule` / issue 3, so the simulator's predictions hold.

Exactness (gradients, BatchNorm running statistics, dropout outputs equal those of
plain training):

* **BatchNorm.**  A stage's first forward of the step updates running statistics;
  its recomputations run with ``track_running_stats=False`` on its ``_BatchNorm``
  modules (training mode: batch statistics, buffers untouched) and with other
  tracking norms' buffers (``InstanceNorm(track_running_stats=True)``) restored.
* **RNG.**  For a stage that runs more than once, the CPU (and CUDA) RNG state at
  its first forward is recorded and replayed at each recomputation; the global RNG
  is restored afterwards, so the step consumes random numbers as plain training.
* **In-place ops.**  Top-level in-place activations are made out-of-place by
  :mod:`.chain`.  A stage that still writes into its input would corrupt a stored
  checkpoint: it is detected (tensor version counter) and raises ``RuntimeError``.

**Tapes and tuples.**  Activations may be tuples of tensors (the convention and the
wrappers that build such chains: :mod:`.chain`); the chain's input and output too.
A checkpoint stores the tuple.  ``FA j`` runs the stage on aliases of ``a[j]``'s
tensors that enter the graph through one node collecting their gradients (floating
ones requiring grad when anything before needs a gradient), not on leaf tensors:
autograd would copy a leaf's gradient into ``.grad`` when the same gradient also
flows elsewhere (a skip tensor added to a branch), a tensor the plan does not count.
``BW j`` back-propagates every tensor of ``a[j+1]`` that has a gradient, so each
tensor of ``a[j]`` receives its own, including one passed through unchanged (its
gradient flows on to the stage that produced it).  Tensors without a gradient
(integers, or not used by the loss) get None.

Not supported (as in ``torch.utils.checkpoint``'s reentrant variant): double
backward (``create_graph=True``), ``torch.autograd.grad`` with respect to the
parameters (their gradients go to ``.grad``), calling backward twice on one forward,
changing parameters or ``train()/eval()`` between forward and backward.  Autocast
state is not recorded for recomputation.  Hooks registered on the wrapped model
itself (not on its stages) do not run on the checkpointed path.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.utils.checkpoint import get_device_states, set_device_states

from waggle_trainer.common import STRATEGIES, Granularity, Strategy

from .budget import BudgetBreakdown, activation_budget, training_state_bytes
from .chain import Activation, input_needs_grad, named_stages, tensors_of
from .costs import ChainCosts
from .planner import Plan, Planner
from .profiler import profile_chain
from .schedule import BW, FA, FC, FN, LOSS, OPS, recomputes

__all__ = ["CheckpointedSequential", "run_schedule"]


def _check_schedule(schedule: Sequence[tuple[str, int]], n: int) -> int:
    """Basic shape checks; returns the index of ``LOSS``."""
    losses = [i for i, (op, _) in enumerate(schedule) if op == LOSS]
    if len(losses) != 1 or schedule[losses[0]][1] != n:
        raise ValueError(f"schedule must contain exactly one ('LOSS', {n})")
    bws = [j for op, j in schedule if op == BW]
    if bws != list(range(n - 1, -1, -1)) or any(op == BW for op, _ in schedule[: losses[0]]):
        raise ValueError("schedule must backward every stage once, n-1 .. 0, after LOSS")
    for op, j in schedule:
        if op not in OPS or (op != LOSS and not 0 <= j < n):
            raise ValueError(f"bad action {(op, j)!r} for a chain of {n} stages")
    return losses[0]


@contextmanager
def _recomputing(stage: nn.Module, rng: tuple | None):
    """Run ``stage`` again: replay its recorded RNG, leave norm statistics alone."""
    with ExitStack() as stack:
        if rng is not None:
            cpu_state, devices, device_states = rng
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.set_rng_state(cpu_state)
            if devices:
                set_device_states(devices, device_states)
        frozen, restore = [], []
        for m in stage.modules():
            if isinstance(m, _NormBase) and m.training and m.track_running_stats:
                if isinstance(m, _BatchNorm):
                    frozen.append(m)
                else:
                    restore += [(b, b.detach().clone()) for b in m.buffers()]
        for m in frozen:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in frozen:
                m.track_running_stats = True
            with torch.no_grad():
                for b, value in restore:
                    b.copy_(value)


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _detached(a: Activation) -> Activation:
    """``a`` with every tensor detached."""
    out = tuple(t.detach() for t in tensors_of(a))
    return out if isinstance(a, tuple) else out[0]


Grads = tuple[torch.Tensor | None, ...]


class _Entry(torch.autograd.Function):
    """Where a tape starts: hands a stage its input tensors (aliases of ``a[j]``) and
    puts their gradients into ``slot`` in the backward.

    Rather than leaf tensors: autograd would accumulate a leaf's gradient into
    ``.grad`` and copy it when the same tensor also flows elsewhere in the graph (a
    skip tensor added to a branch: one more activation-sized tensor than the plan
    counts).  Here the gradient is kept as autograd computed it, as the profiler
    measures it, and the tape does not hold ``a[j]`` unless the stage saved it.
    """

    @staticmethod
    def forward(ctx, slot: list, flags: tuple[bool, ...], anchor, *tensors):
        ctx.slot = slot
        ctx.set_materialize_grads(False)  # no zeros for inputs that get no gradient
        out = tuple(t.detach() for t in tensors)
        fixed = [o for o, flag in zip(out, flags, strict=True) if not flag]
        if fixed:
            ctx.mark_non_differentiable(*fixed)
        return out

    @staticmethod
    def backward(ctx, *grads):
        ctx.slot[:] = grads
        return (None, None, None) + (None,) * len(grads)


def _entry(a: Activation, requires_grad: bool | Sequence[bool]) -> tuple[Activation, list]:
    """``a`` as a stage's input on a tape: its floating tensors requiring grad as asked
    (one flag for all, or one per tensor), their gradients delivered to the returned
    list by the backward (left empty when none flows)."""
    tensors = tensors_of(a)
    wanted = [requires_grad] * len(tensors) if isinstance(requires_grad, bool) else requires_grad
    flags = tuple(f and _differentiable(t) for t, f in zip(tensors, wanted, strict=True))
    slot: list = []
    if not any(flags):
        return _detached(a), slot
    # a 0-element leaf that requires grad puts the node on the graph
    anchor = torch.empty(0, requires_grad=True)
    out = _Entry.apply(slot, flags, anchor, *tensors)
    out = out if isinstance(out, tuple) else (out,)
    return (out if isinstance(a, tuple) else out[0]), slot


class _Run:
    """The state of one forward/backward pair interpreting ``schedule``.

    Internally ``delta[k]`` is a tuple with one gradient (or None) per tensor of
    ``a[k]``.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        schedule,
        x: Activation,
        after_op: Callable[[], object] | None = None,
    ) -> None:
        self.after_op = after_op
        self.stages = list(stages)
        self.n = len(self.stages)
        self.schedule = tuple(schedule)
        self.loss_at = _check_schedule(self.schedule, self.n)
        self.runs = Counter(j for op, j in self.schedule if op in (FN, FC, FA))
        self.rng: dict[int, tuple] = {}
        self.ran: set[int] = set()
        inputs = tensors_of(x, "the chain's input")
        self.input_grads = [t.requires_grad for t in inputs]
        self.acts: dict[int, Activation] = {0: _detached(x)}
        self.stored: set[int] = set()
        self.tapes: dict[int, tuple[list, int, Activation]] = {}  # input grads, count, output
        self.deltas: dict[int, Grads] = {}
        self.needs_grad = input_needs_grad(self.stages, any(self.input_grads))
        self.done = False

    def _forward(self, op: str, j: int) -> None:
        a = self.acts.get(j)
        if a is None:
            raise RuntimeError(f"invalid schedule: {op} {j} needs a[{j}], which is not available")
        stage, first = self.stages[j], j not in self.ran
        if op == FC:
            self.stored.add(j)
        tensors = tensors_of(a)
        if first and self.runs[j] > 1:
            devices, device_states = get_device_states(*tensors)
            self.rng[j] = (torch.get_rng_state(), devices, device_states)
        versions = [t._version for t in tensors]
        with ExitStack() as stack:
            if not first:
                stack.enter_context(_recomputing(stage, self.rng.get(j)))
            if op == FA:
                with torch.enable_grad():
                    inp, slot = _entry(a, self.input_grads if j == 0 else self.needs_grad[j])
                    out = stage(inp)
                del inp
                tensors_of(out, f"the output of stage {j} ({type(stage).__name__})")
                self.tapes[j] = (slot, len(tensors), out)
                self.acts[j + 1] = _detached(out)
            else:
                with torch.no_grad():
                    out = stage(a)
                tensors_of(out, f"the output of stage {j} ({type(stage).__name__})")
                self.acts[j + 1] = out
        if any(t._version != v for t, v in zip(tensors, versions, strict=True)):
            raise RuntimeError(
                f"stage {j} ({type(stage).__name__}) modified its input in place; "
                "checkpointing needs "
                "stages that leave their input intact (use inplace=False inside it)"
            )
        if op == FN and j != 0 and j not in self.stored:
            del self.acts[j]
        self.ran.add(j)

    def _backward(self, j: int) -> None:
        if j not in self.tapes:
            raise RuntimeError(f"invalid schedule: BW {j} without a preceding FA {j}")
        slot, count, out = self.tapes.pop(j)
        delta = self.deltas.pop(j + 1)
        roots = [
            (o, d)
            for o, d in zip(tensors_of(out), delta, strict=True)
            if d is not None and o.requires_grad
        ]
        if roots:
            torch.autograd.backward([o for o, _ in roots], [d for _, d in roots])
        self.deltas[j] = tuple(slot) if slot else (None,) * count
        del out, roots, delta, slot
        self.stored.discard(j)
        self.acts.pop(j + 1, None)
        if j != 0:
            self.acts.pop(j, None)

    def _step(self, op: str, j: int) -> None:
        if op == BW:
            self._backward(j)
        elif op != LOSS:
            self._forward(op, j)
        if self.after_op is not None:
            self.after_op()

    def forward(self) -> Activation:
        for op, j in self.schedule[: self.loss_at]:
            self._step(op, j)
        out = self.acts.pop(self.n, None)
        if out is None:
            raise RuntimeError(f"invalid schedule: a[{self.n}] not computed before LOSS")
        return out

    def backward(self, delta: Grads) -> Grads:
        """``delta``: one gradient (or None) per tensor of the output; returns one per
        tensor of the input."""
        if self.done:
            raise RuntimeError(
                "CheckpointedSequential: backward through the same forward twice is not supported"
            )
        self.done = True
        self.deltas[self.n] = delta
        try:
            for op, j in self.schedule[self.loss_at + 1 :]:
                self._step(op, j)
            return self.deltas.pop(0, (None,) * len(self.input_grads))
        finally:
            self.acts.clear()
            self.tapes.clear()
            self.deltas.clear()
            self.rng.clear()


class _ChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, n_inputs: int, *args: torch.Tensor) -> Activation:
        ctx.run = run
        ctx.n_params = len(args) - n_inputs
        ctx.set_materialize_grads(False)  # an output the loss does not use: None
        out = run.forward()
        fixed = [t for t in tensors_of(out) if not _differentiable(t)]
        if fixed:
            ctx.mark_non_differentiable(*fixed)
        return out

    @staticmethod
    def backward(ctx, *deltas: torch.Tensor | None):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "CheckpointedSequential does not support double backward (create_graph=True)"
            )
        dx = ctx.run.backward(tuple(None if d is None else d.contiguous() for d in deltas))
        return (None, None, *dx) + (None,) * ctx.n_params


def run_schedule(
    stages: Sequence[nn.Module],
    schedule,
    x: Activation,
    after_op: Callable[[], object] | None = None,
) -> Activation:
    """``stages`` applied to ``x`` in order, with forward and backward following ``schedule``.

    The low-level entry point of :class:`CheckpointedSequential` (which also plans).
    ``x`` and the result may be tuples of tensors (see :mod:`.chain`).
    ``after_op()``, if given, is called after every operation of the schedule (the
    allocator's release point: :func:`.allocator.release_hook`).
    Under ``torch.no_grad()``, or when neither ``x`` nor any parameter requires grad,
    the stages simply run in order.
    """
    stages = list(stages)
    inputs = tensors_of(x, "the chain's input")
    params = list({id(p): p for s in stages for p in s.parameters() if p.requires_grad}.values())
    if not torch.is_grad_enabled() or not (any(t.requires_grad for t in inputs) or params):
        for stage in stages:
            x = stage(x)
        return x
    run = _Run(stages, schedule, x, after_op)
    return _ChainFunction.apply(run, len(inputs), *inputs, *params)


class CheckpointedSequential(nn.Module):
    """``module`` trained under the checkpointing schedule that fits a memory budget.

    ``forward(x)`` returns what ``module(x)`` returns; in training mode with autograd
    on, the forward keeps only the activations the plan stores and the backward
    recomputes the others, so a step's activations stay within ``budget_bytes`` in
    the planner's memory model (input, checkpoints, tapes, gradients of activations
    and transient peaks; not parameters, their gradients or optimiser state).
    Gradients, BatchNorm statistics and dropout equal plain training's.

    Args:
        module: an ``nn.Sequential`` or a torchvision ResNet (split into stages by
            :func:`.chain.named_stages`).  Its stages may pass tuples of tensors
            (:mod:`.chain`: :class:`~.chain.ApplyToFirst`, :class:`~.chain.KeepInput`,
            :class:`~.chain.MergeSkip`); ``x`` and the output may be tuples.
        budget_bytes: bytes of activation memory, or ``"auto"``: the memory free on
            this node now (psutil and the cgroup limit) minus a 10% safety margin and
            the gradients and SGD-momentum buffer the module will add (see
            :func:`.budget.activation_budget`; ``.budget`` holds the breakdown).
        strategy: ``"optimal"`` (heterogeneous chains, Beaumont et al.; fastest at
            every budget), ``"revolve"`` (Griewank & Walther, equal steps),
            ``"sequential"`` (the best ``checkpoint_sequential`` segmentation) or
            ``"none"`` (plain ``module(x)``).
        sample_input: profile and plan now, for inputs shaped like it (a tensor or
            a tuple of tensors, as ``x``); without it, the first training input is
            profiled.  The plan then serves inputs of any shape.
        cache_dir: where profiles are cached (keyed by architecture, shape, torch
            and machine); None profiles every time.
        loss_fn: optional map of the output to a scalar, timed into the profile.
        granularity: ``"block"`` (a ResNet's residual blocks are stages) or
            ``"conv"`` (split at their convolutions, the skip tensor carried beside:
            a lower minimum budget, a few more stages to run; bitwise equal results).

    Raises:
        ValueError: an unknown strategy or granularity.
        InfeasibleBudget: (a ``ValueError``) when the plan is made, if the budget is
            below the strategy's minimum feasible peak; the message states it.
        TypeError: a module that is neither a Sequential nor a torchvision ResNet.

    Example::

        model = torchvision.models.resnet18(num_classes=10)
        chain = CheckpointedSequential(model, budget_bytes=64 * 2**20,
                                       sample_input=torch.empty(8, 3, 224, 224))
        print(chain.plan.strategy, chain.plan.predicted_peak_bytes, chain.plan.time_ratio)
        loss = F.cross_entropy(chain(images), labels)
        loss.backward()  # recomputes what the plan dropped

    ``.plan`` is the planner's :class:`.planner.Plan` (``strategy``,
    ``predicted_peak_bytes``, ``time_ratio`` against plain training,
    ``min_feasible_bytes``); :meth:`replan` re-plans for a new budget without
    re-profiling.

    **CPU memory.**  The saving is real only if freed activations go back to the
    kernel.  glibc keeps freed tensor memory in its heaps, so on CPU configure the
    allocator first (:func:`.allocator.configure_allocator`, mode ``"mmap"``, as
    ``waggle-trainer run`` does when its plan recomputes); otherwise the process's
    peak barely moves even though fewer activations are alive at once.

    A chain passing skip tensors (a U-Net-like head on a resnet18 trunk ``r``;
    ``UpFuse(c, c_skip, c_out)`` is a module whose ``forward(x, skip)`` up-samples
    ``x`` to the skip's size and fuses both)::

        model = nn.Sequential(OrderedDict(
            conv1=r.conv1, bn1=r.bn1, relu=r.relu, maxpool=r.maxpool, layer1=r.layer1,
            layer2=KeepInput(r.layer2),            # x4 -> (x8, x4)
            layer3=KeepInput(r.layer3),            # -> (x16, x8, x4)
            up1=MergeSkip(UpFuse(256, 128, 128)),  # UpFuse(x16, x8) -> (y8, x4)
            up2=MergeSkip(UpFuse(128, 64, 64)),    # UpFuse(y8, x4) -> y4
            head=nn.Conv2d(64, classes, 1)))
        chain = CheckpointedSequential(model, budget_bytes=96 * 2**20,
                                       sample_input=torch.empty(8, 3, 288, 384))
        loss = loss_fn(chain(images), targets)   # stages: every block, up1, up2, head

    In eval mode or under ``torch.no_grad()`` the module simply runs.  RNG,
    BatchNorm, in-place and unsupported uses: see :mod:`waggle_trainer.remat.executor`.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        budget_bytes: int | Literal["auto"],
        strategy: Strategy = "optimal",
        sample_input: Activation | None = None,
        cache_dir: str | os.PathLike | None = None,
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
        granularity: Granularity = "block",
    ) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        self.module = module
        self.granularity: Granularity = granularity
        named = named_stages(module, granularity)
        # A plain list: the stages are the module's own submodules, not registered twice.
        self._stage_names = [name for name, _ in named]
        self._stages = [stage for _, stage in named]
        self.strategy: Strategy = strategy
        self.budget: BudgetBreakdown | None = None
        if budget_bytes == "auto":
            self.budget = _auto_budget(module)
            budget_bytes = self.budget.activation_budget_bytes
        elif isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
            raise TypeError(f'budget_bytes must be an int or "auto", got {budget_bytes!r}')
        self.budget_bytes = int(budget_bytes)
        self.cache_dir = cache_dir
        self.loss_fn = loss_fn
        self.costs: ChainCosts | None = None
        self.plan: Plan | None = None
        #: Called after every operation of a recomputing schedule; the training run
        #: sets it to :func:`.allocator.release_hook` (return memory the allocator
        #: keeps beyond a slack, so a reusing allocator cannot outgrow the plan).
        self.after_op: Callable[[], object] | None = None
        self._planner: Planner | None = None
        if sample_input is not None:
            self.profile(sample_input)

    @property
    def stages(self) -> list[nn.Module]:
        return list(self._stages)

    def profile(
        self, sample_input: Activation, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """(Re-)profile the chain for inputs shaped like ``sample_input``, then plan.

        ``progress(done, total)`` is called while stages are measured (see
        :func:`.profiler.profile_chain`).
        """
        self.costs = profile_chain(
            self._stages,
            sample_input,
            loss_fn=self.loss_fn,
            cache_dir=self.cache_dir,
            names=self._stage_names,
            progress=progress,
        )
        self.replan(self.budget_bytes)

    def replan(self, budget_bytes: int) -> Plan | None:
        """Plan for a new activation budget from the cached profile; returns the Plan.

        Before the first profile, only records the budget.  On ``InfeasibleBudget``
        the previous plan and budget are kept.
        """
        if self.costs is not None:
            if self._planner is None or self._planner.costs is not self.costs:
                self._planner = Planner(self.costs)
            self.plan = self._planner.plan(int(budget_bytes), self.strategy)
        self.budget_bytes = int(budget_bytes)
        return self.plan

    def forward(self, x: Activation) -> Activation:
        if not (torch.is_grad_enabled() and self.training):
            return self.module(x)
        if self.plan is None:
            self.profile(x)
        assert self.plan is not None
        if self.strategy == "none" or not recomputes(self.plan.schedule):
            # Nothing is recomputed: the model's own forward is the same computation,
            # without per-stage overhead and with its in-place activations.
            return self.module(x)
        return run_schedule(self._stages, self.plan.schedule, x, self.after_op)

    def extra_repr(self) -> str:
        return (
            f"strategy={self.strategy!r}, budget_bytes={self.budget_bytes}, "
            f"stages={len(self._stages)}, granularity={self.granularity!r}"
        )


def _auto_budget(module: nn.Module) -> BudgetBreakdown:
    """Free memory now minus a 10% margin and the training state still to come."""
    state = training_state_bytes(module, "sgd", momentum=0.9)
    return activation_budget(
        state, safety_fraction=0.1, state_resident_bytes=state.parameter_bytes + state.buffer_bytes
    )
