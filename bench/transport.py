"""Update codec and publish throughput for ResNet-18 / ResNet-50.

The "update" is a random perturbation (N(0, sigma^2), sigma = 1e-3) of a
randomly initialised model (torchvision, weights=None).  For every codec
setting: encoded size relative to raw fp32 (4 bytes per floating entry),
encode+sign and verify+decode time (median of ``--repeats``), and the largest
decoding error relative to max|delta| (of the entries sent, for top-k).  Then
publish throughput to the local broker through the real outbox and
publisher thread, publisher confirms included: the outbox is filled first,
the clock runs from starting the publisher until the outbox is empty.

The codec runs its tensor work on one torch thread (``torch_threads=1``, its
default); one extra line compares encoding with torch's own thread count.

    .venv/bin/python bench/transport.py                    # writes bench/results/transport.md
    .venv/bin/python bench/transport.py --arch resnet18 --repeats 2 --publish 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pika  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from bench.provenance import provenance, write_report  # noqa: E402
from waggle_trainer.transport import (  # noqa: E402
    AmqpSettings,
    CodecSettings,
    Outbox,
    UpdateDecoder,
    UpdateEncoder,
    UpdatePublisher,
    weight_delta,
)

KEY = b"bench-key-0123456789abcdef012345"
MB = 1e6
SETTINGS = [
    CodecSettings("fp32", "none"),
    CodecSettings("fp32", "zstd"),
    CodecSettings("fp16", "zstd"),
    CodecSettings("fp16", "deflate"),
    CodecSettings("int8", "zstd"),
    CodecSettings("int8", "deflate"),
    CodecSettings("fp16", "zstd", 0.01),
    CodecSettings("int8", "zstd", 0.01),
]
PUBLISH = [
    CodecSettings("fp32", "none"),
    CodecSettings("fp16", "zstd"),
    CodecSettings("int8", "zstd", 0.01),
]


def model_pair(arch: str, sigma: float = 1e-3):
    torch.manual_seed(0)
    base = getattr(torchvision.models, arch)(weights=None).state_dict()
    new = {
        k: (v + sigma * torch.randn_like(v) if v.is_floating_point() else v)
        for k, v in base.items()
    }
    return base, new


def codec_rows(arch, base, new, repeats):
    raw = sum(v.numel() * 4 for v in base.values() if v.is_floating_point())
    true = weight_delta(new, base)
    dec = UpdateDecoder(KEY)
    rows = []
    for s in SETTINGS:
        enc_t, dec_t = [], []
        for r in range(repeats + 1):  # the first run warms allocator and caches
            enc = UpdateEncoder(node_id="bench", vsn="W000", model=arch, key=KEY, settings=s)
            t = time.perf_counter()
            u = enc.encode(new, base, base_version="1", round=r, samples=1)
            t1 = time.perf_counter()
            d = dec.decode(u.blob, base)
            t2 = time.perf_counter()
            if r:
                enc_t.append(t1 - t)
                dec_t.append(t2 - t1)
        err = 0.0
        for n, t_ in true.items():
            got = d.delta[n]
            mask = got != 0 if s.topk else torch.ones_like(got, dtype=torch.bool)
            if mask.any():
                err = max(err, float((got[mask] - t_[mask]).abs().max()) / float(t_.abs().max()))
        rows.append(
            dict(
                arch=arch,
                setting=s.describe(),
                bytes=len(u.blob),
                ratio=len(u.blob) / raw,
                enc=statistics.median(enc_t),
                dec=statistics.median(dec_t),
                err=err,
            )
        )
    return raw, rows


def publish_rows(arch, base, new, n_updates):
    amqp = AmqpSettings(connection_name="bench")
    exchange = f"bench.updates.{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    ch = conn.channel()
    ch.exchange_declare(exchange, "topic", durable=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, exchange, "update.*")
    rows = []
    try:
        for s in PUBLISH:
            enc = UpdateEncoder(node_id="bench", vsn="W000", model=arch, key=KEY, settings=s)
            n = max(2, n_updates // 3) if s.dtype == "fp32" and not s.topk else n_updates
            with tempfile.TemporaryDirectory() as d:
                outbox = Outbox(d, 1 << 40)
                total = 0
                for r in range(n):
                    total += outbox.put(
                        enc.encode(new, base, base_version="1", round=r, samples=1).blob
                    ).size
                pub = UpdatePublisher(amqp, outbox, node_id="bench", exchange=exchange, poll_s=0.01)
                t = time.perf_counter()
                pub.start()
                if not pub.wait_idle(600):
                    raise RuntimeError(f"publisher did not drain: {pub.stats()}")
                dt = time.perf_counter() - t
                pub.stop()
            ch.queue_purge(q)
            rows.append(
                dict(
                    arch=arch,
                    setting=s.describe(),
                    n=n,
                    size=total / n,
                    chunks=pub.published_chunks,
                    ups=n / dt,
                    mbs=total / MB / dt,
                )
            )
    finally:
        ch.exchange_delete(exchange)
        conn.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--publish", type=int, default=10, help="updates per publish measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/transport.md")
    a = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    codec, pubs, raws = [], [], {}
    for arch in a.arch:
        base, new = model_pair(arch)
        raws[arch], rows = codec_rows(arch, base, new, a.repeats)
        codec += rows
        for r in rows:
            print(
                f"{arch:9} {r['setting']:20} {r['ratio'] * 100:7.2f}%  enc {r['enc']:.3f}s  "
                f"dec {r['dec']:.3f}s  err {r['err']:.1e}",
                file=sys.stderr,
            )
        pubs += publish_rows(arch, base, new, a.publish)
    # encode at torch's own thread count, for comparison
    base, new = model_pair("resnet18")
    enc = UpdateEncoder(
        node_id="bench",
        vsn="W000",
        model="resnet18",
        key=KEY,
        settings=CodecSettings("fp16", "zstd"),
        torch_threads=None,
    )
    times = []
    for r in range(a.repeats + 1):
        t = time.perf_counter()
        enc.encode(new, base, base_version="1", round=r, samples=1)
        times.append(time.perf_counter() - t)
    default_enc = statistics.median(times[1:])

    lines = [
        "# Transport benchmark",
        "",
        *provenance(
            1,
            f"Codec on 1 torch thread, median of {a.repeats} after a warm-up; update = "
            "N(0, 1e-3²) perturbation of a random-init model.",
            load_before=load_before,
        ),
        "",
        "## Codec",
        "",
        "| model | setting | bytes | % of raw fp32 | encode+sign s | verify+decode s | "
        "max err / max abs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in codec:
        lines.append(
            f"| {r['arch']} | {r['setting']} | {r['bytes']:,} | {r['ratio'] * 100:.2f} | "
            f"{r['enc']:.3f} | {r['dec']:.3f} | {r['err']:.1e} |"
        )
    lines += [
        "",
        "Raw fp32: " + ", ".join(f"{k} {v:,} bytes" for k, v in raws.items()) + ".",
        f"resnet18 fp16+zstd encode+sign with torch's own {torch.get_num_threads()} "
        "thread(s) (`torch_threads=None`): "
        f"{default_enc:.3f} s.",
        "",
        "## Publish to the local broker (outbox → publisher thread → confirms)",
        "",
        "| model | setting | updates | bytes/update | chunks | updates/s | MB/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in pubs:
        lines.append(
            f"| {r['arch']} | {r['setting']} | {r['n']} | {r['size']:,.0f} | "
            f"{r['chunks']} | {r['ups']:.2f} | {r['mbs']:.1f} |"
        )
    write_report(a.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
