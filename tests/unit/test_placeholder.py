"""The placeholder drawing: a Chinese prompt is drawn in a font that has its glyphs (not as
boxes), and a shot without a seed says so in words.
"""

from __future__ import annotations

import os

import pytest
from PIL import Image, ImageDraw

from imgbatch.providers.placeholder import cjk_font_path, font, footer_text
from imgbatch.shots.request import ImageRequest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def drawn(text: str) -> bytes:
    image = Image.new("L", (200, 60), 0)
    ImageDraw.Draw(image).text((4, 4), text, fill=255, font=font(40))
    return image.tobytes()


def test_chinese_is_drawn_with_its_own_glyphs() -> None:
    if cjk_font_path() is None and not IN_CI:
        pytest.skip("no CJK font here (apt-get install fonts-wqy-microhei); CI installs one")
    assert cjk_font_path() is not None
    # Without CJK glyphs every character is the same box: here each one is itself.
    glyphs = {drawn(char) for char in "山水路雾"}
    assert len(glyphs) == 4
    assert all(any(pixel) for pixel in glyphs)


def test_a_shot_without_a_seed_says_no_seed() -> None:
    assert footer_text(ImageRequest(prompt="p", size="1328*1328")) == (
        "qwen-image-max  1328*1328  no seed  (placeholder)"
    )
    assert "seed 7" in footer_text(ImageRequest(prompt="p", seed=7))
