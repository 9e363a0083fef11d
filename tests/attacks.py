"""Hostile inputs, built from scratch: shared by the tests and ``bench/hostile.py``."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
from PIL import Image

__all__ = ["scan_bomb", "ifd_bomb", "chunk_bomb", "smooth_image"]

_MARKER = re.compile(rb"\xff+([^\x00\xff])")
_SCAN_END = re.compile(rb"\xff+([^\x00\xff\xd0-\xd7])")


def scan_bomb(side: int = 4096, repeats: int = 5000) -> bytes:
    """A grey progressive JPEG whose smallest scan is repeated ``repeats`` times: ~230 KB that
    Pillow decodes in tens of seconds."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 128, np.uint8), "L").save(buffer, "JPEG", progressive=True, quality=75)
    data = buffer.getvalue()
    scans, position = [], 2
    while True:
        match = _MARKER.search(data, position)
        marker, start, position = match.group(1)[0], match.start(), match.end()
        if marker == 0xD9:
            break
        if marker in (0x01, *range(0xD0, 0xD9)):
            continue
        length = int.from_bytes(data[position:position + 2], "big")
        if marker == 0xDA:
            end = _SCAN_END.search(data, position + length).start()
            scans.append(data[start:end])
            position = end
        else:
            position += length
    smallest = min(scans[1:], key=len)
    return data[:start] + smallest * repeats + data[start:]


def ifd_bomb(directories: int = 40_000) -> bytes:
    """A 1x1 TIFF followed by ``directories`` chained copies of its directory: 4.5 MB whose
    frames take Pillow most of a minute to count."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, first)[0]
    directory = bytes(data[first:first + 2 + 12 * entries])
    next_pointer = first + 2 + 12 * entries
    for _ in range(directories):
        offset = len(data)
        struct.pack_into("<I", data, next_pointer, offset)
        data += directory + b"\0\0\0\0"
        next_pointer = offset + len(directory)
    return bytes(data)


def smooth_image(height: int, width: int) -> np.ndarray:
    """A photo-like gradient: compresses as photos do, unlike noise."""
    y, x = np.ogrid[0:height, 0:width]
    red = (x * 255 // max(1, width - 1)) + 0 * y
    green = (y * 255 // max(1, height - 1)) + 0 * x
    blue = ((x + y) % 256) + 0 * y
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def chunk_bomb(idat_bytes: int = 150_000) -> bytes:
    """A noisy RGB PNG whose compressed data is split into 1-byte IDAT chunks: valid, and each
    chunk costs Pillow a trip through Python (31 MB of them took 7 s to decode)."""
    side = int((idat_bytes / 3) ** 0.5) + 1
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    position, header, compressed = 8, b"", b""
    while position < len(data):
        length = struct.unpack(">I", data[position:position + 4])[0]
        kind, body = data[position + 4:position + 8], data[position + 8:position + 8 + length]
        header = body if kind == b"IHDR" else header
        compressed += body if kind == b"IDAT" else b""
        position += 12 + length

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + b"".join(chunk(b"IDAT", compressed[i:i + 1]) for i in range(len(compressed))) + chunk(b"IEND", b""))
