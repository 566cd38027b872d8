"""``[memory]`` in the adaptation loop: the fused optimiser step trains as the unfused
one does, the drift guard's rollback restores the fused step's optimiser state, and
every round caches its measured overhead for the next start."""

from __future__ import annotations

import logging

import pytest
import torch

from waggle_trainer.learn import planned_training
from waggle_trainer.learn.adaptation import AdaptationLoop

from .adapt_util import ClipTeacher, clip, tiny_config


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """One state directory for the module: the chain is profiled once per shape."""
    return tmp_path_factory.mktemp("state")


def make_loop(tmp_path, state_dir, frames, *, fused: bool, optimizer: str = "adam", **sections):
    data = {
        "student": {"input_width": 64, "input_height": 64},
        "training": {"batch_size": 2, "steps_per_round": 2, "optimizer": optimizer},
        "adaptation": {"teacher_stride_min": 1, "new_samples_per_round": 3},
        "memory": {"fused_step": fused},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return AdaptationLoop(tiny_config(tmp_path, **data), ClipTeacher(frames), state_dir=state_dir)


def feed_until_round(loop, frames):
    for f, _ in frames:
        if (r := loop.feed(f)) is not None:
            return r
    raise AssertionError("no round")


def optimiser_state(loop) -> dict:
    return {
        (i, name): v.clone() if isinstance(v, torch.Tensor) else v
        for i, st in loop.training.optimizer.state_dict()["state"].items()
        for name, v in st.items()
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_fused_round_trains_as_the_unfused_one(tmp_path, state, optimizer):
    frames = clip(8)
    plain = make_loop(tmp_path / "a", state, frames, fused=False, optimizer=optimizer)
    fused = make_loop(tmp_path / "b", state, frames, fused=True, optimizer=optimizer)
    assert plain.training.fused is None and fused.training.fused is not None
    initial = {k: v.clone() for k, v in fused.student.state_dict().items()}
    r_plain, r_fused = feed_until_round(plain, frames), feed_until_round(fused, frames)
    # the backward stepped every parameter, as many times as the round took steps
    params = fused.training.fused.parameters
    assert fused.training.fused.steps == 2 * params
    assert all(p.grad is None for p in fused.student.parameters())  # no whole-model grads
    assert r_fused.loss == r_plain.loss and r_fused.accepted == r_plain.accepted
    after_plain, after_fused = plain.student.state_dict(), fused.student.state_dict()
    assert any(not torch.equal(after_fused[k], v) for k, v in initial.items())  # it trained
    for k, v in after_plain.items():  # weights and BatchNorm statistics: the same
        assert torch.equal(after_fused[k], v), k
    assert_same(optimiser_state(fused), optimiser_state(plain))


def test_rollback_restores_the_fused_steps_optimiser_state(tmp_path, state, monkeypatch):
    frames = clip(8)
    loop = make_loop(
        tmp_path,
        state,
        frames,
        fused=True,
        # the agreement is stubbed below: judge on any held-out evidence
        adaptation={"rollback_margin": 0.05, "holdout_fraction": 0.25, "min_holdout_labels": 1},
    )
    fused = loop.training.fused
    assert fused is not None
    # one earlier step, so that there is Adam state (step, moments) to restore
    for f, labels in frames[:2]:
        loop._add(loop._sample(f.image, labels))
    loop.training.step(*loop._batch())
    assert fused.steps == fused.parameters
    weights = {k: v.clone() for k, v in loop.student.state_dict().items()}
    optim = optimiser_state(loop)
    assert {name for _, name in optim} == {"step", "exp_avg", "exp_avg_sq"}
    values = iter([(0.8, None), (0.5, None)])  # the round lowers agreement: rolled back
    monkeypatch.setattr(loop, "agreement", lambda: next(values))
    r = feed_until_round(loop, frames[2:])
    assert not r.accepted and loop.rounds_rolled_back == 1
    assert fused.steps > fused.parameters  # the round did step (inside the backward)
    state_now = loop.student.state_dict()
    for k, v in weights.items():
        assert torch.equal(state_now[k], v), k
    assert_same(optimiser_state(loop), optim)
    # the fused step still works on the restored optimiser: the next step moves on from it
    before = fused.steps
    loop.training.step(*loop._batch())
    assert fused.steps == before + fused.parameters
    steps = {float(v) for (_, name), v in optimiser_state(loop).items() if name == "step"}
    assert steps == {2.0}  # the step before the round, then this one: the round's are undone


def test_every_round_caches_its_overhead_for_the_next_start(tmp_path):
    frames = clip(12)
    own = tmp_path / "own"  # a fresh profile cache: nothing measured yet
    loop = make_loop(tmp_path, own, frames, fused=True)
    assert loop.training.overhead_source == "default"
    feed_until_round(loop, frames)
    cached = sorted((own / "profiles").glob("overhead-*.json"))
    assert len(cached) == 1
    again = make_loop(tmp_path, own, frames, fused=True)
    assert again.training.overhead_source == "cache"
    assert again.training.overhead.steps_measured == 1
    # the first round of a fresh optimiser measured what training left resident
    # (oneDNN's caches, the heap): the next start reserves that, not the default
    assert 0 < again.training.overhead.first_step_residue_bytes
    feed_until_round(again, frames)
    assert make_loop(tmp_path, own, frames, fused=True).training.overhead.steps_measured == 2


def test_an_overhead_cache_that_cannot_be_written_is_one_warning(
    tmp_path, state, monkeypatch, caplog
):
    def full(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(planned_training, "save_overhead", full)
    frames = clip(16)
    loop = make_loop(tmp_path, state, frames, fused=False)
    with caplog.at_level(logging.WARNING):
        rounds = [r for f, _ in frames if (r := loop.feed(f)) is not None]
    assert len(rounds) >= 2
    warned = [r.getMessage() for r in caplog.records if "overhead not cached" in r.getMessage()]
    assert warned == [
        "measured overhead not cached ([Errno 28] No space left on device); "
        "the next start plans without it"
    ]


def test_a_cached_overhead_that_leaves_no_plan_runs_the_smallest_one(tmp_path, caplog):
    """The node's second start must not refuse what its first start trained under."""
    from waggle_trainer.learn.adaptation import _run_spec
    from waggle_trainer.remat.overhead import Overhead, save_overhead
    from waggle_trainer.remat.planner import InfeasibleBudget, Planner

    frames = clip(12)
    own = tmp_path / "own"
    probe = make_loop(tmp_path, own, frames, fused=False)
    lowest = Planner(probe.training.chain.costs).min_feasible_budget("optimal")
    budget = {"memory": {"budget": lowest + 2**20}}  # fits, with 1 MiB to spare
    first = make_loop(tmp_path, own, frames, fused=False, **budget)
    assert first.training.allocator_mode == "mmap"  # a tight budget: the key below
    save_overhead(own / "profiles", first.training.overhead_key(), Overhead(8 * 2**20, 0))
    with caplog.at_level(logging.WARNING):
        again = make_loop(tmp_path, own, frames, fused=False, **budget)
    assert again.training.overhead_source == "cache"
    assert again.training.chain.plan.predicted_peak_bytes == lowest
    assert any("leaves too little for any plan" in r.getMessage() for r in caplog.records)
    r = feed_until_round(again, frames)
    assert r.strategy == "optimal" and r.predicted_peak_bytes == lowest
    # bench's way (the default): refused before the first step
    spec = _run_spec(again.cfg, again.spec, own)
    with pytest.raises(InfeasibleBudget):
        planned_training.PlannedTraining.for_model(again.student, spec)
