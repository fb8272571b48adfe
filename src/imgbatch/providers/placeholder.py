"""The offline provider: draws a labelled image of the requested size, at no cost.

Takes an `ImageRequest` and the shot id; gives a PNG showing the id, the prompt, size and model on
a colour derived from the request key, so a shot list can be run, reviewed and tested with no key.
"""

from __future__ import annotations

import asyncio
import io
import textwrap
from types import TracebackType
from typing import Self

from PIL import Image, ImageDraw, ImageFont

from imgbatch.errors import TransientError
from imgbatch.providers import Sink, is_metered
from imgbatch.shots.request import GeneratedImage, ImageRequest


class PlaceholderProvider:
    name = "placeholder"
    metered = is_metered(name)  # the one table: imgbatch.providers.METERED

    def __init__(self) -> None:
        self._rendered: dict[str, bytes] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._rendered.clear()

    def describe_credentials(self) -> str:
        return "no credentials (offline placeholder provider)"

    async def generate(self, request: ImageRequest, *, label: str) -> GeneratedImage:
        width, height = request.dimensions
        data = await asyncio.to_thread(render_placeholder, request, label)
        url = f"placeholder:{request.key}"
        self._rendered[url] = data
        return GeneratedImage(url, width, height, request.seed, None)

    async def fetch(self, image: GeneratedImage, sink: Sink) -> None:
        try:
            data = self._rendered.pop(image.image_url)
        except KeyError:
            raise TransientError(f"placeholder image {image.image_url} was not rendered") from None
        sink(data)


def render_placeholder(request: ImageRequest, label: str) -> bytes:
    width, height = request.dimensions
    key = bytes.fromhex(request.key[:6])
    background = (64 + key[0] // 2, 64 + key[1] // 2, 64 + key[2] // 2)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    title = ImageFont.load_default(size=max(24, width // 18))
    body = ImageFont.load_default(size=max(16, width // 48))
    margin = width // 16
    draw.text((margin, margin), label, fill="white", font=title)
    lines = textwrap.wrap(request.text, width=max(20, (width - 2 * margin) // (width // 80 + 8)))
    y = margin + width // 10
    for line in lines[:12]:
        draw.text((margin, y), line, fill="white", font=body)
        y += int(width / 40)
    footer = f"{request.model}  {request.size}  seed {request.seed}  (placeholder)"
    draw.text((margin, height - margin - width // 40), footer, fill="white", font=body)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()
