"""Reference images: checked before anything is read, read once, keyed by their content.

Takes a `reference_image` as written in a manifest (a path relative to the manifest's folder, a
`data:` URI with the image inline, or an http(s) URL); gives a `ReferenceImage` holding the
content's SHA-256, or raises `ReferenceProblem` saying what is wrong in words a user can act on.

A URL is not fetched when the manifest is read: `validate`, `expand` and `plan` download nothing,
so a URL's reference starts *unfetched* (`sha256` None). Only `apply` and `generate` call
`fetch_urls`, which fetches each distinct URL once, a few at a time, within a deadline and a
size cap, and gives it keyed by its content, or unfetched with the `problem` that fails its shots.

A URL is fetched with nothing of the user's: no ~/.netrc login, no proxy from the environment,
no cookies, at most `REFERENCE_MAX_REDIRECTS` redirects (each to a host the list did not name).

A shot list can come from a pull request, so a local reference is read only when it resolves
(after following links) to a regular file inside the manifest's folder tree, unless the user
allows more; `/proc/self/environ` or `/etc/shadow` are refused before a byte is read. Then it
must be non-empty, at most `REFERENCE_MAX_BYTES` (checked with stat, before reading), and decode
as an image of an accepted format and size. FIFOs and devices are never opened.

Limits (an assumption: Model Studio documents them for its image-edit models; the max/plus
text-to-image models document no image input at all): at most 10 MiB, JPEG, PNG, WEBP, BMP,
TIFF or GIF, each side from 384 to 3072 pixels.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imgbatch.errors import PermanentError, without_reprs
from imgbatch.png import image_kind, pillow_format
from imgbatch.units.bounded import read_at_most

if TYPE_CHECKING:
    import aiohttp

REFERENCE_MAX_BYTES = 10 * 1024 * 1024
# The whole fetch of a reference URL (connect, headers, body), not each read.
REFERENCE_URL_DEADLINE = 30.0
# Reference URLs fetched at once: enough to overlap slow servers, few enough that the bodies held
# while they are checked stay under 100 MiB.
REFERENCE_URL_CONCURRENCY = 8
REFERENCE_MAX_REDIRECTS = 5
REFERENCE_MIN_SIDE = 384
REFERENCE_MAX_SIDE = 3072
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
}
# Never block on a FIFO opened in a race after the stat; never follow a link swapped in.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


class ReferenceProblem(ValueError):
    """A reference image that cannot be used; str() says why."""


@dataclass(frozen=True)
class ReferenceImage:
    """A reference image, identified by what it contains.

    `source` is where it came from (an absolute, resolved path, an http(s) URL, or "<bytes>");
    only `sha256` enters the key, so moving the file does not regenerate anything. A URL's
    `sha256` is None until `fetch_urls` fetched it (and stays None, with the `problem`, when it
    could not be). A local file's
    bytes are not held: 100,000 shots sharing one reference must not hold 100,000 copies, and a
    list of many references must not hold them all. They are read again when a request is sent,
    and refused if they no longer match the hash that was keyed.
    """

    sha256: str | None
    source: str
    media_type: str = "image/png"
    data: bytes | None = field(default=None, repr=False, compare=False)
    problem: str | None = field(default=None, compare=False)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> ReferenceImage:
        """Check that `data` is an accepted image; keep it."""
        return cls(hashlib.sha256(data).hexdigest(), source, describe_image(data), data)

    @classmethod
    def at_url(cls, url: str) -> ReferenceImage:
        """A reference URL whose content is not known yet."""
        return cls(None, url)

    @property
    def is_url(self) -> bool:
        return is_url(self.source)

    @property
    def fetched(self) -> bool:
        """Whether its content, and so its key, is known."""
        return self.sha256 is not None

    def message_value(self) -> str:
        """What goes into the API message: the URL itself, else the bytes as a data URI."""
        if self.is_url:
            return self.source
        data = self.data
        if data is None:
            try:
                data = _read_regular(Path(self.source), REFERENCE_MAX_BYTES)
            except ReferenceProblem as exc:
                raise PermanentError(f"reference image {self.source} {exc}") from None
            except OSError as exc:
                message = f"reference image {self.source} cannot be read: {_reason(exc)}"
                raise PermanentError(message) from None
            if hashlib.sha256(data).hexdigest() != self.sha256:
                raise PermanentError(
                    f"reference image {self.source} changed after it was checked; "
                    "run apply again to key the new content"
                )
        return f"data:{self.media_type};base64,{base64.b64encode(data).decode('ascii')}"


def is_url(written: str) -> bool:
    return written.startswith(("http://", "https://"))


async def fetch_urls(
    urls: Iterable[str], *, concurrency: int | None = None
) -> dict[str, ReferenceImage]:
    """Each distinct URL fetched once, at most `concurrency` at a time: its reference keyed by
    the content fetched, or unfetched with the `problem` (not an image, too large, unreachable,
    not in full within `REFERENCE_URL_DEADLINE`). At most `REFERENCE_URL_CONCURRENCY` at once
    unless `concurrency` says. The bodies are not kept: the API is given the URL itself."""
    distinct = list(dict.fromkeys(urls))
    if not distinct:
        return {}
    # Imported here: only a run with a reference URL needs it, and `validate` or `plan` should
    # not pay its import (tests/cli/test_startup.py).
    import aiohttp

    gate = asyncio.Semaphore(concurrency or REFERENCE_URL_CONCURRENCY)
    deadline = REFERENCE_URL_DEADLINE
    timeout = aiohttp.ClientTimeout(total=None, connect=deadline)
    # The shot list chooses these hosts, so nothing of the user's goes with the request: no
    # ~/.netrc login and no proxy from the environment (trust_env off; a proxy's login would go
    # with every request, and an http:// URL sends it in clear), no cookies from one host to the
    # next. The API calls and image downloads go direct too (providers/dashscope.py).
    async with aiohttp.ClientSession(
        timeout=timeout, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:

        async def one(url: str) -> ReferenceImage:
            async with gate:
                try:
                    data = await _fetch(session, url, deadline)
                    media_type = await asyncio.to_thread(describe_image, data)
                except ReferenceProblem as exc:
                    return ReferenceImage(None, url, problem=str(exc))
                return ReferenceImage(hashlib.sha256(data).hexdigest(), url, media_type)

        found = await asyncio.gather(*(one(url) for url in distinct))
    return dict(zip(distinct, found, strict=True))


async def _fetch(session: aiohttp.ClientSession, url: str, deadline: float) -> bytes:
    """The body at `url`: at most REFERENCE_MAX_BYTES, all of it within `deadline` seconds (a
    per-read timeout is not enough: a server sending a byte every few seconds would never be
    cut off); else `ReferenceProblem`."""
    import aiohttp

    limit = REFERENCE_MAX_BYTES
    cap = f"{limit // (1024 * 1024)} MiB"
    try:
        async with (
            asyncio.timeout(deadline),
            session.get(
                url, headers={"User-Agent": "imgbatch"}, max_redirects=REFERENCE_MAX_REDIRECTS
            ) as response,
        ):
            if response.status != 200:
                raise ReferenceProblem(f"cannot be fetched: HTTP {response.status}")
            declared = response.content_length
            if declared is not None and declared > limit:
                raise ReferenceProblem(f"is larger than {cap} ({declared} bytes)")
            data = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                data += chunk
                if len(data) > limit:
                    raise ReferenceProblem(f"is larger than {cap}")
            return bytes(data)
    except TimeoutError:
        message = f"cannot be fetched: not received in full within {deadline:g} s"
        raise ReferenceProblem(message) from None
    except (aiohttp.ClientError, OSError) as exc:
        message = f"cannot be fetched: {type(exc).__name__} {exc}".rstrip()
        raise ReferenceProblem(message) from None


def is_data_uri(written: str) -> bool:
    return written[:5].lower() == "data:"


def shown(written: str) -> str:
    """`written` as an error message quotes it: a data URI by its head and length only."""
    if is_data_uri(written) and len(written) > 60:
        return f"{written[:40]}... ({len(written)} characters)"
    return written


def decode_data_uri(written: str) -> ReferenceImage:
    """A `data:image/...;base64,...` reference (YAML and `generate --request`), checked as the
    bytes it holds; the URI is never sent as written, only its decoded, checked image."""
    header, comma, payload = written.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ReferenceProblem("is a data URI that is not base64 (data:image/png;base64,...)")
    if len(payload) > (REFERENCE_MAX_BYTES * 4) // 3 + 4:  # before decoding anything
        raise ReferenceProblem(f"is over {_mib(REFERENCE_MAX_BYTES)}, the limit")
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise ReferenceProblem("is a data URI whose base64 does not decode") from None
    return ReferenceImage.from_bytes(data, "<data URI>")


def load_local_reference(written: str, base_dir: Path, *, allow_outside: bool) -> ReferenceImage:
    """Check and read the reference `written` relative to `base_dir`, or the image a data URI
    holds; see the module docstring."""
    if is_data_uri(written):
        return decode_data_uri(written)
    if "\0" in written:
        raise ReferenceProblem("contains a NUL character")
    root = base_dir.resolve()
    try:
        resolved = (base_dir / written).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ReferenceProblem(f"cannot be resolved: {_reason(exc)}") from None
    if not allow_outside and not resolved.is_relative_to(root):
        raise ReferenceProblem(
            f"resolves to {resolved}, outside the manifest's folder {root}; a shot list can come "
            "from anyone, so only files inside its folder are read unless you allow more with "
            "--allow-reference-outside or 'trust: {references_outside: true}'"
        )
    try:
        info = os.stat(resolved)
    except FileNotFoundError:
        raise ReferenceProblem(f"not found (looked for {resolved})") from None
    except OSError as exc:
        raise ReferenceProblem(f"cannot be read: {_reason(exc)}") from None
    _check_stat(info)
    try:
        data = _read_regular(resolved, REFERENCE_MAX_BYTES)
    except OSError as exc:
        raise ReferenceProblem(f"cannot be read: {_reason(exc)}") from None
    return ReferenceImage(hashlib.sha256(data).hexdigest(), str(resolved), describe_image(data))


def describe_image(data: bytes) -> str:
    """The media type of `data` if it is an accepted image; else `ReferenceProblem`."""
    if not data:
        raise ReferenceProblem("is empty")
    if len(data) > REFERENCE_MAX_BYTES:
        raise ReferenceProblem(f"is {_mib(len(data))}; the limit is {_mib(REFERENCE_MAX_BYTES)}")
    # Pillow only here: a shot list without local references is checked without it.
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only the documented formats: Pillow left to guess opens EPS too, and runs
            # Ghostscript on it.
            with Image.open(io.BytesIO(data), formats=list(MEDIA_TYPES)) as image:
                kind, (width, height) = image.format, image.size
                image.verify()
    # Pillow's decoders raise many exception types on hostile bytes; any of them means "not an
    # image we can vouch for".
    except Exception as exc:  # noqa: BLE001
        detected = pillow_format(data)
        if detected is not None and detected not in MEDIA_TYPES:
            accepted = ", ".join(MEDIA_TYPES)
            raise ReferenceProblem(f"is {image_kind(data)}; accepted formats: {accepted}") from None
        raise ReferenceProblem(f"is not a readable image ({_reason(exc)})") from None
    media_type = MEDIA_TYPES[kind or ""]  # one of `formats`
    low, high = REFERENCE_MIN_SIDE, REFERENCE_MAX_SIDE
    if not (low <= width <= high and low <= height <= high):
        raise ReferenceProblem(
            f"is {width}x{height} pixels; each side must be from {low} to {high} pixels"
        )
    return media_type


def _check_stat(info: os.stat_result) -> None:
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise ReferenceProblem("is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise ReferenceProblem(f"is {_kind(mode)}, not a regular file; it was not opened")
    if info.st_size == 0:
        raise ReferenceProblem("is empty")
    if info.st_size > REFERENCE_MAX_BYTES:
        size, limit = _mib(info.st_size), _mib(REFERENCE_MAX_BYTES)
        raise ReferenceProblem(f"is {size}; the limit is {limit}")


def _read_regular(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file, checked on the open handle; else an error."""
    handle = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(handle)
        _check_stat(info)
        with os.fdopen(handle, "rb", closefd=False) as stream:
            data = read_at_most(stream, limit, info.st_size)
    finally:
        os.close(handle)
    if len(data) > limit:
        raise ReferenceProblem(f"grew past {_mib(limit)} while it was read")
    return data


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return without_reprs(str(exc)) or type(exc).__name__
