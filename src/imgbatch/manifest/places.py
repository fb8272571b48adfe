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
    name = field_name(parent, field)
    if in_shot(parent):
        who = f"shot {shot_id}" if shot_id else f"shots[{parent[1]}]"
        return f"{who}, field {name}" if name else who
    return f"field {name}" if name else "manifest"


def in_shot(path: JsonPath) -> bool:
    return len(path) >= 2 and path[0] == "shots" and isinstance(path[1], int)


def field_name(parent: JsonPath, field: str | int | None) -> str | None:
    """The field a place is, dotted: within its shot (`size`, `matrix.light`) for a shot's, else
    from the top (`defaults.size`); None for a whole shot or the whole manifest."""
    parts = [str(part) for part in (parent[2:] if in_shot(parent) else parent)]
    if field is not None:
        parts.append(str(field))
    return ".".join(parts) or None


def show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value, default=str)
