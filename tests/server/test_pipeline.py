"""The server pipeline without the broker: staging, verification, aggregation, store."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file
from simnodes import (
    MODEL,
    _forge,
    _forge_raw,
    _uid,
    encoder,
    make_config,
    messages,
    random_delta,
    tiny_state,
)

from waggle_trainer.server.pipeline import UpdatePipeline
from waggle_trainer.transport.codec import CodecSettings


def feed(p: UpdatePipeline, msgs):
    outs = []
    with p.lock.held():
        for m in msgs:
            out = p.handle(m)
            out.finish()
            outs.append(out)
    return outs


def pipeline(tmp_path, nodes, **sections) -> UpdatePipeline:
    p = UpdatePipeline(make_config(tmp_path, nodes, **sections))
    p.startup()
    return p


def setup_server_files_dict(tmp_path, nodes, aggregation) -> dict:
    from simnodes import setup_server_files

    cfg = setup_server_files(tmp_path, nodes, aggregation=aggregation)
    cfg["status"]["enabled"] = False
    return cfg


def codes(outs) -> list[str]:
    return sorted({d.code for o in outs for d in o.dead_letters})


def test_weighted_average_of_chunked_updates_is_stored(tmp_path):
    nodes = [f"n{i}" for i in range(5)]
    p = pipeline(tmp_path, nodes, aggregation={"min_updates": 5})
    expected_num = {
        k: torch.zeros(v.shape, dtype=torch.float64)
        for k, v in tiny_state().items()
        if v.is_floating_point()
    }
    total = 0
    for i, n in enumerate(nodes):
        d = random_delta(i)
        u = encoder(n).encode_delta(
            d, base_version="1", round=1, samples=10 * (i + 1), metrics={"agreement": 0.5 + i / 10}
        )
        outs = feed(p, messages(u.blob, u.update_id, n, chunk_size=700))
        assert codes(outs) == []
        total += 10 * (i + 1)
        for k in expected_num:
            expected_num[k] += d[k].double() * 10 * (i + 1)
    info = p.store.latest(MODEL)
    assert info.version == "2" and info.manifest["parent"] == "1"
    assert info.manifest["samples"] == total and info.manifest["nodes"] == nodes
    got = load_file(str(info.weights))
    base = tiny_state()
    for k, num in expected_num.items():
        assert torch.allclose(got[k], (base[k].double() + num / total).float(), atol=1e-6)
    assert torch.equal(got["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    assert p.db.pending(MODEL) == []
    assert list((tmp_path / "state" / "pending").iterdir()) == []


def test_refusals_each_with_their_code(tmp_path):
    p = pipeline(tmp_path, ["a", "b"], aggregation={"min_updates": 100})
    enc = encoder("a")
    good = enc.encode_delta(random_delta(1), base_version="1", round=5, samples=4)
    assert codes(feed(p, messages(good.blob, good.update_id, "a"))) == []
    # the same update again: absorbed as a duplicate, not counted twice
    outs = feed(p, messages(good.blob, good.update_id, "a"))
    assert codes(outs) == [] and outs[0].duplicate
    assert len(p.db.pending(MODEL)) == 1

    def refused(blob, uid, node="a", **kw):
        return codes(feed(p, messages(blob, uid, node, **kw)))

    old = enc.encode_delta(random_delta(2), base_version="1", round=5, samples=4)
    assert refused(old.blob, old.update_id) == ["replay"]
    tampered = bytearray(
        enc.encode_delta(random_delta(3), base_version="1", round=6, samples=4).blob
    )
    tampered[-5] ^= 1
    assert refused(bytes(tampered), "11111111-2222-3333-4444-555555555555") == ["signature"]
    # NaN cannot be encoded by an honest encoder: forge the payload and sign it properly
    u = encoder("b").encode_delta(random_delta(4), base_version="1", round=1, samples=1)
    nan = _forge(u, lambda t: t["fc.bias"].__setitem__(0, float("nan")))
    assert refused(nan, u.update_id, "b") == ["nonfinite"]
    shape = dict(random_delta(5), **{"fc.weight": torch.zeros(5, 9)})
    u = encoder("b").encode_delta(shape, base_version="1", round=2, samples=1)
    assert refused(u.blob, u.update_id, "b") == ["shape"]
    u = encoder("b").encode_delta(random_delta(6), base_version="7", round=3, samples=1)
    assert refused(u.blob, u.update_id, "b") == ["base_version"]
    u = encoder("b").encode_delta(random_delta(7), base_version="1", round=4, samples=1)
    assert refused(u.blob, u.update_id, "b", user_id="a") == ["user_id"]
    pick = _forge_raw(
        encoder("b").encode_delta(random_delta(8), base_version="1", round=5, samples=1),
        pickle.dumps({"w": [1.0, 2.0]}),
    )
    assert refused(pick, _uid(pick), "b") == ["format"]
    rej = p.db.conn.execute("SELECT code, reason FROM rejections WHERE code='format'").fetchone()
    assert "pickle" in rej["reason"]
    assert [x.update_id for x in p.db.pending(MODEL)] == [good.update_id]  # only the good one


def test_stale_updates_are_down_weighted_then_refused(tmp_path):
    p = pipeline(
        tmp_path,
        ["a", "b", "c"],
        aggregation={"min_updates": 1, "max_staleness": 1, "staleness_decay": 0.5},
    )
    u = encoder("a").encode_delta(random_delta(1), base_version="1", round=1, samples=8)
    feed(p, messages(u.blob, u.update_id, "a"))
    assert p.store.latest(MODEL).version == "2"
    u = encoder("b").encode_delta(random_delta(2), base_version="1", round=1, samples=8)
    feed(p, messages(u.blob, u.update_id, "b"))
    v3 = p.store.latest(MODEL)
    assert v3.version == "3"
    c = v3.manifest["contributors"][0]
    assert (c["staleness"], c["weight"]) == (1, 4.0)
    u = encoder("c").encode_delta(random_delta(3), base_version="1", round=1, samples=8)
    assert codes(feed(p, messages(u.blob, u.update_id, "c"))) == ["stale"]


def test_a_nodes_later_update_on_an_older_base_is_not_counted_twice(tmp_path):
    """A node's deltas are cumulative since its base: its second update on version 1,
    aggregated after version 2 (its first update), makes the node's weights, not version
    1 plus both deltas (make run adopted a version with its first step doubled)."""
    p = pipeline(tmp_path, ["a"], aggregation={"min_updates": 1, "max_staleness": 2})
    first = random_delta(1)
    u = encoder("a").encode_delta(first, base_version="1", round=1, samples=8)
    feed(p, messages(u.blob, u.update_id, "a"))
    later = {k: v + random_delta(2)[k] for k, v in first.items()}  # the first step and more
    u = encoder("a").encode_delta(later, base_version="1", round=2, samples=8)
    assert codes(feed(p, messages(u.blob, u.update_id, "a"))) == []
    v3 = p.store.latest(MODEL)
    assert v3.version == "3" and v3.manifest["contributors"][0]["staleness"] == 1
    got = load_file(str(v3.weights))
    base = tiny_state()
    for k, d in later.items():
        assert torch.allclose(got[k], base[k] + d, atol=1e-6), k


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rules_ignore_one_wild_node(tmp_path, rule):
    nodes = ["a", "b", "c", "d", "e"]
    p = pipeline(
        tmp_path, nodes, aggregation={"min_updates": 5, "rule": rule, "trim_fraction": 0.2}
    )
    for i, n in enumerate(nodes):
        d = {k: torch.full(v.shape, 0.01 * (i + 1)) for k, v in random_delta(0).items()}
        if n == "e":
            d = {k: torch.full(v.shape, 100.0) for k, v in d.items()}
        u = encoder(n).encode_delta(d, base_version="1", round=1, samples=1000 if n == "e" else 1)
        feed(p, messages(u.blob, u.update_id, n))
    got = load_file(str(p.store.latest(MODEL).weights))
    base = tiny_state()
    step = got["fc.bias"] - base["fc.bias"]
    want = 0.03 if rule == "median" else (0.02 + 0.03 + 0.04) / 3
    assert torch.allclose(step, torch.full_like(step, want), atol=1e-6)


def test_topk_missing_entries_count_as_zero_and_momentum_carries(tmp_path):
    p = pipeline(tmp_path, ["a", "b"], aggregation={"min_updates": 2, "server_momentum": 0.5})
    s = CodecSettings("fp32", "none", topk=0.5)
    da = {k: torch.zeros(v.shape) for k, v in random_delta(0).items()}
    db = {k: torch.zeros(v.shape) for k, v in random_delta(0).items()}
    da["fc.bias"] = torch.tensor([1.0, 0, 0, 0, 2.0])
    db["fc.bias"] = torch.tensor([0, 0, 3.0, 0, 4.0])
    for n, d in (("a", da), ("b", db)):
        u = encoder(n, s).encode_delta(d, base_version="1", round=1, samples=1)
        feed(p, messages(u.blob, u.update_id, n))
    v2 = load_file(str(p.store.latest(MODEL).weights))
    step = v2["fc.bias"] - tiny_state()["fc.bias"]
    assert torch.allclose(step, torch.tensor([0.5, 0, 1.5, 0, 3.0]), atol=1e-6)
    for n, d in (("a", da), ("b", db)):
        u = encoder(n, s).encode_delta(d, base_version="2", round=2, samples=1)
        feed(p, messages(u.blob, u.update_id, n))
    v3 = load_file(str(p.store.latest(MODEL).weights))
    # momentum 0.5: second step = 0.5 * first + new step
    assert torch.allclose(v3["fc.bias"] - v2["fc.bias"], step * 1.5, atol=1e-5)


def test_crash_between_store_and_database_counts_nothing_twice(tmp_path):
    nodes = ["a", "b"]
    p = pipeline(tmp_path, nodes, aggregation={"min_updates": 3})
    for n in nodes:
        u = encoder(n).encode_delta(random_delta(len(n)), base_version="1", round=1, samples=2)
        feed(p, messages(u.blob, u.update_id, n))
    pool = p.db.pending(MODEL)
    # the version is written, then the process dies before the database records it
    p.store.write(
        MODEL,
        2,
        load_file(str(p.store.latest(MODEL).weights)),
        {
            "parent": "1",
            "contributors": [{"update_id": x.update_id} for x in pool],
            "nodes": nodes,
            "samples": 4,
            "created_ns": 1,
        },
    )
    p2 = UpdatePipeline(p.cfg)
    p2.startup()
    assert p2.db.pending(MODEL) == []
    assert {r[0] for r in p2.db.conn.execute("SELECT status FROM updates")} == {"aggregated"}


def test_partial_updates_expire_and_staging_is_bounded(tmp_path):
    p = pipeline(
        tmp_path,
        ["a"],
        verify={
            "staging_max_age_s": 0.2,
            "staging_max_bytes": 40 * 1024,  # counted in 4 KiB blocks: two small updates
            "max_update_bytes": 4 * 1024,
        },
    )
    enc = encoder("a")
    u1 = enc.encode_delta(random_delta(1), base_version="1", round=1, samples=1)
    m1 = messages(u1.blob, u1.update_id, "a", chunk_size=300)
    feed(p, m1[:1])
    u2 = enc.encode_delta(random_delta(2), base_version="1", round=2, samples=1)
    m2 = messages(u2.blob, u2.update_id, "a", chunk_size=300)
    outs = feed(p, m2[:3])  # more than the bound: the oldest partial update is evicted
    assert codes(outs) == ["staging_full"]
    import time

    time.sleep(0.3)
    with p.lock.held():
        out = p.tick()
        out.finish()
    assert {d.code for d in out.dead_letters} == {"incomplete"}
    assert p.staging.partials() == []
    assert p.db.counters()["expired_partials"] == 2


def disk_usage(d) -> int:
    """What a directory tree really takes: allocated blocks of every file and dir."""
    import os

    total = os.lstat(d).st_blocks * 512
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def hostile_chunk(uid: str, node: str, body: bytes = b"", pad: int = 0, count: int = 2):
    from waggle_trainer.server.staging import ChunkMessage
    from waggle_trainer.transport.chunks import Chunk

    c = Chunk(uid, 0, count, "ab" * 32, body)
    headers = dict(c.headers(), **({"pad": "x" * pad} if pad else {}))
    return ChunkMessage(f"update.{node}", body, c.message_id, headers, user_id=node)


def test_staging_counts_every_file_it_writes_and_bounds_headers(tmp_path):
    """150 chunks with an empty body and a 100 kB header, each of a fresh update,
    used to put 22 MiB in an 8 MiB staging area: the header sidecars were not
    counted and an empty body cost nothing."""
    import uuid

    limit = 8 * 2**20
    p = pipeline(tmp_path, ["x"], verify={"staging_max_bytes": limit, "max_update_bytes": 2**20})
    staging = tmp_path / "state" / "staging"
    outs = feed(p, [hostile_chunk(str(uuid.uuid4()), "x", pad=100_000) for _ in range(150)])
    assert codes(outs) == ["headers"]
    reason = outs[0].dead_letters[0].reason
    assert "16384" in reason and "headers" in reason
    assert p.staging.partials() == [] and disk_usage(staging) <= limit
    # headers just within the bound, empty bodies, a fresh update each: every one costs
    # what it takes on disk, and one node holds at most its share of partial updates
    peak = 0
    for _ in range(150):
        feed(p, [hostile_chunk(str(uuid.uuid4()), "x", pad=15_000)])
        peak = max(peak, disk_usage(staging))
        assert p.staging.bytes_total() >= disk_usage(staging)
    assert peak <= limit
    assert len(p.staging.partials()) == 4  # verify.staging_partials_per_node


def test_one_node_cannot_starve_another_out_of_staging(tmp_path):
    """A node floods staging with partial updates; another node's partial update is
    not evicted for it (the flood evicts its own) and completes."""
    import uuid

    p = pipeline(
        tmp_path,
        ["b", "x"],
        aggregation={"min_updates": 100},
        verify={"staging_max_bytes": 320 * 1024, "max_update_bytes": 64 * 1024},
    )
    u = encoder("b").encode_delta(random_delta(1), base_version="1", round=1, samples=1)
    mb = messages(u.blob, u.update_id, "b", chunk_size=400)
    assert len(mb) >= 2
    assert codes(feed(p, mb[:1])) == []  # b's update is the oldest partial from now on
    flood = [hostile_chunk(str(uuid.uuid4()), "x", body=bytes(40_000), count=3) for _ in range(60)]
    outs = feed(p, flood)
    evicted = {d.msg.headers["update_id"] for o in outs for d in o.dead_letters}
    assert u.update_id not in evicted and evicted, "the flood evicted b's update"
    assert p.staging.bytes_total() <= 320 * 1024
    assert codes(feed(p, mb[1:])) == []
    assert [x.update_id for x in p.db.pending(MODEL)] == [u.update_id]


def test_safetensors_sniffing_is_not_fooled_by_a_header_length_byte():
    import pickle as pk

    from safetensors.torch import save

    from waggle_trainer.server.pipeline import looks_like_safetensors

    for n in range(1, 300):  # header lengths whose low byte is 0x80 included
        raw = save({"x" * n: torch.zeros(1)})
        assert looks_like_safetensors(raw[:4096], len(raw)) is None
    p = pk.dumps({"a": 1}, protocol=4)
    assert looks_like_safetensors(p, len(p)) == "a pickle"
    assert looks_like_safetensors(b"PK\x03\x04" + bytes(20), 24) == "a zip archive (torch.save)"


def test_telemetry_view_keeps_last_values_and_counts_malformed():
    import json as js

    from waggle_trainer.server.telemetry_view import TelemetryView
    from waggle_trainer.transport import AmqpSettings

    v = TelemetryView(AmqpSettings(), history=3)
    for i in range(5):
        assert v.record(
            js.dumps(
                {
                    "name": "train.agreement",
                    "ts": i,
                    "val": 0.1 * i,
                    "meta": {"node": "n1", "vsn": "V"},
                }
            ).encode()
        )
    assert not v.record(b"not json")
    assert not v.record(
        js.dumps({"name": "Bad Name", "ts": 1, "val": 1, "meta": {"node": "n1"}}).encode()
    )
    assert not v.record(b'{"name": "x.y", "ts": 1, "val": NaN, "meta": {"node": "n1"}}')
    last, series = v.snapshot()
    assert last["n1"]["train.agreement"] == (4, pytest.approx(0.4))
    assert [t for t, _ in series["n1"]] == [2, 3, 4] and v.malformed == 3


def test_node_keys_are_re_read_when_their_file_changes(tmp_path):
    import os

    p = pipeline(tmp_path, ["a"], aggregation={"min_updates": 100})
    key_file = tmp_path / "node-keys" / "a.key"
    new_key = b"rotated-key-of-a-0123456789abcdef"
    u = encoder("a", key=new_key).encode_delta(
        random_delta(1), base_version="1", round=1, samples=1
    )
    assert codes(feed(p, messages(u.blob, u.update_id, "a"))) == ["signature"]
    key_file.write_bytes(new_key + b"\n")
    os.chmod(key_file, 0o600)
    os.utime(key_file, ns=(1, 1))  # a different mtime even within one clock tick
    u = encoder("a", key=new_key).encode_delta(
        random_delta(1), base_version="1", round=1, samples=1
    )
    assert codes(feed(p, messages(u.blob, u.update_id, "a"))) == []
    key_file.unlink()
    u = encoder("a", key=new_key).encode_delta(
        random_delta(2), base_version="1", round=2, samples=1
    )
    assert codes(feed(p, messages(u.blob, u.update_id, "a"))) == ["key"]


@pytest.mark.parametrize("rule", ["fedavg", "median"])
def test_slicing_does_not_change_the_result(tmp_path, monkeypatch, rule):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from waggle_trainer.server import pipeline as pl
    from waggle_trainer.server.aggregate import combine

    ts = [torch.randn(7, 3, 2) for _ in range(5)]
    for i, t in enumerate(ts):
        save_file({"t": t}, str(tmp_path / f"{i}.safetensors"))
    files = [safe_open(str(tmp_path / f"{i}.safetensors"), framework="pt") for i in range(5)]
    # contributor 2 made its update on an older base
    current, old = torch.randn(7, 3, 2), torch.randn(7, 3, 2)
    save_file({"t": old}, str(tmp_path / "old.safetensors"))
    bases = [None, None, safe_open(str(tmp_path / "old.safetensors"), framework="pt"), None, None]
    w = [1.0, 2.0, 3.0, 4.0, 5.0]
    parts = [t.double() for t in ts]
    parts[2] = parts[2] + (old.double() - current.double())
    whole = combine(parts, w, rule)
    monkeypatch.setattr(pl, "SLICE_BYTES", 8 * 6 * 5 * 2)  # two rows at a time
    got = pl._combine_in_slices(files, "t", current, bases, w, rule, 0.1)
    assert torch.equal(got, whole)


def test_retention_keeps_the_newest_weights_and_every_manifest(tmp_path):
    p = pipeline(
        tmp_path,
        ["a"],
        aggregation={"min_updates": 1, "max_staleness": 1},
        store={"retain_versions": 2},
    )
    for r in range(1, 5):
        u = encoder("a").encode_delta(random_delta(r), base_version=str(r), round=r, samples=1)
        assert codes(feed(p, messages(u.blob, u.update_id, "a"))) == []
    vs = p.store.versions(MODEL)
    assert [v.version for v in vs] == ["1", "2", "3", "4", "5"]
    assert [v.retired for v in vs] == [True, True, True, False, False]
    assert vs[4].manifest["parent"] == "4" and vs[4].manifest["contributors"][0]["round"] == 4
    assert p.accepted_bases(MODEL) == ["5", "4"]
    u = encoder("a").encode_delta(random_delta(9), base_version="3", round=9, samples=1)
    assert codes(feed(p, messages(u.blob, u.update_id, "a"))) == ["stale"]


@pytest.mark.parametrize("compression", ["zstd", "deflate"])
def test_a_large_compressed_update_is_sniffed_correctly(tmp_path, compression):
    """The safetensors check reads the payload's first decompressed bytes; a zstd
    block can span 128 KiB of the payload."""
    big = 300_000
    p = pipeline(tmp_path, ["a"], big=big, aggregation={"min_updates": 100})
    u = encoder("a", CodecSettings("fp16", compression)).encode_delta(
        random_delta(1, scale=1.0, big=big), base_version="1", round=1, samples=1
    )
    assert len(u.blob) > 256 * 1024
    assert codes(feed(p, messages(u.blob, u.update_id, "a"))) == []
    assert len(p.db.pending(MODEL)) == 1


def test_a_round_closes_when_its_time_window_has_passed(tmp_path):
    import time

    p = pipeline(tmp_path, ["a", "b"], aggregation={"min_updates": 10, "window_s": 0.3})
    u = encoder("a").encode_delta(random_delta(1), base_version="1", round=1, samples=3)
    feed(p, messages(u.blob, u.update_id, "a"))
    with p.lock.held():
        assert p.tick().new_versions == []  # one update of ten, window still open
    time.sleep(0.4)
    with p.lock.held():
        (info,) = p.tick().new_versions
    assert info.version == "2" and info.manifest["nodes"] == ["a"]
    with p.lock.held():
        assert p.tick().new_versions == []  # the pool is empty now


def test_beehive_certificate_users_publish_as_node_dash_id(tmp_path):
    """Under Beehive a node's broker user is its certificate's CN, ``node-<id>``, while
    the envelope carries the bare node id: ``user_id_format`` maps one to the other."""
    p = pipeline(
        tmp_path,
        ["a", "b"],
        aggregation={"min_updates": 100},
        verify={"user_id_format": "node-{node}"},
    )
    u = encoder("a").encode_delta(random_delta(1), base_version="1", round=1, samples=1)
    assert codes(feed(p, messages(u.blob, u.update_id, "a", user_id="node-a"))) == []
    u = encoder("b").encode_delta(random_delta(2), base_version="1", round=1, samples=1)
    assert codes(feed(p, messages(u.blob, u.update_id, "b", user_id="b"))) == ["user_id"]
    u = encoder("b").encode_delta(random_delta(3), base_version="1", round=2, samples=1)
    assert codes(feed(p, messages(u.blob, u.update_id, "b", user_id="node-a"))) == ["user_id"]


@pytest.mark.parametrize("bad", ["node", "{node}-{node}", "{nodes}", "x-{node}}"])
def test_user_id_format_needs_one_node_placeholder(tmp_path, bad):
    from waggle_trainer.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="user_id_format|node"):
        make_config(tmp_path, ["a"], verify={"user_id_format": bad})


@pytest.mark.parametrize("kill_at", ["staging", "manifest", "aggregation"])
def test_failover_after_sigkill_counts_every_update_exactly_once(tmp_path, kill_at):
    """Two servers on one state directory.  The active one is SIGKILLed mid-staging,
    between a version's manifest and the database commit, or mid-aggregation; the
    standby (started before, waiting) gets every message the active had not
    acknowledged and goes on.  Every update is counted once, no version holds an
    update twice, and the versions are bit-identical to one server's alone."""
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    from simnodes import write_toml

    from waggle_trainer.server.config import load_server_config

    nodes = ["a", "b", "c"]
    agg = {"min_updates": 3, "window_s": 3600.0}
    rounds = [
        [
            (
                n,
                encoder(n).encode_delta(
                    random_delta(10 * r + i),
                    base_version=str(r + 1),
                    round=r + 1,
                    samples=2 + i + r,
                ),
            )
            for i, n in enumerate(nodes)
        ]
        for r in range(2)
    ]
    msgs = [
        m
        for rnd in rounds
        for n, u in rnd
        for m in messages(u.blob, u.update_id, n, chunk_size=600)
    ]
    cfg_path = write_toml(tmp_path / "server.toml", setup_server_files_dict(tmp_path, nodes, agg))
    cfg = load_server_config(cfg_path)
    standby = UpdatePipeline(cfg)
    standby.startup()  # both servers up; the broker delivers to the active one only
    (tmp_path / "msgs.pickle").write_bytes(pickle.dumps(msgs))
    here = Path(__file__).parent
    child = subprocess.run(
        [
            sys.executable,
            str(here / "pipeline_child.py"),
            str(cfg_path),
            str(tmp_path / "msgs.pickle"),
            kill_at,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(here.parents[1])},
    )
    assert child.returncode == -9, child.stderr[-3000:]
    acked = [int(line.split()[1]) for line in child.stdout.splitlines()]
    first_unacked = (acked[-1] + 1) if acked else 0
    assert 0 < first_unacked < len(msgs)
    # the standby takes over: the unacknowledged message is redelivered, then the rest
    feed(standby, msgs[first_unacked:])
    with standby.lock.held():
        standby.tick().finish()

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = UpdatePipeline(
        load_server_config(
            write_toml(ref_dir / "server.toml", setup_server_files_dict(ref_dir, nodes, agg))
        )
    )
    ref.startup()
    feed(ref, msgs)
    assert [v.version for v in standby.store.versions(MODEL)] == ["1", "2", "3"]
    seen: list[str] = []
    for v in ("2", "3"):
        got, want = standby.store.get(MODEL, v), ref.store.get(MODEL, v)
        wg, ww = standby.store.load_weights(got), ref.store.load_weights(want)
        assert all(torch.equal(wg[k], ww[k]) for k in ww), f"version {v} differs"
        ids = [c["update_id"] for c in got.manifest["contributors"]]
        assert sorted(ids) == sorted(u.update_id for _, u in rounds[int(v) - 2])
        seen += ids
    assert len(seen) == len(set(seen)) == 6
    statuses = standby.db.conn.execute("SELECT status, COUNT(*) FROM updates GROUP BY status")
    assert [tuple(r) for r in statuses] == [("aggregated", 6)]


def test_a_node_that_lost_its_state_is_heard_again_at_once(tmp_path):
    """A node's updates carry ``<node>-<epoch>-r<round>`` ids; a node that lost its
    state starts a new epoch at round 1 and is accepted at once, while a replay of
    any update already accepted, or a late update of the epoch it left, is not."""
    from waggle_trainer.transport.wire import update_id_for

    node = "W0_node-17"  # an underscore and a dash: any node id makes a valid update id
    p = pipeline(tmp_path, [node], aggregation={"min_updates": 100})
    enc = encoder(node)

    def update(epoch: str, rnd: int, seed: int):
        return enc.encode_delta(
            random_delta(seed),
            base_version="1",
            round=rnd,
            samples=1,
            update_id=update_id_for(node, epoch, rnd),
        )

    def send(u):
        return codes(feed(p, messages(u.blob, u.update_id, node)))

    old = [update("0badc0de", r, r) for r in (1, 2, 500)]
    assert [send(u) for u in old] == [[], [], []]
    late = update("0badc0de", 499, 9)  # in flight when the node lost its state
    # the state is lost: a new epoch, round 1 again
    fresh = update("5eed5eed", 1, 11)
    assert send(fresh) == []
    assert [x.update_id for x in p.db.pending(MODEL)] == [fresh.update_id]
    assert send(update("5eed5eed", 2, 12)) == []
    # replays: an accepted update again (absorbed, not counted), the same round of the
    # current epoch under another payload, and the old epoch's late update
    outs = feed(p, messages(old[2].blob, old[2].update_id, node))
    assert outs[0].duplicate and codes(outs) == []
    assert send(update("5eed5eed", 2, 13)) == [] and outs  # same id: absorbed as well
    assert send(late) == ["replay"]
    reason = p.db.conn.execute("SELECT reason FROM rejections WHERE code='replay'").fetchone()[0]
    assert "0badc0de" in reason and "5eed5eed" in reason
    assert send(update("5eed5eed", 1, 14)) == []  # absorbed: the id was accepted before
    assert len(p.db.pending(MODEL)) == 1
    # ids that name no epoch (a UUID) keep the old rule: rounds only move forward
    u = enc.encode_delta(random_delta(20), base_version="1", round=3, samples=1)
    assert send(u) == []
    u = enc.encode_delta(random_delta(21), base_version="1", round=3, samples=1)
    assert send(u) == ["replay"]
