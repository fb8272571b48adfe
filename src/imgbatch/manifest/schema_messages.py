"""The JSON Schema of a manifest, and its errors told as a person would want to hear them.

Takes parsed manifest data and a way to locate a problem (`ProblemAt`: parent path, field,
message, at the key or the value); gives a `ManifestProblem` per schema violation, each saying
what was wrong and what would be right ("unknown field 'sed'; did you mean 'seed'?").
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

import fastjsonschema

from imgbatch.errors import ManifestProblem
from imgbatch.manifest.places import JsonPath, show

if TYPE_CHECKING:
    import jsonschema


class ProblemAt(Protocol):
    def __call__(
        self, parent: JsonPath, field: str | int | None, message: str, *, at_key: bool = False
    ) -> ManifestProblem: ...


@cache
def manifest_schema() -> dict[str, Any]:
    """The version-1 JSON Schema, as shipped inside the package."""
    text = resources.files("imgbatch").joinpath("schema/manifest.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _fast_validator() -> Callable[[Any], Any]:
    """The schema compiled to Python: valid manifests (the common case) pass in milliseconds.

    fastjsonschema stops at the first error, so invalid ones go on to jsonschema, which reports
    them all with their paths.
    """
    return fastjsonschema.compile(manifest_schema())


def schema_problems(data: Any, problem: ProblemAt) -> Iterator[ManifestProblem]:
    """Every schema violation in `data`, explained; nothing for a valid manifest."""
    try:
        _fast_validator()(data)
        return
    except fastjsonschema.JsonSchemaException:
        pass  # invalid: let jsonschema find and explain every problem
    # Imported only now: it costs more start-up than the rest of validation, and a valid
    # manifest (the common case) never needs it.
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    for error in validator.iter_errors(data):
        yield from _explain(error, problem)


_TYPE_NAMES = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
}
_PATTERN_HINTS = {
    "id": "use only letters, digits, '.', '_' and '-', not starting with '.'",
    "name": "use only letters, digits, '.', '_' and '-', not starting with '.'",
    "size": "write it as W*H, for example '1664*928'",
    "vars": "a variable name is letters, digits and '_', not starting with a digit",
    "matrix": "a variable name is letters, digits and '_', not starting with a digit",
    "dir": "a folder name without control characters (NUL, newline, tab, ...)",
    "reference_image": "a path or URL without control characters (NUL, newline, tab, ...)",
    "currency": "three capital letters, such as USD or CNY",
}


def _explain(error: jsonschema.ValidationError, problem: ProblemAt) -> Iterator[ManifestProblem]:
    path: JsonPath = tuple(error.absolute_path)
    parent, field = (path[:-1], path[-1]) if path else ((), None)
    # jsonschema types these as "maybe unset"; for errors from iter_errors they are set.
    kind: Any = error.validator
    value: Any = error.instance
    expected: Any = error.validator_value
    schema: Any = error.schema
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        for key in sorted(set(value) - set(allowed)):
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            yield problem(path, key, f"unknown field '{key}'; {hint}", at_key=True)
    elif kind == "required":
        for name in expected:
            if name not in value:
                yield problem(path, None, f"missing required field '{name}'")
    elif kind == "type":
        wanted = _TYPE_NAMES.get(expected, expected)
        yield problem(parent, field, f"expected {wanted}, got {show(value)}")
    elif kind == "pattern":
        hint = _PATTERN_HINTS.get(str(field), f"must match {expected}")
        yield problem(parent, field, f"{show(value)} is not valid: {hint}")
    elif kind in ("minimum", "maximum", "anyOf") and field == "seed":
        message = f"seed must be a whole number from 0 to 2147483647 or auto, got {show(value)}"
        yield problem(parent, field, message)
    elif kind == "anyOf" and field == "max_cost":
        message = f"must be an amount such as 5 or '5 USD', got {show(value)}"
        yield problem(parent, field, message)
    elif kind == "minimum":
        yield problem(parent, field, f"must be at least {expected}, got {show(value)}")
    elif kind == "maximum":
        yield problem(parent, field, f"must be at most {expected}, got {show(value)}")
    elif kind == "exclusiveMinimum":
        yield problem(parent, field, f"must be greater than {expected}, got {value}")
    elif kind == "const":
        message = f"unsupported version {show(value)}: this imgbatch reads version 1"
        yield problem(parent, field, message)
    elif kind == "enum":
        choices = ", ".join(str(choice) for choice in expected)
        yield problem(parent, field, f"{show(value)} is not one of: {choices}")
    elif kind == "minLength":
        yield problem(parent, field, "must not be empty")
    elif kind == "minItems":
        what = "add at least one shot" if path == ("shots",) else "give at least one value"
        yield problem(parent, field, f"the list is empty: {what}")
    elif kind == "minProperties":
        what = "one model's price" if field == "per_image" else "one variable"
        yield problem(parent, field, f"the mapping is empty: give at least {what}")
    elif kind == "maxLength":
        yield problem(parent, field, f"must be at most {expected} characters")
    else:
        yield problem(parent, field, error.message)
