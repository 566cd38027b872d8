"""What the planners know about a chain: per-stage times and sizes (pure, no torch).

A chain has stages ``0 .. n-1``; stage ``j`` maps activation ``a[j]`` to ``a[j+1]``.
``a[0]`` is the chain's input (held by the caller for the whole step) and ``a[n]``
its output, on which the loss is computed.  The loss is the chain's last step: its
backward produces ``delta[n]``, the gradient of the loss with respect to ``a[n]``.

**Activations that are tuples.**  An activation may be one tensor or a tuple of
tensors (:mod:`waggle_trainer.remat.chain`).  Its size (``input_bytes``,
``output_bytes``) is the sum over its tensors of each one's bytes (its storage's, at
least ``numel * element_size``): what keeping it *on its own* costs, and an upper
bound on its gradient ``delta``, which has one tensor per tensor of the activation.

A tensor that a stage returns unchanged (the very tensor it received, such as a skip
tensor carried beside the main one) is *one* storage in several activations:
:attr:`ChainCosts.carried` lists these as ``(first, last, bytes)``.  A stage sees
only its own input, so a storage in ``a[i]`` and ``a[k]`` is in every activation
between them (an interval).  What a set of live activations holds is therefore:

* the union of their parts, each part counted once (:meth:`ChainCosts.parts`, what
  the simulator counts), and
* for nested checkpoints ``s < s' < s''`` (what the dynamic programs keep): exactly
  ``size(a[s]) + kept(s, s') + kept(s', s'')``, where ``kept(s, t) = size(a[t]) -
  shared(s, t)`` (:meth:`ChainCosts.kept_bytes`), because whatever ``a[s'']`` shares
  with ``a[s]`` it also shares with ``a[s']``.

Counting each tensor's whole storage, and a storage that two tensors of a tuple
share twice, may over-count, never under-count: a budget the planners promise holds.

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
    output_bytes         size of ``a[j+1]`` (see the module doc for tuples): what
                         keeping it as a checkpoint costs on its own, and also the
                         size of ``delta[j+1]``
    saved_bytes          what F-all keeps alive until the backward (the tape),
                         *including* the output ``a[j+1]`` except the tensors it
                         passes through unchanged (they are ``a[j]``'s), *excluding*
                         the input ``a[j]`` and the parameters
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


#: ``(first, last, bytes)``: storages of ``a[first]`` passed through unchanged by
#: stages ``first .. last-1``, so also part of ``a[first+1] .. a[last]``.
Carried = tuple[int, int, int]


@dataclass(frozen=True)
class ChainCosts:
    """The costs of a whole chain plus how they were obtained.

    ``carried`` lists the storages shared by several activations (see the module
    doc); it is empty for a chain whose stages each compute a new tensor.
    """

    input_bytes: int
    stages: tuple[StageCost, ...]
    loss_s: float = 0.0
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    carried: tuple[Carried, ...] = ()

    def __post_init__(self) -> None:
        if not self.carried:
            return
        carried = tuple((int(c[0]), int(c[1]), int(c[2])) for c in self.carried)
        object.__setattr__(self, "carried", carried)
        n, sizes = len(self.stages), self.sizes()
        covered = [0] * (n + 1)
        for first, last, nbytes in carried:
            if not 0 <= first < last <= n or nbytes < 0:
                raise ValueError(
                    f"carried storage {(first, last, nbytes)}: need 0 <= first < last <= {n} "
                    "and bytes >= 0"
                )
            for k in range(first, last + 1):
                covered[k] += nbytes
        for k in range(n + 1):
            if covered[k] > sizes[k]:
                raise ValueError(
                    f"the carried storages of a[{k}] ({covered[k]} bytes) exceed its size "
                    f"({sizes[k]} bytes)"
                )

    def __len__(self) -> int:
        return len(self.stages)

    def sizes(self) -> list[int]:
        """Sizes of ``a[0] .. a[n]``, each on its own (also those of ``delta[k]``)."""
        return [self.input_bytes] + [s.output_bytes for s in self.stages]

    def shared_bytes(self) -> dict[tuple[int, int], int]:
        """``{(s, t): bytes}`` for ``s < t``: the bytes ``a[s]`` and ``a[t]`` share
        (pairs that share nothing are absent)."""
        out: dict[tuple[int, int], int] = {}
        for first, last, nbytes in self.carried:
            if nbytes:
                for s in range(first, last):
                    for t in range(s + 1, last + 1):
                        out[(s, t)] = out.get((s, t), 0) + nbytes
        return out

    def kept_bytes(self, s: int, t: int) -> int:
        """What ``a[t]`` adds to a live ``a[s]`` (``s < t``): its size minus the
        storages they share."""
        shared = sum(b for first, last, b in self.carried if first <= s and t <= last)
        return self.sizes()[t] - shared

    def parts(self) -> tuple[list[int], list[list[int]]]:
        """The activations as disjoint parts: ``(part_bytes, parts_of)``.

        ``parts_of[k]`` lists the parts of ``a[k]``: part ``k`` is what ``a[k]`` holds
        alone (its size minus its carried storages), then one part per entry of
        :attr:`carried` that spans ``k``.  The bytes a set of live activations holds
        are those of the union of their parts.
        """
        sizes = self.sizes()
        part_bytes = list(sizes)
        parts_of = [[k] for k in range(len(sizes))]
        for first, last, nbytes in self.carried:
            p = len(part_bytes)
            part_bytes.append(nbytes)
            for k in range(first, last + 1):
                part_bytes[k] -= nbytes
                parts_of[k].append(p)
        return part_bytes, parts_of

    def to_dict(self) -> dict:
        out = {
            "input_bytes": self.input_bytes,
            "loss_s": self.loss_s,
            "meta": dict(self.meta),
            "stages": [vars(s).copy() for s in self.stages],
        }
        if self.carried:
            out["carried"] = [list(c) for c in self.carried]
        return out

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
        return replace(self, stages=stages, meta={**self.meta, "fused_step_bytes": extra})

    @classmethod
    def from_dict(cls, data: dict) -> ChainCosts:
        return cls(
            input_bytes=int(data["input_bytes"]),
            stages=tuple(StageCost(**s) for s in data["stages"]),
            loss_s=float(data.get("loss_s", 0.0)),
            meta=dict(data.get("meta", {})),
            carried=tuple((int(f), int(l), int(b)) for f, l, b in data.get("carried", ())),
        )
