"""Signed model versions: what a node accepts from the server, and the outbox rule."""

from __future__ import annotations

import pytest
import torch

from waggle_trainer.server.signing import generate_signing_key, load_signing_key
from waggle_trainer.transport import Outbox, UpdateEncoder, UpdateRejected, reference_spec
from waggle_trainer.transport.model_subscriber import drop_unaccepted
from waggle_trainer.transport.model_wire import decode_model, encode_model, load_verify_key


def state():
    return {"w": torch.randn(3, 4), "b": torch.zeros(3), "n": torch.tensor(7)}


@pytest.fixture
def keys(tmp_path):
    generate_signing_key(tmp_path / "k.pem")
    generate_signing_key(tmp_path / "other.pem")
    return (
        load_signing_key(tmp_path / "k.pem"),
        load_verify_key(tmp_path / "k.pem.pub"),
        load_verify_key(tmp_path / "other.pem.pub"),
    )


def test_round_trip_and_every_refusal(keys):
    sk, pk, other = keys
    s = state()
    env, blob = encode_model(s, model="m", version="4", parent="3", accepts=["4", "3"], key=sk)
    mv = decode_model(blob, pk, expected=reference_spec(s))
    assert mv.version == "4" and mv.envelope.accepts == ["4", "3"]
    assert all(torch.equal(mv.state[k], s[k]) for k in s)
    with pytest.raises(UpdateRejected) as e:
        decode_model(blob, other)
    assert e.value.code == "signature"
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(UpdateRejected) as e:
        decode_model(bytes(tampered), pk)
    assert e.value.code == "signature"
    with pytest.raises(UpdateRejected) as e:
        decode_model(
            blob, pk, expected=reference_spec({"w": torch.zeros(4, 3), "b": torch.zeros(3)})
        )
    assert e.value.code == "shape"
    bad = dict(s, b=torch.tensor([1.0, float("inf"), 0.0]))
    _, blob = encode_model(bad, model="m", version="5", parent="4", accepts=["5"], key=sk)
    with pytest.raises(UpdateRejected) as e:
        decode_model(blob, pk)
    assert e.value.code == "nonfinite"
    with pytest.raises(UpdateRejected) as e:
        decode_model(b"\x80\x04pickle", pk)
    assert e.value.code == "format"


def test_outbox_keeps_updates_the_server_still_accepts(tmp_path):
    ob = Outbox(tmp_path / "outbox", 1 << 20)
    enc = UpdateEncoder(node_id="n", vsn="v", model="m", key=b"k" * 16)
    ids = {}
    for base in ("1", "2", "3"):
        u = enc.encode_delta({"w": torch.ones(4)}, base_version=base, round=int(base), samples=1)
        ob.put(u.blob)
        ids[base] = u.update_id
    dropped = drop_unaccepted(ob, "m", ["4", "3", "2"])
    assert dropped == [ids["1"]]
    assert {e.update_id for e in ob.pending()} == {ids["2"], ids["3"]}
