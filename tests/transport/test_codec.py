"""Update codec: round trips for every setting, every validation failure, sizes,
and convergence of a lossy update stream with error feedback."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch

from waggle_trainer.transport.codec import (
    CodecSettings,
    UpdateDecoder,
    UpdateEncoder,
    UpdateRejected,
    _seal,
    _split,
    _torch_threads,
    apply_delta,
    load_key,
    peek_envelope,
    weight_delta,
)

KEY = b"0123456789abcdef0123456789abcdef"


def small_model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g),
        "bn.weight": torch.ones(16),
        "bn.bias": torch.zeros(16),
        "bn.running_mean": torch.zeros(16),
        "bn.num_batches_tracked": torch.tensor(7),  # integer buffer: not part of the update
        "fc.weight": torch.randn(10, 256, generator=g),
        "fc.bias": torch.randn(10, generator=g),
    }


def perturbed(state, scale=1e-2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
        for k, v in state.items()
    }


def encoder(settings: CodecSettings, **kw) -> UpdateEncoder:
    return UpdateEncoder(
        node_id="000048B02D15BC7C",
        vsn="W0A1",
        model="resnet-mini",
        key=KEY,
        settings=settings,
        **kw,
    )


ALL_SETTINGS = [
    CodecSettings(d, c, k)
    for d in ("fp32", "fp16", "int8")
    for c in ("zstd", "deflate", "none")
    for k in (0.0, 0.05)
]


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=lambda s: s.describe())
def test_round_trip(settings):
    base = small_model_state()
    new = perturbed(base)
    u = encoder(settings).encode(
        new, base, base_version="v7", round=3, samples=640, metrics={"loss": 0.5, "agreement": 0.9}
    )
    d = UpdateDecoder(KEY).decode(
        u.blob, base, expected_model="resnet-mini", expected_base_version="v7"
    )
    env = d.envelope
    assert (env.node_id, env.vsn, env.model, env.base_version, env.round, env.samples) == (
        "000048B02D15BC7C",
        "W0A1",
        "resnet-mini",
        "v7",
        3,
        640,
    )
    assert env.metrics == {"loss": 0.5, "agreement": 0.9}
    assert env.update_id == u.update_id and len(env.update_id) == 36
    assert set(d.delta) == {k for k, v in base.items() if v.is_floating_point()}
    true = weight_delta(new, base)
    for name, t in true.items():
        got = d.delta[name]
        assert got.shape == t.shape and got.dtype == torch.float32
        if settings.topk:
            kept = got != 0
            k = max(1, math.ceil(settings.topk * t.numel()))
            assert int(kept.sum()) >= min(k, int((t != 0).sum()))
            # the kept entries are the largest in magnitude
            if int(kept.sum()) < t.numel():
                assert float(t[kept].abs().min()) >= float(t[~kept].abs().max()) - 1e-6
            err = (got[kept] - t[kept]).abs().max()
        else:
            err = (got - t).abs().max()
        tol = {
            "fp32": 0.0,
            "fp16": 1e-3 * float(t.abs().max()),
            "int8": float(t.abs().max()) / 254 + 1e-7,
        }[settings.dtype]
        assert float(err) <= tol + 1e-9, (name, float(err), tol)


def test_error_feedback_carries_what_was_not_sent():
    base = small_model_state()
    enc = encoder(CodecSettings("fp32", "none", 0.05))
    dec = UpdateDecoder(KEY)
    new = perturbed(base)
    d1 = dec.decode(enc.encode(new, base, base_version="1", round=1, samples=1).blob, base)
    # next base version, no training at all: the update is exactly the residual
    d2 = dec.decode(enc.encode(base, base, base_version="2", round=2, samples=1).blob, base)
    true = weight_delta(new, base)
    for n in true:
        # residual goes out over later rounds; nothing is sent twice
        assert torch.all((d1.delta[n] != 0) & (d2.delta[n] != 0) == False)  # noqa: E712
    # cumulative update for the same base version: the pending residual is replaced, not stacked
    enc2 = encoder(CodecSettings("fp32", "none", 0.05))
    enc2.encode(new, base, base_version="1", round=1, samples=1)
    again = dec.decode(enc2.encode(new, base, base_version="1", round=2, samples=1).blob, base)
    for n in true:
        assert torch.equal(again.delta[n], d1.delta[n])


def test_excludes_integer_tensors_and_apply_delta():
    base = small_model_state()
    new = perturbed(base)
    u = encoder(CodecSettings("fp32", "zstd")).encode(
        new, base, base_version="1", round=1, samples=1
    )
    d = UpdateDecoder(KEY).decode(u.blob, base)
    assert "bn.num_batches_tracked" not in d.delta
    out = apply_delta(base, d.delta)
    for k in base:
        assert (
            torch.equal(out[k], new[k])
            if base[k].is_floating_point()
            else torch.equal(out[k], base[k])
        )


# ----------------------------------------------------------------- validation


@pytest.fixture
def update():
    base = small_model_state()
    u = encoder(CodecSettings("fp16", "zstd")).encode(
        perturbed(base), base, base_version="4", round=1, samples=10
    )
    return base, u.blob


def rejected(code, blob, ref, **kw) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as e:
        UpdateDecoder(kw.pop("key", KEY), **kw.pop("dec", {})).decode(blob, ref, **kw)
    assert e.value.code == code, str(e.value)
    return e.value


@pytest.mark.parametrize("where", ["envelope", "mac", "payload", "last"])
def test_flipped_byte(update, where):
    base, blob = update
    head, env, mac, payload = _split(blob)
    pos = {
        "envelope": 8 + len(env) // 2,
        "mac": len(head) + 3,
        "payload": len(head) + 32 + len(payload) // 2,
        "last": len(blob) - 1,
    }[where]
    bad = bytearray(blob)
    bad[pos] ^= 0x01
    with pytest.raises(UpdateRejected) as e:
        UpdateDecoder(KEY).decode(bytes(bad), base)
    # a flipped envelope byte may break the JSON before the MAC is even checked
    assert e.value.code in (("signature", "format") if where == "envelope" else ("signature",))


def test_wrong_key(update):
    base, blob = update
    rejected("signature", blob, base, key=b"another key of 32 bytes.........")
    rejected("key", blob, base, key={"someone-else": KEY})


def test_resigned_tampering_is_caught_by_sha(update):
    # a forger without the key cannot fix the MAC; with the key but a stale hash, sha fails
    base, blob = update
    head, env, mac, payload = _split(blob)
    bad = payload[:-1] + bytes([payload[-1] ^ 1])
    rejected("sha256", _seal(env, bad, KEY), base)


def tamper_payload(blob, mutate):
    """Rewrite the safetensors payload with ``mutate(tensors)`` and re-sign it
    with the right key: validation past the signature must still catch it."""
    import hashlib

    import zstandard
    from safetensors.torch import load, save

    head, env_json, mac, payload = _split(blob)
    raw = zstandard.ZstdDecompressor().decompress(payload)
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    tensors = load(raw)
    mutate(tensors)
    raw = save(tensors, metadata=meta)
    payload = zstandard.ZstdCompressor().compress(raw)
    env = json.loads(env_json)
    env.update(
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_bytes=len(payload),
        raw_bytes=len(raw),
    )
    return _seal(json.dumps(env, sort_keys=True, separators=(",", ":")).encode(), payload, KEY)


def test_nan_rejected(update):
    base, blob = update
    bad = tamper_payload(blob, lambda t: t["fc.bias"].__setitem__(0, float("nan")))
    assert "fc.bias" in rejected("nonfinite", bad, base).reason


def test_wrong_shape_dtype_name(update):
    base, blob = update
    rejected(
        "shape",
        tamper_payload(blob, lambda t: t.update({"fc.bias": torch.zeros(11, dtype=torch.float16)})),
        base,
    )
    rejected("dtype", tamper_payload(blob, lambda t: t.update({"fc.bias": torch.zeros(10)})), base)
    rejected(
        "names",
        tamper_payload(blob, lambda t: t.update({"evil": torch.zeros(1, dtype=torch.float16)})),
        base,
    )
    rejected("names", tamper_payload(blob, lambda t: t.pop("fc.bias")), base)
    # the reference itself differs (server expects another architecture)
    other = dict(base, **{"fc.weight": torch.zeros(10, 255)})
    rejected("shape", blob, other)
    rejected("names", blob, {k: v for k, v in base.items() if k != "fc.bias"})


def test_model_and_base_version_checked(update):
    base, blob = update
    rejected("model", blob, base, expected_model="resnet50")
    rejected("base_version", blob, base, expected_base_version="5")
    rejected("base_version", blob, lambda env: None)


def test_oversized(update):
    base, blob = update
    rejected("size", blob, base, dec={"max_update_bytes": len(blob) - 1})
    # payload claims to decompress to more than the limit (a zip bomb is never inflated)
    head, env_json, mac, payload = _split(blob)
    env = json.loads(env_json)
    env["raw_bytes"] = 10**12
    forged = _seal(json.dumps(env, sort_keys=True, separators=(",", ":")).encode(), payload, KEY)
    rejected("size", forged, base, dec={"max_update_bytes": 10**9})
    # an envelope that lies about raw_bytes within the limit
    env["raw_bytes"] = 100
    forged = _seal(json.dumps(env, sort_keys=True, separators=(",", ":")).encode(), payload, KEY)
    rejected("size", forged, base)


def test_garbage_and_truncation(update):
    base, blob = update
    rejected("format", b"PK\x03\x04 not an update", base)
    rejected("format", blob[:20], base)
    rejected("signature", blob[:-10], base)


def test_encoder_refuses_nonfinite_and_fp16_overflow():
    base = small_model_state()
    bad = dict(base, **{"fc.bias": torch.full((10,), float("inf"))})
    with pytest.raises(ValueError, match="non-finite"):
        encoder(CodecSettings("fp32")).encode(bad, base, base_version="1", round=1, samples=1)
    big = dict(base, **{"fc.bias": torch.full((10,), 1e6)})
    with pytest.raises(ValueError, match="fp16 range"):
        encoder(CodecSettings("fp16")).encode(big, base, base_version="1", round=1, samples=1)


def test_peek_and_key_file(tmp_path, update):
    base, blob = update
    assert peek_envelope(blob).base_version == "4"
    p = tmp_path / "k"
    p.write_bytes(KEY + b"\n")
    os.chmod(p, 0o600)
    assert load_key(p) == KEY
    os.chmod(p, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_key(p)
    p.write_bytes(b"short")
    os.chmod(p, 0o600)
    with pytest.raises(ValueError, match="at least 16"):
        load_key(p)


# ---------------------------------------------------------------- size targets


def test_size_targets_on_a_convnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    base = {k: v for k, v in base.items() if k.startswith(("conv1", "bn1", "layer1", "fc"))}
    new = perturbed(base, scale=1e-3)
    raw = sum(v.numel() * 4 for v in base.values() if v.is_floating_point())
    size = {}
    for s in (
        CodecSettings("fp16", "zstd"),
        CodecSettings("int8", "zstd"),
        CodecSettings("fp16", "zstd", 0.01),
    ):
        size[s.describe()] = (
            len(encoder(s).encode(new, base, base_version="1", round=1, samples=1).blob) / raw
        )
    assert size["fp16+zstd"] <= 0.50
    assert size["int8+zstd"] <= 0.26
    assert size["fp16+top0.01+zstd"] <= 0.03


@pytest.mark.slow
def test_encode_runs_on_one_torch_thread_and_restores_the_count(monkeypatch):
    """The codec's elementwise work runs on one intra-op thread (its speed is measured
    in bench/transport.py, not here); the caller's thread count comes back."""
    seen = []
    real_abs = torch.Tensor.abs

    def spy(self):
        seen.append(torch.get_num_threads())
        return real_abs(self)

    torch.set_num_threads(2)
    monkeypatch.setattr(torch.Tensor, "abs", spy)
    base = {"w": torch.zeros(64, 64), "b": torch.zeros(64)}
    new = perturbed(base, scale=1e-3)
    enc = encoder(CodecSettings("int8", "zstd"))
    enc.encode(new, base, base_version="1", round=0, samples=1)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


# ----------------------------------------------------------------- convergence


def _federated_run(settings: CodecSettings | None, *, feedback: bool = True, rounds: int = 20):
    """Logistic regression on scikit-learn's digits; each round the node trains
    10 full-batch steps from the global weights, sends the update, and the
    server applies it.  Returns the global weights after ``rounds``."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = {"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}
    enc = encoder(settings) if settings else None
    if enc is not None and not feedback:
        enc.feedback = None
    dec = UpdateDecoder(KEY)
    with _torch_threads(1):  # tiny ops: threads only add synchronisation
        for r in range(rounds):
            g = _one_round(g, r, X, y, enc, dec)
    return g


def _one_round(g, r, X, y, enc, dec):
    w = {k: v.clone().requires_grad_(True) for k, v in g.items()}
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(X @ w["fc.weight"].T + w["fc.bias"], y)
        gw, gb = torch.autograd.grad(loss, [w["fc.weight"], w["fc.bias"]])
        with torch.no_grad():
            w["fc.weight"] -= 0.5 * gw
            w["fc.bias"] -= 0.5 * gb
    w = {k: v.detach() for k, v in w.items()}
    if enc is None:
        return w
    blob = enc.encode(w, g, base_version=str(r), round=r, samples=len(y)).blob
    return apply_delta(g, dec.decode(blob, g).delta)


def _rel(a, b):
    num = torch.cat([(a[k] - b[k]).flatten() for k in b]).norm()
    return float(num / torch.cat([b[k].flatten() for k in b]).norm())


def test_int8_stream_with_error_feedback_converges_to_fp32_stream():
    ref = _federated_run(None)
    fp32 = _federated_run(CodecSettings("fp32", "zstd"))
    assert _rel(fp32, ref) < 1e-6  # lossless up to float rounding of base + (w - base)
    assert _rel(_federated_run(CodecSettings("int8", "zstd")), fp32) < 0.01


def test_error_feedback_is_what_makes_topk_converge():
    fp32 = _federated_run(CodecSettings("fp32", "zstd"))
    with_ef = _rel(_federated_run(CodecSettings("fp16", "zstd", 0.1)), fp32)
    without = _rel(_federated_run(CodecSettings("fp16", "zstd", 0.1), feedback=False), fp32)
    assert with_ef < 0.1 and without > 3 * with_ef
