"""Cut the first N frames of an AVI without re-encoding (how vtest-excerpt.avi was made).

    python deploy/clips/excerpt_avi.py /usr/share/doc/opencv-doc/examples/data/vtest.avi \
        deploy/clips/vtest-excerpt.avi --frames 180

Copies the header, the first N chunks of the ``movi`` list and their ``idx1`` entries,
and patches the sizes and frame counts; the compressed frames are copied byte for byte.
Works for single-stream AVI files whose first frame is a key frame (vtest.avi: DivX 3).
"""

from __future__ import annotations

import argparse
import struct


def excerpt(data: bytes, frames: int) -> bytes:
    if data[:4] != b"RIFF" or data[8:12] != b"AVI ":
        raise ValueError("not an AVI file")
    movi = data.find(b"movi") - 8  # start of "LIST" <size> "movi"
    if data[movi : movi + 4] != b"LIST":
        raise ValueError("no movi list")
    pos, kept = movi + 12, 0
    while kept < frames:
        ckid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if ckid[2:] not in (b"dc", b"db"):
            raise ValueError(f"unexpected chunk {ckid!r} in movi")
        pos += 8 + size + (size & 1)
        kept += 1
    body = bytearray(data[:pos])
    idx = data.find(b"idx1", pos)
    if idx >= 0:
        entries = data[idx + 8 : idx + 8 + 16 * frames]
        body += b"idx1" + struct.pack("<I", len(entries)) + entries
    struct.pack_into("<I", body, 4, len(body) - 8)  # RIFF size
    struct.pack_into("<I", body, movi + 4, pos - movi - 8)  # movi LIST size
    avih = body.find(b"avih")
    struct.pack_into("<I", body, avih + 8 + 16, frames)  # dwTotalFrames
    strh = body.find(b"strh")
    struct.pack_into("<I", body, strh + 8 + 32, frames)  # dwLength
    return bytes(body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--frames", type=int, default=180)
    a = p.parse_args()
    with open(a.source, "rb") as f:
        out = excerpt(f.read(), a.frames)
    with open(a.dest, "wb") as f:
        f.write(out)
    print(f"{a.dest}: {a.frames} frames, {len(out)} bytes")


if __name__ == "__main__":
    main()
