"""Simulator: hand-computed peaks and times, every validity rule, sequential splits."""

import pytest

from waggle_trainer.remat.costs import ChainCosts, StageCost
from waggle_trainer.remat.revolve import revolve_schedule
from waggle_trainer.remat.sequential import (
    no_checkpoint_schedule,
    segment_starts,
    sequential_schedule,
)
from waggle_trainer.remat.simulate import InvalidSchedule, simulate


def two_stage():
    return ChainCosts(
        input_bytes=1000,
        stages=(
            StageCost("a", 1.0, 1.5, 2.0, 100, 150, 10, 20),
            StageCost("b", 3.0, 4.0, 5.0, 200, 260, 5, 7),
        ),
        loss_s=0.25,
    )


def test_plain_training_by_hand():
    r = simulate(no_checkpoint_schedule(2), two_stage())
    # FA0 1000+150+10; FA1 1150+260+5; LOSS 1410+200; BW1 1610+100+7;
    # after BW1: 1610-260+100 = 1450 (delta[2] lives until the end); BW0 1450+1000+20
    assert r.peak_bytes == 2470
    assert r.time_s == pytest.approx(1.5 + 4.0 + 0.25 + 5.0 + 2.0)
    assert (r.forward_steps, r.forward_grad_steps, r.max_checkpoints) == (0, 2, 0)


def test_checkpointed_by_hand():
    sched = (("FC", 0), ("FN", 1), ("LOSS", 2), ("FA", 1), ("BW", 1), ("FA", 0), ("BW", 0))
    # that is invalid: FA 1 needs a[1], which FN 1 freed
    with pytest.raises(InvalidSchedule, match=r"action 3 .*a\[1\] live"):
        simulate(sched, two_stage())
    sched = (("FC", 0), ("FA", 1), ("LOSS", 2), ("BW", 1), ("FA", 0), ("BW", 0))
    r = simulate(sched, two_stage(), slots=1)
    # FC0: 1000+100+10 -> 1100; FA1: 1100+260+5 -> 1360; LOSS: 1360+200 -> 1560;
    # BW1: 1560+100+7 = 1667, then - tape1 260 - a[1] 100 + delta[1] 100 -> 1300 (delta[2]
    # is held by autograd until the backward ends); FA0: 1300+150+10 -> 1450; BW0: 1450+1000+20
    assert r.peak_bytes == 2470
    assert r.time_s == pytest.approx(1.0 + 4.0 + 0.25 + 5.0 + 1.5 + 2.0)
    assert r.max_checkpoints == 1
    with pytest.raises(InvalidSchedule, match="exceed"):
        simulate(sched, two_stage(), slots=0)


CASES = [
    ((("FA", 0), ("FA", 1), ("BW", 1)), 2, "BW before LOSS"),
    ((("FA", 0), ("FA", 1), ("LOSS", 2), ("BW", 0)), 3, "out of order"),
    ((("FA", 0), ("FA", 1), ("LOSS", 2), ("BW", 1), ("BW", 1)), 4, "twice"),
    ((("FA", 0), ("FN", 1), ("LOSS", 2), ("BW", 1)), 3, "live tape of stage 1"),
    ((("FA", 0), ("FA", 1), ("LOSS", 2), ("LOSS", 2)), 3, "more than once"),
    ((("FA", 0), ("LOSS", 2)), 1, r"a\[2\] live"),
    ((("FA", 0), ("FA", 1), ("LOSS", 1)), 2, "stage n=2"),
    ((("FN", 1),), 0, r"a\[1\] live"),
    ((("FA", 0), ("FA", 0)), 1, "already live"),
    ((("XX", 0),), 0, "unknown op"),
    ((("FA", 5),), 0, "out of range"),
    ((("FA",),), 0, "pair"),
]


@pytest.mark.parametrize("sched,index,message", CASES)
def test_invalid_schedules_name_the_action(sched, index, message):
    with pytest.raises(InvalidSchedule, match=message) as e:
        simulate(sched, two_stage())
    assert e.value.index == index
    assert f"action {index}" in str(e.value)


def test_end_state_rules():
    with pytest.raises(InvalidSchedule, match="no LOSS"):
        simulate((("FA", 0),), two_stage())
    with pytest.raises(InvalidSchedule, match="never backwarded"):
        simulate((("FA", 0), ("FA", 1), ("LOSS", 2), ("BW", 1)), two_stage())
    leftover = (
        ("FC", 0),
        ("FN", 1),
        ("FC", 0),
        ("FA", 1),
        ("LOSS", 2),
        ("BW", 1),
        ("FA", 0),
        ("BW", 0),
    )
    with pytest.raises(InvalidSchedule):
        simulate(leftover, two_stage())


def test_segment_starts_follow_torch_split():
    assert segment_starts(10, 1) == (0,)
    assert segment_starts(10, 3) == (0, 3, 6)  # last segment 6..9 gets the remainder
    assert segment_starts(10, 10) == tuple(range(10))
    assert segment_starts(7, 2) == (0, 3)
    with pytest.raises(ValueError):
        segment_starts(5, 6)
    with pytest.raises(ValueError):
        segment_starts(5, 0)


def chain(n, out=100, saved=250):
    return ChainCosts(
        1000, tuple(StageCost(f"s{i}", 1.0, 1.5, 2.0, out, saved, 10, 20) for i in range(n)), 0.5
    )


def test_sequential_and_revolve_schedules_are_valid():
    for n in range(1, 12):
        c = chain(n)
        base = simulate(no_checkpoint_schedule(n), c)
        assert simulate(sequential_schedule(n, 1), c) == base
        for k in range(2, n + 1):
            r = simulate(sequential_schedule(n, k), c, slots=k - 1)
            starts = segment_starts(n, k)
            # each checkpointed segment is forwarded twice: once FC/FN, once FA
            assert r.forward_steps == starts[-1]
            assert r.forward_grad_steps == n
            assert r.time_s == pytest.approx(base.time_s + starts[-1] * 1.0)
        for slots in range(1, n + 2):
            simulate(revolve_schedule(n, slots), c, slots=slots)


def test_checkpointing_lowers_peak_on_long_chain():
    c = chain(16, out=1000, saved=3000)
    none = simulate(no_checkpoint_schedule(16), c).peak_bytes
    seq4 = simulate(sequential_schedule(16, 4), c).peak_bytes
    assert seq4 < none


def test_recomputes_tells_plain_training_from_checkpointing():
    from waggle_trainer.remat.schedule import recomputes
    from waggle_trainer.remat.sequential import no_checkpoint_schedule, sequential_schedule

    assert not recomputes(no_checkpoint_schedule(5))
    assert recomputes(sequential_schedule(5, 2))
    # forwarding a stage twice with autograd is recomputation too
    assert recomputes((("FA", 0), ("LOSS", 1), ("FA", 0), ("BW", 0)))
