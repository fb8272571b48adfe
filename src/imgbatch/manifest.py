"""Load a shot list: YAML with positions, the JSON Schema, then the model rules.

Takes a path to a version-1 manifest; gives a validated `Manifest` whose shots carry their
defaults merged in, or raises `ManifestError` listing every problem in the file at once, each at
file:line:column with the shot id and field, what was wrong and what would be right.

    >>> manifest = load_manifest("manifests/cyclist-spot.yaml")
    >>> [shot.id for shot in manifest.shots][:2]
    ['s01-dawn-road', 's02-dusk-portrait']
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastjsonschema
import yaml

from imgbatch.errors import ManifestError, ManifestProblem
from imgbatch.models import DEFAULT_MODEL, MIN_RPS, MODELS, nearest_size
from imgbatch.reference import ReferenceImage, ReferenceProblem, load_local_reference
from imgbatch.request import DEFAULT_SIZE, ImageRequest

if TYPE_CHECKING:
    import jsonschema

JsonPath = tuple[str | int, ...]
# A manifest is text a person or a script writes: far below these, and a file beyond them is a
# mistake or an attack (`/dev/zero`, a YAML alias bomb, a mapping nested thousands deep).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
MAX_ALIAS_VALUES = 1_000_000
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
    # Local references, checked and hashed while validating, by the path as written.
    references: Mapping[str, ReferenceImage] = dataclasses.field(default_factory=dict)
    allow_reference_outside: bool = False
    # Where each reference_image was written, by (shot index | "defaults", field): (line, col).
    positions: Mapping[JsonPath, tuple[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def position_of(self, shot: ShotSpec, name: str) -> tuple[int, int]:
        """Where `name` was written for `shot` (on the shot or under defaults); else (1, 1)."""
        for path in (("shots", shot.index, name), ("defaults", name)):
            if path in self.positions:
                return self.positions[path]
        return (1, 1)


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


def load_manifest(path: str | Path, *, allow_reference_outside: bool = False) -> Manifest:
    """Parse, validate and merge a manifest; raise `ManifestError` with every problem found.

    `allow_reference_outside` lets local reference images lie outside the manifest's folder
    tree (a trust decision; the manifest can also say so itself, see the README).
    """
    path = Path(path)
    display = str(path)
    text = _read_manifest(path, display)
    references: dict[str, ReferenceImage | str] = {}
    # Positions cost memory and time, and matter only when something is wrong: a valid manifest
    # is parsed once without them; an invalid one again with them, to locate every problem.
    for track_positions in (False, True):
        document, structural = _parse_yaml(text, display, track_positions)
        checker = _Checker(document, display, path.parent, allow_reference_outside, references)
        # jsonschema reports a missing field once per required name: say each problem once.
        unique = dict.fromkeys([*structural, *checker.problems()])
        problems = sorted(unique, key=lambda p: (p.line, p.column))
        if not problems:
            return _build_manifest(path, document, checker)
    raise ManifestError(problems)


def _read_manifest(path: Path, display: str) -> str:
    """The file's text; a folder, FIFO, device or oversized file is refused before reading."""

    def problem(message: str) -> ManifestError:
        return ManifestError([ManifestProblem(display, 1, 1, "file", message)])

    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise problem("is a folder; give the manifest's YAML file")
        if not stat.S_ISREG(info.st_mode):
            raise problem("is not a regular file (a FIFO, device or socket); it was not read")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise problem(f"is {info.st_size} bytes; a manifest may be at most 64 MiB")
        # O_NONBLOCK: a file swapped for a FIFO after the stat must not block the open.
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(handle, "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise problem("is not a regular file (a FIFO, device or socket); it was not read")
            data = stream.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise problem("no such file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise problem(f"cannot be read: {exc}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise problem("is larger than 64 MiB; a manifest may be at most 64 MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise problem(f"cannot be read: {exc}") from None


# libyaml parses large shot lists many times faster than pure Python and keeps the same marks.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Positions(dict[JsonPath, tuple[int, int]]):
    """(line, column), 1-based, by path; when not tracking, only those of reference_image.

    Reference URLs are fetched after validation: their errors still point at the field.
    """

    def __init__(self, tracking: bool) -> None:
        super().__init__()
        self.tracking = tracking

    def __setitem__(self, path: JsonPath, position: tuple[int, int]) -> None:
        if self.tracking or (path and path[-1] == "reference_image"):
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
    except yaml.reader.ReaderError as exc:  # a NUL or other control character
        line, column = _reader_position(text, exc.position)
        message = f"character {exc.character!r} is not allowed in YAML ({exc.reason})"
        raise ManifestError([ManifestProblem(display, line, column, "YAML", message)]) from None
    finally:
        loader.dispose()
    return builder.document, builder.structural


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Builder:
    """Builds plain data straight from parser events, noting where each key and value stands.

    Working from events rather than a composed node tree keeps memory proportional to the data:
    a 100,000-shot manifest never holds half a million YAML nodes at once. Anchors, aliases and
    merge keys (`<<: *base`) behave as in PyYAML, except that an alias shares its anchor's value
    instead of copying it (nothing mutates parsed data) and that what aliases expand to is
    bounded: at most MAX_ALIAS_VALUES values in all, and nothing deeper than MAX_DEPTH. A
    "billion laughs" file is refused at the alias that crosses the bound, before anything walks
    the data it would expand to.
    """

    def __init__(self, loader: Any, display: str, track_positions: bool) -> None:
        self.loader = loader
        self.display = display
        self.document = _Document(None, _Positions(track_positions), _Positions(track_positions))
        # anchor -> (value, values it holds once expanded, nesting depth)
        self.anchors: dict[str, tuple[Any, int, int]] = {}
        self.produced = 0  # values built so far, aliases counted as what they expand to
        self.aliased = 0  # of which produced by aliases
        self.structural: list[ManifestProblem] = []  # duplicates, bad merges

    def value(self, path: JsonPath, depth: int = 1) -> Any:
        return self._node(path, depth)[0]

    def _node(self, path: JsonPath, depth: int) -> tuple[Any, int]:
        """The value at `path` and its height (1 for a scalar)."""
        event: Any = self.loader.get_event()
        self.document.values[path] = _position(event)
        if isinstance(event, yaml.AliasEvent):
            return self._alias(event, depth)
        if depth > MAX_DEPTH:
            self._refuse(event, f"nested more than {MAX_DEPTH} levels deep")
        start = self.produced
        result: Any
        height = 1
        if isinstance(event, yaml.ScalarEvent):
            result = self._scalar(event)
        elif isinstance(event, yaml.SequenceStartEvent):
            result = []
            while not self.loader.check_event(yaml.SequenceEndEvent):
                item, item_height = self._node((*path, len(result)), depth + 1)
                result.append(item)
                height = max(height, item_height + 1)
            self.loader.get_event()
        else:
            result, height = self._mapping(path, depth)
        self.produced += 1
        if event.anchor:
            self.anchors[event.anchor] = (result, self.produced - start, height)
        return result, height

    def _alias(self, event: Any, depth: int) -> tuple[Any, int]:
        if event.anchor not in self.anchors:
            problem = f"found undefined alias {event.anchor!r}"
            raise yaml.composer.ComposerError(None, None, problem, event.start_mark)
        value, size, height = self.anchors[event.anchor]
        if depth + height - 1 > MAX_DEPTH:
            self._refuse(event, f"alias *{event.anchor} nests the data more than {MAX_DEPTH} deep")
        self.aliased += size
        if self.aliased > MAX_ALIAS_VALUES:
            self._refuse(
                event,
                f"aliases expand to more than {MAX_ALIAS_VALUES:,} values (at *{event.anchor}); "
                "a manifest this size is a mistake or a YAML bomb",
            )
        self.produced += size
        return value, height

    def _refuse(self, event: Any, message: str) -> None:
        line, column = _position(event)
        raise ManifestError([ManifestProblem(self.display, line, column, "YAML", message)])

    def _tag(self, event: Any) -> str:
        if event.tag is None or event.tag == "!":
            return str(self.loader.resolve(yaml.ScalarNode, event.value, event.implicit))
        return str(event.tag)

    def _scalar(self, event: Any) -> Any:
        node = yaml.ScalarNode(self._tag(event), event.value, event.start_mark, event.end_mark)
        value = self.loader.construct_object(node, deep=True)
        self.loader.constructed_objects.pop(node, None)
        return value

    def _mapping(self, path: JsonPath, depth: int) -> tuple[dict[str, Any], int]:
        mapping: dict[str, Any] = {}
        merges: list[Any] = []
        height = 1
        while not self.loader.check_event(yaml.MappingEndEvent):
            key_event = self.loader.peek_event()
            if isinstance(key_event, yaml.ScalarEvent) and self._tag(key_event) == _MERGE_TAG:
                self.loader.get_event()
                merged, merged_height = self._node((*path, "<<"), depth + 1)
                height = max(height, merged_height)
                merges.extend(merged if isinstance(merged, list) else [merged])
                continue
            key = str(self.value((*path, "<key>"), depth + 1))
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
                self.value((*path, "<duplicate>"), depth + 1)
                continue
            self.document.keys[key_path] = position
            mapping[key], item_height = self._node(key_path, depth + 1)
            height = max(height, item_height + 1)
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
                mapping.setdefault(key, value)
        return mapping, height


def _position(event: Any) -> tuple[int, int]:
    return event.start_mark.line + 1, event.start_mark.column + 1


def _reader_position(text: str, position: int) -> tuple[int, int]:
    # libyaml counts bytes of UTF-8, the pure-Python reader characters.
    if _Loader is not yaml.SafeLoader:
        prefix = text.encode("utf-8", "surrogatepass")[:position].decode("utf-8", "replace")
    else:
        prefix = text[:position]
    return prefix.count("\n") + 1, len(prefix) - (prefix.rfind("\n") + 1) + 1


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
    "dir": "a folder name without control characters (NUL, newline, tab, ...)",
    "reference_image": "a path or URL without control characters (NUL, newline, tab, ...)",
}


class _Checker:
    """Collects schema and model-rule problems for one parsed document."""

    def __init__(
        self,
        document: _Document,
        display: str,
        base_dir: Path,
        allow_reference_outside: bool,
        references: dict[str, ReferenceImage | str],
    ) -> None:
        self.document = document
        self.display = display
        self.base_dir = base_dir
        data = document.data
        trust = data.get("trust") if isinstance(data, dict) else None
        self.allow_reference_outside = allow_reference_outside or (
            isinstance(trust, dict) and trust.get("references_outside") is True
        )
        # Each distinct reference is checked and read once per load, across both passes.
        self.references = references
        shots = data.get("shots") if isinstance(data, dict) else None
        self.shots: list[Any] = shots if isinstance(shots, list) else []
        defaults = data.get("defaults") if isinstance(data, dict) else None
        self.defaults: dict[str, Any] = defaults if isinstance(defaults, dict) else {}
        self._from_defaults: dict[tuple[str, str], list[int]] = {}

    def problems(self) -> Iterator[ManifestProblem]:
        yield from self._schema_problems()
        yield from self._limits_problems()
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

    def _limits_problems(self) -> Iterator[ManifestProblem]:
        # JSON Schema's minimum lets NaN through (every comparison with it is false) and has no
        # finite maximum to set: a NaN rate sends nothing, ever; an infinite one divides by zero.
        data = self.document.data
        limits = data.get("limits") if isinstance(data, dict) else None
        rps = limits.get("rps") if isinstance(limits, dict) else None
        if isinstance(rps, float) and not math.isfinite(rps):
            message = f"must be a finite number of requests per second (at least {MIN_RPS})"
            yield self._problem(("limits",), "rps", f"{message}, got {_show(rps)}")

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
            checked = self._reference(reference)
            if isinstance(checked, str):
                origin = self._field_origin(index, shot, "reference_image")
                yield self._located(origin, index, "reference_image", checked)

    def _reference(self, written: str) -> ReferenceImage | str:
        """The checked reference, or what is wrong with it; each file is read once per load."""
        if written not in self.references:
            try:
                self.references[written] = load_local_reference(
                    written, self.base_dir, allow_outside=self.allow_reference_outside
                )
            except ReferenceProblem as exc:
                message = f"reference image '{written}' {exc}"
                if str(exc).startswith("not found"):
                    message += "; give a path relative to the manifest or an http(s) URL"
                self.references[written] = message
        return self.references[written]

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


def _build_manifest(path: Path, document: _Document, checker: _Checker) -> Manifest:
    data: dict[str, Any] = document.data
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
    references = {
        written: reference
        for written, reference in checker.references.items()
        if isinstance(reference, ReferenceImage)
    }
    return Manifest(
        path=path,
        name=data.get("name", path.stem),
        provider=data.get("provider"),
        output_dir=data.get("output", {}).get("dir"),
        limits=Limits(limits.get("concurrency"), limits.get("rps")),
        shots=shots,
        references=references,
        allow_reference_outside=checker.allow_reference_outside,
        positions=dict(document.values),
    )


def manifest_from_data(
    data: Any, *, display: str, base_dir: Path, allow_reference_outside: bool = False
) -> Manifest:
    """Validate an already-parsed manifest by the same rules as a file: a dict from a Python
    caller, or a single `generate` request wrapped as a one-shot manifest. There are no lines to
    point at, so each problem names its field; relative paths are taken from `base_dir`, and
    local references must lie under it unless `allow_reference_outside`."""
    document = _Document(data, _Positions(False), _Positions(False))
    checker = _Checker(document, display, base_dir, allow_reference_outside, {})
    problems = [replace(problem, line=0, column=0) for problem in checker.problems()]
    if problems:
        raise ManifestError(list(dict.fromkeys(problems)))
    return _build_manifest(base_dir / display, document, checker)
