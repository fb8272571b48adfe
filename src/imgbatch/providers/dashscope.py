"""The real provider: Qwen Image models on Alibaba Cloud Model Studio, via the DashScope SDK.

Takes an `ImageRequest`; gives a `GeneratedImage` (signed URL on Alibaba's OSS, reported size) and,
through `fetch`, its bytes. Requests go through the SDK's `AioImageGeneration` with messages built
here; the SDK's habit of uploading any text item that names an existing local file is switched
off, so no prompt is ever mistaken for a file. The key (found by `dashscope_credentials`) goes
into the Authorization header of API calls only, never to the image host, and never into a
message or log line. The base URL is read from `DASHSCOPE_HTTP_BASE_URL` at each call, so setting
it after import works too (one with a login in it is refused). Every API answer passes
`dashscope_wire`'s guard before the SDK reads it (bounded, never redirected, one POST per call),
and everything the service says passes its `ServiceText` (redacted, bounded) before it is kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
import dashscope
from dashscope.aigc.image_generation import AioImageGeneration

from imgbatch.errors import (
    AuthError,
    NoImageError,
    PermanentError,
    ProviderError,
    RateLimited,
    TransientError,
)
from imgbatch.providers import Sink, checked_base_url, is_metered
from imgbatch.providers.dashscope_credentials import ApiKey
from imgbatch.providers.dashscope_wire import (
    MAX_ANSWER_BYTES,
    CallRecord,
    Refused,
    ServiceText,
    WireGuard,
    WireStats,
    retry_after,
)
from imgbatch.shots.request import GeneratedImage, ImageRequest
from imgbatch.units.quota import Quota

# The SDK logs failed requests with logger.exception; with no handler configured Python would
# print those tracebacks to stderr. imgbatch reports the error itself.
logging.getLogger("dashscope").addHandler(logging.NullHandler())

# A real generation takes about 16.5 s; one that has not answered in seven times that is lost,
# and waiting longer only holds a worker (each try may be billed, so tries are few: executor).
REQUEST_TIMEOUT_SECONDS = 120.0
# A whole download, not a pause between reads: a link that trickles a byte at a time is cut off.
# 4 MB in 60 s still passes on a 70 KB/s link.
DOWNLOAD_TIMEOUT_SECONDS = 60.0
# Real images are 1 to 4 MB; a body far beyond that is not an image we asked for.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
_READ_CHUNK = 256 * 1024
MAX_REDIRECTS = 5


class _TextOnlyImageGeneration(AioImageGeneration):
    """The SDK call without its local-file upload step: imgbatch builds every message itself."""

    @classmethod
    def _preprocess_messages(cls, model: str, messages: list[Any], api_key: str) -> bool:
        return False


class DashScopeProvider:
    name = "dashscope"
    metered = is_metered(name)  # the one table: imgbatch.providers.METERED

    def __init__(
        self,
        api_key: ApiKey,
        *,
        environ: Mapping[str, str] | None = None,
        base_url: str | None = None,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        download_timeout: float = DOWNLOAD_TIMEOUT_SECONDS,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._key = api_key
        self._environ = os.environ if environ is None else environ
        self._base_url = base_url
        self._request_timeout = request_timeout
        self._download_timeout = download_timeout
        self._max_image_bytes = max_image_bytes
        self._session: aiohttp.ClientSession | None = None
        self.wire = WireStats()
        self._guard = WireGuard(self.wire, max_answer_bytes)
        self._shown = ServiceText(api_key.value)
        self.base_url  # noqa: B018 (checked now: refused before anything is sent or written)

    def describe_credentials(self) -> str:
        return f"API key from {self._key.source}"

    @property
    def quota_account(self) -> str:
        """Whose quota this is, for remembering it: a fingerprint of the key (never the key)
        and the endpoint (keys are bound to their region)."""
        digest = hashlib.sha256(b"imgbatch quota account\0" + self._key.value.encode()).hexdigest()
        return f"{digest[:16]}@{self.base_url}"

    @property
    def base_url(self) -> str:
        """Where API calls go; `ConfigError` for one that cannot be (see `checked_base_url`)."""
        if self._base_url:
            return checked_base_url(self._base_url, "the provider's base_url")
        configured = self._environ.get("DASHSCOPE_HTTP_BASE_URL")
        if configured:
            return checked_base_url(configured, "DASHSCOPE_HTTP_BASE_URL")
        return str(dashscope.base_http_api_url)

    async def __aenter__(self) -> Self:
        self.base_url  # noqa: B018 (set after the provider was made: checked before a request)
        # Made inside the running loop (aiohttp sessions are loop-bound), shared by the API
        # calls and the downloads; it carries no default headers, so the key is only ever in the
        # per-request headers the SDK sets on API calls. Nothing ambient goes with a request
        # either: the image URL is the service's to choose, so no ~/.netrc login, no proxy from
        # the environment (trust_env off), and no cookie carried from one host to another.
        # Every API answer passes the guard before the SDK reads it (dashscope_wire).
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            middlewares=(self._guard.middleware,),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def generate(self, request: ImageRequest, *, label: str) -> GeneratedImage:
        content: list[dict[str, str]] = [{"text": request.text}]
        if request.reference is not None:
            # Before the text, as the seed skill maps it.
            content.insert(0, {"image": await asyncio.to_thread(request.reference.message_value)})
        with self.wire.call() as record:
            response = await self._call(request, content, record)
        return self._parse(request, response)

    async def _call(
        self, request: ImageRequest, content: list[dict[str, str]], record: CallRecord
    ) -> Any:
        """The SDK's call, its failures as `ProviderError`s; `record` is what the wire saw."""
        try:
            # A deadline on the whole call, reading the answer included.
            async with asyncio.timeout(self._request_timeout):
                return await _TextOnlyImageGeneration.call(
                    model=request.model,
                    api_key=self._key.value,
                    messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
                    base_address=self.base_url,
                    session=self._require_session(),
                    request_timeout=self._request_timeout,
                    **request.parameters(),
                )
        except Refused as exc:
            raise self._refused(exc) from None
        except aiohttp.ClientConnectorError as exc:
            # Never reached the service: nothing was billed.
            raise TransientError(
                f"cannot connect to {self.base_url} ({exc.strerror or type(exc).__name__})",
                code="CannotConnect",
            ) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise TransientError(
                f"connection dropped after the request was sent ({type(exc).__name__}); "
                "DashScope may have billed it",
                code="ConnectionDropped",
                maybe_billed=True,
            ) from None
        except TimeoutError:
            raise TransientError(
                f"no answer within {self._request_timeout:g} s; DashScope may have billed it",
                code="Timeout",
                maybe_billed=True,
            ) from None
        except (TypeError, KeyError, ValueError) as exc:
            # The SDK raises TypeError on a 200 without `output`. A 200 is an image made, and
            # billed, whether or not its answer can be read.
            billed = record.status == 200
            raise TransientError(
                f"malformed answer from DashScope ({self._shown(str(exc))})"
                + ("; DashScope may have billed it" if billed else ""),
                maybe_billed=billed,
            ) from None

    def _refused(self, refused: Refused) -> ProviderError:
        """What a `Refused` answer means for this try (one place for every such answer)."""
        if refused.status is None:
            return TransientError(
                "connection dropped after the request was sent; DashScope may have billed it "
                "(imgbatch does not let the SDK send it again)",
                code="ConnectionDropped",
                maybe_billed=True,
            )
        reason = self._shown(refused.reason)
        if refused.status == 200:
            return TransientError(
                f"DashScope answered 200 with {reason}; it may have billed it",
                code="Unreadable",
                maybe_billed=True,
            )
        return self._failure(
            refused.status, f"DashScope answered with {reason}", "Unreadable", None, refused.headers
        )

    def _parse(self, request: ImageRequest, response: Any) -> GeneratedImage:
        # Everything the service says is redacted and bounded here, at the boundary: a service
        # (or a proxy) that echoes the key back, or sends megabytes of message, must not get it
        # into results.json, the journal, the sheet or stderr.
        status = int(response.status_code)
        request_id = self._redact_optional(response.request_id)
        if status == 200:
            try:
                content = response.output["choices"][0]["message"]["content"]
                url = next(item["image"] for item in content if item.get("image"))
            except (KeyError, IndexError, TypeError, AttributeError, StopIteration):
                raise NoImageError(
                    "DashScope answered 200 without an image URL", request_id=request_id
                ) from None
            # The size is checked on the image itself; what usage reports is only a default.
            width, height = request.dimensions
            try:
                width, height = int(response.usage["width"]), int(response.usage["height"])
            except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: 1e999
                pass
            stated = _stated_quota(response.headers)
            # Redacted, not shortened: a URL cut short would not fetch the image paid for.
            return GeneratedImage(
                self._shown.redact(str(url)), width, height, request.seed, request_id, stated
            )
        code = self._redact_optional(response.code)
        message = self._redact(str(response.message or "no message"))
        raise self._failure(status, message, code, request_id, response.headers)

    def _failure(
        self,
        status: int,
        message: str,
        code: str | None,
        request_id: str | None,
        headers: Mapping[str, str] | None,
    ) -> ProviderError:
        """The error an answer of `status` means: which class decides what the executor does."""
        if status in (401, 403):
            return AuthError(
                f"{message} (using the {self.describe_credentials()})",
                status=status,
                code=code,
                request_id=request_id,
            )
        if status == 429 or status == 408 or status >= 500:
            transient = RateLimited if status == 429 else TransientError
            return transient(
                message,
                status=status,
                code=code,
                request_id=request_id,
                retry_after=retry_after(headers),
                stated_quota=_stated_quota(headers),
            )
        return PermanentError(message, status=status, code=code, request_id=request_id)

    async def fetch(self, image: GeneratedImage, sink: Sink) -> None:
        """Download the signed URL with a bare GET (no key, no SDK headers) into `sink`, piece by
        piece as it arrives, whole or not at all (a body cut short raises `TransientError`):
        capped at `max_image_bytes`, within one deadline for the whole body."""
        try:
            async with asyncio.timeout(self._download_timeout):
                async with self._require_session().get(
                    image.image_url, max_redirects=MAX_REDIRECTS
                ) as response:
                    if response.status != 200:
                        raise TransientError(
                            f"image download answered HTTP {response.status}",
                            status=response.status,
                        )
                    await self._read_body(response, sink)
        except TimeoutError:
            raise TransientError(
                f"image download did not finish within {self._download_timeout:g} s",
                code="Timeout",
            ) from None
        except aiohttp.ClientPayloadError:
            raise TransientError("image download was cut short", code="CutShort") from None
        except aiohttp.TooManyRedirects:
            raise TransientError(
                f"image download redirected more than {MAX_REDIRECTS} times"
            ) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise TransientError(f"image download failed ({type(exc).__name__})") from None

    async def fetch_bytes(self, image: GeneratedImage) -> bytes:
        """The image's bytes, whole (`fetch` into a list: for one image, never a batch)."""
        pieces: list[bytes] = []
        await self.fetch(image, pieces.append)
        return b"".join(pieces)

    async def _read_body(self, response: aiohttp.ClientResponse, sink: Sink) -> None:
        cap = self._max_image_bytes
        too_large = PermanentError(f"the image is larger than {cap / 2**20:g} MiB", code="TooLarge")
        declared = response.content_length
        if response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
            # Decoded as it is read (gzip, deflate...): the length declared is the encoded one,
            # and the cap counts the decoded bytes.
            declared = None
        if declared is not None and declared > cap:
            raise too_large
        received = 0
        async for chunk in response.content.iter_chunked(_READ_CHUNK):
            received += len(chunk)
            if received > cap:
                raise too_large
            sink(chunk)  # written to disk as it comes: an image is never held whole
        if declared is not None and received != declared:
            raise TransientError(
                f"image download was cut short ({received} of {declared} bytes)", code="CutShort"
            )

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ProviderError("DashScopeProvider is used outside `async with`")
        return self._session

    def _redact(self, text: str) -> str:
        return self._shown(text)

    def _redact_optional(self, text: object) -> str | None:
        return self._redact(str(text)) if text else None


FLOW_CONTROL_HEADER = "x-dashscope-inner-flow-control-meta"


def _stated_quota(headers: Mapping[str, str] | None) -> Quota | None:
    """The quota in the undocumented flow-control header, if an answer carries a sane one.

    `{"user_spec": {"count_limit": 2, "count_limit_period": 60, ...}}`: two requests a minute.
    Undocumented, so anything unexpected is ignored rather than trusted.
    """
    if not headers:
        return None
    for name, value in headers.items():
        if name.lower() != FLOW_CONTROL_HEADER:
            continue
        try:
            spec = json.loads(value)["user_spec"]
            count, period = spec["count_limit"], spec["count_limit_period"]
            if isinstance(count, bool) or not isinstance(count, int):
                return None
            return Quota(count, float(period))
        # RecursionError: a header nested deeper than json can follow.
        except (ValueError, TypeError, KeyError, RecursionError):
            return None
    return None
