"""Load a shot list: YAML with positions, the JSON Schema, then the model rules.

Takes a path to a version-1 manifest; gives a validated `Manifest` whose shots carry their
defaults merged in, or raises `ManifestError` listing every problem in the file at once, each at
file:line:column with the shot id and field, what was wrong and what would be right.

    >>> manifest = load_manifest("manifests/cyclist-spot.yaml")
    >>> [shot.id for shot in manifest.shots][:2]
    ['s01-dawn-road', 's02-dusk-portrait']
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastjsonschema
import yaml

from imgbatch.errors import ManifestError, ManifestProblem
from imgbatch.models import DEFAULT_MODEL, MODELS, nearest_size
from imgbatch.request import DEFAULT_SIZE, ImageRequest

if TYPE_CHECKING:
    import jsonschema

JsonPath = tuple[str | int, ...]
SHOT_FIELDS = (
    "model",
    "size",
    "negative_prompt",
    "style",
    "seed",
    "reference_image",
    "prompt_extend",
    "watermark",
)


@dataclass(frozen=True)
class Limits:
    concurrency: int | None = None
    rps: float | None = None


@dataclass(frozen=True)
class ShotSpec:
    """One shot as written, with `defaults` merged under its own fields."""

    id: str
    index: int
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    provider: str | None
    output_dir: str | None
    limits: Limits
    shots: tuple[ShotSpec, ...]

    @property
    def base_dir(self) -> Path:
        return self.path.parent


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


def load_manifest(path: str | Path) -> Manifest:
    """Parse, validate and merge a manifest; raise `ManifestError` with every problem found."""
    path = Path(path)
    display = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError([ManifestProblem(display, 1, 1, "file", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        problem = ManifestProblem(display, 1, 1, "file", f"cannot be read: {exc}")
        raise ManifestError([problem]) from None
    # Positions cost memory and time, and matter only when something is wrong: a valid manifest
    # is parsed once without them; an invalid one again with them, to locate every problem.
    for track_positions in (False, True):
        document, structural = _parse_yaml(text, display, track_positions)
        checker = _Checker(document, display, path.parent)
        # jsonschema reports a missing field once per required name: say each problem once.
        unique = dict.fromkeys([*structural, *checker.problems()])
        problems = sorted(unique, key=lambda p: (p.line, p.column))
        if not problems:
            return _build_manifest(path, document.data)
    raise ManifestError(problems)


# libyaml parses large shot lists many times faster than pure Python and keeps the same marks.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Positions(dict[JsonPath, tuple[int, int]]):
    """(line, column), 1-based, by path; records nothing when not tracking."""

    def __init__(self, tracking: bool) -> None:
        super().__init__()
        self.tracking = tracking

    def __setitem__(self, path: JsonPath, position: tuple[int, int]) -> None:
        if self.tracking:
            super().__setitem__(path, position)


@dataclass
class _Document:
    data: Any
    values: _Positions
    keys: _Positions


def _parse_yaml(
    text: str, display: str, track_positions: bool
) -> tuple[_Document, list[ManifestProblem]]:
    loader = _Loader(text)
    builder = _Builder(loader, display, track_positions)
    try:
        loader.get_event()  # stream start
        if loader.check_event(yaml.StreamEndEvent):
            raise ManifestError([ManifestProblem(display, 1, 1, "file", "the file is empty")])
        loader.get_event()  # document start
        builder.document.data = builder.value(())
        loader.get_event()  # document end
        if not loader.check_event(yaml.StreamEndEvent):
            line, column = _position(loader.peek_event())
            message = "a second YAML document ('---'); a manifest is one document"
            raise ManifestError([ManifestProblem(display, line, column, "file", message)])
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        detail = exc.problem or str(exc)
        problem = ManifestProblem(display, line, column, "YAML", f"{detail}; not valid YAML")
        raise ManifestError([problem]) from None
    finally:
        loader.dispose()
    return builder.document, builder.structural


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Builder:
    """Builds plain data straight from parser events, noting where each key and value stands.

    Working from events rather than a composed node tree keeps memory proportional to the data:
    a 100,000-shot manifest never holds half a million YAML nodes at once. Anchors, aliases and
    merge keys (`<<: *base`) behave as in PyYAML.
    """

    def __init__(self, loader: Any, display: str, track_positions: bool) -> None:
        self.loader = loader
        self.display = display
        self.document = _Document(None, _Positions(track_positions), _Positions(track_positions))
        self.anchors: dict[str, Any] = {}
        self.structural: list[ManifestProblem] = []  # duplicates, bad merges

    def value(self, path: JsonPath) -> Any:
        event: Any = self.loader.get_event()
        self.document.values[path] = _position(event)
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in self.anchors:
                mark: Any = event.start_mark
                problem = f"found undefined alias {event.anchor!r}"
                raise yaml.composer.ComposerError(None, None, problem, mark)
            return copy.deepcopy(self.anchors[event.anchor])
        result: Any
        if isinstance(event, yaml.ScalarEvent):
            result = self._scalar(event)
        elif isinstance(event, yaml.SequenceStartEvent):
            result = []
            while not self.loader.check_event(yaml.SequenceEndEvent):
                result.append(self.value((*path, len(result))))
            self.loader.get_event()
        else:
            result = self._mapping(path)
        if event.anchor:
            self.anchors[event.anchor] = result
        return result

    def _tag(self, event: Any) -> str:
        if event.tag is None or event.tag == "!":
            return str(self.loader.resolve(yaml.ScalarNode, event.value, event.implicit))
        return str(event.tag)

    def _scalar(self, event: Any) -> Any:
        node = yaml.ScalarNode(self._tag(event), event.value, event.start_mark, event.end_mark)
        value = self.loader.construct_object(node, deep=True)
        self.loader.constructed_objects.pop(node, None)
        return value

    def _mapping(self, path: JsonPath) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        merges: list[Any] = []
        while not self.loader.check_event(yaml.MappingEndEvent):
            key_event = self.loader.peek_event()
            if isinstance(key_event, yaml.ScalarEvent) and self._tag(key_event) == _MERGE_TAG:
                self.loader.get_event()
                merged = self.value((*path, "<<"))
                merges.extend(merged if isinstance(merged, list) else [merged])
                continue
            key = str(self.value((*path, "<key>")))
            key_path = (*path, key)
            position = _position(key_event)
            if key in mapping:
                first = self.document.keys.get(key_path, (0, 0))[0]
                self.structural.append(
                    ManifestProblem(
                        self.display,
                        *position,
                        _describe(path, key, None),
                        f"duplicate field '{key}' (first given on line {first}); keep one",
                    )
                )
                self.value((*path, "<duplicate>"))
                continue
            self.document.keys[key_path] = position
            mapping[key] = self.value(key_path)
        self.loader.get_event()
        self.document.values.pop((*path, "<key>"), None)
        self.document.values.pop((*path, "<duplicate>"), None)
        # Merged keys never override the mapping's own; earlier merge sources win over later.
        for source in merges:
            if not isinstance(source, dict):
                line, column = self.document.values.get((*path, "<<"), (0, 0))
                message = "a merge key (<<) takes a mapping or a list of mappings"
                self.structural.append(
                    ManifestProblem(
                        self.display, line, column, _describe(path, "<<", None), message
                    )
                )
                continue
            for key, value in source.items():
                mapping.setdefault(key, copy.deepcopy(value))
        return mapping


def _position(event: Any) -> tuple[int, int]:
    return event.start_mark.line + 1, event.start_mark.column + 1


def _describe(parent: JsonPath, field: str | int | None, shot_id: str | None) -> str:
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
}


class _Checker:
    """Collects schema and model-rule problems for one parsed document."""

    def __init__(self, document: _Document, display: str, base_dir: Path) -> None:
        self.document = document
        self.display = display
        self.base_dir = base_dir
        data = document.data
        shots = data.get("shots") if isinstance(data, dict) else None
        self.shots: list[Any] = shots if isinstance(shots, list) else []
        defaults = data.get("defaults") if isinstance(data, dict) else None
        self.defaults: dict[str, Any] = defaults if isinstance(defaults, dict) else {}
        self._from_defaults: dict[tuple[str, str], list[int]] = {}

    def problems(self) -> Iterator[ManifestProblem]:
        yield from self._schema_problems()
        yield from self._id_problems()
        for index, shot in enumerate(self.shots):
            if isinstance(shot, dict):
                for problem in self._shot_rule_problems(index, shot):
                    if problem is not _DEFERRED:
                        yield problem
        yield from self._defaults_problems()

    def _shot_id(self, path: JsonPath) -> str | None:
        if len(path) >= 2 and path[0] == "shots" and isinstance(path[1], int):
            if path[1] < len(self.shots) and isinstance(self.shots[path[1]], dict):
                shot_id = self.shots[path[1]].get("id")
                return shot_id if isinstance(shot_id, str) else None
        return None

    def _problem(
        self, parent: JsonPath, field: str | int | None, message: str, *, at_key: bool = False
    ) -> ManifestProblem:
        path = parent if field is None else (*parent, field)
        position = (self.document.keys.get(path) if at_key else None) or self.document.values.get(
            path, self.document.values.get(parent)
        )
        line, column = position or (1, 1)
        return ManifestProblem(
            self.display, line, column, _describe(parent, field, self._shot_id(path)), message
        )

    def _schema_problems(self) -> Iterator[ManifestProblem]:
        try:
            _fast_validator()(self.document.data)
            return
        except fastjsonschema.JsonSchemaException:
            pass  # invalid: let jsonschema find and explain every problem
        # Imported only now: it costs more start-up than the rest of validation, and a valid
        # manifest (the common case) never needs it.
        import jsonschema

        validator = jsonschema.Draft202012Validator(manifest_schema())
        for error in validator.iter_errors(self.document.data):
            yield from self._explain(error)

    def _explain(self, error: jsonschema.ValidationError) -> Iterator[ManifestProblem]:
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
                yield self._problem(path, key, f"unknown field '{key}'; {hint}", at_key=True)
        elif kind == "required":
            for name in expected:
                if name not in value:
                    yield self._problem(path, None, f"missing required field '{name}'")
        elif kind == "type":
            wanted = _TYPE_NAMES.get(expected, expected)
            yield self._problem(parent, field, f"expected {wanted}, got {_show(value)}")
        elif kind == "pattern":
            hint = _PATTERN_HINTS.get(str(field), f"must match {expected}")
            yield self._problem(parent, field, f"{_show(value)} is not valid: {hint}")
        elif kind in ("minimum", "maximum") and field == "seed":
            message = f"seed must be a whole number from 0 to 2147483647, got {_show(value)}"
            yield self._problem(parent, field, message)
        elif kind == "minimum":
            yield self._problem(parent, field, f"must be at least {expected}, got {_show(value)}")
        elif kind == "maximum":
            yield self._problem(parent, field, f"must be at most {expected}, got {_show(value)}")
        elif kind == "exclusiveMinimum":
            yield self._problem(parent, field, f"must be greater than {expected}, got {value}")
        elif kind == "const":
            message = f"unsupported version {_show(value)}: this imgbatch reads version 1"
            yield self._problem(parent, field, message)
        elif kind == "enum":
            choices = ", ".join(str(choice) for choice in expected)
            yield self._problem(parent, field, f"{_show(value)} is not one of: {choices}")
        elif kind == "minLength":
            yield self._problem(parent, field, "must not be empty")
        elif kind == "minItems":
            yield self._problem(parent, field, "the list is empty: add at least one shot")
        elif kind == "maxLength":
            yield self._problem(parent, field, f"must be at most {expected} characters")
        else:
            yield self._problem(parent, field, error.message)

    def _id_problems(self) -> Iterator[ManifestProblem]:
        # Ids become file names: two ids differing only in case would overwrite each other on
        # case-insensitive file systems (macOS, Windows).
        seen: dict[str, int] = {}
        for index, shot in enumerate(self.shots):
            shot_id = shot.get("id") if isinstance(shot, dict) else None
            if not isinstance(shot_id, str):
                continue
            folded = shot_id.casefold()
            if folded in seen:
                first = seen[folded]
                line = self.document.values.get(("shots", first, "id"), (0, 0))[0]
                message = (
                    f"id '{shot_id}' is already used by shots[{first}] on line {line}; "
                    "ids must be unique (ignoring case)"
                )
                yield self._problem(("shots", index), "id", message)
            else:
                seen[folded] = index

    def _field_origin(self, index: int, shot: dict[str, Any], field: str) -> JsonPath:
        """Where a merged field was written: on the shot, or under defaults."""
        if field in shot or field not in self.defaults:
            return ("shots", index)
        return ("defaults",)

    def _shot_rule_problems(self, index: int, shot: dict[str, Any]) -> Iterator[ManifestProblem]:
        merged = {**self.defaults, **shot}
        model = merged.get("model", DEFAULT_MODEL)
        if not isinstance(model, str):
            return
        spec = MODELS.get(model)
        if spec is None:
            close = difflib.get_close_matches(model, list(MODELS), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(MODELS)}"
            origin = self._field_origin(index, shot, "model")
            yield self._located(origin, index, "model", f"unknown model '{model}'; {hint}")
            return
        size = merged.get("size", DEFAULT_SIZE)
        if isinstance(size, str) and re.fullmatch(r"[0-9]+\*[0-9]+", size):
            if size not in spec.sizes:
                message = (
                    f"size '{size}' is not supported by {model}; supported: "
                    f"{', '.join(spec.sizes)}; nearest by aspect ratio: "
                    f"{nearest_size(size, spec.sizes)}"
                )
                origin = self._field_origin(index, shot, "size")
                yield self._located(origin, index, "size", message)
        prompt, style = merged.get("prompt"), merged.get("style")
        if isinstance(prompt, str):
            sent = len(ImageRequest(prompt, style=style if isinstance(style, str) else None).text)
            if sent > spec.max_prompt_chars:
                with_style = " with its style appended" if isinstance(style, str) else ""
                message = (
                    f"prompt{with_style} is {sent} characters; {model} takes at most "
                    f"{spec.max_prompt_chars}"
                )
                yield self._located(("shots", index), index, "prompt", message)
        negative = merged.get("negative_prompt")
        if isinstance(negative, str) and len(negative) > spec.max_negative_prompt_chars:
            message = (
                f"negative_prompt is {len(negative)} characters; {model} takes at most "
                f"{spec.max_negative_prompt_chars}"
            )
            origin = self._field_origin(index, shot, "negative_prompt")
            yield self._located(origin, index, "negative_prompt", message)
        reference = merged.get("reference_image")
        if isinstance(reference, str) and reference and not _is_url(reference):
            resolved = self.base_dir / reference
            if not resolved.is_file():
                message = (
                    f"reference image '{reference}' not found (looked for {resolved}); "
                    "give a path relative to the manifest or an http(s) URL"
                )
                origin = self._field_origin(index, shot, "reference_image")
                yield self._located(origin, index, "reference_image", message)

    def _located(self, origin: JsonPath, index: int, field: str, message: str) -> ManifestProblem:
        if origin == ("defaults",):
            self._from_defaults.setdefault((field, message), []).append(index)
            return _DEFERRED
        return self._problem(origin, field, message)

    def _defaults_problems(self) -> Iterator[ManifestProblem]:
        """A bad default is one mistake, however many shots inherit it: say it once."""
        for (field, message), indexes in self._from_defaults.items():
            names = [self._shot_id(("shots", index)) or f"shots[{index}]" for index in indexes]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problem = self._problem(("defaults",), field, message)
            yield ManifestProblem(
                problem.file,
                problem.line,
                problem.column,
                f"{problem.where} (used by shot{'s' if len(names) > 1 else ''} {shown})",
                message,
            )


_DEFERRED = ManifestProblem("", 0, 0, "", "")


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value, default=str)


def _build_manifest(path: Path, data: dict[str, Any]) -> Manifest:
    defaults = data.get("defaults", {})
    shots = tuple(
        ShotSpec(
            id=shot["id"],
            index=index,
            fields={**defaults, **shot},
        )
        for index, shot in enumerate(data["shots"])
    )
    limits = data.get("limits", {})
    return Manifest(
        path=path,
        name=data.get("name", path.stem),
        provider=data.get("provider"),
        output_dir=data.get("output", {}).get("dir"),
        limits=Limits(limits.get("concurrency"), limits.get("rps")),
        shots=shots,
    )


def manifest_from_data(data: Any, *, display: str, base_dir: Path) -> Manifest:
    """Validate an already-parsed manifest by the same rules as a file: a dict from a Python
    caller, or a single `generate` request wrapped as a one-shot manifest. There are no lines to
    point at, so each problem names its field; relative paths are taken from `base_dir`."""
    document = _Document(data, _Positions(False), _Positions(False))
    checker = _Checker(document, display, base_dir)
    problems = [replace(problem, line=0, column=0) for problem in checker.problems()]
    if problems:
        raise ManifestError(list(dict.fromkeys(problems)))
    return _build_manifest(base_dir / display, data)
