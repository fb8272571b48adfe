"""The check every downloaded image passes: PNG only, its size read before a pixel, and no
exception but imgbatch's own whatever the bytes.

Takes small real PNGs (several colour types and depths, with text chunks; mutations set
IHDR's interlace byte too), mutated thousands of
ways, and other formats' headers and images; gives proof that `verify_image` only ever returns
or raises `ImageError`, that a decode bomb is refused from its header within a memory bound that
decoding it would break, and that errors say what the bytes are.
"""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import IO

import pytest
from PIL import Image, PngImagePlugin

from imgbatch.errors import ImageError
from imgbatch.png import image_kind, png_dimensions
from imgbatch.state.cache import verify_image
from tests.support import hostile_images

FUZZ_CASES = 3000
SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(mode: str, size: tuple[int, int], **options: object) -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, size)
    noise = random.Random(f"{mode}{size}").randbytes(len(image.tobytes()))
    image.frombytes(noise)
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _seeds() -> list[bytes]:
    text = PngImagePlugin.PngInfo()
    text.add_itxt("imgbatch:shot", "s01")
    text.add_text("Comment", "hello", zip=True)
    return [
        _png("RGB", (32, 24)),
        _png("RGBA", (24, 32), pnginfo=text),
        _png("L", (17, 9), optimize=True),
        _png("P", (16, 16)),
        _png("I;16", (12, 12)),
        _png("1", (40, 8)),
        _png("LA", (20, 20)),
    ]


def _chunks(data: bytes) -> list[tuple[int, int]]:
    spans, position = [], len(SIGNATURE)
    while position + 12 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        end = position + 12 + length
        if end > len(data):
            break
        spans.append((position, end))
        position = end
    return spans


def _fix_crcs(data: bytes) -> bytes:
    """`data` with every whole chunk's CRC made right, so the decoder reads past the check."""
    out = bytearray(data)
    for start, end in _chunks(data):
        out[end - 4 : end] = struct.pack(">I", zlib.crc32(data[start + 4 : end - 4]))
    return bytes(out)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and len(out) > 8:
            out[rng.randrange(8, len(out))] = rng.randrange(256)
        elif choice < 0.55:
            del out[rng.randrange(8, len(out) + 1) :]
        elif choice < 0.7:
            at = rng.randrange(8, len(out) + 1)
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        elif choice < 0.85 and _chunks(bytes(out)):
            start, _ = rng.choice(_chunks(bytes(out)))
            out[start : start + 4] = struct.pack(">I", rng.choice([0, 1, 13, 2**31 - 1, 2**32 - 1]))
        else:
            at = rng.randrange(16, 29) if len(out) > 29 else 8
            if at < len(out):  # a case cut short to its signature has no IHDR to change
                out[at] = rng.choice([0, 1, 2, 3, 4, 6, 8, 16, 255])  # depth, colour type...
    return _fix_crcs(bytes(out)) if rng.random() < 0.6 else bytes(out)


def _other_formats(rng: random.Random) -> list[bytes]:
    Image.init()
    heads = [
        b"\xff\xd8\xff\xe0",
        b"GIF89a",
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"BM",
        b"II*\x00",
        b"MM\x00*",
        b"%!PS-Adobe-3.0 EPSF-3.0\n",
        b"DDS |\x00\x00\x00",
        b"8BPS",
        b"\x00\x00\x00\x0cjP  \r\n\x87\n",
        b"P6\n",
        b"\x1f\x8b",
        b"<html>",
        SIGNATURE,
    ]
    cases = [head + rng.randbytes(rng.randint(0, 300)) for head in heads for _ in range(20)]
    cases += [hostile_images.dds_unknown_pixel_format(), hostile_images.eps()]
    cases += [hostile_images.other_format(kind, 32, 24) for kind in ("JPEG", "WEBP", "GIF", "BMP")]
    return cases


def _expected_size(data: bytes, fallback: tuple[int, int]) -> tuple[int, int]:
    """The size the mutated header states, so the decoder itself is reached (small ones only)."""
    try:
        width, height = png_dimensions(data, "fuzzed bytes")
    except ImageError:
        return fallback
    return (width, height) if width * height <= 1 << 16 else fallback


def test_fuzzed_images_only_ever_raise_imgbatchs_own_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    marker = hostile_images.fake_gs(tmp_path, monkeypatch)
    rng = random.Random(18)
    seeds = _seeds()
    cases = _other_formats(rng)
    cases += [_mutate(rng.choice(seeds), rng) for _ in range(FUZZ_CASES - len(cases))]
    outcomes = {"accepted": 0, "refused": 0}
    for data in cases:
        try:
            verify_image(data, *_expected_size(data, (32, 24)))
            outcomes["accepted"] += 1
        except ImageError:
            outcomes["refused"] += 1
        except BaseException as exc:  # noqa: BLE001 - the point: nothing else may come out
            pytest.fail(f"{type(exc).__name__}: {exc} for bytes starting {data[:40]!r}")
    assert not marker.exists()
    # Both outcomes happen: the fuzzing reaches the decoder rather than only the header check.
    assert outcomes["accepted"] > 50 and outcomes["refused"] > 1000, outcomes


def _outcome(source: bytes | IO[bytes], size: tuple[int, int]) -> str:
    try:
        verify_image(source, *size)
    except ImageError as exc:
        return str(exc)
    except BaseException as exc:  # noqa: BLE001 - the point: nothing else may come out
        pytest.fail(f"{type(exc).__name__}: {exc}")
    return "accepted"


def test_a_file_is_read_as_strictly_as_the_same_bytes_in_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The executor decodes a download from its temporary file (in Pillow's small blocks, never
    # read back whole): each fuzzed case must end the same way, with the same message.
    marker = hostile_images.fake_gs(tmp_path, monkeypatch)
    rng = random.Random(20)
    seeds = _seeds()
    cases = _other_formats(rng) + [_mutate(rng.choice(seeds), rng) for _ in range(400)]
    path = tmp_path / "incoming.png"
    outcomes = []
    for data in cases:
        size = _expected_size(data, (32, 24))
        path.write_bytes(data)
        with path.open("rb") as source:
            outcome = _outcome(source, size)
        assert outcome == _outcome(data, size), data[:40]
        outcomes.append(outcome)
    assert not marker.exists()
    assert 20 < outcomes.count("accepted") < len(cases) - 100, outcomes.count("accepted")


@pytest.mark.skipif(sys.platform != "linux", reason="bounds the address space through /proc")
@pytest.mark.parametrize("source", ["bytes", "file"])
def test_a_decode_bomb_is_refused_from_its_header_without_decoding(
    tmp_path: Path, source: str
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(hostile_images.decode_bomb())
    assert bomb.stat().st_size < 1024 * 1024  # small on disk, 265 MB once decoded
    code = textwrap.dedent(
        """
        import resource, sys, time
        from imgbatch.errors import ImageError
        from imgbatch.state.cache import verify_image
        source = open(sys.argv[1], "rb")
        data = source.read() if sys.argv[2] == "bytes" else source
        pages = int(open("/proc/self/statm").read().split()[0])
        # 64 MiB more than is mapped now: decoding the bomb needs 265 MB.
        limit = pages * resource.getpagesize() + 64 * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        started = time.process_time()
        try:
            verify_image(data, 1328, 1328)
        except ImageError as exc:
            print(f"{time.process_time() - started:.3f}|{exc}")
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, str(bomb), source],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    seconds, message = completed.stdout.strip().split("|")
    assert message == "downloaded image is 9400*9400, not the 1328*1328 asked for"
    assert float(seconds) < 0.1


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (hostile_images.eps(), "a PostScript (EPS) document"),
        (hostile_images.dds_unknown_pixel_format(), "a DDS image"),
        (b"\xff\xd8\xff\xdb\x00C", "a JPEG image"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "a WebP image"),
        (b"GIF89a\x01\x00", "a GIF image"),
        (b"BM6\x00\x00\x00", "a BMP image"),
        (b"P6\n4 4\n255\n", "a PPM image"),
        (b"\n  <!doctype html><title>denied</title>", "HTML or XML text"),
        (b"hello", "not an image imgbatch knows (they start 68 65 6c 6c 6f)"),
    ],
)
def test_what_was_served_is_named(data: bytes, kind: str) -> None:
    assert image_kind(data) == kind
    with pytest.raises(ImageError) as caught:
        verify_image(data, 64, 64)
    assert str(caught.value) == (
        f"downloaded bytes are {kind}, not a PNG image (imgbatch reads PNG only)"
    )


def test_a_png_cut_short_in_its_header_or_with_a_damaged_header_is_refused() -> None:
    data = _png("RGB", (8, 8))
    with pytest.raises(ImageError, match=r"cut short in its signature\)$"):
        verify_image(data[:5], 8, 8)
    with pytest.raises(ImageError, match=r"cut short in its header\)$"):
        verify_image(data[:20], 8, 8)
    damaged = data[:23] + b"\x09" + data[24:]  # the height made 9, the CRC unchanged
    with pytest.raises(ImageError, match=r"a damaged PNG header\)$"):
        verify_image(damaged, 8, 8)
