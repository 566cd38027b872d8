"""A memory-planned training run: the student trained under the checkpointing plan
that fits the memory free on this machine, with its plan and measurements.

This is what ``waggle-trainer run`` (until the daemon exists), ``bench`` and the
benchmarks drive.  The data is synthetic: fresh random images and random labels each
step (a fixed batch drives the loss to 0 and the gradients subnormal, which makes CPU
kernels far slower), so the loss measures nothing; the run measures memory and time.

Peak memory is measured as resident set size (RSS) sampled by a thread every
millisecond, so it sees the transient peaks of a step; ``growth`` is the peak over
the baseline taken after a warm-up step (when parameters, gradients and optimiser
state are resident and freed activations have been trimmed), which is what the
plan's ``predicted_peak_bytes`` predicts.  What the first step leaves behind is
measured in anonymous memory (:func:`anonymous_rss`): the RSS also counts the pages of
torch's libraries that the first step's kernels touch (39 MiB for resnet50 on x86-64),
which are shared, clean and reclaimable and which a memory cgroup does not charge to a
process that finds them already cached.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from torch import nn

from waggle_trainer.common import (
    CLASSES_MIN,
    DEFAULT_CLASSES,
    GRANULARITIES,
    IMAGE_SIZE_MAX,
    IMAGE_SIZE_MIN,
    Arch,
    Granularity,
    OptimizerName,
    Strategy,
    batch_too_small,
)
from waggle_trainer.remat import allocator
from waggle_trainer.remat.budget import (
    BudgetBreakdown,
    BudgetWatcher,
    activation_budget,
    training_state_bytes,
)
from waggle_trainer.remat.chain import build_resnet, named_stages
from waggle_trainer.remat.executor import CheckpointedSequential
from waggle_trainer.remat.fused_step import FusedStep, costs_with_fused_step
from waggle_trainer.remat.optim import make_optimizer
from waggle_trainer.remat.overhead import (
    DEFAULT,
    Overhead,
    load_overhead,
    save_overhead,
    schedule_digest,
)
from waggle_trainer.remat.planner import InfeasibleBudget, Plan
from waggle_trainer.remat.profiler import profile_chain
from waggle_trainer.remat.schedule import recomputes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """What to train and under which memory budget."""

    arch: Arch = "resnet18"
    batch: int = 8
    image: int = 224
    classes: int = DEFAULT_CLASSES
    strategy: Strategy = "optimal"
    budget: int | str = "auto"  # bytes of activation memory, or "auto"
    safety_margin: float = 0.1
    optimizer: OptimizerName = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    # None: the optimiser's own default; else on weights only (remat/optim.py)
    weight_decay: float | None = None
    replan_threshold: float = 0.1
    cache_dir: Path | None = None
    seed: int = 0
    width: int | None = None  # input width when it differs from ``image`` (the height)
    # The optimiser step runs inside the backward, one parameter at a time
    # (remat/fused_step.py): no whole-model gradients, same results.
    fused_step: bool = False
    # Plan before the first step with the overhead known on this machine: this
    # configuration's record, else the machine's step model (remat/overhead.py).
    known_overhead: bool = True
    # When the machine's step model is missing: measure it now (small runs in fresh
    # processes, once per machine: learn/overhead_probe.py).
    probe_overhead: bool = False
    # Residual blocks as stages ("block") or split at their convolutions ("conv":
    # the skip tensor carried beside the main one; a smaller smallest plan).
    granularity: Granularity = "block"

    def __post_init__(self) -> None:
        """The limits of the config file, named as the command line's flags."""
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        if not IMAGE_SIZE_MIN <= self.image <= IMAGE_SIZE_MAX:
            raise ValueError(
                f"--image {self.image} is out of range ({IMAGE_SIZE_MIN}..{IMAGE_SIZE_MAX} px)"
            )
        if self.classes < CLASSES_MIN:
            raise ValueError(
                f"--classes {self.classes} is out of range (at least {CLASSES_MIN}: "
                "one class has nothing to learn)"
            )
        if self.width is not None and not IMAGE_SIZE_MIN <= self.width <= IMAGE_SIZE_MAX:
            raise ValueError(
                f"--width {self.width} is out of range ({IMAGE_SIZE_MIN}..{IMAGE_SIZE_MAX} px)"
            )
        why = batch_too_small(self.batch, self.image, self.width)
        if why:
            raise ValueError(f"--batch {self.batch} is too small for --image {self.image} ({why})")
        if not 0 <= self.safety_margin < 1:
            raise ValueError(f"--safety-margin {self.safety_margin} is out of range (0 <= f < 1)")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"--granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}"
            )

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(batch, 3, height, width)`` of a training batch."""
        return (self.batch, 3, self.image, self.width or self.image)


ROOM_FOR_GLIBC = 2.0


def allocator_mode_for(plan) -> str:
    """The allocator mode a plan needs (see :mod:`waggle_trainer.remat.allocator`).

    ``"mmap"`` (a fixed mmap threshold) makes what a checkpointing plan frees really
    go back to the kernel, at the price of page faults (slower steps; measured in
    ``bench/results/allocator.md``).  When the plan recomputes nothing and the budget
    has room for glibc's own fragmentation (``ROOM_FOR_GLIBC`` times the predicted
    peak), there is nothing to make real and glibc's defaults are kept: ``"default"``.
    """
    if (
        not recomputes(plan.schedule)
        and plan.budget_bytes >= ROOM_FOR_GLIBC * plan.predicted_peak_bytes
    ):
        return "default"
    return "mmap"


class RssSampler:
    """Samples this process's RSS in a thread; ``peak`` since the last ``reset``."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.peak = self.current()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def current(self) -> int:
        return self._proc.memory_info().rss

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            rss = self.current()
            with self._lock:
                if rss > self.peak:
                    self.peak = rss

    def reset(self) -> int:
        with self._lock:
            self.peak = self.current()
            return self.peak

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def anonymous_rss() -> int | None:
    """This process's resident anonymous and shared-memory pages (``RssAnon + RssShmem``
    of ``/proc/self/status``): what a memory cgroup charges to it and cannot reclaim
    without swap.  None where the file is missing (not Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssShmem"):
            kib[key] = int(value.split()[0])
    return 1024 * sum(kib.values()) if "RssAnon" in kib else None


Progress = Callable[[int, int], None]


def profiled_resnet(
    arch: str,
    classes: int,
    batch: int,
    image: int,
    cache_dir: Path | None,
    progress: Progress | None = None,
    granularity: Granularity = "block",
):
    """A fresh ResNet in training mode, its stages (at ``granularity``) and their
    profile (cached in ``cache_dir``) for ``batch`` images of ``image`` px:
    ``(model, stages, costs)``."""
    model = build_resnet(arch, classes).train()
    named = named_stages(model, granularity)
    stages = [m for _, m in named]
    costs = profile_chain(
        stages,
        torch.empty(batch, 3, image, image),
        cache_dir=cache_dir,
        names=[n for n, _ in named],
        progress=progress,
    )
    return model, stages, costs


def resolve_budget(model: nn.Module, spec: RunSpec, *, reserve_bytes: int = 0) -> BudgetBreakdown:
    """The activation budget for ``spec``: a given size, or what is free here now."""
    state = training_state_bytes(
        model, spec.optimizer, momentum=spec.momentum, fused_step=spec.fused_step
    )
    if spec.budget != "auto":
        return BudgetBreakdown(
            free_bytes=int(spec.budget),
            safety_margin_bytes=0,
            training_state_bytes=state.total_bytes,
            training_state_resident_bytes=state.total_bytes,
            reserve_bytes=0,
            activation_budget_bytes=int(spec.budget),
            limited_by="given",
        )
    # Parameters and buffers exist already; gradients and optimiser state arrive
    # with the first step and must fit too.
    resident = state.parameter_bytes + state.buffer_bytes
    return activation_budget(
        state,
        safety_fraction=spec.safety_margin,
        state_resident_bytes=resident,
        reserve_bytes=reserve_bytes,
    )


@dataclass
class PlannedTraining:
    """A student, its checkpointed chain and optimiser, ready to step."""

    spec: RunSpec
    model: nn.Module
    chain: CheckpointedSequential
    optimizer: torch.optim.Optimizer
    budget: BudgetBreakdown
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    watcher: BudgetWatcher | None = None
    replans: int = 0
    allocator_mode: str = "default"
    overshoot_bytes: int = 0
    #: What calibration did: "" (nothing to do), "off" (not run), "re-planned", "no smaller plan"
    #: (the plan for the budget minus the overhead is the one already running) or
    #: "infeasible" (nothing fits the budget minus the overhead: the smallest plan runs).
    calibration: str = ""
    fused: FusedStep | None = None
    #: The overhead this run planned with before its first step: measured before for
    #: this configuration ("cache"), predicted by the machine's step model ("machine")
    #: or :data:`~waggle_trainer.remat.overhead.DEFAULT` ("default").
    overhead: Overhead = DEFAULT
    overhead_source: str = "default"
    #: This process measured the profile: its heap holds the profiler's leftovers, so
    #: its steps' overhead is not the machine's and is not cached (measured 93 MiB of
    #: step overhead for resnet50 batch 8 against 28 in a process that did not profile).
    profiled_here: bool = False

    def calibrate(self, rss: RssSampler, rounds: int = 3, batch=None) -> int:
        """Measure one step; take what it needed beyond the plan's prediction off the
        budget and re-plan, so that the real peak stays within the budget.

        The profile sees tensors, not the allocator's heap for small blocks or the
        scratch buffers of oneDNN kernels.  Repeats (up to ``rounds`` steps) while the
        measured peak exceeds the budget and a smaller plan exists.  Only when memory is
        tight (allocator mode ``mmap``; under glibc's defaults the budget has room by
        construction).  ``batch()`` makes a training batch ``(x, y)`` (default
        :meth:`batch`: random data).  Records what it did in :attr:`calibration`; returns
        the overshoot in bytes.
        """
        batch = batch or self.batch
        if self.allocator_mode != "mmap":
            return 0
        budget = self.budget.activation_budget_bytes
        for _ in range(rounds):
            allocator.trim()
            base = rss.reset()
            self.step(*batch())
            growth = rss.peak - base
            overshoot = growth - self._plan.predicted_peak_bytes
            if growth <= budget or overshoot <= self.overshoot_bytes:
                break
            schedule = self._plan.schedule
            self.overshoot_bytes = overshoot
            if not self._replan_within(budget):
                self.calibration = "infeasible"
                break
            if self._plan.schedule == schedule:
                self.calibration = "no smaller plan"
                break
            self.calibration = "re-planned"
        return self.overshoot_bytes

    @property
    def _plan(self) -> Plan:
        assert self.chain.plan is not None  # profiled at build
        return self.chain.plan

    def _replan_within(self, budget_bytes: int) -> bool:
        """Re-plan for ``budget_bytes`` minus the measured overhead; when nothing fits
        that, run the smallest plan there is and return whether it was measured to fit
        (:meth:`_smallest_measured_to_fit`)."""
        try:
            self.chain.replan(max(0, budget_bytes - self.overshoot_bytes))
            fits = True
        except InfeasibleBudget as exc:
            fits = self._smallest_measured_to_fit(exc, budget_bytes)
            if not fits:
                log.warning(
                    "measured overhead %s leaves too little for any plan (%s); "
                    "running the smallest plan",
                    _mib(self.overshoot_bytes),
                    exc,
                )
        self._set_release_hook()
        return fits

    def _smallest_measured_to_fit(self, exc: InfeasibleBudget, budget_bytes: int) -> bool:
        """Nothing fits ``budget_bytes`` minus the largest step overhead seen: switch to the
        smallest plan and say whether an earlier run on this machine measured its growth
        within ``budget_bytes`` (its own overhead is often smaller than the largest)."""
        self.chain.replan(exc.min_bytes)
        growth = self.overhead.plan_growth.get(schedule_digest(self._plan.schedule))
        if growth is None or growth > budget_bytes:
            return False
        log.info(
            "the smallest plan (predicted %s) was measured before at %s, within the budget %s",
            _mib(self._plan.predicted_peak_bytes),
            _mib(growth),
            _mib(budget_bytes),
        )
        return True

    def _configure_allocator(self) -> None:
        """Switch to the mode the current plan needs (only ever towards "mmap":
        glibc's dynamic threshold cannot be restored once fixed)."""
        wanted = allocator_mode_for(self._plan)
        if wanted != self.allocator_mode and self.allocator_mode != "mmap":
            allocator.configure_allocator(wanted)
            self.allocator_mode = wanted
            log.debug(
                "allocator mode %s chosen: the plan %s",
                wanted,
                "recomputes activations or leaves glibc no room"
                if wanted == "mmap"
                else "recomputes nothing and the budget has room",
            )
        self._set_release_hook()
        allocator.trim()

    def _set_release_hook(self) -> None:
        """Under a reusing allocator (tcmalloc) the plan's freed activations stay with it
        for the next stage to reuse (no page faults); past what the plan leaves unused
        of the budget, the executor gives the excess back between operations, so the
        process's growth follows the plan (:func:`.allocator.release_hook`)."""
        unused = (
            self.budget.activation_budget_bytes
            - self._plan.predicted_peak_bytes
            - max(self.overhead.step_bytes, self.overshoot_bytes)
        )
        self.chain.after_op = (
            allocator.release_hook(allocator.release_slack_bytes(unused))
            if self.allocator_mode == "mmap"
            else None
        )

    @classmethod
    def build(cls, spec: RunSpec, *, progress: Progress | None = None) -> PlannedTraining:
        """Build the student, resolve the budget, profile (``progress(done, total)``
        while measuring) and plan."""
        torch.manual_seed(spec.seed)
        model = build_resnet(spec.arch, spec.classes).train()
        return cls.for_model(model, spec, progress=progress)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        spec: RunSpec,
        loss_fn=None,
        *,
        progress: Progress | None = None,
        smallest_plan_when_tight: bool = False,
    ) -> PlannedTraining:
        """``model`` (a chain :mod:`waggle_trainer.remat.chain` can split) planned for
        batches of ``spec.input_shape`` within ``spec.budget``; ``loss_fn(output, y)``
        (default cross-entropy).

        A budget no plan fits raises ``InfeasibleBudget``.  When the budget fits a plan
        but not once the cached step overhead is taken off, that is refused too, unless
        ``smallest_plan_when_tight``: then the smallest plan runs, after one warning, as
        after a calibration step that measured the same (the node's loop, which must
        not stop where its first start trained)."""
        budget = resolve_budget(model, spec)
        chain = CheckpointedSequential(
            model,
            budget_bytes=budget.activation_budget_bytes,
            strategy=spec.strategy,
            cache_dir=spec.cache_dir,
            granularity=spec.granularity,
        )
        profiled: list[int] = []  # progress is reported only when measuring (no cache hit)

        def measuring(done: int, total: int) -> None:
            profiled.append(done)
            if progress is not None:
                progress(done, total)

        chain.profile(torch.empty(*spec.input_shape), progress=measuring)
        watcher = BudgetWatcher(threshold=spec.replan_threshold) if spec.budget == "auto" else None
        optimizer = make_optimizer(
            model.parameters(),
            spec.optimizer,
            lr=spec.learning_rate,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
        )
        training = cls(spec, model, chain, optimizer, budget, watcher=watcher)
        training.profiled_here = bool(profiled)
        if loss_fn is not None:
            training.loss_fn = loss_fn
        if spec.fused_step:
            training.fuse_step()
        training._configure_allocator()
        training._plan_with_cached_overhead(smallest_plan_when_tight)
        return training

    def overhead_key(self) -> dict:
        """The facts a measured overhead (:mod:`~waggle_trainer.remat.overhead`) holds for."""
        from waggle_trainer.remat.profiler import profile_key

        s = self.spec
        key = profile_key(self.chain.stages, torch.empty(*s.input_shape))
        # not the optimiser or the fused step: the residue is the runtime's, the state
        # the first step creates is subtracted from it
        return {
            **key,
            "allocator": allocator.loaded_allocator(),
            "allocator_mode": self.allocator_mode,
        }

    def _plan_with_cached_overhead(self, smallest_plan_when_tight: bool = False) -> None:
        """Before the first step: reserve the cached first-step residue in an automatic
        budget and plan for the activation budget minus the cached step overhead
        (see :meth:`for_model` for a budget the overhead leaves too small)."""
        cached = (
            load_overhead(self.spec.cache_dir, self.overhead_key())
            if self.spec.known_overhead
            else None
        )
        if cached is not None:
            self.overhead_source = "cache"
        else:
            cached = self._predicted_overhead()
        self.overhead = cached
        if self.spec.budget == "auto":
            self.budget = resolve_budget(
                self.model, self.spec, reserve_bytes=cached.first_step_residue_bytes
            )
        self.overshoot_bytes = max(self.overshoot_bytes, cached.step_bytes)
        # Before the first step nothing runs yet: a budget that the overhead leaves too
        # small is refused (InfeasibleBudget), not trained into an OOM kill, unless the
        # smallest plan was measured to fit it, or the caller keeps training in the
        # smallest plan (the budget itself must fit it).
        budget = self.budget.activation_budget_bytes
        try:
            self.chain.replan(max(0, budget - self.overshoot_bytes))
        except InfeasibleBudget as exc:
            if not self._smallest_measured_to_fit(exc, budget):
                if not smallest_plan_when_tight or budget < exc.min_bytes:
                    raise
                self._replan_within(budget)  # the smallest plan, one warning
        self._configure_allocator()
        log.info(
            "overhead (%s): %d MiB per step, %d MiB after the first; planned for %d MiB of tensors",
            {
                "cache": "measured before for this configuration",
                "machine": "predicted by this machine's step model",
            }.get(self.overhead_source, "default until measured"),
            cached.step_bytes >> 20,
            cached.first_step_residue_bytes >> 20,
            self._plan.predicted_peak_bytes >> 20,
        )

    def _predicted_overhead(self) -> Overhead:
        """The machine's step model's prediction for this chain (probed now when
        ``spec.probe_overhead`` and none is cached), else :data:`DEFAULT`.  Only for a
        plan that runs with the fixed mmap threshold: what the probe measures."""
        from waggle_trainer.learn.overhead_probe import activation_scale, step_model

        if not self.spec.known_overhead or self.allocator_mode != "mmap":
            return DEFAULT
        assert self.chain.costs is not None  # profiled at build
        model = step_model(self.spec.cache_dir, self.allocator_mode, probe=self.spec.probe_overhead)
        if model is None:
            return DEFAULT
        self.overhead_source = "machine"
        step = model.predict(activation_scale(self.chain.costs))
        return Overhead(step, DEFAULT.first_step_residue_bytes, steps_measured=0)

    def state_bytes_created_by_first_step(self) -> int:
        """Optimiser state (and resident gradients, when not fused) the first step creates."""
        state = training_state_bytes(
            self.model,
            self.spec.optimizer,
            momentum=self.spec.momentum,
            fused_step=self.fused is not None,
        )
        return state.optimizer_state_bytes + state.gradient_bytes

    def record_overhead(
        self,
        *,
        step_growths: list[tuple[Plan, int]] | None = None,
        first_step_residue_bytes: int | None = None,
    ) -> Overhead:
        """Cache what was measured (merged with what is cached): each step's growth over
        the baseline with the plan that ran it (its excess over that plan's prediction
        is the step overhead; the growth is that plan's own) and what the first step left
        resident beyond the state it created."""
        step = 0
        growth: dict[str, int] = {}
        for plan, g in step_growths or ():
            step = max(step, g - plan.predicted_peak_bytes)
            digest = schedule_digest(plan.schedule)
            growth[digest] = max(growth.get(digest, 0), max(0, g))
        measured = Overhead(step, max(0, first_step_residue_bytes or 0), 1, growth)
        save_overhead(self.spec.cache_dir, self.overhead_key(), measured)
        return measured

    def fuse_step(self) -> None:
        """Fuse the optimiser step into the backward (:mod:`~waggle_trainer.remat.fused_step`)
        and re-plan with its temporaries counted in every stage's backward peak."""
        if self.fused is not None:
            return
        self.fused = FusedStep(self.optimizer)
        assert self.chain.costs is not None  # profiled at build
        self.chain.costs = costs_with_fused_step(
            self.chain.costs, self.chain.stages, self.optimizer
        )
        self.chain.replan(self.chain.budget_bytes)

    def maybe_replan(self) -> bool:
        """Between steps: re-plan if free memory moved by more than the threshold."""
        if self.watcher is None:
            return False
        allocator.trim()
        change = self.watcher.poll()
        if change is None:
            return False
        state = training_state_bytes(
            self.model,
            self.spec.optimizer,
            momentum=self.spec.momentum,
            fused_step=self.fused is not None,
        )
        self.budget = activation_budget(
            state,
            free=change.current_bytes,
            safety_fraction=self.spec.safety_margin,
            state_resident_bytes=state.total_bytes,
        )
        old = self._plan
        fits = self._replan_within(self.budget.activation_budget_bytes)
        plan = self._plan
        self.replans += 1
        self._configure_allocator()
        log.info(
            "free memory moved %+.0f%%: re-planned %s for %s (peak %s -> %s)%s",
            100 * change.fraction,
            plan.strategy,
            _mib(self.budget.activation_budget_bytes),
            _mib(old.predicted_peak_bytes),
            _mib(plan.predicted_peak_bytes),
            "" if fits else "; nothing fits the new budget, the smallest plan runs",
        )
        return True

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        return torch.randn(*s.input_shape), torch.randint(0, s.classes, (s.batch,))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.fused is not None:  # the backward steps each parameter and drops its gradient
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.chain(x), y)
            loss.backward()
            return float(loss.detach())
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.loss_fn(self.chain(x), y)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class RunResult:
    """What a planned run measured, beside what its plan predicted (bytes, seconds)."""

    arch: str
    batch: int
    image: int
    strategy: Strategy
    budget_bytes: int
    plan_budget_bytes: int  # what the final plan was made for (budget minus calibration)
    predicted_peak_bytes: int
    predicted_time_ratio: float
    min_feasible_bytes: int
    steps: int
    median_step_s: float
    step_times_s: list[float]
    baseline_rss_bytes: int
    peak_rss_bytes: int
    peak_rss_growth_bytes: int
    losses: list[float]
    replans: int
    allocator_mode: str
    calibration_bytes: int
    calibration: str
    budget_breakdown: dict
    data: str = "synthetic"  # random images and labels: the loss measures nothing
    width: int | None = None  # input width when it differs from ``image`` (the height)

    fused_step: bool = False
    allocator: str = "glibc"  # the malloc this process runs under (/proc/self/maps)
    # The overhead model: what the plan was made with before the first step: measured
    # before ("cache") or the default until measured ("default"); bytes per step and
    # after the first step.
    overhead_source: str = "default"
    overhead_step_bytes: int = 0
    overhead_residue_bytes: int = 0
    # predicted_peak_bytes + the modelled step overhead: what the growth should be
    predicted_growth_bytes: int = 0
    first_step_residue_bytes: int | None = None  # measured in this run (None: not its first)
    # What the measured steps cost the process (getrusage, all its threads, the RSS
    # sampler's included): CPU seconds (user + system), of which system (page faults,
    # mmap/munmap: the allocator's share), and page faults (minor + major).  Unlike
    # wall time, these hardly move when other processes load the machine.
    cpu_s_per_step: float = 0.0
    sys_s_per_step: float = 0.0
    page_faults_per_step: float = 0.0
    # the overhead measured here was cached (not when this process profiled the chain)
    overhead_recorded: bool = True
    granularity: str = "block"  # the chain's stages: residual blocks, or split at convolutions

    @property
    def budget_kept(self) -> bool:
        """The promise: a step's measured growth stayed within the activation budget."""
        return self.peak_rss_growth_bytes <= self.budget_bytes

    @property
    def diverged_at(self) -> int | None:
        """The first measured step whose loss is not finite (1-based), or None."""
        return next((i + 1 for i, v in enumerate(self.losses) if not math.isfinite(v)), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "budget_kept": self.budget_kept, "diverged_at": self.diverged_at}


class StepUsage:
    """Sums this process's CPU time (user + system), system time and page faults
    over the ``with`` blocks (``getrusage``: every thread of the process)."""

    def __init__(self) -> None:
        self.cpu_s = self.sys_s = 0.0
        self.faults = 0

    def __enter__(self) -> None:
        self._start = resource.getrusage(resource.RUSAGE_SELF)

    def __exit__(self, *exc) -> None:
        end, start = resource.getrusage(resource.RUSAGE_SELF), self._start
        self.sys_s += end.ru_stime - start.ru_stime
        self.cpu_s += end.ru_utime - start.ru_utime + end.ru_stime - start.ru_stime
        self.faults += end.ru_minflt - start.ru_minflt + end.ru_majflt - start.ru_majflt


def measure(
    training: PlannedTraining, steps: int, *, warmup: int = 1, calibrate: bool = True
) -> RunResult:
    """Run ``warmup`` + ``steps`` training steps; time them and sample RSS.

    ``calibrate=False`` skips the calibration step (:meth:`PlannedTraining.calibrate`):
    the plan made before the first step runs as it is (recorded as ``"off"``), which is
    how the overhead model's predictions are checked."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    times, losses = [], []
    with RssSampler() as rss:
        fresh = not training.optimizer.state  # the first step creates the optimiser state
        allocator.trim()
        before = rss.reset()  # the RSS now
        anon_before = anonymous_rss()
        for _ in range(warmup):
            training.step(*training.batch())
        allocator.trim()
        after = rss.reset()
        anon_after = anonymous_rss()
        residue = None
        if fresh and warmup:
            # anonymous memory: the library pages the first step maps in are not charged
            grown = (
                after - before
                if anon_before is None or anon_after is None
                else anon_after - anon_before
            )
            residue = max(0, grown - training.state_bytes_created_by_first_step())
        if calibrate:
            training.calibrate(rss)
        else:
            training.calibration = "off"
        allocator.trim()
        baseline = peak = rss.reset()
        # each step's growth with the plan that ran it: a re-plan between steps must not
        # charge one plan's peak to another's prediction
        growths: list[tuple[Plan, int]] = []
        usage = StepUsage()
        for _ in range(steps):
            rss.reset()
            ran = training._plan
            x, y = training.batch()
            t0 = time.perf_counter()
            with usage:
                losses.append(training.step(x, y))
            times.append(time.perf_counter() - t0)
            del x, y
            growths.append((ran, rss.peak - baseline))
            peak = max(peak, rss.peak)
            training.maybe_replan()
    plan = training._plan
    if not training.profiled_here:
        training.record_overhead(step_growths=growths, first_step_residue_bytes=residue)
    known = training.overhead
    return RunResult(
        arch=training.spec.arch,
        batch=training.spec.batch,
        image=training.spec.image,
        width=training.spec.width,
        granularity=training.spec.granularity,
        strategy=plan.strategy,
        budget_bytes=training.budget.activation_budget_bytes,
        plan_budget_bytes=plan.budget_bytes,
        predicted_peak_bytes=plan.predicted_peak_bytes,
        predicted_time_ratio=plan.time_ratio,
        min_feasible_bytes=plan.min_feasible_bytes,
        steps=steps,
        median_step_s=statistics.median(times),
        step_times_s=times,
        baseline_rss_bytes=baseline,
        peak_rss_bytes=peak,
        peak_rss_growth_bytes=peak - baseline,
        losses=losses,
        replans=training.replans,
        allocator_mode=training.allocator_mode,
        calibration_bytes=training.overshoot_bytes,
        calibration=training.calibration,
        budget_breakdown=training.budget.to_dict(),
        fused_step=training.fused is not None,
        allocator=allocator.loaded_allocator(),
        overhead_source=training.overhead_source,
        overhead_step_bytes=known.step_bytes,
        overhead_residue_bytes=known.first_step_residue_bytes,
        predicted_growth_bytes=plan.predicted_peak_bytes + known.step_bytes,
        first_step_residue_bytes=residue,
        cpu_s_per_step=usage.cpu_s / steps,
        sys_s_per_step=usage.sys_s / steps,
        page_faults_per_step=usage.faults / steps,
        overhead_recorded=not training.profiled_here,
    )
