"""The daemon with the stand-in loop, in process: rounds -> outbox -> state, resume,
crash between spooling and saving, a full disk, global model adoption, SIGHUP."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.node.nodeutil import make_daemon
from waggle_trainer.node import daemon as daemonmod
from waggle_trainer.node.cli import history_line, summary_lines
from waggle_trainer.node.state import StateStore
from waggle_trainer.transport import Outbox, Telemetry, UpdateDecoder, load_key, peek_envelope


def outbox_envelopes(state_dir):
    return [
        peek_envelope(e.path.read_bytes()) for e in Outbox(state_dir / "outbox", 2**30).pending()
    ]


def test_each_accepted_round_is_spooled_once_under_a_deterministic_id(node, tmp_path):
    path, cfg = node(transport={"codec": "fp32", "compression": "none"})
    d = make_daemon(cfg, path, max_rounds=8)
    assert d.run() == 0
    envs = outbox_envelopes(cfg.state.dir)
    # rounds 4 and 8 are rolled back by the stand-in: no update for them
    assert [e.round for e in envs] == [1, 2, 3, 5, 6, 7]
    assert [e.update_id for e in envs] == [f"local-{d.epoch}-r{r}" for r in (1, 2, 3, 5, 6, 7)]
    # the last update is exactly student - base (fp32, uncompressed)
    key = load_key(cfg.state.dir / "node" / "local-hmac.key")
    blob = Outbox(cfg.state.dir / "outbox", 2**30).pending()[-1].path.read_bytes()
    delta = UpdateDecoder(key).decode(blob, d.base).delta
    weights = d.loop.student.state_dict()
    for name, base in d.base.items():
        assert torch.allclose(base + delta[name], weights[name]), name
    meta = StateStore(cfg.state.dir / "node").read_meta()
    assert meta["round"] == 8 and meta["counters"]["accepted"] == 6


def test_rounds_without_held_out_evidence_are_shown_as_not_judged_and_send_nothing(node, caplog):
    """Rounds 1-2 not judged (weights kept), 3 accepted, 4 rolled back, 5 accepted."""
    path, cfg = node(transport={"codec": "fp32", "compression": "none"})
    d = make_daemon(cfg, path, not_judged=2, max_rounds=5)
    caplog.set_level(logging.INFO, logger="waggle_trainer.daemon")
    assert d.run() == 0
    envs = outbox_envelopes(cfg.state.dir)
    assert [e.round for e in envs] == [3, 5]  # nothing leaves without a verdict
    # its metrics say it was judged, on what evidence, and the kept agreement
    key = load_key(cfg.state.dir / "node" / "local-hmac.key")
    first = Outbox(cfg.state.dir / "outbox", 2**30).pending()[0].path.read_bytes()
    update = UpdateDecoder(key).decode(first, d.base)
    m = update.envelope.metrics
    assert m["judged"] == 1.0 and m["accepted"] == 1.0 and m["agreement"] == 0.6
    assert m["holdout_labels"] == 8.0 and m["rounds_not_judged"] == 2.0
    # what a user reads: the log, the status line, the saved history, the summary
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert lines[0].startswith("round 1 not judged (held-out has 0 labels, need 8), no update;")
    assert lines[2].startswith("round 3 accepted: agreement 0.500 -> 0.600, update ")
    assert lines[3].startswith("round 4 rolled back: agreement 0.500 -> 0.400;")
    assert "2 accepted/1 rolled back/2 not judged, agreement 0.600" in d.status_line()
    history = StateStore(cfg.state.dir / "node").read_meta()["history"]
    assert [(h["judged"], h["agreement_after"]) for h in history[:3]] == [
        (False, None),
        (False, None),
        (True, 0.6),
    ]
    assert history_line(history[0]).startswith("not judged (held-out has 0 labels, need 8)")
    assert history_line(history[3]).startswith("0.500 -> 0.400  loss ")
    s = d.summary()
    assert (s["accepted"], s["rolled_back"], s["not_judged"]) == (2, 1, 2)
    assert s["agreement_first"] == 0.5 and s["agreement_last"] == 0.6
    assert "rounds: 5 this run (2 accepted, 1 rolled back, 2 not judged)" in "\n".join(
        summary_lines(s)
    )
    # telemetry: the count and the evidence of the last round
    t = Telemetry("n", "v")
    d._register_gauges(t)
    t.sample_gauges()
    sampled = {m["name"]: m["val"] for m in t.peek(100)}
    assert sampled["train.rounds_not_judged"] == 2 and sampled["train.holdout_labels"] == 8
    assert sampled["train.agreement"] == 0.6


def test_restart_resumes_at_the_last_round_with_the_saved_weights(node):
    path, cfg = node()
    loops = []
    first = make_daemon(cfg, path, max_rounds=3, loops=loops)
    assert first.run() == 0
    trained = {k: v.clone() for k, v in loops[0].student.state_dict().items()}
    second = make_daemon(cfg, path, max_rounds=2, loops=loops)
    second.start()
    assert second.round == 3 and second.epoch == first.epoch
    for k, v in loops[1].student.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert loops[1].index == 3
    second._shutdown(flush=False)


class Crash(BaseException):
    """Stands for SIGKILL at one exact moment."""


def test_killed_between_spooling_and_saving_never_reuses_an_id(node, monkeypatch, caplog):
    path, cfg = node()
    real_save = StateStore.save
    calls = {"n": 0}

    def save_then_die(self, state):
        calls["n"] += 1
        if state.meta["round"] == 3:
            raise Crash
        return real_save(self, state)

    monkeypatch.setattr(StateStore, "save", save_then_die)
    d = make_daemon(cfg, path, max_rounds=5)
    with pytest.raises(Crash):
        d.run()
    # round 3's update is in the outbox, but held: its state was never saved
    entry = [e for e in d.outbox.pending() if e.round == 3][0]
    assert not d._releasable(entry)
    monkeypatch.setattr(StateStore, "save", real_save)
    d2 = make_daemon(cfg, path, max_rounds=2)
    d2.start()
    assert d2.round == 3 and d2._releasable(entry)  # moved past round 3, which may now leave
    d2._shutdown(flush=False)
    d3 = make_daemon(cfg, path, max_rounds=1)
    assert d3.run() == 0
    assert sum("outbox holds round 3" in r.message for r in caplog.records) == 1
    ids = [e.update_id for e in outbox_envelopes(cfg.state.dir)]
    assert len(ids) == len(set(ids))
    assert [e.round for e in outbox_envelopes(cfg.state.dir)] == [1, 2, 3, 4]


def test_disk_full_keeps_the_last_state_logs_once_and_recovers(node, monkeypatch, caplog):
    path, cfg = node()
    real_put = Outbox.put
    full = {"on": False}

    def put(self, blob):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, blob)

    monkeypatch.setattr(Outbox, "put", put)
    d = make_daemon(cfg, path, reject_every=0, max_rounds=2)
    assert d.run() == 0
    full["on"] = True
    d = make_daemon(cfg, path, reject_every=0, max_rounds=4)
    caplog.set_level(logging.INFO, logger="waggle_trainer.daemon")
    assert d.run() == 0
    meta = StateStore(cfg.state.dir / "node").read_meta()
    assert meta["round"] == 2, "state must not claim rounds whose update is not spooled"
    assert sum("disk full" in r.message for r in caplog.records if r.levelno >= 40) == 1
    assert d.counters.disk_full_events >= 4
    assert len(d._pending) == 1  # newer cumulative updates superseded the older ones
    full["on"] = False
    d = make_daemon(cfg, path, reject_every=0, max_rounds=1)
    assert d.run() == 0
    assert StateStore(cfg.state.dir / "node").read_meta()["round"] == 3
    assert [e.round for e in outbox_envelopes(cfg.state.dir)] == [1, 2, 3]


def test_state_write_failure_is_retried_after_the_next_round(node, monkeypatch):
    path, cfg = node()
    real_save = StateStore.save
    fail = {"left": 2}

    def save(self, state):
        if fail["left"]:
            fail["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, state)

    monkeypatch.setattr(StateStore, "save", save)
    d = make_daemon(cfg, path, reject_every=0, max_rounds=3)
    assert d.run() == 0  # the first save at start failed too: still no crash
    assert StateStore(cfg.state.dir / "node").read_meta()["round"] == 3


def test_adopts_a_new_global_model_between_rounds(node, tmp_path, caplog):
    global_file = tmp_path / "global.safetensors"
    path, cfg = node(daemon={"global_model_file": str(global_file)})
    loops = []
    d = make_daemon(cfg, path, max_rounds=2, loops=loops)
    assert d.run() == 0
    weights = {
        k: torch.full_like(v, 0.25) if v.is_floating_point() else v
        for k, v in loops[0].student.state_dict().items()
    }
    save_file(weights, str(global_file), metadata={"version": "v7"})
    d = make_daemon(cfg, path, max_rounds=2, loops=loops)
    assert d.run() == 0
    assert loops[1].adopted == ["v7"] and d.base_version == "v7"
    assert torch.equal(d.base["0.weight"], weights["0.weight"])
    assert outbox_envelopes(cfg.state.dir)[-1].base_version == "v7"
    assert StateStore(cfg.state.dir / "node").read_meta()["base_version"] == "v7"
    # a file that does not fit the student is refused with one line, base kept
    save_file({"0.weight": torch.zeros(1)}, str(global_file), metadata={"version": "v8"})
    caplog.set_level(logging.ERROR)
    d = make_daemon(cfg, path, max_rounds=1, loops=loops)
    assert d.run() == 0
    assert d.base_version == "v7" and loops[2].adopted == []
    assert any("does not fit the student" in r.message for r in caplog.records)


def test_sighup_applies_live_keys_and_keeps_the_rest(node, caplog):
    path, cfg = node(node={"log_level": "info"}, student={"arch": "resnet18"})
    d = make_daemon(cfg, path, max_rounds=1)
    d.start()
    path.write_text(
        path.read_text()
        .replace('"info"', '"debug"')
        .replace("resnet18", "resnet34")
        .replace("steps_per_round = 2", "steps_per_round = 2\n")
    )
    caplog.set_level(logging.INFO, logger="waggle_trainer.daemon")
    d._reload()
    assert d.cfg.node.log_level == "debug" and d.cfg.student.arch == "resnet18"
    msgs = [r.message for r in caplog.records]
    assert any("applied node.log_level" in m for m in msgs)
    assert any("student.arch cannot change while running; kept" in m for m in msgs)
    path.write_text("[training]\nbatch_size = 0\n")
    d._reload()
    assert any(
        "keeping the running config" in r.message and "training.batch_size" in r.message
        for r in caplog.records
    )
    d._shutdown(flush=False)


def test_broker_down_at_start_never_blocks_training(node, tmp_path):
    key = tmp_path / "hmac.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    path, cfg = node(
        node={"id": "node1"},
        # room for two of the stand-in's updates (about 1.5 KB each: the real metrics)
        transport={"enabled": True, "port": 1, "hmac_key_file": str(key), "outbox_max_bytes": 3500},
    )
    d = make_daemon(cfg, path, reject_every=0, max_rounds=6)
    assert d.run() == 0
    assert d.counters.rounds == 6 and d.publisher.published_updates == 0
    # the outbox stayed within its bound: older cumulative updates were superseded
    assert d.outbox.bytes <= 3500 and d.outbox.dropped_superseded == 6 - len(d.outbox)
    assert [e.round for e in outbox_envelopes(cfg.state.dir)] == [5, 6]


def test_missing_tls_files_are_one_fatal_line(tmp_path):
    import os
    import subprocess
    import sys

    from tests.node.nodeutil import write_config

    cfg = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "node1"},
            "transport": {"enabled": True, "tls": True, "cacert": str(tmp_path / "nope.pem")},
            "state": {"dir": str(tmp_path / "state")},
        },
    )
    r = subprocess.run(
        [sys.executable, "-m", "waggle_trainer", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{cfg}: transport.cacert: ")
    assert "not found" in lines[0] and not (tmp_path / "state").exists()


def test_missing_hmac_key_with_transport_is_one_fatal_line(node, tmp_path, capsys):
    path, cfg = node(
        node={"id": "node1"}, transport={"enabled": True, "hmac_key_file": str(tmp_path / "k")}
    )
    assert make_daemon(cfg, path).run() == daemonmod.EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"waggle-trainer run: transport.hmac_key_file: {tmp_path}/k: not found"
    )


def test_codec_settings_reach_the_envelope(node):
    path, cfg = node(transport={"codec": "int8", "compression": "deflate", "topk": 0.5})
    make_daemon(cfg, path, reject_every=0, max_rounds=1).run()
    env = outbox_envelopes(cfg.state.dir)[0]
    assert env.encoding == {"dtype": "int8", "topk": 0.5, "compression": "deflate"}


def test_progress_file_drives_the_health_check(node, capsys):
    import os
    import time

    from waggle_trainer.node.cli import progress_check

    path, cfg = node()
    state_dir = cfg.state.dir
    assert progress_check(state_dir, 60) == 1  # never ran
    assert make_daemon(cfg, path, max_rounds=1).run() == 0
    assert progress_check(state_dir, 60) == 0
    old = time.time() - 1000
    os.utime(state_dir / "node" / daemonmod.PROGRESS_FILE, (old, old))
    assert progress_check(state_dir, 600) == 1
    assert "unhealthy: last frame or step 1000 s ago" in capsys.readouterr().out


@pytest.mark.parametrize("flush_s", [0.0, 2.0])
def test_stop_flush_s_bounds_the_wait_for_an_absent_broker(node, tmp_path, flush_s):
    import time

    key = tmp_path / "hmac.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    path, cfg = node(
        node={"id": "node1"},
        transport={"enabled": True, "port": 1, "hmac_key_file": str(key)},
        daemon={"stop_flush_s": flush_s},
    )
    d = make_daemon(cfg, path, reject_every=0, max_rounds=1)
    d.start()
    d._t0 = time.monotonic()
    d._main_loop()
    t0 = time.monotonic()
    d._shutdown(flush=True)
    waited = time.monotonic() - t0
    assert len(d.outbox) == 1  # kept for the next start
    assert flush_s <= waited < flush_s + 1.5


@pytest.fixture
def tiny_disk(tmp_path):
    """A 48 KiB tmpfs: a real ENOSPC (needs root; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk_does_not_crash_and_recovers(node, tiny_disk, caplog):
    path, cfg = node(
        state={"dir": str(tiny_disk / "state")}, transport={"codec": "fp32", "compression": "none"}
    )
    caplog.set_level(logging.INFO, logger="waggle_trainer.daemon")
    d = make_daemon(cfg, path, reject_every=0, max_rounds=60)
    assert d.run() == 0  # kept training through ENOSPC
    assert d.counters.disk_full_events > 0
    errors = [r.message for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("disk full writing the ")
    saved = StateStore(tiny_disk / "state" / "node").load()  # the last good state loads
    assert 0 < saved.meta["round"] < 60
    for p in (tiny_disk / "state" / "outbox").glob("*.wgu"):  # an operator frees space
        p.unlink()
    d = make_daemon(cfg, path, reject_every=0, max_rounds=1)
    assert d.run() == 0
    assert StateStore(tiny_disk / "state" / "node").read_meta()["round"] == saved.meta["round"] + 1
