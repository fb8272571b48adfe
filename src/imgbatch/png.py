"""Reading untrusted image bytes as PNG, and only as PNG (and the provenance chunks in them).

Takes bytes (or a file) that a server sent, a pull request committed or a cache holds; gives the
decoded image, or raises `ImageError` saying what the bytes are instead (a JPEG, an EPS, HTML...:
`WrongImageError`, as is a PNG of another size than asked for: whole bytes, not damaged ones).

Pillow, left to guess, opens any format it knows, and some of them hand the bytes to another
program: an EPS makes it run Ghostscript. So nothing here lets it guess: the PNG signature and
the IHDR chunk (its CRC too) are read by hand first, the dimensions they state are checked
against the size asked for (or a pixel budget) before a pixel is decoded, and only then is
Pillow asked to open the bytes with `formats=["PNG"]`. Any exception its decoder raises on
hostile bytes (there are many types: OSError, SyntaxError, EOFError, struct.error,
NotImplementedError...) becomes an `ImageError`, so one bad image fails one shot.

It also reads imgbatch's provenance (`read_provenance`: the `imgbatch:` text chunks, walked
without an image library), which review/provenance.py writes: prune, gc and generate --output
prove with it that a file is one imgbatch wrote before they delete or replace it.

    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("RGB", (8, 4)).save(buffer, format="PNG")
    >>> png_dimensions(buffer.getvalue(), "it")
    (8, 4)
    >>> png_dimensions(b"%!PS-Adobe-3.0 EPSF-3.0", "downloaded bytes")
    Traceback (most recent call last):
    ...
    imgbatch.errors.WrongImageError: downloaded bytes are a PostScript (EPS) document, not a PNG...
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from imgbatch.errors import ImageError, InspectError, WrongImageError, without_reprs
from imgbatch.units.bounded import read_at_most

if TYPE_CHECKING:
    from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# imgbatch's provenance: text chunks whose keyword starts so (review/provenance.py writes them).
PREFIX = "imgbatch:"
TEXT_CHUNKS = frozenset({b"iTXt", b"tEXt", b"zTXt"})
# A text chunk inflating past this is not provenance imgbatch wrote (prompts are short).
_MAX_TEXT_BYTES = 1 << 20
# Signature, then IHDR: length, type, width, height, five one-byte fields, CRC.
_HEADER_BYTES = len(PNG_SIGNATURE) + 8 + 13 + 4
# Pixels decoded when no exact size is asked (a file in the output folder, for its thumbnail):
# every size the service makes is under 2 Mpx; a retouched, upscaled take may be larger, but a
# small file claiming 90 Mpx is a decompression bomb, not a take.
MAX_PIXELS = 4096 * 4096
# A file larger than any image the service makes is not one (and is never read whole).
MAX_FILE_BYTES = 64 * 1024 * 1024
# What the bytes are, when not a PNG: said in the error, so a user sees what was served.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "a JPEG image"),
    (b"GIF87a", 0, "a GIF image"),
    (b"GIF89a", 0, "a GIF image"),
    (b"WEBP", 8, "a WebP image"),
    (b"BM", 0, "a BMP image"),
    (b"II*\x00", 0, "a TIFF image"),
    (b"MM\x00*", 0, "a TIFF image"),
    (b"%!PS", 0, "a PostScript (EPS) document"),
    (b"\xc5\xd0\xd3\xc6", 0, "a PostScript (EPS) document"),
    (b"%PDF", 0, "a PDF document"),
    (b"DDS ", 0, "a DDS image"),
    (b"\x00\x00\x01\x00", 0, "an ICO image"),
    (b"8BPS", 0, "a Photoshop image"),
    (b"\x00\x00\x00\x0cjP  ", 0, "a JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", 0, "a JPEG 2000 image"),
    (b"\x1f\x8b", 0, "gzip-compressed data"),
    (b"<", 0, "HTML or XML text"),
    (b"{", 0, "JSON text"),
)


def png_dimensions(data: bytes, what: str) -> tuple[int, int]:
    """The width and height the PNG `data` states in its IHDR chunk (its first 33 bytes are
    enough); `ImageError` naming `what` and what the bytes are when they are not a PNG."""
    if not data.startswith(PNG_SIGNATURE):
        if not data:
            raise ImageError(f"{what} are not a whole image (there are no bytes)")
        if PNG_SIGNATURE.startswith(data):
            raise ImageError(f"{what} are not a whole image (cut short in its signature)")
        kind = image_kind(data)
        raise WrongImageError(f"{what} are {kind}, not a PNG image (imgbatch reads PNG only)")
    if len(data) < _HEADER_BYTES:
        raise ImageError(f"{what} are not a whole image (cut short in its header)")
    start = len(PNG_SIGNATURE)
    length, kind, width, height = struct.unpack(">I4sII", data[start : start + 16])
    crc = struct.unpack(">I", data[start + 21 : start + 25])[0]
    if length != 13 or kind != b"IHDR" or zlib.crc32(data[start + 4 : start + 21]) != crc:
        raise ImageError(f"{what} are not a whole image (a damaged PNG header)")
    if width == 0 or height == 0:
        raise ImageError(f"{what} are not a whole image (a PNG of {width}*{height} pixels)")
    return width, height


def decode_png(
    data: bytes | IO[bytes],
    what: str,
    *,
    size: tuple[int, int] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """`data` (bytes, or a binary file open at its start) decoded whole as a PNG, once its
    header says it is one of `size` (when given; else of at most `max_pixels`): the dimensions
    are checked before a pixel is decoded. A file is read in Pillow's small blocks, so no second
    copy of its bytes is made (nor are they held whole); the caller closes it.

    Raises `ImageError` only: the size, naming both, when it is not the one asked for."""
    head = data if isinstance(data, bytes) else _peek(data)
    found = png_dimensions(head, what)
    if size is not None and found != size:
        raise WrongImageError(
            f"{_singular(what)} is {found[0]}*{found[1]}, not the {size[0]}*{size[1]} asked for"
        )
    if size is None and found[0] * found[1] > max_pixels:
        raise ImageError(
            f"{_singular(what)} is {found[0]}*{found[1]} pixels, more than the "
            f"{max_pixels:,} imgbatch decodes"
        )
    try:
        from PIL import Image  # here: `inspect`, which reads only text chunks, stays light

        source = io.BytesIO(data) if isinstance(data, bytes) else cast(IO[bytes], _Unnamed(data))
        image = Image.open(source, formats=["PNG"])
        image.load()  # the pixels are the image's now; the source is not needed again
        if image.size != found:  # never, for Pillow's PNG reader: checked all the same
            raise ValueError(f"decoded at {image.size[0]}*{image.size[1]}")
        return image
    # Pillow's decoders raise many exception types on hostile bytes; any of them means "not an
    # image we can vouch for", and must fail this one image, never the run.
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"{what} are not a whole image ({_reason(exc)})") from None


class _Unnamed:
    """A binary file as Pillow reads it (read, seek, tell) under no name: Pillow's messages quote
    the file object, and this one's repr, unlike a file's (its path), is one `without_reprs`
    takes out, so a file's error reads as the same bytes' would."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def _peek(source: IO[bytes]) -> bytes:
    """The first bytes of the file `source` (enough to say what it is), then back to its start."""
    head = source.read(64)
    source.seek(0)
    return head


def check_png(data: bytes, what: str, size: tuple[int, int]) -> None:
    """Raise `ImageError` unless `data` decodes whole as a PNG of `size` (`what` names them,
    "downloaded bytes")."""
    decode_png(data, what, size=size).close()


def read_image_file(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at `path` (never through a symbolic link, never a FIFO or
    device), at most `limit` of them; `ImageError` naming it otherwise."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageError(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise ImageError(f"{path} is {info.st_size} bytes, too large to be an image")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = read_at_most(handle, limit, info.st_size)
    except OSError as exc:
        raise ImageError(f"{path} cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ImageError(f"{path} grew past {limit} bytes while it was read")
    return data


def image_kind(data: bytes) -> str:
    """What `data` is, in words ("a JPEG image", "HTML or XML text"), from its first bytes only:
    nothing is decoded, and no plugin but Pillow's own prefix tests runs."""
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if magic == b"WEBP" and not data.startswith(b"RIFF"):
                continue
            return name
    stripped = data.lstrip()
    if stripped[:1] in (b"<", b"{"):
        return image_kind(stripped)
    found = pillow_format(data)
    if found is not None:
        return f"an {found} image" if found[0] in "AEIOU" else f"a {found} image"
    return f"not an image imgbatch knows (they start {data[:8].hex(' ')})"


def pillow_format(data: bytes) -> str | None:
    """The name of the first Pillow format whose prefix test accepts `data` ("PPM", "EPS"), or
    None: the test only looks at the first bytes, nothing is opened or decoded."""
    from PIL import Image

    Image.init()
    for name, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(data[:64]):
                return name
        except Exception:  # noqa: BLE001 - a prefix test that fails did not recognise it
            continue
    return None


def _singular(what: str) -> str:
    # "downloaded bytes" -> "downloaded image"; a file name stays as it is.
    return what.removesuffix(" bytes") + " image" if what.endswith(" bytes") else what


def _reason(exc: BaseException) -> str:
    text = without_reprs(str(exc)) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


# ----- provenance: imgbatch's text chunks, read without an image library -------------------


def read_provenance(data: bytes, *, name: str = "the image") -> dict[str, str]:
    """The `imgbatch:` text chunks of the PNG `data`, keyword to text (prefix kept).

    Raises `InspectError` naming `name` when `data` is not a PNG, a chunk is damaged, or there
    is no provenance."""
    if not data.startswith(PNG_SIGNATURE):
        raise InspectError(f"{name} is not a PNG image; imgbatch keeps provenance only in PNGs")
    found: dict[str, str] = {}
    for kind, start, end in chunks(data, strict=name):
        if kind not in TEXT_CHUNKS or not text_keyword(data, start).startswith(PREFIX.encode()):
            continue
        body = data[start + 8 : end - 4]
        if zlib.crc32(data[start + 4 : end - 4]) != struct.unpack(">I", data[end - 4 : end])[0]:
            raise InspectError(f"{name} is a damaged PNG: its {kind.decode()} chunk fails its CRC")
        try:
            keyword, text = _decode_text(kind, body)
        except (ValueError, zlib.error) as exc:
            raise InspectError(f"{name} has a damaged {kind.decode()} chunk: {exc}") from None
        found.setdefault(keyword, text)  # the first wins, as in Pillow
    if not found:
        raise InspectError(
            f"{name} has no imgbatch provenance (not written by imgbatch, written before "
            "provenance existed, or re-saved by a tool that drops text chunks)"
        )
    return found


def chunks(data: bytes, *, strict: str | None = None) -> Iterator[tuple[bytes, int, int]]:
    """Each chunk's type, start and end (length field to CRC, inclusive) up to IEND. Stops at
    the first chunk that does not fit; with `strict` (the image's name) raises instead."""
    if not data.startswith(PNG_SIGNATURE):
        return
    position = len(PNG_SIGNATURE)
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        end = position + 12 + length
        if end > len(data):
            break
        yield kind, position, end
        if kind == b"IEND":
            return
        position = end
    if strict is not None:
        raise InspectError(f"{strict} is a damaged PNG: it is cut short before its end")


def text_keyword(data: bytes, start: int) -> bytes:
    body = data[start + 8 : start + 8 + 80]
    return body.split(b"\0", 1)[0]


def _decode_text(kind: bytes, body: bytes) -> tuple[str, str]:
    keyword, _, rest = body.partition(b"\0")
    name = keyword.decode("latin-1")
    if kind == b"tEXt":
        return name, rest.decode("latin-1")
    if kind == b"zTXt":
        return name, _inflate(rest[1:]).decode("latin-1")
    if len(rest) < 2:
        raise ValueError("it is cut short")
    compressed = rest[0] == 1
    _language, _, rest = rest[2:].partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return name, (_inflate(text) if compressed else text).decode("utf-8")


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, _MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"its text inflates past {_MAX_TEXT_BYTES} bytes")
    return out
