"""Provenance in every PNG imgbatch writes, and reading it back (`imgbatch inspect`).

Takes image bytes and a `Provenance` (what made them); gives the same PNG with one iTXt chunk per
field, keyword `imgbatch:<field>` (UTF-8, uncompressed), inserted right after IHDR, so that an
image found on its own says which request made it and can be made again. The chunks are spliced
into the byte stream: the image data (IDAT) is not decoded or re-encoded, so the pixels and their
encoding stay exactly the provider's, and a 3.5 MB image costs one copy instead of seconds of
zlib (bench/provenance.py). Bytes that are not a PNG are given back unchanged.

    >>> from imgbatch.providers.placeholder import render_placeholder
    >>> from imgbatch.shots.request import ImageRequest
    >>> request = ImageRequest(prompt="a red bicycle", size="1328*1328", seed=7)
    >>> drawn = render_placeholder(request, "s01")
    >>> stamped = embed(drawn, Provenance("s01", request, request.text, None))
    >>> read_provenance(stamped)["imgbatch:seed"], stamped.endswith(drawn[33:])
    ('7', True)

`Stamper` does the same to bytes as they arrive (a download written to disk as it comes): the
same output as `embed`, piece by piece, holding back at most a chunk header and a text chunk's
keyword, never the image.

Reading needs no image library: `read_provenance` (in `imgbatch.png`, below every layer that
reads it: prune and gc prove with it that they wrote a file) walks the chunks and returns the
`imgbatch:` text chunks (iTXt, tEXt or zTXt) by keyword. The API key is never a field.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgbatch.errors import InspectError
from imgbatch.png import (
    PNG_SIGNATURE,
    PREFIX,
    TEXT_CHUNKS,
    chunks,
    read_provenance,
    text_keyword,
)

if TYPE_CHECKING:
    from imgbatch.shots.request import ImageRequest

# In the order `inspect` prints them; a field with no value (no seed, no style) is left out.
FIELDS = (
    "shot",
    "prompt_sent",
    "prompt",
    "style",
    "negative_prompt",
    "size",
    "seed",
    "model",
    "provider",
    "reference_sha256",
    "prompt_extend",
    "watermark",
    "key",
    "request_id",
    "version",
)
_INT_FIELDS = frozenset({"seed"})
_BOOL_FIELDS = frozenset({"prompt_extend", "watermark"})
# An image over this is not one imgbatch wrote (MAX_CACHED_BYTES in store.py is 64 MiB).
_MAX_INSPECT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Provenance:
    """What made one image: the shot it was generated for, the request, the text actually sent
    (the simplified one after a 200 without an image) and the service's request id."""

    shot: str
    request: ImageRequest
    sent: str
    request_id: str | None

    def fields(self) -> dict[str, str]:
        request = self.request
        values: dict[str, object] = {
            "shot": self.shot,
            "prompt_sent": self.sent,
            "prompt": request.prompt,
            "style": request.style,
            "negative_prompt": request.negative_prompt,
            "size": request.size,
            "seed": request.seed,
            "model": request.model,
            "provider": request.provider,
            "reference_sha256": request.reference.sha256 if request.reference else None,
            "prompt_extend": request.prompt_extend,
            "watermark": request.watermark,
            "key": request.key,
            "request_id": self.request_id,
            "version": imgbatch_version(),
        }
        return {name: _as_text(value) for name, value in values.items() if value not in (None, "")}


@cache
def imgbatch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imgbatch")
    except PackageNotFoundError:
        return "unknown"


def embed(data: bytes, provenance: Provenance) -> bytes:
    """`data` with `provenance` as iTXt chunks after IHDR, replacing any `imgbatch:` text
    chunks it had (a service cannot plant its own); `data` itself if it is not a PNG."""
    spans = list(chunks(data))
    if not spans or spans[0][0] != b"IHDR":
        return data
    ours = b"".join(_itxt(PREFIX + name, text) for name, text in provenance.fields().items())
    header_end = spans[0][2]
    pieces = [data[:header_end], ours]
    position = header_end
    for kind, start, end in spans[1:]:
        if kind in TEXT_CHUNKS and text_keyword(data, start).startswith(PREFIX.encode()):
            pieces.append(data[position:start])
            position = end
    pieces.append(data[position:])
    return b"".join(pieces)


class Stamper:
    """`embed` for bytes that arrive in pieces: `feed` each piece, then `end`; the pieces given
    back, written in order, are what `embed` gives for the whole (for any PNG, and for bytes
    that are not one: those pass unchanged). Slices of the pieces fed, not copies."""

    def __init__(self, provenance: Provenance) -> None:
        self._ours = b"".join(_itxt(PREFIX + n, t) for n, t in provenance.fields().items())
        self._held = bytearray()  # the start of a chunk, until it is known what to do with it
        self._copy = 0  # bytes to pass on before the next chunk starts
        self._skip = 0  # bytes to drop (an `imgbatch:` text chunk the bytes came with)
        self._after: bytes | None = None  # to emit once `_copy` is done (ours, after IHDR)
        self._first = True
        self._through = False  # not a PNG, or past IEND: everything passes as it is

    def feed(self, data: bytes) -> list[memoryview | bytes]:
        out: list[memoryview | bytes] = []
        view = memoryview(data)
        while view:
            if self._through:
                out.append(view)
                break
            if self._skip or self._copy:
                view = self._pass(view, out)
                continue
            view = self._take_start(view, out)
        return out

    def end(self) -> bytes:
        """What is held back when the bytes end (a chunk cut short: passed on as it was)."""
        held, self._held = bytes(self._held), bytearray()
        return held

    def _pass(self, view: memoryview, out: list[memoryview | bytes]) -> memoryview:
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            return view[taken:]
        taken = min(self._copy, len(view))
        out.append(view[:taken])
        self._copy -= taken
        if not self._copy and self._after is not None:
            out.append(self._after)
            self._after = None
        return view[taken:]

    def _take_start(self, view: memoryview, out: list[memoryview | bytes]) -> memoryview:
        """Hold the start of the next chunk until its header (and, for a text chunk, its
        keyword) is in; then decide to pass it on, drop it, or pass everything."""
        header = 8 + (len(PNG_SIGNATURE) if self._first else 0)
        while True:
            need = self._needed(header)
            taken = min(need - len(self._held), len(view))
            self._held += view[:taken]
            view = view[taken:]
            if len(self._held) < need:
                return view
            if self._needed(header) == need:
                self._decide(header, out)
                return view

    def _needed(self, header: int) -> int:
        """Bytes of the chunk's start to hold: its header, then a text chunk's keyword."""
        if len(self._held) < header or self._first:
            return header
        length, kind = struct.unpack(">I4s", self._held[header - 8 : header])
        return header + min(length, 80) if kind in TEXT_CHUNKS else header

    def _decide(self, header: int, out: list[memoryview | bytes]) -> None:
        held, self._held = bytes(self._held), bytearray()
        length, kind = struct.unpack(">I4s", held[header - 8 : header])
        rest = length + 4 - (len(held) - header)  # of the chunk, its CRC included
        if self._first:
            self._first = False
            if not held.startswith(PNG_SIGNATURE) or kind != b"IHDR":
                self._through = True
                out.append(held)
                return
            self._after = self._ours
        elif kind in TEXT_CHUNKS and held[header:].split(b"\0", 1)[0].startswith(PREFIX.encode()):
            self._skip = rest
            return
        elif kind == b"IEND":
            self._through = True
            out.append(held)
            return
        out.append(held)
        self._copy = rest
        if not rest and self._after is not None:
            out.append(self._after)
            self._after = None


def inspect_image(path: str | Path) -> dict[str, str]:
    """The provenance of the image file at `path`, field name to text, in `FIELDS` order (then
    any field a later imgbatch wrote). Raises `InspectError` for a missing or unreadable file, a
    non-PNG, or a PNG without provenance.

        >>> from imgbatch import apply
        >>> report = apply("manifests/shots.yaml", provider="placeholder")
        >>> inspect_image("manifests/output/shots/s01-dusk.png")["seed"]
        '1234'
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InspectError(f"{path} is not a file")
        if size > _MAX_INSPECT_BYTES:
            raise InspectError(f"{path} is {size} bytes, too large to be an image imgbatch wrote")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InspectError(f"{path}: no such file") from None
    except OSError as exc:
        raise InspectError(f"cannot read {path}: {exc.strerror or exc}") from None
    found = read_provenance(data, name=str(path))
    named = {keyword.removeprefix(PREFIX): text for keyword, text in found.items()}
    ordered = {name: named.pop(name) for name in FIELDS if name in named}
    return {**ordered, **named}


def as_json(fields: Mapping[str, str]) -> dict[str, Any]:
    """`fields` as JSON values: every known field present (null when absent), the seed a number
    and the switches booleans."""
    document: dict[str, Any] = {name: None for name in FIELDS}
    for name, text in fields.items():
        value: Any = text
        if name in _INT_FIELDS and text.lstrip("-").isdigit():
            value = int(text)
        elif name in _BOOL_FIELDS and text in ("true", "false"):
            value = text == "true"
        document[name] = value
    return document


def as_lines(fields: Mapping[str, str]) -> list[str]:
    """`fields` as aligned `name: value` lines; a value's further lines are indented under it.
    Control characters are shown escaped: a PNG from anywhere must not drive the terminal."""
    shown = {_printable(name): text for name, text in fields.items()}
    width = max(len(name) for name in shown) + 2
    lines = []
    for name, text in shown.items():
        first, *rest = (_printable(line) for line in text.split("\n"))
        lines.append(f"{name + ':':<{width}}{first}")
        lines.extend(" " * width + line for line in rest)
    return lines


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() or c == "\t" else ascii(c)[1:-1] for c in text)


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _itxt(keyword: str, text: str) -> bytes:
    # keyword NUL, compression flag 0 and method 0, empty language tag NUL, empty translated
    # keyword NUL, then UTF-8 text: always iTXt, so a prompt in any language reads back as sent.
    body = keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    kind = b"iTXt"
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
