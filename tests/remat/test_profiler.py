import json

import pytest
import torch
from torch import nn

from waggle_trainer.remat import profiler
from waggle_trainer.remat.chain import named_stages
from waggle_trainer.remat.costs import ChainCosts
from waggle_trainer.remat.profiler import profile_chain, saved_bytes

F32 = 4


@pytest.mark.parametrize(
    "stage, analytic",
    [
        (nn.Linear(16, 32), 8 * 32 * F32),  # saves input and weight (excluded): the output only
        (
            nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8)),
            8 * 24 * F32 + 8 * 8 * F32,
        ),  # hidden + output
        (nn.ReLU(), 8 * 16 * F32),  # saves its output, which is the output
        (nn.Sigmoid(), 8 * 16 * F32),
        (nn.Sequential(nn.Linear(16, 16), nn.ReLU()), 8 * 16 * F32),  # linear's output is not kept
    ],
)
def test_saved_bytes_matches_analytic(stage, analytic):
    x = torch.randn(8, 16, requires_grad=True)
    out, nbytes = saved_bytes(stage, x)
    assert nbytes == analytic
    assert out.grad_fn is not None


def test_saved_bytes_conv_and_batchnorm():
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    assert saved_bytes(conv, x)[1] == 2 * 6 * 10 * 10 * F32
    bn = nn.BatchNorm2d(3)
    # output + save_mean + save_invstd (one float per channel each)
    assert saved_bytes(bn, x)[1] == x.numel() * F32 + 2 * 3 * F32


class TwoTemporaries(nn.Module):
    def forward(self, x):
        return (x * 2) * 3  # x*2 is alive while (x*2)*3 is produced, then freed


def small_chain():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.5),
        TwoTemporaries(),
        nn.Linear(32, 4),
    )
    return model, named_stages(model)


def test_profile_chain_measures_sizes_and_times():
    model, named = small_chain()
    x = torch.randn(8, 3, 4)
    costs = profile_chain(
        [s for _, s in named], x, names=[n for n, _ in named], loss_fn=lambda o: o.square().sum()
    )
    assert isinstance(costs, ChainCosts) and len(costs) == 7
    assert [s.name for s in costs.stages] == [n for n, _ in named]
    assert costs.input_bytes == 8 * 12 * F32
    assert [s.output_bytes for s in costs.stages] == [8 * 12 * F32] + [8 * 32 * F32] * 5 + [
        8 * 4 * F32
    ]
    assert costs.stages[3].saved_bytes == 8 * 32 * F32  # ReLU: its output
    assert costs.stages[5].forward_peak_bytes == 8 * 32 * F32  # one temporary beyond the output
    assert all(s.forward_s > 0 and s.forward_grad_s > 0 for s in costs.stages)
    assert all(s.backward_s > 0 for s in costs.stages[1:])
    assert costs.loss_s > 0
    assert costs.meta["stage_names"] == [n for n, _ in named]
    assert costs.meta["input_shape"] == [8, 3, 4]


def test_profiling_does_not_change_the_model():
    model, named = small_chain()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    x = torch.randn(8, 3, 4)
    torch.manual_seed(42)
    rng = torch.get_rng_state()
    profile_chain([s for _, s in named], x)
    torch.testing.assert_close(torch.get_rng_state(), rng, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(
            v, state[k], rtol=0, atol=0
        )  # incl. running stats, num_batches_tracked
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert model.training


def test_cache_hit_miss_and_corruption(tmp_path, monkeypatch):
    model, named = small_chain()
    stages = [s for _, s in named]
    x = torch.randn(8, 3, 4)
    first = profile_chain(stages, x, cache_dir=tmp_path, repeats=1)
    files = list(tmp_path.glob("profile-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["key"]["input_shape"] == [8, 3, 4]

    def no_measuring(*args, **kwargs):
        raise AssertionError("re-profiled although cached")

    real_measure = profiler._measure
    monkeypatch.setattr(profiler, "_measure", no_measuring)
    hit = profile_chain(
        stages, torch.randn(8, 3, 4), cache_dir=tmp_path
    )  # same key, other data: hit
    assert hit == first

    with pytest.raises(AssertionError, match="re-profiled"):  # another shape is a miss
        profile_chain(stages, torch.randn(4, 3, 4), cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="re-profiled"):  # another architecture is a miss
        profile_chain(stages[:-1] + [nn.Linear(32, 5)], x, cache_dir=tmp_path)

    monkeypatch.setattr(profiler, "_measure", real_measure)
    files[0].write_text('{"key": {"format": 1}, "costs": [tru')
    with pytest.warns(RuntimeWarning, match="corrupt profile cache"):
        again = profile_chain(stages, x, cache_dir=tmp_path, repeats=1)
    assert len(again) == 7
    assert (
        json.loads(files[0].read_text())["costs"]["stages"][0]["output_bytes"] == 8 * 12 * F32
    )  # rewritten
