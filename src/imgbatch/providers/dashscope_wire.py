"""What crosses the wire between imgbatch and the DashScope API, checked before the SDK sees it.

Takes: each request the provider's aiohttp session sends (through `WireGuard.middleware`) and
every text the service sends back. Gives: answers the SDK can read without surprises, or a
`Refused` saying why not; a count of every POST that really went out; the service's words
redacted and bounded for display (`ServiceText`); a `Retry-After` in seconds.

A server (or whatever answers at the base URL) may be hostile, so an answer is read whole only
up to `MAX_ANSWER_BYTES` *decoded* (a gzip bomb inflates no further), is never redirected (a
redirected POST would be sent, and maybe billed, again), and a 200 must be a JSON object: the
SDK's own readers (multipart, event streams, any content type) are never reached with anything
else. A call sends at most one POST: the SDK's own re-send after a dropped connection would pay
twice for one image, so it is refused here and reported as the lost answer it is.
"""

from __future__ import annotations

import base64
import contextvars
import email.utils
import json
import math
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp

# A real answer is under 2 KB; 1 MiB decoded is far beyond any, and bounds what a hostile
# answer can make imgbatch hold.
MAX_ANSWER_BYTES = 1024 * 1024
# What the service says (a message, a code, a request id) is kept to this many characters
# wherever it is stored or shown; real messages are one sentence.
MAX_SERVICE_TEXT = 1000
_READ_CHUNK = 64 * 1024
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?")
_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+?\+)?json")  # what the SDK's reader accepts


class Refused(Exception):
    """An answer imgbatch does not read as it came (or a second POST in one call); `status` is
    the HTTP status it came with (None: the POST was never sent). Never shown as it is: the
    provider turns it into a `ProviderError` with the reason passed through `ServiceText`."""

    def __init__(
        self, status: int | None, reason: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


@dataclass
class CallRecord:
    """One `generate` call as the wire saw it: POSTs sent and the status of the last answer."""

    posts: int = 0
    status: int | None = None


# The call the running task is in (each shot's calls run in a task of their own).
_CALL: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "imgbatch_dashscope_call", default=None
)


@dataclass
class WireStats:
    """What actually crossed the wire, counted in the session itself."""

    posts_sent: int = 0

    @contextmanager
    def call(self) -> Iterator[CallRecord]:
        """One provider call: what the wire sees of it goes to the record given."""
        record = CallRecord()
        token = _CALL.set(record)
        try:
            yield record
        finally:
            _CALL.reset(token)


class WireGuard:
    """The session middleware: one POST per call, no redirect, answers bounded and checked."""

    def __init__(self, stats: WireStats, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.stats = stats
        self.max_answer_bytes = max_answer_bytes

    async def middleware(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        if request.method != "POST":
            return await handler(request)  # image downloads stream with their own cap
        record = _CALL.get() or CallRecord()
        if record.posts:
            raise Refused(None, "the SDK's re-send after a lost answer")
        record.posts += 1
        self.stats.posts_sent += 1
        try:
            response = await handler(request)
        except aiohttp.ClientConnectorError:
            # No connection, so nothing was sent: trying again pays nothing twice.
            record.posts -= 1
            self.stats.posts_sent -= 1
            raise
        record.status = response.status
        try:
            body = await self._checked_body(response)
        except BaseException:
            response.close()
            raise
        # Held for the SDK's read(): the stream is spent, and it must not read it again.
        response._body = body
        return response

    async def _checked_body(self, response: aiohttp.ClientResponse) -> bytes:
        status, headers = response.status, response.headers
        if 300 <= status < 400:
            where = headers.get("Location", "nowhere")
            reason = f"HTTP {status}, a redirect to {where}; API calls are never redirected"
            raise Refused(status, reason, headers)
        body = await self._read(response)
        json_type = _JSON_TYPE.match(headers.get("Content-Type", "").lower())
        if status == 200 and not json_type:
            kind = response.content_type or "no content type"
            raise Refused(status, f"an answer of {kind}, not JSON", headers)
        try:
            if json_type:
                encoding = response.get_encoding()
                if not isinstance(json.loads(body.decode(encoding) or "{}"), dict):
                    raise ValueError("not a JSON object")
            else:
                body.decode("utf-8")
        except (ValueError, RecursionError, LookupError) as exc:
            reason = f"an answer that cannot be read ({_reason(exc)})"
            raise Refused(status, reason, headers) from None
        return body

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        cap = self.max_answer_bytes
        reason = f"an answer larger than {cap} bytes"
        too_large = Refused(response.status, reason, response.headers)
        declared = response.content_length
        if declared is not None and declared > cap:
            raise too_large
        body = bytearray()
        # Decoded chunks: a compressed body is counted as it inflates, not as it was sent.
        async for chunk in response.content.iter_chunked(_READ_CHUNK):
            body += chunk
            if len(body) > cap:
                raise too_large
        return bytes(body)


class ServiceText:
    """Text from the service, fit to store and show: the key (and the forms a service or proxy
    might echo it in: upper or lower case, reversed, one character short, base64) replaced with
    ***, control characters shown escaped, at most `MAX_SERVICE_TEXT` characters."""

    def __init__(self, secret: str, limit: int = MAX_SERVICE_TEXT) -> None:
        self._limit = limit
        self._pattern = _secret_pattern(secret) if secret else None

    def __call__(self, text: str) -> str:
        text = self.redact(text)
        if len(text) > self._limit:
            text = f"{text[: self._limit]}... ({len(text) - self._limit} more characters)"
        return text

    def redact(self, text: str) -> str:
        """`text` with the key and control characters taken out, whole (for a URL)."""
        if self._pattern is not None:
            text = self._pattern.sub("***", text)
        # Shown, not obeyed: an escape or line break from the service (or a proxy) would
        # otherwise clear the user's terminal or forge a line of the summary.
        return "".join(
            c if c.isprintable() else " " if c.isspace() else ascii(c)[1:-1] for c in text
        )


def _secret_pattern(secret: str) -> re.Pattern[str]:
    plain = {secret, secret[::-1]}
    if len(secret) >= 8:  # a short secret's truncations would match ordinary words
        plain |= {secret[:-1], secret[1:], secret[::-1][:-1], secret[::-1][1:]}
    encoded = set(_base64_forms(secret.encode()))
    # Longest first: the whole key before the same key one character short.
    alternatives = sorted(
        [f"(?i:{re.escape(form)})" for form in plain] + [re.escape(form) for form in encoded],
        key=len,
        reverse=True,
    )
    return re.compile("|".join(alternatives))


def _base64_forms(secret: bytes) -> Iterator[str]:
    """What `secret` looks like inside any base64 text, standard or URL-safe, padded or not:
    for each of the three alignments, the characters that depend on the secret's bytes only."""
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret).decode("ascii")
        start, stop = (offset * 8 + 5) // 6, ((offset + len(secret)) * 8) // 6
        core = encoded[start:stop]
        if len(core) >= 8:
            yield core
            yield core.translate(str.maketrans("+/", "-_"))


def retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """The wait a `Retry-After` asks for, in seconds: delta-seconds or an HTTP date (RFC 9110);
    None when absent or unreadable (the executor's own backoff applies then)."""
    for name, value in (headers or {}).items():
        if name.lower() != "retry-after":
            continue
        text = value.strip()
        if _DELTA_SECONDS.fullmatch(text):
            seconds = float(text)
        else:
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
            if when.tzinfo is None:
                return None  # not an HTTP date (those are always GMT)
            seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return type(exc).__name__
