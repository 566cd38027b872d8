"""The executor is exact: same outputs, gradients, BN statistics and RNG use as plain training."""

import copy
import functools
import importlib.util

import pytest
import torch
from torch import nn

from waggle_trainer.remat.chain import build_resnet, chain_stages
from waggle_trainer.remat.costs import ChainCosts, StageCost
from waggle_trainer.remat.executor import CheckpointedSequential, run_schedule
from waggle_trainer.remat.schedule import BW, FA, FC, FN, LOSS

HAVE_PLANNER = importlib.util.find_spec("waggle_trainer.remat.planner") is not None
TIGHT = dict(rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- models
def mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16, momentum=None),  # cumulative average: uses num_batches_tracked
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(16, 5),
        nn.Dropout(0.2),  # dropout on the output: the output itself shows the mask
    )


def convnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout2d(0.25),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


MODELS = {
    "mlp": (mlp, (8, 3, 4)),
    "convnet": (convnet, (4, 3, 12, 12)),
    "resnet18": (lambda: build_resnet("resnet18", num_classes=6), (2, 3, 32, 32)),
    "resnet50": (lambda: build_resnet("resnet50", num_classes=6), (2, 3, 32, 32)),
}


def make(name, seed=0):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().train()
    with torch.no_grad():  # non-trivial running statistics before the step
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(*shape)


# ---------------------------------------------------------------- hand-made schedules
def store_all(n):
    return tuple(
        [(FA, j) for j in range(n)] + [(LOSS, n)] + [(BW, j) for j in range(n - 1, -1, -1)]
    )


def recompute_all(n):
    """Keep only the input; before each BW j recompute 0..j-1 without autograd."""
    out = [(FN, j) for j in range(n)] + [(LOSS, n)]
    for j in range(n - 1, -1, -1):
        out += [(FN, i) for i in range(j)] + [(FA, j), (BW, j)]
    return tuple(out)


def stored_segments(n, every=3):
    """FC checkpoints every `every` stages, each segment recomputed stage by stage with
    FN from its stored checkpoint (which must survive the FNs) before each FA/BW."""
    starts = list(range(0, n, every))
    out = []
    for s in starts[:-1]:
        out += [(FC, s)] + [(FN, j) for j in range(s + 1, min(s + every, n))]
    out += [(FA, j) for j in range(starts[-1], n)] + [(LOSS, n)]
    out += [(BW, j) for j in range(n - 1, starts[-1] - 1, -1)]
    for s in reversed(starts[:-1]):
        for j in range(s + every - 1, s - 1, -1):
            out += [(FN, i) for i in range(s, j)] + [(FA, j), (BW, j)]
    return tuple(out)


def hand_schedules(n):
    schedules = {
        "store_all": store_all(n),
        "recompute_all": recompute_all(n),
        "stored_segments": stored_segments(n),
    }
    try:
        from waggle_trainer.remat.revolve import revolve_schedule
        from waggle_trainer.remat.sequential import sequential_schedule
    except ImportError:
        return schedules
    schedules["revolve2"] = revolve_schedule(n, 2)
    schedules["revolve4"] = revolve_schedule(n, 4)
    schedules["sequential3"] = sequential_schedule(n, min(3, n))
    return schedules


def unit_costs(n):
    return ChainCosts(
        input_bytes=1, stages=tuple(StageCost(str(j), 1.0, 1.0, 1.0, 1, 2) for j in range(n))
    )


def test_hand_schedules_are_valid_for_the_simulator():
    simulate = pytest.importorskip("waggle_trainer.remat.simulate")
    for n in (1, 2, 7, 15):
        for schedule in hand_schedules(n).values():
            simulate.validate(schedule, unit_costs(n))


# ---------------------------------------------------------------- comparison
def step(forward, x, seed):
    """One training step's forward/backward; returns (output, rng state after)."""
    torch.manual_seed(seed)
    out = forward(x)
    weights = torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), torch.get_rng_state()


def assert_same_step(plain, checkpointed_forward, checkpointed, x, seed=7, x_requires_grad=True):
    xa = x.clone().requires_grad_(x_requires_grad)
    xb = x.clone().requires_grad_(x_requires_grad)
    out_a, rng_a = step(plain, xa, seed)
    out_b, rng_b = step(checkpointed_forward, xb, seed)
    torch.testing.assert_close(out_b, out_a, **TIGHT)  # incl. dropout outputs
    torch.testing.assert_close(rng_b, rng_a, rtol=0, atol=0)  # same RNG consumption
    if x_requires_grad:
        torch.testing.assert_close(xb.grad, xa.grad, **TIGHT)
    else:
        assert xb.grad is None
    params = zip(plain.named_parameters(), checkpointed.parameters(), strict=True)
    for (name, pa), pb in params:
        assert pb.grad is not None, name
        torch.testing.assert_close(pb.grad, pa.grad, **TIGHT, msg=_named(name))
    # running stats, num_batches_tracked
    for (name, ba), bb in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        torch.testing.assert_close(bb, ba, **TIGHT, msg=_named(name))


def _named(name: str):
    return lambda m: f"{name}: {m}"


@pytest.mark.parametrize("model_name", list(MODELS))
def test_hand_schedules_are_exact(model_name):
    model, x = make(model_name)
    n = len(chain_stages(model))
    for schedule_name, schedule in hand_schedules(n).items():
        if model_name == "resnet50" and schedule_name not in (
            "recompute_all",
            "stored_segments",
            "revolve2",
        ):
            continue  # keep the suite fast; the cheap models cover the rest
        plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
        stages = chain_stages(checkpointed)
        try:
            assert_same_step(
                plain, functools.partial(run_schedule, stages, schedule), checkpointed, x
            )
        except AssertionError as exc:
            raise AssertionError(f"{model_name} / {schedule_name}: {exc}") from None


def test_recomputation_really_replays_dropout_and_freezes_bn():
    """Controls that the exactness test can fail: without the executor's care the
    recomputed stages would draw new masks and update BN statistics again."""
    model, x = make("mlp")
    stages = chain_stages(model)
    torch.manual_seed(1)
    run_schedule(stages, recompute_all(len(stages)), x).sum().backward()
    assert model[2].num_batches_tracked.item() == 1  # the first forward only
    assert model[6].num_batches_tracked.item() == 1
    torch.manual_seed(1)
    first = model[4](torch.ones(64, 16))
    assert not torch.equal(first, model[4](torch.ones(64, 16)))  # dropout does consume RNG


def test_input_without_requires_grad():
    model, x = make("convnet")
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    stages = chain_stages(checkpointed)
    schedule = stored_segments(len(stages))
    assert_same_step(
        plain, lambda t: run_schedule(stages, schedule, t), checkpointed, x, x_requires_grad=False
    )


def test_frozen_model_and_input_without_grad_just_runs():
    model, x = make("mlp")
    model.requires_grad_(False)
    out = run_schedule(chain_stages(model), recompute_all(len(model)), x)
    assert not out.requires_grad


def test_inplace_relu_stem_needs_out_of_place():
    """torchvision's stem ReLU is in place; a segment starting right after it fails
    with the raw module, and is exact with chain_stages' out-of-place wrapper."""
    model, x = make("resnet18")
    # checkpoint a[2] (bn1's output, the ReLU's input) and a[3] (the ReLU's output)
    raw = [model.conv1, model.bn1, model.relu, model.maxpool, *model.layer1, *model.layer2,
           *model.layer3, *model.layer4, model.avgpool, nn.Flatten(1), model.fc]  # fmt: skip
    schedule = stored_segments(len(raw), every=1)
    with pytest.raises(RuntimeError, match="in ?place"):
        run_schedule(raw, schedule, x.clone().requires_grad_()).sum().backward()
    model, x = make("resnet18")
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    stages = chain_stages(checkpointed)
    assert_same_step(plain, lambda t: run_schedule(stages, schedule, t), checkpointed, x)


class AddOneInPlace(nn.Module):
    def forward(self, x):
        return x.add_(1.0)


def test_stage_writing_into_its_input_is_rejected():
    stages = [nn.Linear(4, 4), AddOneInPlace(), nn.Linear(4, 2)]
    schedule = recompute_all(3)
    with pytest.raises(RuntimeError, match="modified its input in place"):
        run_schedule(stages, schedule, torch.randn(3, 4))


def test_invalid_schedules_and_double_backward_are_errors():
    stages = [nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)]
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="LOSS"):
        run_schedule(stages, ((FA, 0), (FA, 1), (FA, 2), (BW, 2), (BW, 1), (BW, 0)), x)
    with pytest.raises(ValueError, match="backward every stage once"):
        run_schedule(stages, ((FA, 0), (FA, 1), (FA, 2), (LOSS, 3), (BW, 2), (BW, 0)), x)
    bad = ((FN, 0), (FN, 1), (FA, 2), (LOSS, 3), (BW, 2), (FA, 1), (BW, 1), (FA, 0), (BW, 0))
    with pytest.raises(RuntimeError, match="a\\[1\\], which is not available"):
        run_schedule(stages, bad, x).sum().backward()
    out = run_schedule(stages, store_all(3), x)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.sum().backward()


# ---------------------------------------------------------------- the module
def test_eval_and_no_grad_just_run_the_module(tmp_path):
    model, x = make("convnet")
    wrapped = CheckpointedSequential(
        model, budget_bytes=10**9, strategy="optimal", cache_dir=tmp_path
    )
    assert wrapped.plan is None
    with torch.no_grad():
        out = wrapped(x)
    assert not out.requires_grad and wrapped.plan is None  # no profiling without training
    wrapped.eval()
    torch.testing.assert_close(wrapped(x), model(x), rtol=0, atol=0)
    assert wrapped.plan is None
    assert list(wrapped.state_dict()) == ["module." + k for k in model.state_dict()]


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        CheckpointedSequential(mlp(), budget_bytes=1, strategy="magic")


needs_planner = pytest.mark.skipif(
    not HAVE_PLANNER, reason="waggle_trainer.remat.planner not written yet"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("profiles")


@needs_planner
@pytest.mark.parametrize("model_name", ["mlp", "convnet", "resnet18", "resnet50"])
def test_planned_strategies_are_exact_at_every_budget(model_name, cache_dir):
    from waggle_trainer.remat.planner import Planner

    model, x = make(model_name)
    probe = CheckpointedSequential(
        copy.deepcopy(model), budget_bytes=1 << 40, sample_input=x, cache_dir=cache_dir
    )
    planner = Planner(probe.costs)
    plain_peak = planner.min_feasible_budget("none")
    strategies = ["optimal", "revolve", "sequential", "none"]
    if model_name == "resnet50":
        strategies = ["optimal", "revolve"]
    for strategy in strategies:
        minimum = planner.min_feasible_budget(strategy)
        budgets = sorted({minimum, (minimum + plain_peak) // 2, plain_peak * 2})
        if model_name == "resnet50":
            budgets = [minimum, (minimum + plain_peak) // 2]
        for budget in budgets:
            plain, copied = copy.deepcopy(model), copy.deepcopy(model)
            wrapped = CheckpointedSequential(
                copied, budget_bytes=budget, strategy=strategy, sample_input=x, cache_dir=cache_dir
            )
            assert wrapped.plan.predicted_peak_bytes <= budget
            if strategy != "none" and budget == minimum:  # the tightest plans do recompute
                forwards = sum(op in (FN, FC, FA) for op, _ in wrapped.plan.schedule)
                assert forwards > len(wrapped.stages), (strategy, wrapped.plan.schedule)
            try:
                assert_same_step(plain, wrapped, copied, x)
            except AssertionError as exc:
                raise AssertionError(
                    f"{model_name} / {strategy} / budget {budget}: {exc}"
                ) from None


@needs_planner
def test_lazy_profile_replan_and_budget_too_small(tmp_path):
    from waggle_trainer.remat.planner import InfeasibleBudget

    model, x = make("convnet")
    plain, copied = copy.deepcopy(model), copy.deepcopy(model)
    wrapped = CheckpointedSequential(copied, budget_bytes=1 << 40, cache_dir=tmp_path)
    assert wrapped.plan is None
    assert_same_step(plain, wrapped, copied, x)  # profiles at the first training forward
    assert wrapped.plan is not None and list(tmp_path.glob("profile-*.json"))
    minimum = wrapped.plan.min_feasible_bytes
    assert 0 < minimum < wrapped.plan.predicted_peak_bytes + 1
    tight = wrapped.replan(minimum)
    assert tight.predicted_peak_bytes <= minimum and wrapped.budget_bytes == minimum
    with pytest.raises(InfeasibleBudget, match=f"{minimum}|{minimum / 2**20:.1f}") as info:
        wrapped.replan(minimum - 1)
    assert isinstance(info.value, ValueError)
    assert wrapped.plan is tight and wrapped.budget_bytes == minimum  # kept on failure
    with pytest.raises(InfeasibleBudget):
        CheckpointedSequential(
            copy.deepcopy(model), budget_bytes=minimum - 1, sample_input=x, cache_dir=tmp_path
        )
