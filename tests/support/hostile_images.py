"""Hostile image bytes and a recording stand-in for Ghostscript, for the hostile suites.

Takes nothing but sizes; gives bytes a hostile image host or pull request could send: an EPS
(Pillow left to guess hands it to Ghostscript), a DDS whose header makes Pillow raise
NotImplementedError, a decode bomb (a PNG of a few hundred KB stating 9400*9400 pixels, whole and
valid: decoding it takes 265 MB), other formats' images, and `fake_gs`: a `gs` on PATH that
writes a marker file if anything runs it.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from functools import cache
from pathlib import Path

import pytest
from PIL import EpsImagePlugin, Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOMB_SIDE = 9400


def eps(width: int = 1328, height: int = 1328) -> bytes:
    """An EPS document of the shot's size: Pillow's EPS reader runs `gs` to draw it."""
    return (
        "%!PS-Adobe-3.0 EPSF-3.0\n"
        f"%%BoundingBox: 0 0 {width} {height}\n"
        "%%EndComments\n"
        f"newpath 0 0 moveto {width} 0 lineto {width} {height} lineto closepath fill\n"
        "showpage\n%%EOF\n"
    ).encode()


def dds_unknown_pixel_format(width: int = 1328, height: int = 1328) -> bytes:
    """A DDS header with no pixel-format flags: Pillow raises NotImplementedError on it."""
    header = struct.pack("<3I", 0x1007, height, width) + bytes(120 - 12)
    return b"DDS " + struct.pack("<I", 124) + header + bytes(64)


def other_format(kind: str, width: int = 1328, height: int = 1328) -> bytes:
    """A whole image in Pillow's format `kind` (JPEG, WEBP, GIF, BMP, TIFF) of that size."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format=kind)
    return buffer.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


@cache
def decode_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid RGB PNG of `side`*`side` black pixels: small on disk (zeros compress a
    thousandfold), `side`*`side`*3 bytes once decoded. Made row by row, never whole in memory."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = bytes(1 + side * 3)  # filter byte 0, then the row's pixels
    rows = row * 64
    pieces = []
    for _ in range(side // 64):
        pieces.append(compressor.compress(rows))
    pieces.append(compressor.compress(row * (side % 64)))
    pieces.append(compressor.flush())
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(pieces))
        + chunk(b"IEND", b"")
    )


def fake_gs(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a `gs` first on PATH (for this process and the ones it starts) that writes the
    marker file whose path it gives back, with its arguments, if anything runs it. It answers
    like a real one (exit 0), and Pillow's memory of having looked for one is cleared, so code
    that lets Pillow guess a format would really run it here."""
    marker = folder / "gs-was-run"
    bin_dir = folder / "fake-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "gs"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 0\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker
