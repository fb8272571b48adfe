"""imgbatch: declarative batch image generation for Qwen Image models on DashScope.

The library behind the `imgbatch` command. A pipeline (video agent, notebook, CI step) can
call it directly:

    >>> from imgbatch import load_manifest, make_plan, apply
    >>> report = apply("manifests/cyclist-spot.yaml", provider="placeholder")
    >>> report.ok
    True
"""

from __future__ import annotations

from imgbatch.api import ApplyOptions, ApplyReport, apply, make_plan
from imgbatch.errors import (
    AuthError,
    ConfigError,
    ImgbatchError,
    ManifestError,
    PermanentError,
    ProviderError,
    TransientError,
)
from imgbatch.manifest import Manifest, load_manifest
from imgbatch.request import GeneratedImage, ImageRequest
from imgbatch.single import agenerate, generate

__all__ = [
    "ApplyOptions",
    "ApplyReport",
    "AuthError",
    "ConfigError",
    "GeneratedImage",
    "ImageRequest",
    "ImgbatchError",
    "Manifest",
    "ManifestError",
    "PermanentError",
    "ProviderError",
    "TransientError",
    "agenerate",
    "apply",
    "generate",
    "load_manifest",
    "make_plan",
]
