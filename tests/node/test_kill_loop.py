"""SIGKILL at random moments, 50 times, with a real broker and a consumer counting
every message that arrived (signature and hash verified): no round is lost, none is
sent under two ids or two contents, none arrives corrupt, and round numbers only move
forward.  Uses the stand-in loop (tiny model, 16x16 frames)
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
from waggle_trainer.transport import Outbox, UpdateDecoder

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "transport"))

from brokerutil import BROKER, wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.broker]

KILLS = 50
NODE = "killnode"


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "forkserver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv, log) -> int:
        return self._ask(
            {
                "start": argv,
                "log": str(log),
                "env": {"STANDIN_REJECT": "3", "STANDIN_FRAME_SLEEP": "0.002"},
            }
        )["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["status"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def drain(queue: str, key: bytes) -> list[tuple[str, str]]:
    """(update id, SHA-256 of the update) of every message on the queue, verified."""
    import hashlib

    import pika

    decoder = UpdateDecoder(key)
    out = []
    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        assert props.headers["chunk_count"] == 1  # updates of the stand-in are small
        env, _ = decoder.verify(body)  # HMAC and payload hash: not corrupt, not forged
        assert env.update_id == props.headers["update_id"]
        out.append((env.update_id, hashlib.sha256(body).hexdigest()))
    conn.close()
    return out


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
    cfg = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": NODE, "vsn": "W0K"},
            "training": {"steps_per_round": 2},
            "transport": {
                "enabled": True,
                "exchange": names.exchange,
                "hmac_key_file": str(key),
                "codec": "fp32",
                "compression": "none",
            },
            "daemon": {"stop_flush_s": 10.0},
            "state": {"dir": str(state)},
        },
    )
    import pika

    conn = pika.BlockingConnection(BROKER)
    ch = conn.channel()
    ch.exchange_declare(names.exchange, exchange_type="topic", durable=True)
    ch.queue_declare(names.queue, durable=True)  # survives a broker restart by other tests
    ch.queue_bind(names.queue, names.exchange, routing_key="update.*")
    conn.close()
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
            if i % 3:  # two kills in three while training, one anywhere from the start
                wait_until(lambda log=log: "ready:" in log.read_text(), 20, step=0.01)
            time.sleep(rng.uniform(0.02, 0.5))
            os.kill(pid, signal.SIGKILL)
            status = fs.wait(pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                log.read_text()[-2000:]
            )
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
    arrived = drain(names.queue, key.read_bytes())
    ids = [u for u, _ in arrived]
    waiting = {e.update_id for e in Outbox(state / "outbox", 2**30).pending()}
    # nothing lost: every accepted round arrived or still waits in the outbox
    assert expected <= set(ids) | waiting, sorted(expected - set(ids) - waiting)[:5]
    contents: dict[str, set[str]] = {}
    for u, sha in arrived:
        contents.setdefault(u, set()).add(sha)
    assert all(len(v) == 1 for v in contents.values()), "an id carried two different updates"
    rounds = sorted(int(u.rsplit("-r", 1)[1]) for u in contents)
    assert all(u.startswith(f"{NODE}-{epoch}-r") for u in contents)
    assert max(rounds) <= final_round
    resent = len(ids) - len(contents)
    kills_before_ready = sum("ready:" not in log.read_text() for log in logs[:-1])
    print(
        f"\nkill loop: {KILLS} SIGKILLs ({kills_before_ready} before READY), final round "
        f"{final_round}, {len(accepted)} accepted rounds logged, {len(contents)} distinct "
        f"updates arrived ({len(set(rounds) - accepted)} spooled but killed before the log "
        f"line), {resent} re-sent copies of the same update (same id, same bytes: a kill "
        f"between the broker's confirm and the outbox delete), 0 corrupt"
    )
