"""The private state record: what the next plan needs, and who owns the folder.

Takes a `FolderState` (every shot's entry, the manifest that owns the folder, the entries other
manifests made in it under `--force`, and what results.json was last rendered as); gives the
record file (`state.json`) and reads it back. The record, not results.json, is what a plan
decides from: results.json is rendered from it (see `imgbatch.state.folder`).

The file is JSON with one entry per line, like results.json, so a 100,000-shot record is read a
line at a time and written as it is made; it is written atomically. A record that cannot be
read is a `StoreError` naming it and saying how to recover (move it aside: results.json is then
imported instead).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgbatch.errors import StoreError
from imgbatch.state.cache import atomic_write
from imgbatch.state.results import (
    FileIdentity,
    ResultEntry,
    Shared,
    exists_as_file,
    json_lines,
    read_entry_document,
)

RECORD_VERSION = 1
_ENTRIES = "entries"


@dataclass(frozen=True, slots=True)
class Owner:
    """A manifest applied into a folder: its file relative to the folder (results.json's
    `manifest`; None for a manifest given as data) and its `name:` (None when unknown: a folder
    an earlier version made)."""

    manifest: str | None
    name: str | None

    def same(self, other: Owner) -> bool:
        """Whether `other` is this manifest: the same file, else (data has no file) the same
        name; a side that does not say is taken to be the same."""
        if self.manifest is not None and other.manifest is not None:
            return self.manifest == other.manifest
        if self.name is not None and other.name is not None:
            return self.name == other.name
        return True

    def fill(self, recorded: Owner | None) -> Owner:
        """The folder's owner after this manifest applied into it: `recorded` (this manifest
        filling in what it did not say, such as the name a folder of an earlier version lacks),
        or this manifest when nothing was recorded."""
        if recorded is None:
            return self
        if not recorded.same(self):
            return recorded
        return Owner(recorded.manifest or self.manifest, recorded.name or self.name)

    def to_json(self) -> dict[str, str | None]:
        return {"manifest": self.manifest, "name": self.name}

    @classmethod
    def from_json(cls, data: Any) -> Owner:
        if not isinstance(data, dict):
            raise ValueError(f"an owner is a JSON {type(data).__name__}, not an object")
        manifest, name = data.get("manifest"), data.get("name")
        if not (manifest is None or isinstance(manifest, str)) or not (
            name is None or isinstance(name, str)
        ):
            raise ValueError("an owner's manifest and name are strings")
        return cls(manifest, name)


@dataclass(frozen=True, slots=True)
class Rendered:
    """results.json as the state last rendered it: its `updated_at`, its bytes' SHA-256, and
    the SHA-256 of its head (`imgbatch.state.results.results_head`: what it says besides the
    entries; None in a record written before it was kept)."""

    updated_at: str | None = None
    sha256: str | None = None
    head: str | None = None


@dataclass(frozen=True)
class FolderState:
    """Everything known of an output folder's shots, in the order results.json lists them."""

    entries: Mapping[str, ResultEntry] = field(default_factory=dict)
    owner: Owner | None = None
    # Entries a manifest other than `owner` made here (`--force`): shot id -> that manifest.
    guests: Mapping[str, Owner] = field(default_factory=dict)
    rendered: Rendered = Rendered()
    # Exactly what the record on disk holds (no journal replayed over it, nothing imported).
    synced: bool = False
    # The folder has a state record or a results file (an empty state is still a state).
    known: bool = False
    # The results file as loaded, when it held what `rendered` says (its `FileIdentity`): if
    # it is still that file, what it holds is known without reading it again.
    results_file: FileIdentity | None = field(default=None, compare=False)

    def owner_of(self, shot_id: str) -> Owner | None:
        return self.guests.get(shot_id, self.owner)

    def split(
        self, owner: Owner, ids: Collection[str]
    ) -> tuple[Mapping[str, ResultEntry], dict[str, ResultEntry]]:
        """The entries that are `owner`'s (its shots' ids, and the ones it made), and the
        others: another manifest's, which `owner`'s apply neither plans, lists nor prunes."""
        if not self.guests and (self.owner is None or self.owner.same(owner)):
            # All of them (the usual case): the entries as they are, not a copy of 100,000.
            return self.entries, {}
        mine: dict[str, ResultEntry] = {}
        others: dict[str, ResultEntry] = {}
        for shot_id, entry in self.entries.items():
            by = self.owner_of(shot_id)
            if shot_id in ids or by is None or by.same(owner):
                mine[shot_id] = entry
            else:
                others[shot_id] = entry
        return mine, others

    def same_record(self, other: FolderState) -> bool:
        """Whether writing `other` would write this record again (order counts)."""
        return (
            self.owner == other.owner
            and self.rendered == other.rendered
            and dict(self.guests) == dict(other.guests)
            and tuple(self.entries) == tuple(other.entries)
            and tuple(self.entries.values()) == tuple(other.entries.values())
        )


def read_record(path: Path, shared: Shared | None = None) -> FolderState | None:
    """The record at `path`, None if there is none; `StoreError` naming it when unreadable.
    `shared`: strings its entries share (`imgbatch.state.results.Shared`)."""
    if path.is_symlink():
        raise StoreError(
            f"{path} is a symbolic link; imgbatch never follows links in {path.parent.name}/: "
            "move it aside and run apply again"
        )
    if not exists_as_file(path):
        return None
    try:
        entries, head = read_entry_document(path, (_ENTRIES,), shared)
        if head.get("version") != RECORD_VERSION:
            raise ValueError(f"version {head.get('version')!r}, not {RECORD_VERSION}")
        owner = Owner.from_json(head["owner"]) if head.get("owner") is not None else None
        guests = {str(shot): Owner.from_json(by) for shot, by in dict(head["guests"]).items()}
        results = dict(head["results"])
        rendered = Rendered(
            _text(results.get("updated_at")),
            _text(results.get("sha256")),
            _text(results.get("head")),
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise StoreError(
            f"{path} cannot be read ({exc}); move it aside and run apply again: the state is "
            "then read from results.json"
        ) from None
    by_id = {entry.id: entry for entry in entries}
    return FolderState(by_id, owner, guests, rendered, synced=True, known=True)


def read_owner(path: Path) -> Owner | None:
    """The owner named at the head of the record at `path`, read without its entries (a cheap
    early look); None when there is no record or its head is not as `write_record` writes it."""
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                name, _, value = line.strip().partition(": ")
                if name == f'"{_ENTRIES}"':
                    return None
                if name == '"owner"':
                    data = json.loads(value.removesuffix(","))
                    return None if data is None else Owner.from_json(data)
    except (OSError, ValueError):
        pass
    return None


def write_record(path: Path, state: FolderState) -> None:
    """Write `state` to `path` atomically (raises `StoreWriteError` naming it)."""
    atomic_write(path, _pieces(state))


def _pieces(state: FolderState) -> Iterator[bytes]:
    head: dict[str, Any] = {
        "version": RECORD_VERSION,
        "owner": state.owner.to_json() if state.owner else None,
        "results": {
            "updated_at": state.rendered.updated_at,
            "sha256": state.rendered.sha256,
            **({"head": state.rendered.head} if state.rendered.head is not None else {}),
        },
        "guests": {shot_id: by.to_json() for shot_id, by in state.guests.items()},
    }
    yield b"{\n"
    for name, value in head.items():
        yield f"  {_compact(name)}: {_compact(value)},\n".encode()
    yield f"  {_compact(_ENTRIES)}: ".encode()
    yield from json_lines(tuple(state.entries.values()))
    yield b"\n}\n"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # a few head lines: no need to be quick


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {type(value).__name__}")
