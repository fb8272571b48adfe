"""The normalized image request, its cache key, and the generated image it gives.

Takes the merged fields of one shot; gives an `ImageRequest` whose `key` names its image in the
cache. The key covers exactly what determines the image: provider, model, the text sent, negative
prompt, size, seed, the reference image's content hash (never its path or URL) and the provider
parameters. Fields left unset are omitted from the canonical form, so adding an optional field in
a later version does not change the keys of existing shots.

A reference URL not fetched yet has no content hash: such a request's key is provisional (it
names the URL, which a content key never does), so no image is ever cached or found under it;
`apply` and `generate` fetch the URL and key the request by its content before anything else.

    >>> ImageRequest(prompt="a red bicycle", size="1328*1328", seed=7).key[:12]
    '...'
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from imgbatch.manifest.catalogue import DEFAULT_MODEL, DEFAULT_SIZE, parse_size, sent_text
from imgbatch.manifest.reference import ReferenceImage
from imgbatch.units.quota import Quota

# Bump when the canonical form changes meaning: every key changes, every shot regenerates.
KEY_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """Everything that determines one generated image, and its `key`.

    Slots, and the key worked out when the request is made: every request's key is needed by
    every plan, and a per-instance dict for a cached property was 160 bytes a shot.
    """

    prompt: str
    model: str = DEFAULT_MODEL
    size: str = DEFAULT_SIZE
    negative_prompt: str | None = None
    style: str | None = None
    seed: int | None = None
    reference: ReferenceImage | None = None
    # The API defaults prompt_extend to true: the server rewrites the prompt differently on each
    # call, so the same key would not mean the same picture. imgbatch sends both explicitly.
    prompt_extend: bool = False
    watermark: bool = False
    provider: str = "dashscope"
    # The request's cache key (see the module doc); not compared: it follows from the rest.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self._key())

    @property
    def text(self) -> str:
        """The prompt as sent (`imgbatch.manifest.catalogue.sent_text`)."""
        return sent_text(self.prompt, self.style)

    @property
    def dimensions(self) -> tuple[int, int]:
        parsed = parse_size(self.size)
        if parsed is None:
            raise ValueError(f"size {self.size!r} is not W*H")
        return parsed

    def canonical(self) -> dict[str, Any]:
        """The fields that determine the image, as plain JSON values; unset ones left out."""
        fields: dict[str, Any] = {
            "provider": self.provider,
            "model": self.model,
            "text": self.text,
            "size": self.size,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "reference_sha256": self.reference.sha256 if self.reference else None,
            "prompt_extend": self.prompt_extend,
            "watermark": self.watermark,
        }
        return {name: value for name, value in fields.items() if value is not None}

    def _key(self) -> str:
        payload = {"key_format": KEY_FORMAT_VERSION, **self.canonical()}
        if self.reference is not None and not self.reference.fetched:
            payload["reference_url"] = self.reference.source  # provisional: see the module doc
        blob = _KEY_JSON.encode(payload)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def parameters(self) -> dict[str, Any]:
        """The API's `parameters` object for this request."""
        params: dict[str, Any] = {
            "size": self.size,
            "prompt_extend": self.prompt_extend,
            "watermark": self.watermark,
        }
        if self.negative_prompt:
            params["negative_prompt"] = self.negative_prompt
        if self.seed is not None:
            params["seed"] = self.seed
        return params


# One encoder for every key: json.dumps with options builds a new one per call (a third of the
# cost of a key).
_KEY_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of canonical fields that differ between two requests, in a stable order."""
    names = list(dict.fromkeys([*new, *old]))
    return [name for name in names if old.get(name) != new.get(name)]


@dataclass(frozen=True)
class GeneratedImage:
    """The provider's answer: where the image is and what it says about it."""

    image_url: str
    width: int
    height: int
    seed: int | None
    request_id: str | None
    # The quota the service says the account has, if its answer said (a hint for the pacer).
    stated_quota: Quota | None = None


# Western sentences end at a stop and a space; Chinese and Japanese ones at the full-width stop.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")
_CLAUSE_END = re.compile(r"[,;，；]\s*")


def simplified(request: ImageRequest) -> ImageRequest | None:
    """The request to send once more after a 200 without an image (the seed skill's rule): the
    style dropped and the prompt cut to its first sentence (or, for a one-sentence prompt, its
    first clause). None when there is nothing left to simplify."""
    prompt = request.prompt.strip()
    shorter = _SENTENCE_END.split(prompt, maxsplit=1)[0].strip()
    if shorter == prompt:
        shorter = _CLAUSE_END.split(prompt, maxsplit=1)[0].strip()
    if not shorter:
        shorter = prompt
    if shorter == prompt and not request.style:
        return None
    return replace(request, prompt=shorter, style=None)
