"""The offline provider: draws a labelled image of the requested size, at no cost.

Takes an `ImageRequest` and the shot id; gives a PNG showing the id, the prompt, size and model on
a colour derived from the request key, so a shot list can be run, reviewed and tested with no key.

Prompts are often Chinese: the text is drawn with the first CJK font found on the machine
(WenQuanYi Micro Hei from Debian's `fonts-wqy-microhei`, which CI installs; Noto Sans CJK,
Droid Sans Fallback, or the system fonts of macOS and Windows), and with Pillow's own font,
which has no CJK glyphs, only when there is none.
"""

from __future__ import annotations

import asyncio
import functools
import io
import textwrap
import unicodedata
from pathlib import Path
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


# Fonts with CJK glyphs, most likely first: Debian and Ubuntu packages, then macOS and Windows.
CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)


@functools.cache
def cjk_font_path() -> Path | None:
    """The first CJK font on this machine, or None."""
    return next((Path(path) for path in CJK_FONTS if Path(path).is_file()), None)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font of `size` pixels that draws Chinese and Japanese (when the machine has one)."""
    path = cjk_font_path()
    if path is not None:
        try:
            return ImageFont.truetype(str(path), size)
        except OSError:
            pass
    return ImageFont.load_default(size=size)


def _wrapped(text: str, columns: int) -> list[str]:
    """Lines of at most `columns` narrow characters (a CJK character counts two); CJK text has
    no spaces to break at, so it breaks anywhere."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        if not any(unicodedata.east_asian_width(char) in "WF" for char in paragraph):
            lines.extend(textwrap.wrap(paragraph, width=columns) or [""])
            continue
        line, used = "", 0
        for char in paragraph:
            wide = 2 if unicodedata.east_asian_width(char) in "WF" else 1
            if used + wide > columns:
                lines.append(line)
                line, used = "", 0
            line += char
            used += wide
        lines.append(line)
    return lines


def footer_text(request: ImageRequest) -> str:
    """The placeholder's last line: model, size and seed, in words where there is none."""
    seed = "no seed" if request.seed is None else f"seed {request.seed}"
    return f"{request.model}  {request.size}  {seed}  (placeholder)"


def render_placeholder(request: ImageRequest, label: str) -> bytes:
    width, height = request.dimensions
    key = bytes.fromhex(request.key[:6])
    background = (64 + key[0] // 2, 64 + key[1] // 2, 64 + key[2] // 2)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    title = font(max(24, width // 18))
    body = font(max(16, width // 48))
    margin = width // 16
    draw.text((margin, margin), label, fill="white", font=title)
    lines = _wrapped(request.text, max(20, (width - 2 * margin) // (width // 80 + 8)))
    y = margin + width // 10
    for line in lines[:12]:
        draw.text((margin, y), line, fill="white", font=body)
        y += int(width / 40)
    footer = footer_text(request)
    draw.text((margin, height - margin - width // 40), footer, fill="white", font=body)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()
