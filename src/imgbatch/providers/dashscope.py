"""The real provider: Qwen Image models on Alibaba Cloud Model Studio, via the DashScope SDK.

Takes an `ImageRequest`; gives a `GeneratedImage` (signed URL on Alibaba's OSS, reported size) and,
through `fetch`, its bytes. Requests go through the SDK's `AioImageGeneration` with messages built
here; the SDK's habit of uploading any text item that names an existing local file is switched
off, so no prompt is ever mistaken for a file. The key (found by `dashscope_credentials`) goes
into the Authorization header of API calls only, never to the image host, and never into a
message or log line. The base URL is read from `DASHSCOPE_HTTP_BASE_URL` at each call, so setting
it after import works too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace, TracebackType
from typing import Any, Self

import aiohttp
import dashscope
from dashscope.aigc.image_generation import AioImageGeneration

from imgbatch.errors import (
    AuthError,
    NoImageError,
    PermanentError,
    ProviderError,
    TransientError,
)
from imgbatch.providers import is_metered
from imgbatch.providers.dashscope_credentials import ApiKey
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


@dataclass
class WireStats:
    """What actually crossed the wire, counted by aiohttp itself (SDK re-sends included)."""

    posts_sent: int = 0
    dropped_after_send: int = 0


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
    ) -> None:
        self._key = api_key
        self._environ = os.environ if environ is None else environ
        self._base_url = base_url
        self._request_timeout = request_timeout
        self._download_timeout = download_timeout
        self._max_image_bytes = max_image_bytes
        self._session: aiohttp.ClientSession | None = None
        self.wire = WireStats()

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
        configured = self._base_url or self._environ.get("DASHSCOPE_HTTP_BASE_URL")
        return configured or str(dashscope.base_http_api_url)

    async def __aenter__(self) -> Self:
        # Made inside the running loop (aiohttp sessions are loop-bound), shared by the API
        # calls and the downloads; it carries no default headers, so the key is only ever in the
        # per-request headers the SDK sets on API calls.
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(self._on_request_start)
        trace.on_request_exception.append(self._on_request_exception)
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(connector=connector, trace_configs=[trace])
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

    async def _on_request_start(
        self, session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
    ) -> None:
        if params.method == "POST":
            self.wire.posts_sent += 1

    async def _on_request_exception(
        self, session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
    ) -> None:
        if params.method == "POST" and not isinstance(
            params.exception, aiohttp.ClientConnectorError
        ):
            self.wire.dropped_after_send += 1

    async def generate(self, request: ImageRequest, *, label: str) -> GeneratedImage:
        content: list[dict[str, str]] = [{"text": request.text}]
        if request.reference is not None:
            # Before the text, as the seed skill maps it.
            content.insert(0, {"image": await asyncio.to_thread(request.reference.message_value)})
        try:
            # A deadline on the whole call: the SDK's own timeout does not cover its re-send.
            async with asyncio.timeout(self._request_timeout):
                response = await _TextOnlyImageGeneration.call(
                    model=request.model,
                    api_key=self._key.value,
                    messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
                    base_address=self.base_url,
                    session=self._require_session(),
                    request_timeout=self._request_timeout,
                    **request.parameters(),
                )
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
            # The SDK raises TypeError on a 200 without `output`.
            raise TransientError(
                f"malformed answer from DashScope ({self._redact(str(exc))})"
            ) from None
        return self._parse(request, response)

    def _parse(self, request: ImageRequest, response: Any) -> GeneratedImage:
        # Everything the service says is redacted here, at the boundary: a service (or a proxy)
        # that echoes the key back must not get it into results.json, the journal or stderr.
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
            except (KeyError, TypeError, ValueError):
                pass
            stated = _stated_quota(response.headers)
            return GeneratedImage(
                self._redact(str(url)), width, height, request.seed, request_id, stated
            )
        code = self._redact_optional(response.code)
        message = self._redact(str(response.message or "no message"))
        if status in (401, 403):
            raise AuthError(
                f"{message} (using the {self.describe_credentials()})",
                status=status,
                code=code,
                request_id=request_id,
            )
        if status == 429 or status == 408 or status >= 500:
            raise TransientError(
                message,
                status=status,
                code=code,
                request_id=request_id,
                retry_after=_retry_after(response.headers),
                throttled=status == 429,
                stated_quota=_stated_quota(response.headers),
            )
        raise PermanentError(message, status=status, code=code, request_id=request_id)

    async def fetch(self, image: GeneratedImage) -> bytes:
        """Download the signed URL with a bare GET (no key, no SDK headers), whole or not at all:
        streamed, capped at `max_image_bytes`, within one deadline for the whole body."""
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
                    return await self._read_body(response)
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

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        cap = self._max_image_bytes
        too_large = PermanentError(f"the image is larger than {cap / 2**20:g} MiB", code="TooLarge")
        declared = response.content_length
        if declared is not None and declared > cap:
            raise too_large
        body = bytearray()
        async for chunk in response.content.iter_chunked(_READ_CHUNK):
            body += chunk
            if len(body) > cap:
                raise too_large
        if declared is not None and len(body) != declared:
            raise TransientError(
                f"image download was cut short ({len(body)} of {declared} bytes)", code="CutShort"
            )
        return bytes(body)

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ProviderError("DashScopeProvider is used outside `async with`")
        return self._session

    def _redact(self, text: str) -> str:
        text = text.replace(self._key.value, "***") if self._key.value else text
        # Shown, not obeyed: an escape or line break from the service (or a proxy) would
        # otherwise clear the user's terminal or forge a line of the summary.
        return "".join(
            c if c.isprintable() else " " if c.isspace() else ascii(c)[1:-1] for c in text
        )

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
        except (ValueError, TypeError, KeyError):
            return None
    return None


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None  # an HTTP date: rare enough to fall back to our own backoff
    return None
