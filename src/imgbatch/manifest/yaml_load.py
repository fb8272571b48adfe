"""Read a manifest file and parse its YAML, noting where every key and value stands.

Takes a path; gives a `Document` (plain data plus the (line, column) of each value and key by
JSON path) and the structural problems YAML itself hides (duplicate keys, bad merges), or raises
`ManifestError` for a file that cannot be a manifest at all (a folder, a FIFO, too large, not
UTF-8, not YAML, a YAML bomb).
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imgbatch.errors import ManifestError, ManifestProblem
from imgbatch.manifest.places import TOO_LONG, JsonPath, describe
from imgbatch.units.bounded import read_at_most

# A manifest is text a person or a script writes: far below these, and a file beyond them is a
# mistake or an attack (`/dev/zero`, a YAML alias bomb, a mapping nested thousands deep).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
MAX_ALIAS_VALUES = 1_000_000


def read_manifest_text(path: Path, display: str) -> str:
    """The file's text; a folder, FIFO, device or oversized file is refused before reading."""

    def problem(message: str) -> ManifestError:
        # About the file as a whole: no line or column to point at.
        return ManifestError([ManifestProblem(display, 0, 0, "file", message)])

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
            data = read_at_most(stream, MAX_MANIFEST_BYTES, info.st_size)
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


class Positions(dict[JsonPath, tuple[int, int]]):
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
class Document:
    data: Any
    values: Positions
    keys: Positions


def parse_yaml(
    text: str, display: str, track_positions: bool
) -> tuple[Document, list[ManifestProblem]]:
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
        # A scalar never closed (a quote left open) is found at the end of the file: the place
        # to fix is where it starts, which the context mark points at.
        scanning = (exc.context or "").startswith("while scanning")
        mark = (exc.context_mark if scanning else None) or exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        detail = exc.problem or str(exc)
        if scanning and "quoted scalar" in (exc.context or ""):
            detail = f"a quoted string starts here and is never closed ({detail})"
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
_STR_TAG = "tag:yaml.org,2002:str"
_QUOTED = frozenset({"'", '"'})


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
        self.document = Document(None, Positions(track_positions), Positions(track_positions))
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
        values = self.document.values
        # (Checked here, not only in Positions: a call per value was a tenth of the parse.)
        if values.tracking or (path and path[-1] == "reference_image"):
            values[path] = _position(event)
        if isinstance(event, yaml.AliasEvent):
            return self._alias(event, depth)
        if depth > MAX_DEPTH:
            self._refuse(event, f"nested more than {MAX_DEPTH} levels deep")
        start = self.produced
        result: Any
        height = 1
        if isinstance(event, yaml.ScalarEvent):
            result = self._scalar(event, path)
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

    def _merges(self, key_event: Any) -> bool:
        """Whether a key is the merge key: only a plain `<<` resolves to it, or a key tagged
        so (every other key is not resolved twice: once here, once as the key)."""
        if key_event.value != "<<" and key_event.tag is None:
            return False
        return self._tag(key_event) == _MERGE_TAG

    def _scalar(self, event: Any, path: JsonPath) -> Any:
        if event.style in _QUOTED and event.tag is None:
            return event.value  # a quoted string is its text: nothing to resolve or construct
        tag = self._tag(event)
        if tag == _STR_TAG:
            return event.value  # what SafeConstructor.construct_yaml_str gives
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark)
        try:
            value = self.loader.construct_object(node, deep=True)
        except (ValueError, OverflowError) as exc:
            # A number of 5000 digits (Python refuses to convert it), a date like 2024-13-45.
            if tag == "tag:yaml.org,2002:int":
                return -TOO_LONG if event.value.lstrip().startswith("-") else TOO_LONG
            where = describe(path[:-1], path[-1], None) if path else "YAML"
            kind = tag.rpartition(":")[2]
            line, column = _position(event)
            message = f"{event.value[:40]!r} reads as a {kind} that cannot be: {exc}; quote it"
            problem = ManifestProblem(self.display, line, column, where, message)
            raise ManifestError([problem]) from None
        finally:
            self.loader.constructed_objects.pop(node, None)
        return value

    def _mapping(self, path: JsonPath, depth: int) -> tuple[dict[str, Any], int]:
        mapping: dict[str, Any] = {}
        merges: list[Any] = []
        height = 1
        while not self.loader.check_event(yaml.MappingEndEvent):
            key_event = self.loader.peek_event()
            if isinstance(key_event, yaml.ScalarEvent) and self._merges(key_event):
                self.loader.get_event()
                merged, merged_height = self._node((*path, "<<"), depth + 1)
                height = max(height, merged_height)
                merges.extend(merged if isinstance(merged, list) else [merged])
                continue
            # Interned: every shot's mapping repeats the same few field names, and a
            # 100,000-shot list held 200,000 copies of "id" and "prompt" (10 MB).
            key = sys.intern(str(self.value((*path, "<key>"), depth + 1)))
            key_path = (*path, key)
            position = _position(key_event)
            if key in mapping:
                first = self.document.keys.get(key_path, (0, 0))[0]
                self.structural.append(
                    ManifestProblem(
                        self.display,
                        *position,
                        describe(path, key, None),
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
                    ManifestProblem(self.display, line, column, describe(path, "<<", None), message)
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
