"""Small real images for reference_image tests: bytes Pillow decodes, in the accepted sizes."""

from __future__ import annotations

import io

from PIL import Image


def image_bytes(
    image_format: str = "PNG", size: tuple[int, int] = (384, 384), colour: str = "red"
) -> bytes:
    """An image of `size` in `image_format`, one colour (so equal arguments give equal bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=image_format)
    return buffer.getvalue()


PNG = image_bytes("PNG")
PNG_OTHER = image_bytes("PNG", colour="blue")
JPEG = image_bytes("JPEG")
