"""One construction of every optimiser the config allows, and the budget counts its state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from waggle_trainer.common import OPTIMIZER_NAMES
from waggle_trainer.remat.budget import training_state_bytes
from waggle_trainer.remat.optim import make_optimizer


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for t in st.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


@pytest.mark.parametrize(
    "name, cls",
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)],
)
def test_every_allowed_optimizer_is_built_and_counted(name, cls):
    assert name in OPTIMIZER_NAMES
    model = _model()
    opt = make_optimizer(model.parameters(), name, lr=0.01, momentum=0.9)
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.01
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    counted = training_state_bytes(model, name, momentum=0.9)
    assert counted.optimizer_state_bytes == _state_bytes(opt)


def test_plain_sgd_keeps_no_state():
    model = _model()
    opt = make_optimizer(model.parameters(), "sgd", lr=0.1, momentum=0.0)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert (
        _state_bytes(opt)
        == training_state_bytes(model, "sgd", momentum=0.0).optimizer_state_bytes
        == 0
    )


def test_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="'rmsprop'.*sgd, adam, adamw"):
        make_optimizer(_model().parameters(), "rmsprop", lr=0.1)
