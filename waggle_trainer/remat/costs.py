"""What the planners know about a chain: per-stage times and sizes (pure, no torch).

A chain has stages ``0 .. n-1``; stage ``j`` maps activation ``a[j]`` to ``a[j+1]``.
``a[0]`` is the chain's input (held by the caller for the whole step) and ``a[n]``
its output, on which the loss is computed.  The loss is the chain's last step: its
backward produces ``delta[n]``, the gradient of the loss with respect to ``a[n]``.

All sizes are bytes, all times seconds, measured on this machine by
``waggle_trainer.remat.profiler``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class StageCost:
    """Measured cost of one stage.

    forward_s            time of the forward without autograd (F-nograd / F-check)
    forward_grad_s       time of the forward with autograd recording (F-all)
    backward_s           time of the backward, given the recorded tape
    output_bytes         size of ``a[j+1]``: what keeping it as a checkpoint costs,
                         and also the size of ``delta[j+1]``
    saved_bytes          what F-all keeps alive until the backward (the tape),
                         *including* the output ``a[j+1]``, *excluding* the input
                         ``a[j]`` and the parameters
    forward_peak_bytes   transient memory during the forward beyond input and output
    backward_peak_bytes  transient memory during the backward beyond the tape,
                         ``delta[j+1]`` and ``delta[j]``
    """

    name: str
    forward_s: float
    forward_grad_s: float
    backward_s: float
    output_bytes: int
    saved_bytes: int
    forward_peak_bytes: int = 0
    backward_peak_bytes: int = 0


@dataclass(frozen=True)
class ChainCosts:
    """The costs of a whole chain plus how they were obtained."""

    input_bytes: int
    stages: tuple[StageCost, ...]
    loss_s: float = 0.0
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __len__(self) -> int:
        return len(self.stages)

    def to_dict(self) -> dict:
        return {
            "input_bytes": self.input_bytes,
            "loss_s": self.loss_s,
            "meta": dict(self.meta),
            "stages": [vars(s).copy() for s in self.stages],
        }

    def with_step_bytes(self, step_bytes: Sequence[int]) -> ChainCosts:
        """These costs with ``step_bytes[j]`` added to stage ``j``'s backward peak.

        For an optimiser step fused into the backward
        (:mod:`waggle_trainer.remat.fused_step`): each parameter is stepped as soon as
        its gradient is complete, inside ``BW j``, and the step's temporaries add to
        that backward's transient.  The planners and the simulator then count them
        like any other transient.  Recorded in ``meta["fused_step_bytes"]``; adding
        them twice is an error.
        """
        if "fused_step_bytes" in self.meta:
            raise ValueError("these costs already include a fused optimiser step")
        extra = [int(b) for b in step_bytes]
        if len(extra) != len(self.stages) or any(b < 0 for b in extra):
            raise ValueError(f"step_bytes must be {len(self.stages)} byte counts >= 0, got {extra}")
        stages = tuple(
            replace(s, backward_peak_bytes=s.backward_peak_bytes + b)
            for s, b in zip(self.stages, extra, strict=True)
        )
        return ChainCosts(
            self.input_bytes, stages, self.loss_s, {**self.meta, "fused_step_bytes": extra}
        )

    @classmethod
    def from_dict(cls, data: dict) -> ChainCosts:
        return cls(
            input_bytes=int(data["input_bytes"]),
            stages=tuple(StageCost(**s) for s in data["stages"]),
            loss_s=float(data.get("loss_s", 0.0)),
            meta=dict(data.get("meta", {})),
        )
