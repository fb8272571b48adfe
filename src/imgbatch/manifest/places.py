"""Where a problem is in a manifest, said in words: the one vocabulary every check uses.

Takes a JSON path into the parsed manifest (`("shots", 3, "size")`); gives "shot s04, field
size" or "field defaults.size", and values shown the way a user wrote them.
"""

from __future__ import annotations

import json
from typing import Any

JsonPath = tuple[str | int, ...]


def describe(parent: JsonPath, field: str | int | None, shot_id: str | None) -> str:
    """Name a place in the manifest: "shot s02-helmet, field size" or "field defaults.size"."""
    if len(parent) >= 2 and parent[0] == "shots" and isinstance(parent[1], int):
        who = f"shot {shot_id}" if shot_id else f"shots[{parent[1]}]"
        rest = [str(part) for part in parent[2:]]
        if field is not None:
            rest.append(str(field))
        return f"{who}, field {'.'.join(rest)}" if rest else who
    parts = [str(part) for part in parent]
    if field is not None:
        parts.append(str(field))
    return f"field {'.'.join(parts)}" if parts else "manifest"


def show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value, default=str)
