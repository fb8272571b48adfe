"""How a downloaded image reaches the disk: the pieces of each network chunk in one system call.

Takes the cache's write path (`store._write_fd`, the seam the disk-full tests use too) and the
fake service serving a real-sized PNG cut into many small chunks; gives how many writes an
image took. The provenance stamper hands back a chunk in a piece per PNG chunk it spans (a
chunk header held back, then a slice of the rest): written one `write` each, a 3.3 MB image
took about 118 system calls and 0.7 ms more CPU than the 13 its network chunks need.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgbatch.cli.main import main
from imgbatch.state import cache as store
from imgbatch.state.cache import ImageCache
from tests.support.fake_dashscope import FakeDashScope, _encode_real_png
from tests.support.files import FAKE_KEY, write_many_shots

# IDAT chunks of this size: a 1328*1328 image of about 4 MB in some 500 PNG chunks.
SMALL_IDAT = 8 * 1024


def rechunked(png: bytes, size: int) -> bytes:
    """`png` with its image data in IDAT chunks of `size` bytes (the same pixels)."""
    position, head, data, tail = 8, [png[:8]], [], []
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position : position + 8])
        chunk = png[position : position + 12 + length]
        if kind == b"IDAT":
            data.append(chunk[8:-4])
        else:
            (tail if data else head).append(chunk)
        position += 12 + length
    joined = b"".join(data)
    idats = [
        struct.pack(">I", len(piece))
        + b"IDAT"
        + piece
        + struct.pack(">I", zlib.crc32(b"IDAT" + piece))
        for piece in (joined[start : start + size] for start in range(0, len(joined), size))
    ]
    return b"".join(head + idats + tail)


def test_a_download_is_written_in_a_call_per_network_chunk_not_per_png_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    png = rechunked(_encode_real_png(1328, 1328, (40, 90, 160)), SMALL_IDAT)
    png_chunks = png.count(b"IDAT")
    assert png_chunks > 400
    writes: list[int] = []
    real = store._write_fd

    def counted(fd: int, data: bytes, path: Path) -> None:
        if "cache" in Path(path).parts:
            writes.append(len(data))
        real(fd, data, path)

    monkeypatch.setattr(store, "_write_fd", counted)
    manifest = write_many_shots(tmp_path, "pieces", 1)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="real", chunk_size=256 * 1024) as server:
        server.serve_next_image(png)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("DASHSCOPE_API_KEY", FAKE_KEY)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", server.base_url)
        monkeypatch.delenv("OUTPUT_DIR", raising=False)
        result = CliRunner().invoke(main, ["apply", str(manifest), "--quota", "100/s"])
    assert result.exit_code == 0, result.output
    made = (tmp_path / "output" / "pieces" / "shot-000.png").read_bytes()
    assert len(made) > len(png)  # whole, with its provenance spliced in
    # One write per network chunk (aiohttp's reads: at least 16 KB each here, in practice 64
    # to 256 KB) and one for what the stamper held at the end; a write per piece was more than
    # two per PNG chunk (over 1,000 here).
    assert len(writes) <= len(png) // (16 * 1024) + 2 < png_chunks, len(writes)


class ShortWrites:
    """`os.writev` as a kernel may answer it: at most `most` bytes taken per call."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.calls = 0

    def __call__(self, fd: int, buffers: list[memoryview]) -> int:
        self.calls += 1
        joined = b"".join(buffers)[: self.most]
        return os.write(fd, joined)


@pytest.mark.parametrize("most", [1, 5, 7, 1 << 20])
def test_pieces_written_together_arrive_whole_and_in_order_whatever_the_kernel_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most: int
) -> None:
    short = ShortWrites(most)
    monkeypatch.setattr(os, "writev", short)
    pieces = [b"abc", memoryview(b"0123456789")[2:8], b"", b"z" * 11, memoryview(b"!")]
    expected = b"".join(bytes(piece) for piece in pieces)
    incoming = ImageCache(tmp_path).receive("ab" * 32)
    try:
        incoming.write(pieces)
        incoming.write(b"tail")
        incoming.commit()
    finally:
        incoming.close()
    assert incoming.path.read_bytes() == expected + b"tail"
    assert incoming.size == len(expected) + 4
    assert incoming.sha256 == hashlib.sha256(expected + b"tail").hexdigest()
    assert short.calls == (1 if most >= len(expected) else -(-len(expected) // most))
