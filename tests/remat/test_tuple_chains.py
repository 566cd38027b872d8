"""Chains whose stages pass tuples of tensors: the wrappers, ResNet blocks split at
their convolutions, a U-Net-like student, exactness and memory under recomputation."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from waggle_trainer.remat.chain import (
    ApplyToFirst,
    KeepInput,
    MergeSkip,
    OutOfPlace,
    build_resnet,
    chain_stages,
    named_stages,
)
from waggle_trainer.remat.executor import CheckpointedSequential, run_schedule
from waggle_trainer.remat.planner import InfeasibleBudget, Planner
from waggle_trainer.remat.profiler import LiveBytes, profile_chain
from waggle_trainer.remat.schedule import FA, FC, FN

from .test_executor import TIGHT, hand_schedules, make, recompute_all, stored_segments


def run(stages, x):
    for stage in stages:
        x = stage(x)
    return x


# ---------------------------------------------------------------- the wrappers
def test_wrappers_follow_the_stack_convention():
    x, s1, s2 = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 5)
    double = ApplyToFirst(nn.Identity())
    assert double(x) is x  # a plain tensor: inner(x)
    out = ApplyToFirst(nn.Tanh())((x, s1, s2))
    assert torch.equal(out[0], torch.tanh(x)) and out[1] is s1 and out[2] is s2
    kept = KeepInput(nn.Tanh())(x)
    assert isinstance(kept, tuple) and torch.equal(kept[0], torch.tanh(x)) and kept[1] is x
    kept = KeepInput(nn.Tanh())((x, s1))
    assert len(kept) == 3 and kept[1] is x and kept[2] is s1

    class Join(nn.Module):
        def forward(self, a, b):
            return torch.cat([a, b], 1)

    merged = MergeSkip(Join())((x, s1, s2))
    assert torch.equal(merged[0], torch.cat([x, s1], 1)) and merged[1] is s2
    assert torch.equal(MergeSkip(Join())((x, s1)), torch.cat([x, s1], 1))  # no 1-tuples

    class Split(nn.Module):
        def forward(self, a):
            return a[:, :1], a[:, 1:]

    spliced = ApplyToFirst(Split())((x, s1))
    assert [t.shape[1] for t in spliced] == [1, 2, 4]
    with pytest.raises(TypeError, match="MergeSkip needs at least 2 tensors, got 1"):
        MergeSkip(Join())(x)
    with pytest.raises(TypeError, match="flat, non-empty tuple of tensors, got list"):
        ApplyToFirst(nn.Tanh())([x, s1])


def test_wrapped_sequentials_are_split_and_inplace_children_made_out_of_place():
    model = nn.Sequential(
        nn.Linear(4, 4),
        KeepInput(nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4))),
        ApplyToFirst(nn.Sequential(nn.ReLU(inplace=True))),
        MergeSkip(nn.Bilinear(4, 4, 2)),
    )
    named = named_stages(model)
    assert [n for n, _ in named] == ["0", "1.inner.0", "1.inner.1", "1.inner.2", "2.inner.0", "3"]
    stages = [s for _, s in named]
    assert type(stages[1]) is KeepInput and stages[1].inner is model[1].inner[0]
    assert type(stages[2]) is ApplyToFirst and isinstance(stages[2].inner, OutOfPlace)
    assert isinstance(stages[4].inner, OutOfPlace)
    assert type(stages[3]) is ApplyToFirst and type(stages[5]) is MergeSkip
    x = torch.randn(3, 4)
    torch.testing.assert_close(run(stages, x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown granularity 'layer'"):
        named_stages(model, "layer")


# ---------------------------------------------------------------- ResNet blocks split
@pytest.mark.parametrize(
    "arch, blocks, last", [("resnet18", 8, "layer4.1.conv2"), ("resnet50", 16, "layer4.2.conv3")]
)
def test_conv_granularity_splits_blocks_with_their_own_modules(arch, blocks, last):
    torch.manual_seed(0)
    model = build_resnet(arch, num_classes=5).train()
    keys = list(model.state_dict())
    named = named_stages(model, "conv")
    names = [n for n, _ in named]
    parts = int(last[-1])
    assert len(names) == 7 + blocks * parts
    assert names[4:6] == ["layer1.0.conv1", "layer1.0.conv2"] and names[-4] == last
    kinds = [type(s) for _, s in named[4 : 4 + parts]]
    assert kinds == [KeepInput, ApplyToFirst, MergeSkip][:1] + (
        [ApplyToFirst] if parts == 3 else []
    ) + [MergeSkip]
    # every parameter of the model in exactly one stage, the model's own tensors
    owned = [id(p) for _, s in named for p in s.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    assert list(model.state_dict()) == keys
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    out = run([s for _, s in named], x)
    assert torch.equal(out, reference(x))  # bitwise, training mode
    for (name, b), rb in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, rb), name  # running statistics updated the same way
    assert model.relu.inplace and model.layer1[0].relu.inplace  # the model is not modified


# ---------------------------------------------------------------- exactness
def weighted_loss(out):
    tensors = out if isinstance(out, tuple) else (out,)
    total = 0
    for k, t in enumerate(tensors):
        if t.is_floating_point():
            w = torch.linspace(-1.0, 2.0 + k, t.numel()).reshape(t.shape)
            total = total + (t * w).sum()
    return total


def assert_same_step(plain, forward, trained, x, seed=7):
    """One step of ``plain(x)`` and ``forward(x)``: equal outputs, RNG use, input and
    parameter gradients and buffers (``x``: a tensor or a tuple)."""
    tensors = x if isinstance(x, tuple) else (x,)

    def fresh():
        copies = tuple(
            t.clone().requires_grad_(t.requires_grad or t.is_floating_point()) for t in tensors
        )
        return copies if isinstance(x, tuple) else copies[0]

    results = []
    for module, fwd in ((plain, plain), (trained, forward)):
        xs = fresh()
        torch.manual_seed(seed)
        out = fwd(xs)
        weighted_loss(out).backward()
        outs = out if isinstance(out, tuple) else (out,)
        grads = [t.grad for t in (xs if isinstance(xs, tuple) else (xs,))]
        results.append(([o.detach() for o in outs], torch.get_rng_state(), grads, module))
    (out_a, rng_a, gx_a, _), (out_b, rng_b, gx_b, _) = results
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(b, a, **TIGHT)
    torch.testing.assert_close(rng_b, rng_a, rtol=0, atol=0)
    for a, b in zip(gx_a, gx_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, **TIGHT)
    for (name, pa), pb in zip(plain.named_parameters(), trained.parameters(), strict=True):
        assert pb.grad is not None, name
        torch.testing.assert_close(pb.grad, pa.grad, **TIGHT, msg=lambda m, n=name: f"{n}: {m}")
    for (name, ba), bb in zip(plain.named_buffers(), trained.buffers(), strict=True):
        torch.testing.assert_close(bb, ba, **TIGHT, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_conv_split_resnet_is_exact_under_hand_schedules(arch):
    model, x = make(arch)
    n = len(chain_stages(model, "conv"))
    names = ["recompute_all", "stored_segments", "revolve2"]
    if arch == "resnet18":
        names += ["revolve4", "sequential3", "store_all"]
    for name in names:
        plain, trained = copy.deepcopy(model), copy.deepcopy(model)
        stages = chain_stages(trained, "conv")
        schedule = hand_schedules(n)[name]
        try:
            assert_same_step(
                plain, lambda t, s=schedule, st=stages: run_schedule(st, s, t), trained, x
            )
        except AssertionError as exc:
            raise AssertionError(f"{arch} / {name}: {exc}") from None


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("profiles")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_conv_split_resnet_is_exact_under_planned_schedules(arch, cache_dir):
    model, x = make(arch)
    probe = CheckpointedSequential(
        copy.deepcopy(model),
        budget_bytes=1 << 40,
        sample_input=x,
        cache_dir=cache_dir,
        granularity="conv",
    )
    assert probe.costs.carried  # the identity rides beside the block's inner tensors
    planner = Planner(probe.costs)
    low, plain_peak = planner.min_feasible_budget(), planner.min_feasible_budget("none")
    for strategy, budget in (
        ("optimal", low),
        ("optimal", (low + plain_peak) // 2),
        ("revolve", planner.min_feasible_budget("revolve")),
    ):
        plain, trained = copy.deepcopy(model), copy.deepcopy(model)
        chain = CheckpointedSequential(
            trained,
            budget_bytes=budget,
            strategy=strategy,
            sample_input=x,
            cache_dir=cache_dir,
            granularity="conv",
        )
        assert chain.plan.predicted_peak_bytes <= budget
        if budget == low:
            forwards = sum(op in (FN, FC, FA) for op, _ in chain.plan.schedule)
            assert forwards > len(chain.stages)  # it does recompute
        try:
            assert_same_step(plain, chain, trained, x)
        except AssertionError as exc:
            raise AssertionError(f"{arch} / {strategy} / {budget}: {exc}") from None


# ---------------------------------------------------------------- a U-Net-like student
class UpFuse(nn.Module):
    """Up-sample ``x`` to the skip's size, concatenate, conv-bn-relu, dropout."""

    def __init__(self, channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + skip_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.drop = nn.Dropout2d(0.2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.drop(F.relu(self.bn(self.conv(torch.cat([x, skip], 1)))))


def unet_student(classes: int = 3) -> nn.Sequential:
    """resnet18 stem -> layer1 -> layer2 -> layer3, skips from layer1 (stride 4) and
    layer2 (stride 8) fused into the up-sampling: activations (main, skip8, skip4)."""
    r = build_resnet("resnet18", 1)
    return nn.Sequential(
        OrderedDict(
            conv1=r.conv1,
            bn1=r.bn1,
            relu=r.relu,
            maxpool=r.maxpool,
            layer1=r.layer1,
            layer2=KeepInput(r.layer2),  # (x8, x4)
            layer3=KeepInput(r.layer3),  # (x16, x8, x4)
            up1=MergeSkip(UpFuse(256, 128, 128)),  # (y8, x4)
            up2=MergeSkip(UpFuse(128, 64, 64)),  # y4
            head=nn.Conv2d(64, classes, 1),
        )
    )


def make_unet(seed=0):
    torch.manual_seed(seed)
    model = unet_student().train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    return model, torch.randn(2, 3, 64, 96)


def test_unet_stages_and_carried_skips(cache_dir):
    model, x = make_unet()
    block = [n for n, _ in named_stages(model)]
    assert block[4:] == [
        "layer1.0",
        "layer1.1",
        "layer2.inner.0",
        "layer2.inner.1",
        "layer3.inner.0",
        "layer3.inner.1",
        "up1",
        "up2",
        "head",
    ]
    conv = [n for n, _ in named_stages(model, "conv")]
    assert conv[4:9] == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
        "layer2.inner.0",
    ]
    assert conv[9:11] == ["layer2.inner.1.conv1", "layer2.inner.1.conv2"]
    assert len(conv) == 4 + 4 + 1 + 2 + 1 + 2 + 3
    eval_model = copy.deepcopy(model).eval()
    for granularity in ("block", "conv"):
        torch.testing.assert_close(
            run(chain_stages(eval_model, granularity), x), eval_model(x), rtol=0, atol=0
        )
    stages = chain_stages(model)
    costs = profile_chain(stages, x, cache_dir=cache_dir, repeats=1)
    # a[6] = layer1's output x4 is kept from layer2 (stage 6) to up2 (stage 11); a[8]
    # = layer2's output x8 from layer3 (stage 8) to up1 (stage 10)
    x4 = 2 * 64 * 16 * 24 * 4
    x8 = 2 * 128 * 8 * 12 * 4
    assert costs.carried == ((6, 11, x4), (8, 10, x8))
    assert costs.stages[10].output_bytes == 2 * 128 * 8 * 12 * 4 + x4  # (y8, x4)
    # the tape of layer2's first block does not count the skip it passes on
    layer2_0 = profile_chain(stages[6:7], torch.empty(2, 64, 16, 24), repeats=1).stages[0]
    assert layer2_0.output_bytes == x8 + x4
    assert layer2_0.saved_bytes < costs.stages[6].saved_bytes + x4


@pytest.mark.parametrize("granularity", ["block", "conv"])
def test_unet_trains_exactly_under_its_plans(granularity, cache_dir):
    model, x = make_unet()
    probe = CheckpointedSequential(
        copy.deepcopy(model),
        budget_bytes=1 << 40,
        sample_input=x,
        cache_dir=cache_dir,
        granularity=granularity,
    )
    planner = Planner(probe.costs)
    low, plain_peak = planner.min_feasible_budget(), planner.min_feasible_budget("none")
    assert low < plain_peak
    for budget in (low, (low + plain_peak) // 2, plain_peak):
        plain, trained = copy.deepcopy(model), copy.deepcopy(model)
        chain = CheckpointedSequential(
            trained,
            budget_bytes=budget,
            sample_input=x,
            cache_dir=cache_dir,
            granularity=granularity,
        )
        assert chain.plan.predicted_peak_bytes <= budget
        assert_same_step(plain, chain, trained, x)
    for name in ("recompute_all", "stored_segments", "revolve2"):
        plain, trained = copy.deepcopy(model), copy.deepcopy(model)
        stages = chain_stages(trained, granularity)
        schedule = hand_schedules(len(stages))[name]
        assert_same_step(plain, lambda t, s=schedule, st=stages: run_schedule(st, s, t), trained, x)


# ---------------------------------------------------------------- tuples at both ends
class Masked(nn.Module):
    """(x, mask) -> (x * mask, mask): an integer tensor carried without a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, a):
        x, mask = a
        return self.lin(x) * mask, mask


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, a):
        x, mask = a
        return self.a(x), self.b(x).sum(1, keepdim=True) * mask[:, :1], mask


def test_tuple_input_and_output_and_integer_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(
        Masked(), ApplyToFirst(nn.BatchNorm1d(6)), ApplyToFirst(nn.Dropout(0.3)), TwoHeads()
    ).train()
    x = (torch.randn(5, 6), torch.randint(0, 2, (5, 6)))
    n = len(chain_stages(model))
    for schedule in (recompute_all(n), stored_segments(n, every=2)):
        plain, trained = copy.deepcopy(model), copy.deepcopy(model)
        stages = chain_stages(trained)
        assert_same_step(plain, lambda t, s=schedule, st=stages: run_schedule(st, s, t), trained, x)
    # the loss uses one head only: the other gets no gradient, the step still works
    stages = chain_stages(model)
    out = run_schedule(stages, recompute_all(n), (x[0].requires_grad_(), x[1]))
    assert isinstance(out, tuple) and not out[2].requires_grad and out[2].dtype == torch.int64
    out[0].sum().backward()
    assert model[3].b.weight.grad is None and model[3].a.weight.grad is not None
    assert x[0].grad is not None


def test_a_stage_returning_a_list_is_named():
    class Listy(nn.Module):
        def forward(self, x):
            return [x, x]

    stages = [nn.Linear(3, 3), Listy(), ApplyToFirst(nn.Tanh())]
    with pytest.raises(TypeError, match=r"output of stage 1 \(Listy\) must be a tensor"):
        run_schedule(stages, recompute_all(3), torch.randn(2, 3))


# ---------------------------------------------------------------- memory
def measured_step_bytes(chain, x):
    """Peak bytes of tensors created during one checkpointed step (aten-level, as the
    profiler counts), with parameter gradients already resident (``zero_grad`` to
    zeros, so each new gradient is a transient, as the plan assumes) and a loss with
    no temporaries beyond the output's size (the plan does not cover the loss's)."""
    out = chain(x)
    weights = [torch.linspace(-1.0, 2.0, t.numel()).reshape(t.shape) for t in (out,)]
    del out
    for p in chain.parameters():
        p.grad = torch.zeros_like(p)
    live = LiveBytes()
    with live:
        (chain(x) * weights[0]).sum().backward()
    return live.peak


@pytest.mark.parametrize(
    "name, granularity", [("unet", "block"), ("unet", "conv"), ("resnet50", "conv")]
)
def test_a_step_stays_within_the_predicted_peak(name, granularity, cache_dir):
    """What the plan promises is kept, tensor by tensor, and not grossly over-counted
    (a skip added to a branch: its gradient is not copied into a ``.grad``)."""
    if name == "unet":
        model, _ = make_unet()
        x = torch.randn(4, 3, 128, 160)
    else:
        torch.manual_seed(0)
        model, x = build_resnet(name, 6).train(), torch.randn(4, 3, 96, 96)
    probe = CheckpointedSequential(
        model,
        budget_bytes=1 << 40,
        sample_input=x,
        cache_dir=cache_dir,
        granularity=granularity,
    )
    planner = Planner(probe.costs)
    low, plain_peak = planner.min_feasible_budget(), planner.min_feasible_budget("none")
    for budget in (low, (low + plain_peak) // 2):
        probe.replan(budget)
        predicted = probe.plan.predicted_peak_bytes - probe.costs.input_bytes
        measured = measured_step_bytes(probe, x)
        # + the loss's scalars (below an output-sized tensor: 240 KiB here)
        assert measured <= predicted + 1024, (budget, measured, predicted)
        assert measured >= 0.85 * predicted, (budget, measured, predicted)


def test_budget_below_the_smallest_plan_is_refused_in_one_line(cache_dir):
    model, x = make("resnet50")
    chain = CheckpointedSequential(
        model, budget_bytes=1 << 40, sample_input=x, cache_dir=cache_dir, granularity="conv"
    )
    low = chain.plan.min_feasible_bytes
    with pytest.raises(InfeasibleBudget) as info:
        CheckpointedSequential(
            copy.deepcopy(model),
            budget_bytes=low - 1,
            sample_input=x,
            cache_dir=cache_dir,
            granularity="conv",
        )
    message = str(info.value)
    assert "\n" not in message and f"{low} bytes" in message and info.value.min_bytes == low
    assert (
        CheckpointedSequential(
            copy.deepcopy(model),
            budget_bytes=low,
            sample_input=x,
            cache_dir=cache_dir,
            granularity="conv",
        ).plan.predicted_peak_bytes
        <= low
    )
