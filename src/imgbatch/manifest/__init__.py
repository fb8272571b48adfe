"""YAML with positions -> a checked Manifest (schema, rules, model catalogue).

`loader` is the entry point (`load_manifest`); the names below are imported from it on first
use, so that a command needing only the model catalogue (`imgbatch --help`) does not load the
schema, the rules or the image libraries behind them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgbatch.manifest.loader import (
        MIN_RPS,
        Limits,
        Manifest,
        ShotSpec,
        load_manifest,
        manifest_from_data,
        manifest_schema,
    )

__all__ = [
    "MIN_RPS",
    "Limits",
    "Manifest",
    "ShotSpec",
    "load_manifest",
    "manifest_from_data",
    "manifest_schema",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'imgbatch.manifest' has no attribute {name!r}")
    value = getattr(importlib.import_module("imgbatch.manifest.loader"), name)
    globals()[name] = value
    return value
