"""imgbatch: declarative batch image generation for Qwen Image models on DashScope.

The library behind the `imgbatch` command. A pipeline (video agent, notebook, CI step) can
call it directly:

    >>> from imgbatch import load_manifest, make_plan, apply
    >>> report = apply("manifests/cyclist-spot.yaml", provider="placeholder")
    >>> report.ok
    True

Each name below is imported on first use (module `__getattr__`), so `import imgbatch.cli` does
not pay for the executor, aiohttp, Pillow or the DashScope SDK before a command needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgbatch.api import (
        ApplyOptions,
        ApplyReport,
        agenerate,
        apply,
        expand_shots,
        generate,
        make_plan,
    )
    from imgbatch.errors import (
        AuthError,
        CacheEntryDamaged,
        ConfigError,
        CostLimitError,
        FolderOwnedError,
        FrozenError,
        ImageError,
        ImgbatchError,
        InspectError,
        LockedError,
        ManifestError,
        ManifestProblem,
        NoImageError,
        PaidImagesError,
        PermanentError,
        ProviderError,
        RateLimited,
        SharedEntryDamaged,
        SharedStoreError,
        StoreError,
        StoreWriteError,
        TransientError,
        WrongImageError,
    )
    from imgbatch.manifest import Manifest, load_manifest
    from imgbatch.plan.decide import Action, Plan, PlannedShot
    from imgbatch.review.provenance import inspect_image
    from imgbatch.shots.request import GeneratedImage, ImageRequest
    from imgbatch.state.results import ResultEntry

_EXPORTS = {
    "ApplyOptions": "imgbatch.api",
    "ApplyReport": "imgbatch.api",
    "apply": "imgbatch.api",
    "make_plan": "imgbatch.api",
    "expand_shots": "imgbatch.api",
    "AuthError": "imgbatch.errors",
    "ConfigError": "imgbatch.errors",
    "ImgbatchError": "imgbatch.errors",
    "ManifestError": "imgbatch.errors",
    "PermanentError": "imgbatch.errors",
    "ProviderError": "imgbatch.errors",
    "TransientError": "imgbatch.errors",
    "RateLimited": "imgbatch.errors",
    "CacheEntryDamaged": "imgbatch.errors",
    "SharedEntryDamaged": "imgbatch.errors",
    "SharedStoreError": "imgbatch.errors",
    "CostLimitError": "imgbatch.errors",
    "FrozenError": "imgbatch.errors",
    "FolderOwnedError": "imgbatch.errors",
    "PaidImagesError": "imgbatch.errors",
    "InspectError": "imgbatch.errors",
    "ImageError": "imgbatch.errors",
    "LockedError": "imgbatch.errors",
    "ManifestProblem": "imgbatch.errors",
    "NoImageError": "imgbatch.errors",
    "StoreError": "imgbatch.errors",
    "StoreWriteError": "imgbatch.errors",
    "WrongImageError": "imgbatch.errors",
    "Action": "imgbatch.plan.decide",
    "Plan": "imgbatch.plan.decide",
    "PlannedShot": "imgbatch.plan.decide",
    "ResultEntry": "imgbatch.state.results",
    "Manifest": "imgbatch.manifest",
    "load_manifest": "imgbatch.manifest",
    "GeneratedImage": "imgbatch.shots.request",
    "ImageRequest": "imgbatch.shots.request",
    "agenerate": "imgbatch.api",
    "generate": "imgbatch.api",
    "inspect_image": "imgbatch.review.provenance",
}

__all__ = [
    "Action",
    "ApplyOptions",
    "ApplyReport",
    "AuthError",
    "CacheEntryDamaged",
    "SharedEntryDamaged",
    "SharedStoreError",
    "ConfigError",
    "CostLimitError",
    "FolderOwnedError",
    "FrozenError",
    "GeneratedImage",
    "ImageError",
    "ImageRequest",
    "ImgbatchError",
    "InspectError",
    "LockedError",
    "Manifest",
    "ManifestError",
    "ManifestProblem",
    "NoImageError",
    "PaidImagesError",
    "PermanentError",
    "Plan",
    "PlannedShot",
    "ProviderError",
    "RateLimited",
    "ResultEntry",
    "StoreError",
    "StoreWriteError",
    "TransientError",
    "WrongImageError",
    "agenerate",
    "apply",
    "expand_shots",
    "generate",
    "inspect_image",
    "load_manifest",
    "make_plan",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imgbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
