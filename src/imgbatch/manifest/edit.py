"""Review decisions written into the shot list: `reroll` (a new seed) and `pick` (a chosen take).

Takes a manifest's path and shot ids as the contact sheet or a person names them; gives what
changed, having rewritten the file atomically (a temporary file beside it, then a rename). Only
the characters of the edited value change, or one line is added: comments, key order, quoting,
blank lines and line endings stay as they were, so the change reads as one line in a diff. The
new text is parsed again and must equal the old data with exactly this edit made, or nothing is
written.

A seed that comes from `defaults:` (or a merge key) is overridden on the shot itself, which
changes that shot only. A value that other shots share is refused, saying what to edit instead:
a matrix combination's seed is its written shot's (all combinations share it), a variant's seed
is one of a run (seed, seed+1, ...). Every problem is found before anything is written.

    >>> import random, shutil, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> path = shutil.copy("manifests/variants.yaml", folder)
    >>> [str(change) for change in pick(path, ["poster-2"])]
    ['poster: pick 2 (poster-2)']
    >>> [str(change) for change in reroll(path, ["poster"], rng=random.Random(1))]
    ['poster: seed 40 -> 288545018 (3 takes)']
"""

from __future__ import annotations

import difflib
import os
import random
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgbatch.errors import ManifestError, ManifestProblem
from imgbatch.manifest.catalogue import SEED_MAX
from imgbatch.manifest.loader import Manifest, ShotSpec, load_manifest
from imgbatch.manifest.yaml_load import parse_yaml, read_manifest_text

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class SeedChange:
    """`reroll` of one written shot: its id as named, the seed it had and the one it has now."""

    shot: str
    old: int | None
    new: int
    takes: int = 1  # a shot with variants: all its takes get new seeds

    def __str__(self) -> str:
        old = "no seed" if self.old is None else f"seed {self.old}"
        takes = f" ({self.takes} takes)" if self.takes > 1 else ""
        return f"{self.shot}: {old} -> {self.new}{takes}"


@dataclass(frozen=True)
class PickChange:
    """`pick` of one take: the id its variants share, the take's number and id."""

    shot: str
    take: int
    take_id: str
    old: int | None = None

    def __str__(self) -> str:
        was = f", was {self.old}" if self.old not in (None, self.take) else ""
        return f"{self.shot}: pick {self.take} ({self.take_id}{was})"


@dataclass
class _Value:
    start: int  # character offsets of the value in the text
    end: int
    alias: bool


@dataclass
class _Place:
    """Where one written shot (a mapping under `shots:`) stands in the text."""

    line: int
    column: int
    flow: bool
    keys: dict[str, _Value] = field(default_factory=dict)
    key_columns: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Edit:
    index: int  # shots[index]
    name: str  # the field set on it
    value: int


def reroll(
    path: str | Path,
    ids: Iterable[str],
    *,
    rng: random.Random | None = None,
    allow_reference_outside: bool = False,
) -> tuple[SeedChange, ...]:
    """Give each named shot a new random seed, written into the manifest.

    The next apply makes a new take of those shots only (their request keys change); their old
    takes stay in the cache, so reverting the edit restores them without a request. A shot
    with variants is named by the id they share (`poster`) and all its takes are rerolled.
    """
    draw = rng or random.SystemRandom()
    editor = _Editor(Path(path), "reroll", allow_reference_outside)
    changes: list[SeedChange] = []
    for shot_id in dict.fromkeys(ids):
        found = editor.find(shot_id)
        if found is None:
            continue
        spec, takes = found
        if not editor.seed_is_its_own(shot_id, spec, takes):
            continue
        old = _seed_written(editor.manifest, spec, takes)
        new = draw.randint(0, SEED_MAX - takes + 1)
        while new == old:
            new = draw.randint(0, SEED_MAX - takes + 1)
        if editor.set(spec, "seed", new):
            changes.append(SeedChange(shot_id, old, new, takes))
    editor.write()
    return tuple(changes)


def pick(
    path: str | Path, take_ids: Iterable[str], *, allow_reference_outside: bool = False
) -> tuple[PickChange, ...]:
    """Record the chosen take of each named shot (`poster-2`) as `pick: 2` on its shot.

    Apply then also writes that take as `<shot>.png` (`poster.png`), for pipelines that want one
    image per shot.
    """
    editor = _Editor(Path(path), "pick", allow_reference_outside)
    changes: dict[str, PickChange] = {}
    for take_id in dict.fromkeys(take_ids):
        found = editor.find(take_id, bases=False)
        if found is None:
            continue
        spec, _ = found
        if spec.variant is None or spec.base_id is None or spec.values:
            editor.refuse(spec, take_id, _not_a_take(spec))
            continue
        if spec.base_id in changes:
            other = changes[spec.base_id].take_id
            message = f"{other} and {take_id} are takes of the same shot: pick one of them"
            editor.refuse(spec, take_id, message)
            continue
        written = editor.written(spec).get("pick")
        old = written if isinstance(written, int) else None
        if editor.set(spec, "pick", spec.variant):
            changes[spec.base_id] = PickChange(spec.base_id, spec.variant, take_id, old)
    editor.write()
    return tuple(changes.values())


class _Editor:
    """Finds shots, plans edits as text splices, checks and writes them all at once."""

    def __init__(self, path: Path, verb: str, allow_reference_outside: bool) -> None:
        self.path = path
        self.verb = verb
        self.manifest = load_manifest(path, allow_reference_outside=allow_reference_outside)
        self.text = read_manifest_text(path, str(path))
        self.places = _shot_places(self.text)
        self.by_id = {spec.id: spec for spec in self.manifest.shots}
        self.bases: dict[str, list[ShotSpec]] = {}
        for spec in self.manifest.shots:
            if spec.base_id is not None and not spec.values:
                self.bases.setdefault(spec.base_id, []).append(spec)
        self.edits: dict[tuple[int, str], _Edit] = {}
        self.problems: list[ManifestProblem] = []
        self.data = self._data()
        defaults = self.data.get("defaults")
        self.manifest_defaults: dict[str, Any] = defaults if isinstance(defaults, dict) else {}

    def written(self, spec: ShotSpec) -> dict[str, Any]:
        """The shot as written in the file (before defaults and expansion)."""
        shot: dict[str, Any] = self.data["shots"][spec.index]
        return shot

    def _data(self) -> Any:
        document, _ = parse_yaml(self.text, str(self.path), False)
        return document.data

    def find(self, shot_id: str, *, bases: bool = True) -> tuple[ShotSpec, int] | None:
        """The shot an id names, and how many takes an edit of it changes."""
        if shot_id in self.by_id:
            return self.by_id[shot_id], 1
        if bases and shot_id in self.bases:
            return self.bases[shot_id][0], len(self.bases[shot_id])
        known = [*self.by_id, *(self.bases if bases else ())]
        close = difflib.get_close_matches(shot_id, known, n=3, cutoff=0.8)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        message = f"no such shot in {self.path}{hint}"
        self.problems.append(ManifestProblem(str(self.path), 0, 0, f"shot {shot_id}", message))
        return None

    def seed_is_its_own(self, shot_id: str, spec: ShotSpec, takes: int) -> bool:
        """Whether a seed written on `spec`'s shot changes only what `shot_id` names."""
        shared = [other for other in self.manifest.shots if other.index == spec.index]
        if spec.values:
            written = self.written(spec).get("id")
            message = (
                f"one combination of the matrix of shots[{spec.index}] ('{written}', "
                f"{len(shared)} shots), which share one seed: to reroll all {len(shared)}, "
                f"set a new seed: on that shot; to reroll only {shot_id}, take it out of the "
                "matrix into a shot of its own"
            )
            self.refuse(spec, shot_id, message)
            return False
        if spec.variant is not None and takes == 1:
            count = len(shared)
            seed = self.written(spec).get("seed", self.manifest_defaults.get("seed"))
            seeds = (
                "each with its own auto seed"
                if seed == "auto"
                else f"seeds {shared[0].fields.get('seed')} to {shared[-1].fields.get('seed')}"
            )
            message = (
                f"take {spec.variant} of shot '{spec.base_id}' (variants: {count}, {seeds}), "
                f"whose seeds all come from that shot's: reroll '{spec.base_id}' for new takes "
                f"of all {count}, or raise variants: to {count + 1} for one more take"
            )
            self.refuse(spec, shot_id, message)
            return False
        return True

    def refuse(self, spec: ShotSpec, named: str, message: str) -> None:
        place = self.places[spec.index] if spec.index < len(self.places) else None
        line, column = (place.line, place.column) if place else (0, 0)
        where = f"shot {named}"
        self.problems.append(ManifestProblem(str(self.path), line, column, where, message))

    def set(self, spec: ShotSpec, name: str, value: int) -> bool:
        """Plan `name: value` on `spec`'s written shot; False (with a problem) when it cannot."""
        place = self.places[spec.index] if spec.index < len(self.places) else None
        written = self.written(spec).get("id")
        if place is None:
            message = f"shots[{spec.index}] is written as an alias (*name); edit it by hand"
            self.refuse(spec, str(written), message)
            return False
        current = place.keys.get(name)
        if current is not None and current.alias:
            message = f"its {name}: is an alias (*name); set {name}: {value} by hand"
            self.refuse(spec, str(written), message)
            return False
        if (spec.index, name) in self.edits:
            return False  # named twice (a shot and one of its takes): once is enough
        self.edits[(spec.index, name)] = _Edit(spec.index, name, value)
        return True

    def write(self) -> None:
        if self.problems:
            raise ManifestError(self.problems, subject=f"the {self.verb}")
        if not self.edits:
            return
        new = self.text
        splices = [self._splice(edit) for edit in self.edits.values()]
        for start, end, replacement in sorted(splices, reverse=True):
            new = new[:start] + replacement + new[end:]
        expected = self._data()  # a fresh copy to change
        for edit in self.edits.values():
            expected["shots"][edit.index][edit.name] = edit.value
        document, _ = parse_yaml(new, str(self.path), False)
        if document.data != expected:  # never write what was not meant
            fields = ", ".join(f"shots[{e.index}].{e.name}: {e.value}" for e in self.edits.values())
            raise ManifestError(
                [
                    ManifestProblem(
                        str(self.path),
                        0,
                        0,
                        "file",
                        f"this file's layout cannot be edited safely; set {fields} by hand",
                    )
                ],
                subject=f"the {self.verb}",
            )
        _replace_text(self.path, self.text, new)

    def _splice(self, edit: _Edit) -> tuple[int, int, str]:
        place = self.places[edit.index]
        assert place is not None  # set() refused an alias
        current = place.keys.get(edit.name)
        if current is not None:
            return current.start, current.end, str(edit.value)
        anchor_name = "variants" if "variants" in place.keys and edit.name == "pick" else "id"
        anchor = place.keys.get(anchor_name) or place.keys["id"]
        if place.flow:
            return anchor.end, anchor.end, f", {edit.name}: {edit.value}"
        column = place.key_columns.get(anchor_name, place.key_columns.get("id", place.column))
        text = self.text
        if text[anchor.end - 1 : anchor.end] == "\n":
            at = anchor.end
        else:
            newline_at = text.find("\n", anchor.end)
            at = len(text) if newline_at < 0 else newline_at + 1
        newline = "\r\n" if text[max(0, at - 2) : at] == "\r\n" else "\n"
        lead = "" if text[at - 1 : at] == "\n" or at == 0 else newline
        return at, at, f"{lead}{' ' * column}{edit.name}: {edit.value}{newline}"


def _seed_written(manifest: Manifest, spec: ShotSpec, takes: int) -> int | None:
    """The seed of the shot as it stands (the first take's, for a shot with variants)."""
    if takes > 1:
        spec = next(other for other in manifest.shots if other.index == spec.index)
    seed = spec.fields.get("seed")
    return int(seed) if isinstance(seed, int | float) else None


def _not_a_take(spec: ShotSpec) -> str:
    if spec.values and spec.variant is not None:
        return (
            "a take of a matrix combination: a pick there would choose the same take of every "
            "combination; write the combination as a shot of its own to pick among its takes"
        )
    return (
        "not one of a shot's takes: pick names a take of a shot with variants: N, as "
        "<id>-<number> (poster-2 is the second take of a shot poster with variants: 3)"
    )


def _shot_places(text: str) -> list[_Place | None]:
    """Where each item of the top-level `shots:` list stands (None for an alias item)."""
    loader = _Loader(text)
    try:
        for expected in (yaml.StreamStartEvent, yaml.DocumentStartEvent, yaml.MappingStartEvent):
            if not isinstance(loader.get_event(), expected):
                return []
        while not loader.check_event(yaml.MappingEndEvent):
            key = loader.get_event()
            if isinstance(key, yaml.ScalarEvent) and key.value == "shots":
                if loader.check_event(yaml.SequenceStartEvent):
                    loader.get_event()
                    return _items(loader)
            _skip(loader)
        return []
    finally:
        loader.dispose()


def _items(loader: Any) -> list[_Place | None]:
    places: list[_Place | None] = []
    while not loader.check_event(yaml.SequenceEndEvent):
        if not loader.check_event(yaml.MappingStartEvent):
            _skip(loader)
            places.append(None)
            continue
        start: Any = loader.get_event()
        place = _Place(start.start_mark.line + 1, start.start_mark.column + 1, start.flow_style)
        while not loader.check_event(yaml.MappingEndEvent):
            key: Any = loader.get_event()
            value: Any = loader.peek_event()
            if isinstance(key, yaml.ScalarEvent) and key.value not in place.keys:
                # Only a scalar written here can be replaced in place (an alias's text is
                # its anchor's, elsewhere).
                alias = not isinstance(value, yaml.ScalarEvent)
                place.keys[key.value] = _Value(value.start_mark.index, value.end_mark.index, alias)
                mark: Any = key.start_mark
                place.key_columns[key.value] = mark.column
            _skip(loader)
        loader.get_event()
        places.append(place)
    return places


def _skip(loader: Any) -> None:
    """Consume one node's events (a scalar, an alias, or a whole collection)."""
    depth = 0
    while True:
        event = loader.get_event()
        if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            depth += 1
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            depth -= 1
        if depth == 0:
            return


def _replace_text(path: Path, before: str, after: str) -> None:
    """Write `after` in place of the file, atomically; refused if the file changed meanwhile."""
    target = Path(os.path.realpath(path))  # a linked manifest: edit the file it names
    if read_manifest_text(target, str(path)) != before:
        message = "the file changed while it was being edited; nothing was written: try again"
        raise ManifestError([ManifestProblem(str(path), 0, 0, "file", message)])
    mode = target.stat().st_mode & 0o7777
    folder, prefix = target.parent, f".{target.name}."
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(after)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
