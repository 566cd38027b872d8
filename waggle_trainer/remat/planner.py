"""Choose a checkpointing schedule for a chain and an activation budget (pure).

Strategies:

``none``        plain training: ``FA`` everything, ``LOSS``, ``BW`` everything.
``sequential``  ``checkpoint_sequential``: the segment count whose simulated peak
                fits the budget with the best simulated time.
``revolve``     Revolve with ``u_f`` = mean ``forward_s`` and ``u_b`` = mean
                ``forward_grad_s + backward_s`` of the chain: the slot count ``c``
                whose simulated peak fits with the best simulated time.
``optimal``     the heterogeneous-chain DP (:mod:`.optimal`).

Guarantee of ``optimal``: at every budget its predicted time is <= that of
``revolve``, ``sequential`` and ``none`` at the same budget, and it is feasible
down to the exact minimum peak of the model (:func:`.optimal.min_memory_schedule`),
which is <= theirs.  Revolve's and checkpoint_sequential's schedules lie in the DP's
search space, so the DP alone satisfies this up to its memory discretisation (sizes
are rounded up, so near the edge the DP can miss a schedule that fits by a few
units).  To make the guarantee exact, ``optimal`` evaluates in the simulator the DP's
schedule at the budget, the DP's schedules at up to 8 slightly larger memory levels
(which often still fit), the exact minimum-memory schedule, and the other
strategies' candidates, and returns the fastest that fits; ``detail["source"]``
says which one won (almost always ``"dp"``).

Every schedule a :class:`Plan` carries has been validated by the simulator, whose
peak (``input_bytes`` included) and time are the plan's predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from waggle_trainer.common import STRATEGIES, Strategy, format_sizes_apart

from .costs import ChainCosts
from .optimal import DEFAULT_RESOLUTION, OptimalSolver, min_memory_schedule
from .revolve import RevolveTable
from .schedule import Schedule
from .sequential import no_checkpoint_schedule, sequential_schedule
from .simulate import SimResult, simulate

__all__ = ["STRATEGIES", "InfeasibleBudget", "Plan", "Planner", "plan", "min_feasible_budget"]

MiB = 1 << 20
_PROBES = 8


class InfeasibleBudget(ValueError):
    """The budget is below the smallest peak the strategy can reach."""

    def __init__(self, strategy: str, budget_bytes: int, min_bytes: int):
        budget, minimum = format_sizes_apart(budget_bytes, min_bytes)
        exact = "" if minimum.endswith(" bytes") else f" ({min_bytes} bytes)"
        super().__init__(
            f"strategy {strategy!r}: budget {budget} is below the minimum feasible {minimum}{exact}"
        )
        self.strategy = strategy
        self.budget_bytes = budget_bytes
        self.min_bytes = min_bytes


@dataclass(frozen=True)
class Plan:
    """A schedule with its predictions; peaks include the input, times in seconds."""

    strategy: Strategy
    schedule: Schedule
    budget_bytes: int
    predicted_peak_bytes: int
    predicted_time_s: float
    baseline_time_s: float
    baseline_peak_bytes: int
    min_feasible_bytes: int
    detail: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def time_ratio(self) -> float:
        """Predicted time relative to plain training (strategy ``none``)."""
        return self.predicted_time_s / self.baseline_time_s if self.baseline_time_s else 1.0


@dataclass(frozen=True)
class _Cand:
    schedule: Schedule
    sim: SimResult
    detail: dict


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (allowed: {', '.join(STRATEGIES)})")


def _fastest(cands, budget: int) -> _Cand | None:
    best = None
    for c in cands:
        if c.sim.peak_bytes <= budget and (best is None or c.sim.time_s < best.sim.time_s):
            best = c
    return best


class Planner:
    """Plans for one chain; DP tables and candidate schedules are computed once, on
    first use, so re-planning for a new budget is a lookup plus a few simulations."""

    def __init__(self, costs: ChainCosts, *, resolution: int = DEFAULT_RESOLUTION):
        self.costs = costs
        self.n = len(costs)
        self.resolution = resolution
        sched = no_checkpoint_schedule(self.n)
        self._none = _Cand(sched, simulate(sched, costs), {})
        self._solver: OptimalSolver | None = None
        self._minmem: _Cand | None = None
        self._revolve: tuple[_Cand, ...] | None = None
        self._sequential: tuple[_Cand, ...] | None = None

    # -------------------------------------------------------------- candidates
    @property
    def solver(self) -> OptimalSolver:
        if self._solver is None:
            self._solver = OptimalSolver(self.costs, resolution=self.resolution)
        return self._solver

    def _min_memory(self) -> _Cand:
        if self._minmem is None:
            sched, _ = min_memory_schedule(self.costs)
            self._minmem = _Cand(sched, simulate(sched, self.costs), {"source": "min-memory"})
        return self._minmem

    def revolve_candidates(self) -> tuple[_Cand, ...]:
        """One simulated Revolve schedule per slot count 1 .. n+1."""
        if self._revolve is None:
            st, n = self.costs.stages, self.n
            if n == 0:
                self._revolve = (self._none,)
            else:
                uf = sum(s.forward_s for s in st) / n
                ub = sum(s.forward_grad_s + s.backward_s for s in st) / n
                table = RevolveTable(n, n + 1, uf, ub)
                cands = []
                for c in range(1, n + 2):
                    sched = table.schedule(n, c)
                    detail = {"slots": c, "uf": uf, "ub": ub, "revolve_cost": table.cost(n, c)}
                    cands.append(_Cand(sched, simulate(sched, self.costs, slots=c), detail))
                self._revolve = tuple(cands)
        return self._revolve

    def sequential_candidates(self) -> tuple[_Cand, ...]:
        """One simulated checkpoint_sequential schedule per segment count 1 .. n."""
        if self._sequential is None:
            if self.n == 0:
                self._sequential = (self._none,)
            else:
                self._sequential = tuple(
                    _Cand(s, simulate(s, self.costs), {"segments": k})
                    for k in range(1, self.n + 1)
                    for s in (sequential_schedule(self.n, k),)
                )
        return self._sequential

    # -------------------------------------------------------------- queries
    def min_feasible_budget(self, strategy: Strategy = "optimal") -> int:
        """Smallest budget (bytes, input included) at which ``strategy`` has a plan."""
        _check_strategy(strategy)
        if strategy == "none":
            return self._none.sim.peak_bytes
        if strategy == "optimal":
            return self._min_memory().sim.peak_bytes
        cands = self.revolve_candidates() if strategy == "revolve" else self.sequential_candidates()
        return min(c.sim.peak_bytes for c in cands)

    def plan(self, budget_bytes: int, strategy: Strategy = "optimal") -> Plan:
        """The fastest plan of ``strategy`` whose predicted peak fits ``budget_bytes``.

        Raises :class:`InfeasibleBudget` below :meth:`min_feasible_budget`.
        """
        _check_strategy(strategy)
        budget = int(budget_bytes)
        lowest = self.min_feasible_budget(strategy)
        if budget < lowest:
            raise InfeasibleBudget(strategy, budget, lowest)
        chosen: _Cand | None
        if strategy == "none":
            chosen = self._none
        elif strategy == "revolve":
            chosen = _fastest(self.revolve_candidates(), budget)
        elif strategy == "sequential":
            chosen = _fastest(self.sequential_candidates(), budget)
        else:
            chosen = self._plan_optimal(budget)
        assert chosen is not None  # budget >= the smallest candidate peak
        return Plan(
            strategy=strategy,
            schedule=chosen.schedule,
            budget_bytes=budget,
            predicted_peak_bytes=chosen.sim.peak_bytes,
            predicted_time_s=chosen.sim.time_s,
            baseline_time_s=self._none.sim.time_s,
            baseline_peak_bytes=self._none.sim.peak_bytes,
            min_feasible_bytes=lowest,
            detail=dict(chosen.detail),
        )

    def _plan_optimal(self, budget: int) -> _Cand:
        solver = self.solver
        m0 = solver.units_for(budget)
        extra = {"unit_bytes": solver.unit_bytes}
        cands: list[_Cand] = []
        if solver.min_units is not None and m0 >= solver.min_units:
            levels = [m0] + solver.breakpoints(m0, m0 + self.n + 2)[:_PROBES]
            for m in levels:
                sched = solver.schedule_units(m)
                if sched is None:  # pragma: no cover - m >= min_units always has one
                    continue
                detail = {"source": "dp", "dp_units": m, **extra}
                cands.append(_Cand(sched, simulate(sched, self.costs), detail))
        cands.append(self._min_memory())
        cands.append(_Cand(self._none.schedule, self._none.sim, {"source": "none"}))
        cands.extend(
            _Cand(c.schedule, c.sim, {"source": "revolve", **c.detail})
            for c in self.revolve_candidates()
        )
        cands.extend(
            _Cand(c.schedule, c.sim, {"source": "sequential", **c.detail})
            for c in self.sequential_candidates()
        )
        best = _fastest(cands, budget)
        assert best is not None  # the minimum-memory schedule fits (checked by plan())
        return _Cand(best.schedule, best.sim, {**extra, **best.detail})


def plan(
    costs: ChainCosts,
    budget_bytes: int,
    strategy: Strategy = "optimal",
    *,
    resolution: int = DEFAULT_RESOLUTION,
) -> Plan:
    """One-off :meth:`Planner.plan`; keep a :class:`Planner` to re-plan cheaply."""
    return Planner(costs, resolution=resolution).plan(budget_bytes, strategy)


def min_feasible_budget(costs: ChainCosts, strategy: Strategy = "optimal") -> int:
    """One-off :meth:`Planner.min_feasible_budget`."""
    return Planner(costs).min_feasible_budget(strategy)
