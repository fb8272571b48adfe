"""What each supported model accepts: one capability table, used by validation and providers.

Takes a model name; gives its `ModelSpec` (sizes, text limits) or None for a model imgbatch does
not know. Model names are never invented: a name missing here is an error in the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

QWEN_IMAGE_SIZES: tuple[str, ...] = ("1664*928", "1472*1104", "1328*1328", "1104*1472", "928*1664")
SEED_MAX = 2_147_483_647
# Below this a run would wait a quarter of an hour between requests: a typo, not a plan. Kept here,
# not in manifest.py, so that the CLI can build its options without importing the manifest reader.
MIN_RPS = 0.001


@dataclass(frozen=True)
class ModelSpec:
    name: str
    sizes: tuple[str, ...]
    max_prompt_chars: int
    max_negative_prompt_chars: int


def _qwen_image(name: str) -> ModelSpec:
    # Prices depend on the region too: imgbatch.plan.pricing has them.
    return ModelSpec(name, QWEN_IMAGE_SIZES, 800, 500)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _qwen_image("qwen-image-max"),
        _qwen_image("qwen-image-max-2025-12-30"),
        _qwen_image("qwen-image-plus"),
        _qwen_image("qwen-image-plus-2026-01-09"),
    )
}
DEFAULT_MODEL = "qwen-image-max"
DEFAULT_SIZE = "1664*928"


def sent_text(prompt: str, style: str | None) -> str:
    """The prompt as sent. The models have no style parameter, so a style is appended."""
    if not style:
        return prompt
    return f"{prompt.rstrip()}\nStyle: {style}"


def parse_size(size: str) -> tuple[int, int] | None:
    """`"1664*928"` -> `(1664, 928)`; anything else -> None."""
    width, sep, height = size.partition("*")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return int(width), int(height)


def nearest_size(size: str, sizes: tuple[str, ...]) -> str:
    """The supported size closest in aspect ratio to `size` (first listed on a tie)."""
    parsed = parse_size(size)
    if parsed is None or parsed[1] == 0:
        return sizes[0]
    # Log ratios make 2:1 and 1:2 equally far from 1:1.
    log_ratio = math.log(max(parsed[0], 1) / parsed[1])

    def distance(candidate: str) -> float:
        width, height = parse_size(candidate) or (1, 1)
        return abs(math.log(width / height) - log_ratio)

    return min(sizes, key=distance)
