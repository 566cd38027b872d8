"""The optimiser step fused into the backward gives the unfused step's results, bit for
bit, plain and under a checkpointing plan, and is counted in the budget and the plan."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from waggle_trainer.remat.budget import training_state_bytes
from waggle_trainer.remat.chain import build_resnet, chain_stages
from waggle_trainer.remat.costs import ChainCosts, StageCost
from waggle_trainer.remat.executor import run_schedule
from waggle_trainer.remat.fused_step import (
    FusedStep,
    stage_step_bytes,
    step_transient_multiple,
)
from waggle_trainer.remat.profiler import LiveBytes
from waggle_trainer.remat.schedule import BW, FA, FC, FN, LOSS
from waggle_trainer.remat.simulate import simulate

OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True
    ),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05),
}


def checkpointed(n: int):
    """Checkpoints at stages 0 and n//2, everything else recomputed before its backward."""
    mid = n // 2
    out = [(FC, 0)] + [(FN, j) for j in range(1, mid)] + [(FC, mid)]
    out += [(FN, j) for j in range(mid + 1, n)] + [(LOSS, n)]
    for s, e in ((mid, n), (0, mid)):
        for j in range(e - 1, s - 1, -1):
            out += [(FN, i) for i in range(s, j)] + [(FA, j), (BW, j)]
    return tuple(out)


def train(model, optimizer, steps: int, *, schedule=None, fused: bool) -> FusedStep | None:
    stages = chain_stages(model)
    hooks = FusedStep(optimizer) if fused else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, 32, 32, generator=gen)
        y = torch.randint(0, 6, (2,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        out = model(x) if schedule is None else run_schedule(stages, schedule, x)
        nn.functional.cross_entropy(out, y).backward()
        if fused:
            assert all(p.grad is None for p in model.parameters())
        else:
            optimizer.step()
    return hooks


def assert_identical(a: nn.Module, oa, b: nn.Module, ob) -> None:
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name  # weights and BatchNorm statistics
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i, state in sa["state"].items():
        for key, value in state.items():
            other = sb["state"][i][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (i, key)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("plan", ["plain", "checkpointed"])
def test_fused_step_is_identical_to_the_unfused_step(optimizer, plan):
    torch.manual_seed(0)
    ref = build_resnet("resnet18", num_classes=6).train()
    fused = copy.deepcopy(ref)
    schedule = checkpointed(len(chain_stages(ref))) if plan == "checkpointed" else None
    opt_ref = OPTIMIZERS[optimizer](ref.parameters())
    opt_fused = OPTIMIZERS[optimizer](fused.parameters())
    train(ref, opt_ref, 3, schedule=schedule, fused=False)
    hooks = train(fused, opt_fused, 3, schedule=schedule, fused=True)
    assert hooks is not None and hooks.steps == 3 * hooks.parameters
    assert_identical(ref, opt_ref, fused, opt_fused)
    # the optimiser is the real one: its state loads back into an unfused copy
    restored = OPTIMIZERS[optimizer](ref.parameters())
    restored.load_state_dict(opt_fused.state_dict())
    hooks.remove()
    assert_identical(ref, opt_ref, ref, restored)


def test_removed_hooks_leave_an_ordinary_optimizer():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = FusedStep(opt)
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    assert model.weight.grad is None and not torch.equal(model.weight, before)
    hooks.remove()
    model(torch.ones(1, 3)).sum().backward()
    assert model.weight.grad is not None


def test_step_temporaries_are_measured_per_optimizer():
    p = [nn.Parameter(torch.zeros(4))]
    assert step_transient_multiple(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == 0
    assert step_transient_multiple(torch.optim.SGD(p, lr=0.1, weight_decay=0.1)) == 1
    assert step_transient_multiple(torch.optim.Adam(p, lr=0.1)) == 2
    assert step_transient_multiple(torch.optim.AdamW(p, lr=0.1)) == 2
    assert step_transient_multiple(torch.optim.Adam(p, lr=0.1, weight_decay=0.1)) == 3
    seq = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    adam = torch.optim.Adam(seq.parameters())
    assert stage_step_bytes(list(seq), adam) == [2 * 200 * 4, 0, 2 * 60 * 4]


def test_budget_counts_no_resident_gradients():
    model = build_resnet("resnet18", num_classes=6)
    plain = training_state_bytes(model, "sgd", momentum=0.9)
    fused = training_state_bytes(model, "sgd", momentum=0.9, fused_step=True)
    assert plain.gradient_bytes == plain.optimizer_state_bytes > 0
    assert fused.gradient_bytes == 0 and fused.fused_step
    assert plain.total_bytes - fused.total_bytes == plain.gradient_bytes


def test_plan_counts_the_step_temporaries_in_each_backward():
    costs = ChainCosts(100, tuple(StageCost(str(j), 1, 1, 1, 10, 20, 5, 7) for j in range(3)))
    more = costs.with_step_bytes([0, 1000, 0])
    assert [s.backward_peak_bytes for s in more.stages] == [7, 1007, 7]
    assert more.meta["fused_step_bytes"] == [0, 1000, 0]
    store_all = ((FA, 0), (FA, 1), (FA, 2), (LOSS, 3), (BW, 2), (BW, 1), (BW, 0))
    assert simulate(store_all, costs).peak_bytes < 1000
    # at BW 1: input 100 + tapes 0 and 1 (40) + delta[3] (held by autograd until the
    # backward ends) 10 + delta[2] 10, + delta[1] 10 + 1007
    assert simulate(store_all, more).peak_bytes == 100 + 40 + 10 + 10 + 10 + 1007
    with pytest.raises(ValueError, match="already include"):
        more.with_step_bytes([0, 0, 0])
    with pytest.raises(ValueError, match="3 byte counts"):
        costs.with_step_bytes([1, 2])


def test_fused_step_lowers_the_tensor_peak_by_the_gradients():
    """Tensor-level (LiveBytes) memory of a training step after the first: unfused, the
    gradients of every parameter are alive at once before ``step()``; fused, at most about
    the largest one is."""
    torch.manual_seed(0)
    ref = build_resnet("resnet18", num_classes=6).train()
    fused = copy.deepcopy(ref)
    grads = sum(p.numel() * p.element_size() for p in ref.parameters())
    largest = max(p.numel() * p.element_size() for p in ref.parameters())
    peaks = {}
    for name, model in (("unfused", ref), ("fused", fused)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train(model, opt, 1, fused=name == "fused")  # state exists
        x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2,))
        opt.zero_grad(set_to_none=True)
        live = LiveBytes()
        with live:
            nn.functional.cross_entropy(model(x), y).backward()
            if name == "unfused":
                opt.step()
        peaks[name] = live.peak
    assert peaks["unfused"] > grads
    assert peaks["fused"] < peaks["unfused"] - grads + 1.2 * largest
