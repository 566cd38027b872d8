"""Hostile updates refused by the codec and the chunk parser (no broker).

Each update here is validly signed: the attacker holds a node's key, or a node is
buggy.  Signature checks do not help; the decoder must refuse them with a code."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
import zstandard
from hostile import resign, with_metrics_text, zstd_bomb, zstd_declaring
from safetensors.torch import load, save

from waggle_trainer.transport.chunks import ChunkError, parse_headers, split
from waggle_trainer.transport.codec import (
    CodecSettings,
    UpdateDecoder,
    UpdateEncoder,
    UpdateRejected,
    _split,
)
from waggle_trainer.transport.wire import CHUNK_FORMAT

KEY = b"hostile-test-key-0123456789abcdef"
REF = {"w": torch.zeros(300), "b": torch.zeros(7)}


def encode(compression="zstd", dtype="fp16", **kw) -> bytes:
    enc = UpdateEncoder(
        node_id="n1", vsn="W0T", model="m", key=KEY, settings=CodecSettings(dtype, compression)
    )
    delta = {"w": torch.randn(300), "b": torch.randn(7)}
    return enc.encode_delta(delta, base_version="1", round=1, samples=4, **kw).blob


def refused(blob: bytes, code: str, **kw) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as e:
        UpdateDecoder(KEY, **kw).decode(blob, REF)
    assert e.value.code == code, str(e.value)
    return e.value


# ------------------------------------------------------------ decompression


def test_zstd_frame_declaring_two_to_the_fifty_bytes_is_refused_before_allocating():
    blob = encode("zstd", "fp16")
    UpdateDecoder(KEY).decode(blob, REF)  # the honest update decodes
    e = refused(zstd_bomb(blob, KEY), "size")
    assert str(2**50) in e.reason and "raw_bytes" in e.reason


def test_zstd_frame_without_a_declared_size_is_refused():
    blob = encode("zstd")
    payload = _split(blob)[3]
    e = refused(resign(blob, KEY, payload=zstd_declaring(payload, None)), "size")
    assert "declare" in e.reason


def test_zstd_frame_declaring_the_right_size_decodes():
    # the header rewrite itself is harmless: only the declared size matters
    blob = encode("zstd")
    payload = _split(blob)[3]
    raw_bytes = json.loads(_split(blob)[1])["raw_bytes"]
    honest = resign(blob, KEY, payload=zstd_declaring(payload, raw_bytes))
    assert UpdateDecoder(KEY).decode(honest, REF).delta["w"].shape == (300,)


def test_zstd_frame_declaring_less_than_it_holds_is_refused():
    blob = encode("zstd", "fp32")
    payload = _split(blob)[3]
    raw_bytes = json.loads(_split(blob)[1])["raw_bytes"]
    lie = resign(
        blob, KEY, payload=zstd_declaring(payload, raw_bytes // 2), raw_bytes=raw_bytes // 2
    )
    assert refused(lie, "format").reason.startswith("payload does not decompress")


def test_zstd_data_after_the_frame_is_refused():
    blob = encode("zstd")
    payload = _split(blob)[3]
    refused(resign(blob, KEY, payload=payload + b"trailing"), "format")


def test_deflate_bomb_stops_at_raw_bytes():
    # 64 MiB of zeros deflate to ~64 KiB; the envelope says 1000 bytes
    bomb = zlib.compress(bytes(64 * 2**20), 9)
    blob = resign(encode("deflate"), KEY, payload=bomb, raw_bytes=1000)
    assert "more than raw_bytes = 1000" in refused(blob, "size").reason


def test_deflate_data_after_the_stream_is_refused():
    blob = encode("deflate")
    payload = _split(blob)[3]
    refused(resign(blob, KEY, payload=payload + b"trailing"), "format")


def test_payload_that_is_not_safetensors_is_refused_with_code_format():
    garbage = b"\xff" * 64
    blob = resign(
        encode("zstd"),
        KEY,
        payload=zstandard.ZstdCompressor().compress(garbage),
        raw_bytes=len(garbage),
    )
    assert "not safetensors" in refused(blob, "format").reason


def test_unknown_safetensors_dtype_is_refused_before_building_tensors():
    # "F8_E8M0" is a dtype safetensors' parser knows and its torch loader does not
    header = json.dumps(
        {
            "w": {"dtype": "F8_E8M0", "shape": [300], "data_offsets": [0, 300]},
            "b": {"dtype": "F16", "shape": [7], "data_offsets": [300, 314]},
            "__metadata__": {
                "format": "waggle-update-payload/1",
                "dtype": "fp16",
                "sparse": "dense",
            },
        }
    ).encode()
    raw = len(header).to_bytes(8, "little") + header + bytes(314)
    blob = resign(encode("none"), KEY, payload=raw, raw_bytes=len(raw))
    assert "F8_E8M0" in refused(blob, "dtype").reason


@pytest.mark.parametrize(
    "scales",
    ['{"w":1' + "0" * 400 + ',"b":1}', '{"w":NaN,"b":1}', '{"w":-1,"b":1}', '{"w":true,"b":1}'],
)
def test_int8_scale_that_is_not_a_finite_nonnegative_number_is_refused(scales):
    blob = encode("none", "int8")
    raw = _split(blob)[3]
    meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    raw = save(load(raw), metadata=dict(meta, scales=scales))
    e = refused(resign(blob, KEY, payload=raw, raw_bytes=len(raw)), "nonfinite")
    assert "'w'" in e.reason


def _with_scales(blob: bytes, scales: dict, topk: bool = False) -> bytes:
    raw = _split(blob)[3]
    meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    raw = save(load(raw), metadata=dict(meta, scales=json.dumps(scales)))
    return resign(blob, KEY, payload=raw, raw_bytes=len(raw))


@pytest.mark.parametrize("topk", [0.0, 0.5])
def test_int8_scale_whose_values_overflow_float32_is_refused(topk):
    """127 x 1e38 is +inf in float32: a finite scale can still decode to inf."""
    enc = UpdateEncoder(
        node_id="n1", vsn="W0T", model="m", key=KEY, settings=CodecSettings("int8", "none", topk)
    )
    delta = {"w": torch.randn(300), "b": torch.randn(7)}
    blob = enc.encode_delta(delta, base_version="1", round=1, samples=4).blob
    e = refused(_with_scales(blob, {"w": 1e38, "b": 0.01}), "nonfinite")
    assert "'w'" in e.reason and "1e+38" in e.reason
    # the largest scale whose 127 multiple is a finite float32 still decodes, finite
    top = torch.finfo(torch.float32).max / 127
    d = UpdateDecoder(KEY).decode(_with_scales(blob, {"w": top * 0.999, "b": 0.01}), REF)
    assert all(bool(torch.isfinite(t).all()) for t in d.delta.values())


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_every_decoded_tensor_is_finite(dtype):
    """Infinity in an fp32 or fp16 payload (dense): refused, whatever produced it."""
    blob = encode("none", dtype)
    raw = _split(blob)[3]
    meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    tensors = load(raw)
    tensors["b"][3] = float("inf")
    raw = save(tensors, metadata=meta)
    e = refused(resign(blob, KEY, payload=raw, raw_bytes=len(raw)), "nonfinite")
    assert "'b'" in e.reason or "b:" in e.reason


def test_int8_scales_that_python_cannot_read_are_refused():
    blob = encode("none", "int8")
    raw = _split(blob)[3]
    meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    raw = save(load(raw), metadata=dict(meta, scales="[" * 30_000))
    refused(resign(blob, KEY, payload=raw, raw_bytes=len(raw)), "format")


# ------------------------------------------------------------ envelope metrics


@pytest.mark.parametrize(
    "text", ['{"loss":NaN}', '{"loss":Infinity}', '{"loss":-Infinity}', '{"loss":1e999}']
)
def test_nonfinite_metric_is_refused(text):
    blob = with_metrics_text(encode(metrics={"loss": 0.5}), KEY, text)
    assert "loss" in refused(blob, "nonfinite").reason


@pytest.mark.parametrize(
    "text", ['{"loss":"0.5"}', '{"loss":true}', '{"loss":[1]}', '{"loss":null}']
)
def test_metric_that_is_not_a_number_is_refused(text):
    blob = with_metrics_text(encode(metrics={"loss": 0.5}), KEY, text)
    assert "loss" in refused(blob, "format").reason


def test_metric_integer_beyond_float_range_is_refused():
    blob = with_metrics_text(encode(metrics={"loss": 0.5}), KEY, '{"loss":1' + "0" * 400 + "}")
    assert "loss" in refused(blob, "nonfinite").reason


@pytest.mark.parametrize(
    "text", ["[" * 30_000 + "]" * 30_000, "1" * 5000], ids=["deep-nesting", "5000-digit-integer"]
)
def test_envelope_json_that_python_cannot_read_is_refused(text):
    blob = with_metrics_text(encode(metrics={"loss": 0.5}), KEY, text)
    assert "not JSON" in refused(blob, "format").reason


def test_finite_metrics_pass():
    blob = encode(metrics={"loss": 0.5, "agreement": 1})
    assert UpdateDecoder(KEY).decode(blob, REF).envelope.metrics == {"loss": 0.5, "agreement": 1.0}


# ------------------------------------------------------------ chunk headers


def test_chunk_of_an_unknown_format_version_is_refused():
    (c,) = split("u1", b"x" * 10)
    assert c.headers()["format"] == CHUNK_FORMAT
    assert parse_headers(c.headers(), c.message_id)[0] == "u1"
    for fmt in ("waggle-update-chunk/2", b"waggle-update-chunk/2", "", None, 1):
        h = dict(c.headers(), format=fmt)
        with pytest.raises(ChunkError) as e:
            parse_headers(h, c.message_id)
        assert e.value.code == "format" and "waggle-update-chunk/1" in e.value.reason
    h = dict(c.headers())
    del h["format"]
    with pytest.raises(ChunkError) as e:
        parse_headers(h, c.message_id)
    assert e.value.code == "format"
    # the header may arrive as bytes (AMQP long strings)
    assert parse_headers(dict(c.headers(), format=CHUNK_FORMAT.encode()), c.message_id)


def test_chunk_without_message_id_is_refused():
    (c,) = split("u1", b"x" * 10)
    for mid in (None, ""):
        with pytest.raises(ChunkError) as e:
            parse_headers(c.headers(), mid)
        assert e.value.code == "headers" and "message_id" in e.value.reason


def test_a_skippable_frame_before_a_bomb_does_not_get_past_the_bound():
    # libzstd reports content size 0 for a skippable frame: the streaming bound holds
    bomb = zstd_declaring(zstandard.ZstdCompressor().compress(bytes(2**20)), 2**50)
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"skip"
    blob = resign(encode("zstd"), KEY, payload=skippable + bomb)
    assert refused(blob, "size").reason.startswith("payload decompresses to more than raw_bytes")
