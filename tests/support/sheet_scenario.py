"""A small output folder for the contact sheet tests, made by two real applies.

The offline placeholder provider draws every image, except that a prompt with the word
FORBIDDEN is refused the way DashScope's moderation refuses it (400 DataInspectionFailed). The
second apply replaces one shot (its prompt edited) and adds another; one shot's prompt and
negative prompt are hostile markup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgbatch.errors import PermanentError
from imgbatch.providers.placeholder import PlaceholderProvider
from imgbatch.run.apply import ApplyOptions, ApplyReport, apply
from imgbatch.shots.request import GeneratedImage, ImageRequest

HOSTILE_PROMPT = '<img src=x onerror="window.__xss=1;alert(1)"> a cafe table at noon'
HOSTILE_NEGATIVE = "</script><script>window.__xss=2;alert(2)</script>"
MODERATION_MESSAGE = "Input data may contain inappropriate content."
FAILED = "s04-sign"
REPLACED = "s05-bottle"
ADDED = "s09-podium"
HOSTILE = "s06-cafe"

FIRST = """\
version: 1
name: sheet-demo
provider: placeholder
defaults:
  model: qwen-image-max
  size: "1664*928"
  negative_prompt: "blurry, low quality, watermark"
  seed: 1234
shots:
  - id: s01-dawn-road
    prompt: "wide establishing shot of an empty mountain road at dawn, mist in the valley"
  - id: s02-dusk-portrait
    prompt: "a cinematic portrait of a cyclist at dusk, soft rim light"
  - id: s03-helmet
    prompt: "a studio product photo of a matte black cycling helmet"
    size: "1328*1328"
    seed: 7
    style: "studio photography, softbox lighting"
  - id: s04-sign
    prompt: "a FORBIDDEN sign on a closed mountain pass"
  - id: s05-bottle
    prompt: "close-up of a hand pulling a water bottle from a carbon frame"
    size: "1472*1104"
  - id: s06-cafe
    prompt: '<img src=x onerror="window.__xss=1;alert(1)"> a cafe table at noon'
    negative_prompt: "</script><script>window.__xss=2;alert(2)</script>"
  - id: s07-phone
    prompt: "vertical shot of a cyclist checking a route on a phone"
    size: "928*1664"
  - id: s08-finish
    prompt: "a cyclist crossing a finish line, confetti, crowd cheering"
"""

SECOND = (
    FIRST.replace(
        "close-up of a hand pulling a water bottle from a carbon frame",
        "close-up of a hand pulling a red water bottle from a carbon frame, droplets in the air",
    )
    + "  - id: s09-podium\n    prompt: three cyclists on a podium, golden hour, champagne spray\n"
)
ORDER = [
    "s01-dawn-road",
    "s02-dusk-portrait",
    "s03-helmet",
    FAILED,
    REPLACED,
    HOSTILE,
    "s07-phone",
    "s08-finish",
    ADDED,
]


class ModeratedPlaceholder(PlaceholderProvider):
    """The placeholder, with DashScope's moderation answer for prompts saying FORBIDDEN."""

    async def generate(self, request: ImageRequest, *, label: str) -> GeneratedImage:
        if "FORBIDDEN" in request.text:
            raise PermanentError(
                MODERATION_MESSAGE, status=400, code="DataInspectionFailed", request_id="req-4"
            )
        return await super().generate(request, label=label)


@dataclass(frozen=True)
class Scenario:
    manifest: Path
    output_dir: Path
    first: ApplyReport
    second: ApplyReport

    @property
    def sheet(self) -> Path:
        return self.output_dir / "index.html"


def make_scenario(directory: Path) -> Scenario:
    manifest = directory / "shots.yaml"
    manifest.write_text(FIRST, encoding="utf-8")
    options = ApplyOptions(environ={}, home=directory)
    first = apply(manifest, options, provider=ModeratedPlaceholder())
    manifest.write_text(SECOND, encoding="utf-8")
    second = apply(manifest, options, provider=ModeratedPlaceholder())
    return Scenario(manifest, directory / "output" / "sheet-demo", first, second)
