"""Image files a user may hand over: photo-like JPEGs, a PNG that claims a decompression bomb's
size, and a JPEG cut in half."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A photo-like JPEG: smooth colour gradients and some noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    pixels = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + rng.integers(0, 55, (height, width, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG", quality=85)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims `width` x `height` RGB pixels (a decompression bomb's header) and holds
    one row of them: opening it is enough for PIL to judge its size."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 1024))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) +
                     png_chunk(b"IDAT", row) + png_chunk(b"IEND", b""))
    return path


def write_truncated_jpeg(path: Path) -> Path:
    whole = write_jpeg(path, 160, 120).read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return path
