"""SIGKILL at random moments, 50 times, with a real broker and the server's consumer
counting: no round is lost, none is sent under two ids, none arrives corrupt, and
round numbers only move forward.  Uses the stand-in loop (tiny model, 16x16 frames)
so each restart takes a fraction of a second (see forkserver.py)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.node.nodeutil import write_config
from waggle_trainer.node.state import StateStore
from waggle_trainer.transport import AmqpSettings, Outbox, TensorSpec, UpdateConsumer

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "transport"))

from brokerutil import Collector, wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.broker]

KILLS = 50
NODE = "killnode"


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "forkserver.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv, log) -> int:
        return self._ask({"start": argv, "log": str(log),
                          "env": {"STANDIN_REJECT": "3", "STANDIN_FRAME_SLEEP": "0.002"}})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["status"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def reference_spec():
    from tests.node.standin import StandInLoop

    class C:
        class training:
            steps_per_round = 2

    sd = StandInLoop(C, None).student.state_dict()
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in sd.items() if v.is_floating_point()}


@pytest.fixture
def fast_dir(tmp_path):
    """State on tmpfs when there is one: SIGKILL does not drop the page cache, so what
    is tested is the same, and a process killed inside fsync on a slow disk takes
    ~1 s to die."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="waggle-kill-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_fifty_sigkills_lose_and_duplicate_nothing(tmp_path, fast_dir, names):
    key = tmp_path / "hmac.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    state = fast_dir / "state"
    cfg = write_config(tmp_path / "node.toml", {
        "node": {"id": NODE, "vsn": "W0K"},
        "training": {"steps_per_round": 2},
        "transport": {"enabled": True, "exchange": names.exchange, "hmac_key_file": str(key),
                      "codec": "fp32", "compression": "none"},
        "daemon": {"stop_flush_s": 10.0},
        "state": {"dir": str(state)},
    })
    collector = Collector()
    consumer = UpdateConsumer(
        AmqpSettings(backoff_initial_s=0.2, backoff_max_s=2.0, connection_name="test kill"),
        keys=key.read_bytes(), reference=reference_spec(), on_update=collector,
        exchange=names.exchange, queue=names.queue, dead_letter_exchange=names.dlx,
        dead_letter_queue=names.dlq)
    consumer.start()
    assert wait_until(lambda: consumer.connected, 10)
    time.sleep(0.3)
    rng = random.Random(int(os.environ.get("KILL_LOOP_SEED", "9")))
    fs = ForkServer()
    argv = ["run", "--config", str(cfg)]
    prev_round = 0
    logs = []
    try:
        for i in range(KILLS):
            log = tmp_path / f"run-{i:02d}.log"
            log.touch()
            logs.append(log)
            pid = fs.start(argv, log)
            time.sleep(rng.uniform(0.02, 0.5))
            os.kill(pid, signal.SIGKILL)
            status = fs.wait(pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                log.read_text()[-2000:]
            # after every kill: the state loads, rounds only move forward, the outbox
            # parses and holds nothing beyond the round being saved
            saved = StateStore(state / "node").load()
            if saved is None:
                assert prev_round == 0
                continue
            assert saved.meta["round"] >= prev_round
            prev_round = saved.meta["round"]
            rounds = [e.round for e in Outbox(state / "outbox", 2**30).pending()]
            assert max(rounds, default=0) <= prev_round + 1
        # a last, clean run delivers whatever is waiting, then SIGTERM
        log = tmp_path / "final.log"
        log.touch()
        logs.append(log)
        pid = fs.start(argv, log)
        assert wait_until(lambda: "ready:" in log.read_text(), 30), log.read_text()
        assert wait_until(lambda: not list((state / "outbox").glob("*.wgu")), 60)
        os.kill(pid, signal.SIGTERM)
        status = fs.wait(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, log.read_text()[-2000:]
    finally:
        fs.close()
    epoch = StateStore(state / "node").read_meta()["epoch"]
    final_round = StateStore(state / "node").read_meta()["round"]
    accepted = set()
    for log in logs:
        accepted |= {int(m) for m in re.findall(r"round (\d+) accepted", log.read_text())}
    expected = {f"{NODE}-{epoch}-r{r}" for r in accepted}
    assert wait_until(lambda: expected <= set(collector.ids()), 30), \
        sorted(expected - set(collector.ids()))[:5]
    time.sleep(1.0)
    consumer.stop()
    delivered = collector.ids()
    assert len(delivered) == len(set(delivered))  # the consumer hands each id over once
    assert not consumer.rejected, consumer.rejected  # nothing corrupt or forged
    rounds = sorted(int(u.rsplit("-r", 1)[1]) for u in delivered)
    assert all(u.startswith(f"{NODE}-{epoch}-r") for u in delivered)
    assert max(rounds) <= final_round
    kills_before_ready = sum("ready:" not in log.read_text() for log in logs[:-1])
    print(f"\nkill loop: {KILLS} SIGKILLs ({kills_before_ready} before READY), final round "
          f"{final_round}, {len(accepted)} accepted rounds logged, {len(delivered)} updates "
          f"delivered once each ({len(set(rounds) - accepted)} more spooled but killed before "
          f"the log line), {consumer.duplicates} re-sent duplicate(s) absorbed by id, "
          f"0 rejected")
