"""Where a problem is in a manifest, said in words: the one vocabulary every check uses.

Takes a JSON path into the parsed manifest (`("shots", 3, "size")`); gives "shot s04, field
size" or "field defaults.size", and values shown the way a user wrote them.
"""

from __future__ import annotations

import json
from typing import Any

JsonPath = tuple[str | int, ...]
# No field takes a number anywhere near this long. A longer one (a 5000-digit seed) stands in as
# +-TOO_LONG, so the field's own check refuses it by name: Python will not even convert a number
# of more than 4300 digits, and a million-digit one would take seconds.
MAX_NUMBER_DIGITS = 40
TOO_LONG: int = 10**MAX_NUMBER_DIGITS


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
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= TOO_LONG:
        return f"a number of more than {MAX_NUMBER_DIGITS} digits"
    return json.dumps(value, default=str)


def bounded_int(digits: str) -> int:
    """An integer as JSON wrote it (`json.loads(..., parse_int=bounded_int)`); one longer than
    any field takes is +-TOO_LONG, refused by name where the field is checked.

        >>> bounded_int("-12"), show(bounded_int("9" * 5000))
        (-12, 'a number of more than 40 digits')
    """
    if len(digits.lstrip("+-").lstrip("0")) > MAX_NUMBER_DIGITS:
        return -TOO_LONG if digits.startswith("-") else TOO_LONG
    return int(digits)
