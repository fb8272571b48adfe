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
    PermanentError,
    ProviderError,
    TransientError,
)
from imgbatch.providers.dashscope_credentials import ApiKey
from imgbatch.request import GeneratedImage, ImageRequest

# The SDK logs failed requests with logger.exception; with no handler configured Python would
# print those tracebacks to stderr. imgbatch reports the error itself.
logging.getLogger("dashscope").addHandler(logging.NullHandler())

REQUEST_TIMEOUT_SECONDS = 180
DOWNLOAD_TIMEOUT_SECONDS = 120
MAX_IMAGE_BYTES = 64 * 1024 * 1024


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
    metered = True

    def __init__(
        self,
        api_key: ApiKey,
        *,
        environ: Mapping[str, str] | None = None,
        base_url: str | None = None,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        self._key = api_key
        self._environ = os.environ if environ is None else environ
        self._base_url = base_url
        self._request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        self.wire = WireStats()

    def describe_credentials(self) -> str:
        return f"API key from {self._key.source}"

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
            content.append({"image": await asyncio.to_thread(request.reference.message_value)})
        try:
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
            raise TransientError(f"cannot connect to {self.base_url} ({exc.strerror})") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise TransientError(
                f"connection dropped after the request was sent ({type(exc).__name__}); "
                "DashScope may have billed it",
                code="ConnectionDropped",
            ) from None
        except TimeoutError:
            raise TransientError(
                f"no answer within {self._request_timeout:g} s", code="Timeout"
            ) from None
        except (TypeError, KeyError, ValueError) as exc:
            # The SDK raises TypeError on a 200 without `output`.
            raise TransientError(f"malformed answer from DashScope ({exc})") from None
        return self._parse(request, response)

    def _parse(self, request: ImageRequest, response: Any) -> GeneratedImage:
        status = int(response.status_code)
        request_id = response.request_id or None
        if status == 200:
            try:
                content = response.output["choices"][0]["message"]["content"]
                url = next(item["image"] for item in content if "image" in item)
                width, height = int(response.usage["width"]), int(response.usage["height"])
            except (KeyError, IndexError, TypeError, ValueError, StopIteration):
                raise TransientError(
                    "DashScope answered 200 without an image URL and size",
                    request_id=request_id,
                ) from None
            return GeneratedImage(url, width, height, request.seed, request_id)
        code = response.code or None
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
            )
        raise PermanentError(message, status=status, code=code, request_id=request_id)

    async def fetch(self, image: GeneratedImage) -> bytes:
        """Download the signed URL with a bare GET: no key, no SDK headers."""
        try:
            async with self._require_session().get(
                image.image_url,
                timeout=aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_SECONDS),
            ) as response:
                if response.status != 200:
                    raise TransientError(
                        f"image download answered HTTP {response.status}", status=response.status
                    )
                data = await response.content.read(MAX_IMAGE_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"image download failed ({type(exc).__name__})") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise TransientError("image download is larger than 64 MiB")
        return data

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ProviderError("DashScopeProvider is used outside `async with`")
        return self._session

    def _redact(self, text: str) -> str:
        return text.replace(self._key.value, "***") if self._key.value else text


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
