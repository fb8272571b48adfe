"""The one in-memory fake provider, for tests that need no wire: imgbatch's own run, a fake service.

Takes (all optional): scripted fetch outcomes, per-shot hooks awaited during a generation or a
fetch, a latency per generation and a delay per download, the quota a real answer would state.
Gives: `FakeProvider`, a metered provider named `dashscope` (so a run plans, paces and keys as
with the paid one) that answers each request with an image URL and a request id of its own,
serves a small PNG of the requested size unless a script says otherwise, and records what it was
asked: the requests, the shots in order, the images fetched, the most requests it held at once.
The wire (HTTP, chunks, real-sized images, hostile answers) is tests/support/fake_dashscope.py's.
"""

from __future__ import annotations

import asyncio
import functools
import io
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from imgbatch.pacing.quota import Quota
from imgbatch.providers import Sink
from imgbatch.shots.request import GeneratedImage, ImageRequest

Hook = Callable[[], Awaitable[object]]


@functools.cache
def small_png(width: int, height: int) -> bytes:
    """A valid PNG of this size, one bit a pixel: quick to verify even by the thousand."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def shot_of(url: str) -> str:
    """The shot a FakeProvider's image URL was made for ("" for any other URL)."""
    return parse_qs(urlsplit(url).query).get("shot", [""])[0]


class FakeProvider:
    """Generates after its hook and latency; each fetch takes the next scripted outcome.

    `fetches`: bytes to serve or an exception to raise, one per fetch, the last one repeating;
    none: a small PNG of the image's size. `on_generate` / `on_fetch`: an async callable per shot
    id, awaited before the answer (to hang, interrupt or fail that shot). `tag` goes into the
    image URLs and request ids, to tell one provider's images from another's.
    """

    name = "dashscope"
    metered = True

    def __init__(
        self,
        fetches: Sequence[bytes | Exception] = (),
        *,
        tag: str = "run",
        on_generate: dict[str, Hook] | None = None,
        on_fetch: dict[str, Hook] | None = None,
        latency: float = 0.0,
        download: float = 0.0,
        stated_quota: Quota | None = None,
    ) -> None:
        self.fetches = list(fetches)
        self.tag = tag
        self.on_generate = on_generate or {}
        self.on_fetch = on_fetch or {}
        self.latency, self.download = latency, download
        self.stated_quota = stated_quota
        self.generated: list[ImageRequest] = []
        self.labels: list[str] = []  # the shot of each request, in the order sent
        self.fetched: list[GeneratedImage] = []
        self.in_flight = self.most_in_flight = 0
        self.urls: dict[str, str] = {}  # shot -> the image URL its last request was given
        self.request_ids: dict[str, str] = {}  # shot -> the request id of its last request

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def describe_credentials(self) -> str:
        return "no credentials (test)"

    @property
    def fetched_labels(self) -> list[str]:
        """The shot of each image fetched, in order."""
        return [shot_of(image.image_url) for image in self.fetched]

    async def generate(self, request: ImageRequest, *, label: str) -> GeneratedImage:
        self.generated.append(request)
        self.labels.append(label)
        number = len(self.generated)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            hook = self.on_generate.get(label)
            if hook is not None:
                await hook()
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        # The shot is in the URL, so that another FakeProvider fetching it (the next apply's,
        # recovering an image this one was paid for) knows whose image it is.
        url = f"https://bucket.example.invalid/{self.tag}-{number}.png?Signature=x&shot={label}"
        request_id = f"req-{self.tag}-{number}"
        self.urls[label], self.request_ids[label] = url, request_id
        width, height = request.dimensions
        return GeneratedImage(url, width, height, request.seed, request_id, self.stated_quota)

    async def fetch(self, image: GeneratedImage, sink: Sink) -> None:
        self.fetched.append(image)
        hook = self.on_fetch.get(shot_of(image.image_url))
        if hook is not None:
            await hook()
        if self.download:
            await asyncio.sleep(self.download)
        if not self.fetches:
            sink(small_png(image.width, image.height))
            return
        outcome = self.fetches[min(len(self.fetched), len(self.fetches)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        sink(outcome)
