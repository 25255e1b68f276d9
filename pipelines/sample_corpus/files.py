"""Bytes of the stored files: encodings, near-duplicates, junk entries and the decompression bomb."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

BOMB_SIZE = (30000, 30000)


def near_duplicate(img: Image.Image) -> Image.Image:
    """A re-release of the same page: lower contrast, brighter, different bytes; geometry (boxes) unchanged."""
    rgb = np.asarray(img.convert("RGB"), np.float32)
    return Image.fromarray(np.clip(rgb * 0.94 + 14, 0, 255).round().astype(np.uint8), "RGB")


def save(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def encode_default(img: Image.Image, fmt: str, style: str) -> bytes:
    if fmt == "JPEG":
        if style == "chroma_noise":
            return save(img, "JPEG", quality=75, subsampling=2)
        return save(img, "JPEG", quality=88 if style in ("sepia", "grey", "screentone") else 90)
    if fmt == "WEBP":
        return save(img, "WEBP", quality=85, method=4)
    return save(img, "PNG", compress_level=6)


def decompression_bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of `width` x `height` zeros: tiny on disk, huge once decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = 1024
    compressor = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def junk_entries(kind: str, first_page: str) -> tuple[str, bytes]:
    if kind == "macosx":
        folder, _, name = first_page.rpartition("/")
        prefix = f"__MACOSX/{folder}/" if folder else "__MACOSX/"
        return prefix + "._" + name, b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(58)
    if kind == "thumbs":
        return "Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)
    if kind == "ds_store":
        return ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(56)
    return "ComicInfo.xml", b'<?xml version="1.0"?>\n<ComicInfo><Series>sample</Series></ComicInfo>\n'
