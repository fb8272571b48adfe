"""Results entries, the results file they render to, and the journal: the formats, not places.

Takes finished shots as `ResultEntry`s; gives the bytes of `results.json` (the **contract**: one
entry per shot in manifest order, one per line), reads such a file back (only to import one this
version did not write: see `imgbatch.state.folder`), and appends entries to a journal, each line
fsynced before `record` returns. A journal line that is not an entry (a torn last line: a run was
killed mid-append) is skipped; a results file or journal that cannot be read at all, or has a
folder in its place, is a `StoreError` naming it. Where these files live, and when they are
written, is decided by their one owner, `OutputFolder`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

from imgbatch.errors import StoreError
from imgbatch.state.cache import AppendLog, atomic_write

RESULTS_FILE = "results.json"
RESULTS_FORMAT_VERSION = 1
# generated: made by a request; cached: restored from the cache; failed: `error` says why, no
# image; unfetched: the service made (and billed) it, its `image_url` is kept, but it was never
# downloaded: the next apply fetches it before it would pay again.
Status = Literal["generated", "cached", "failed", "unfetched"]
STATUSES: tuple[Status, ...] = ("generated", "cached", "failed", "unfetched")
# The statuses of an entry whose image is in the output folder (as imgbatch wrote it).
WITH_IMAGE = frozenset({"generated", "cached"})


@dataclass(frozen=True, slots=True)
class ResultEntry:
    """One shot's line in results.json."""

    id: str
    status: Status
    file: str | None
    key: str
    width: int | None
    height: int | None
    seed: int | None
    model: str
    size: str
    prompt: str
    image_url: str | None
    request_id: str | None
    error: str | None = None
    error_code: str | None = None
    negative_prompt: str | None = None
    style: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    attempts: int = 0
    request: Mapping[str, Any] = field(default_factory=dict)
    # The text actually sent (the prompt with its style folded in, or its simplified form), and
    # whether the service's 200 without an image made imgbatch ask again, simplified.
    prompt_sent: str | None = None
    simplified: bool = False
    # The reference URL the image was made from (its content hash is `request`'s
    # reference_sha256): a plan, which downloads nothing, compares it to the manifest's.
    reference_url: str | None = None
    # A provider error as data, where the entry is made: the HTTP status the service answered,
    # and its own words when `error` is its answer as such ("<status> <code>: <words>"), so
    # that nothing reads them back out of `error`.
    error_status: int | None = None
    error_message: str | None = None
    # False: the image is kept only in the shared store, at `image_url` (`apply
    # --no-local-copy`), not at `file`; None (not written): it is at `file`.
    local_copy: bool | None = None
    # When this entry's outcome came (UTC, ISO 8601, seconds): its image received, or its
    # failure. It travels with the entry (a shot restored from a shared store keeps its maker's),
    # and results.json's `updated_at` is the newest of them: a time of the data, not of a run.
    made_at: str | None = None

    @property
    def has_image(self) -> bool:
        """Whether imgbatch put this entry's image at `file` (its `sha256` and `bytes`)."""
        return self.status in WITH_IMAGE

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: `request` is a flat mapping, and dataclasses.asdict's deep copy of
        # every entry was a third of a 10,000-shot no-op apply.
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        request = self.request
        # A loaded one's pairs zipped back (a lookup a name was 0.15 s a 100,000-shot file).
        data["request"] = request.as_dict() if type(request) is Recorded else dict(request)
        for name in _WRITTEN_WHEN_SET:
            if data[name] is None:
                # Only some entries have them (a URL-referenced shot, a provider's error): every
                # other line stays as older versions wrote it, so upgrading does not rewrite a
                # committed results.json.
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: Any, shared: Shared | None = None) -> ResultEntry:
        """The entry `data` holds; ValueError if it is not one (a hand edit, a damaged file).
        `shared`: strings it keeps as the caller's own objects when equal (see `Shared`)."""
        if not isinstance(data, dict):
            raise ValueError(f"an entry is a JSON {type(data).__name__}, not an object")
        if data.keys() <= _FIELD_SET:  # as this module writes it: copied in C
            values = dict(data)
        else:  # fields from a later version, or a hand edit: only those this one knows
            values = {name: value for name, value in data.items() if name in _FIELD_SET}
        if shared is not None:
            shared.share(values)
        # A 100,000-shot state is held whole while it is planned: the few strings and numbers
        # that repeat from entry to entry are kept once, not once an entry.
        for name in _REPEATING_FIELDS:
            if type(value := values.get(name)) is str:
                values[name] = sys.intern(value)
        for name in ("width", "height"):
            if type(value := values.get(name)) is int:
                values[name] = _SIZES.setdefault(value, value) if len(_SIZES) < 4096 else value
        prompt = values.get("prompt")
        if "prompt_sent" in values and values["prompt_sent"] == prompt:
            values["prompt_sent"] = prompt  # one string for both, as for the request's text
        if values.get("status") == "failed" and values.get("image_url"):
            # Written before `unfetched` existed: a failed entry with an image URL was billed
            # but not downloaded (this version writes no failed entry with a URL).
            values["status"] = "unfetched"
        request = values.get("request")
        if type(request) is dict:
            values["request"] = Recorded.of(request, prompt)
        entry = cls(**values)
        _check_types(entry)
        return entry


class Recorded(Mapping[str, Any]):
    """A loaded entry's `request`: a read-only mapping of its canonical fields, the values in
    a tuple under names shared by every request that names the same ones (a 100,000-shot state
    is held whole, and a dict apiece was a fifth of it). Equal to a dict of the same items."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: tuple[str, ...], values: tuple[Any, ...]) -> None:
        self._names = names
        self._values = values

    @classmethod
    def of(cls, request: dict[str, Any], prompt: Any) -> Recorded:
        """`request` as read from a file; its text, when it is the entry's `prompt`, is that
        string, and the values that repeat from entry to entry are each kept once."""
        request = dict(request)  # the caller's is left as it is
        for name in _REPEATING_REQUEST:
            if type(value := request.get(name)) is str:
                request[name] = sys.intern(value)
        if request.get("text") == prompt:
            request["text"] = prompt
        names = tuple(request)
        if len(_NAMES) < 4096:  # bounded against a hostile file
            names = _NAMES.setdefault(names, names)
        return cls(names, tuple(request.values()))

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(self._names, self._values, strict=True))

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[self._names.index(name)]
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Recorded) and other._names is self._names:
            return other._values == self._values
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]  # equal to a dict, which is not hashable

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class KnownShot(Protocol):
    """A shot the caller holds (the shot list's): the strings its entry repeats."""

    @property
    def id(self) -> str: ...

    @property
    def file(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def prompt(self) -> str: ...


class Shared:
    """What the entries of one read share instead of holding equal copies: the id, file, key
    and prompt of the shot each is for, as the caller already holds them (`known`, by shot
    id: a plan holds both sides whole, and 100,000 entries kept their own copies of these, a
    third of the state's memory), and `made_at`, which shots finished in the same second
    repeat. Only equal strings are shared: what an entry says never changes."""

    def __init__(self, known: Mapping[str, KnownShot] | None = None) -> None:
        self.known: Mapping[str, KnownShot] = known or {}
        self._stamps: dict[str, str] = {}

    def share(self, values: dict[str, Any]) -> None:
        """Replace, in an entry's `values`, each string equal to a shared one by that one."""
        made_at = values.get("made_at")
        if type(made_at) is str:
            values["made_at"] = self._stamps.setdefault(made_at, made_at)
        shot_id = values.get("id")
        shot = self.known.get(shot_id) if type(shot_id) is str else None
        if shot is None:
            return
        for name, mine in (
            ("id", shot.id),
            ("file", shot.file),
            ("key", shot.key),
            ("prompt", shot.prompt),
        ):
            if values.get(name) == mine:
                values[name] = mine


def _check_types(entry: ResultEntry) -> None:
    # A hand edit must fail here, naming the file and the entry, never as a traceback far from
    # it (the sheet formats every field). The key and the file name paths (the cache entry, the
    # thumbnail, the file prune removes): a `../../outside/x` must never reach one. One
    # expression: this runs for every entry of a 100,000-shot state.
    if (
        type(entry.id) is str
        and type(entry.key) is str
        and _KEY.fullmatch(entry.key)
        and entry.status in _STATUSES
        and (
            entry.file is None
            or (type(entry.file) is str and "/" not in entry.file and _plain_name(entry.file))
        )
        and type(entry.model) is str
        and type(entry.size) is str
        and type(entry.prompt) is str
        and type(entry.attempts) is int
        and type(entry.simplified) is bool
        and type(entry.request) in _REQUEST_TYPES
        and type(entry.width) in _INT_OR_NONE
        and type(entry.height) in _INT_OR_NONE
        and type(entry.seed) in _INT_OR_NONE
        and type(entry.bytes) in _INT_OR_NONE
        and type(entry.image_url) in _STR_OR_NONE
        and type(entry.request_id) in _STR_OR_NONE
        and type(entry.error) in _STR_OR_NONE
        and type(entry.error_code) in _STR_OR_NONE
        and type(entry.negative_prompt) in _STR_OR_NONE
        and type(entry.style) in _STR_OR_NONE
        and type(entry.sha256) in _STR_OR_NONE
        and type(entry.prompt_sent) in _STR_OR_NONE
        and type(entry.reference_url) in _STR_OR_NONE
        and type(entry.local_copy) in _BOOL_OR_NONE
        and type(entry.made_at) in _STR_OR_NONE
    ):
        return
    bad = [
        f"{name} ({expected}, not {_shown(getattr(entry, name))})"
        for name, (kinds, expected) in _TYPES.items()
        if type(getattr(entry, name)) not in kinds
    ]
    if entry.status not in _STATUSES:
        bad.append(f"status ({', '.join(STATUSES)}, not {_shown(entry.status)})")
    if type(entry.key) is str and not _KEY.fullmatch(entry.key):
        bad.append(f"key {entry.key[:80]!r} (a request key is 64 hex digits)")
    if type(entry.file) is str and not _plain_name(entry.file):
        bad.append(f"file {entry.file[:80]!r} (a file name in the output folder, no folders)")
    raise ValueError(f"entry {_shown(entry.id)} has a bad {', '.join(bad)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_NONE: type = type(None)
_INT_OR_NONE: frozenset[type] = frozenset({int, _NONE})
_STR_OR_NONE: frozenset[type] = frozenset({str, _NONE})
_BOOL_OR_NONE: frozenset[type] = frozenset({bool, _NONE})
_REQUEST_TYPES: frozenset[type] = frozenset({dict, Recorded})
_TEXT, _OPTIONAL_TEXT = (frozenset({str}), "text"), (_STR_OR_NONE, "text or null")
_OPTIONAL_NUMBER = (_INT_OR_NONE, "a whole number or null")
# Each field's JSON types, for the message that names what a hand edit got wrong.
_TYPES: dict[str, tuple[frozenset[type], str]] = {
    "id": _TEXT,
    "key": _TEXT,
    "model": _TEXT,
    "size": _TEXT,
    "prompt": _TEXT,
    "file": _OPTIONAL_TEXT,
    "image_url": _OPTIONAL_TEXT,
    "request_id": _OPTIONAL_TEXT,
    "error": _OPTIONAL_TEXT,
    "error_code": _OPTIONAL_TEXT,
    "negative_prompt": _OPTIONAL_TEXT,
    "style": _OPTIONAL_TEXT,
    "sha256": _OPTIONAL_TEXT,
    "prompt_sent": _OPTIONAL_TEXT,
    "reference_url": _OPTIONAL_TEXT,
    "made_at": _OPTIONAL_TEXT,
    "width": _OPTIONAL_NUMBER,
    "height": _OPTIONAL_NUMBER,
    "seed": _OPTIONAL_NUMBER,
    "bytes": _OPTIONAL_NUMBER,
    "attempts": (frozenset({int}), "a whole number"),
    "simplified": (frozenset({bool}), "true or false"),
    "local_copy": (_BOOL_OR_NONE, "true, false or null"),
    "request": (_REQUEST_TYPES, "an object"),
}


def _plain_name(name: str) -> bool:
    """A file name with no folder in it: never absolute, never `..`, never a separator."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


_STATUSES = frozenset(STATUSES)
# A request key as `ImageRequest.key` makes it: the SHA-256 of the request, in hex.
_KEY = re.compile(r"[0-9a-f]{64}")
_FIELD_NAMES = tuple(item.name for item in fields(ResultEntry))
_WRITTEN_WHEN_SET = ("reference_url", "error_status", "error_message", "local_copy", "made_at")
# Fields whose few values repeat across thousands of shots (defaults, mostly): loaded entries
# share one string each instead of holding a copy apiece (a 100,000-shot state is held whole),
# and so do their requests' (whose keys the JSON parser already shares within one parse).
_REPEATING_FIELDS = ("status", "model", "size", "negative_prompt", "style", "error_code")
_REPEATING_REQUEST = ("provider", "model", "size", "negative_prompt")
_FIELD_SET = frozenset(_FIELD_NAMES)
# Widths and heights, each kept once (a few distinct ones; bounded against a hostile file).
_SIZES: dict[int, int] = {}
# The names of recorded requests, each tuple kept once (`Recorded`).
_NAMES: dict[tuple[str, ...], tuple[str, ...]] = {}


def read_results(
    path: Path, shared: Shared | None = None
) -> tuple[list[ResultEntry], dict[str, Any]]:
    """The entries of the results file at `path` (shots, then orphans) and its other top-level
    fields (`manifest`, `updated_at`...); nothing if there is none. Raises `StoreError` naming
    the file when it cannot be read. `shared`: see `Shared`."""
    if not exists_as_file(path):
        return [], {}
    try:
        return read_entry_document(path, ("shots", "orphans"), shared)
    except (OSError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise StoreError(
            f"{path} cannot be read ({exc}); move it aside and run apply again: "
            "images already in the cache are restored without new requests"
        ) from None


def exists_as_file(path: Path) -> bool:
    """False if absent; raise StoreError naming `path` when something else is in its place."""
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not path.is_file():
        raise StoreError(f"{path} is not a file (a folder?); move it aside and run apply again")
    return True


def read_entry_document(
    path: Path, lists: tuple[str, ...], shared: Shared | None = None
) -> tuple[list[ResultEntry], dict[str, Any]]:
    """The entries in the JSON document at `path`'s lists named `lists` (in that order), and
    its other top-level fields.

    A file as `write_results` (or the state record) writes it is read a line at a time, each
    entry parsed on its own, so a 100,000-shot file is never in memory whole as text and as
    objects at once. The lines that are not entries must still parse as the JSON document
    around them, with the entries' places in its lists; anything else (a file edited or
    pretty-printed by hand) is parsed whole. Raises ValueError (or OSError) when it is not such a
    document.
    """
    by_lines = _read_by_lines(path, lists, shared)
    if by_lines is not None:
        return by_lines
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ValueError(f"a JSON {type(document).__name__}, not an object")
    raws = [raw for name in lists for raw in document.get(name, [])]
    return [ResultEntry.from_json(raw, shared) for raw in raws], _head(document, lists)


# Entry lines parsed in one json.loads call: a call per line was a fifth of loading a state.
_BATCH = 1000


def _read_by_lines(
    path: Path, lists: tuple[str, ...], shared: Shared | None
) -> tuple[list[ResultEntry], dict[str, Any]] | None:
    """`read_entry_document` a line at a time, for a file laid out as this module writes it;
    None when it is not (each entry must be one line, the rest the document around them)."""
    entries: list[ResultEntry] = []
    skeleton: list[str] = []
    batch: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("    {"):
                skeleton.append(line)
                continue
            text = line.rstrip()
            batch.append(text.removesuffix(","))
            skeleton.append("0," if text.endswith(",") else "0")
            if len(batch) == _BATCH:
                if not _parsed(batch, entries, shared):
                    return None
                batch.clear()
    if not _parsed(batch, entries, shared):
        return None
    try:
        document = json.loads("".join(skeleton))
        places = [item for name in lists for item in document[name]]
    except (ValueError, KeyError, TypeError):
        return None
    return (entries, _head(document, lists)) if places == [0] * len(entries) else None


def _parsed(lines: list[str], entries: list[ResultEntry], shared: Shared | None) -> bool:
    """Add the entries `lines` hold, one each, to `entries`; False if they are not that."""
    if not lines:
        return True
    try:
        raws = json.loads(f"[{','.join(lines)}]")
        if len(raws) != len(lines):
            return False
        entries.extend(ResultEntry.from_json(raw, shared) for raw in raws)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def _head(document: dict[str, Any], lists: tuple[str, ...]) -> dict[str, Any]:
    return {name: value for name, value in document.items() if name not in lists}


def read_journal(path: Path) -> list[ResultEntry]:
    """The journal's entries; a line that is not one (a torn last line) is skipped."""
    if path.is_symlink():
        raise StoreError(
            f"{path} is a symbolic link; imgbatch never follows links in {path.parent.name}/: "
            "move it aside and run apply again"
        )
    if not exists_as_file(path):
        return []
    entries = []
    try:
        with path.open("rb") as handle:
            for line in handle:
                try:
                    entries.append(ResultEntry.from_json(json.loads(line.decode("utf-8"))))
                except (ValueError, TypeError, RecursionError):
                    # The torn tail of a run killed mid-append (possibly inside a multi-byte
                    # character: UnicodeDecodeError is a ValueError), or a damaged line.
                    continue
    except OSError as exc:
        raise StoreError(f"{path} cannot be read ({exc.strerror or exc})") from None
    return entries


class Journal:
    """Append-only record of shots finished by the current run, durable line by line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._log = AppendLog(self.path)

    def record(self, entry: ResultEntry) -> None:
        """Raises `StoreWriteError` when the line cannot be written (a full disk)."""
        line = json.dumps(entry.to_json(), ensure_ascii=False) + "\n"
        self._log.append(line.encode("utf-8"))

    def close(self) -> None:
        self._log.close()


def write_results(
    path: Path,
    entries: Sequence[ResultEntry],
    orphans: Sequence[ResultEntry],
    meta: Mapping[str, Any],
) -> Path:
    """Write the results file at `path` atomically; gives `path`. `meta` (with its
    `updated_at`) goes at the top, before the summary; see `render_results`."""
    atomic_write(path, render_results(entries, orphans, meta))
    return path


def render_results(
    entries: Sequence[ResultEntry], orphans: Sequence[ResultEntry], meta: Mapping[str, Any]
) -> Iterator[bytes]:
    """results.json's bytes, in pieces as they are made (a 100,000-shot file is never held in
    memory whole).

    One shot per line: a re-run's diff in git shows exactly the shots that changed. The lines
    go through json's C encoder (an indented dump is pure Python, and was the slowest part of a
    10,000-shot no-op apply).
    """
    return _results_pieces(entries, orphans, meta)


def compare_and_hash(path: Path, pieces: Iterable[bytes]) -> tuple[bool, str]:
    """Whether the file at `path` holds exactly the concatenation of `pieces`, and that
    concatenation's SHA-256; the pieces are read as they come, the file alongside them."""
    digest = hashlib.sha256()
    same = True
    try:
        handle: BinaryIO | None = path.open("rb")
    except OSError:
        handle, same = None, False
    try:
        for piece in pieces:
            digest.update(piece)
            if same and handle is not None and handle.read(len(piece)) != piece:
                same = False
        if same and handle is not None:
            same = handle.read(1) == b""
    except OSError:
        same = False
    finally:
        if handle is not None:
            handle.close()
    return same, digest.hexdigest()


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of the file at `path`, None if it cannot be read."""
    return hashed_file(path)[0]


FileIdentity = tuple[int, int, int, int]
"""A file's inode, size, and modification and change times (ns): an atomic write (a new file
renamed into place) or any edit changes it."""


def file_identity(path: Path) -> FileIdentity | None:
    """The identity of the file at `path` now; None if there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def hashed_file(path: Path) -> tuple[str | None, FileIdentity | None]:
    """The SHA-256 of the file at `path` and the identity of the file so hashed (None if it
    changed while it was read); (None, None) if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            while piece := handle.read(1 << 20):
                digest.update(piece)
    except OSError:
        return None, None
    identity = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    return digest.hexdigest(), identity if file_identity(path) == identity else None


def _results_pieces(
    entries: Sequence[ResultEntry], orphans: Sequence[ResultEntry], meta: Mapping[str, Any]
) -> Iterator[bytes]:
    yield results_head(entries, meta)
    yield from json_lines(entries)
    yield b',\n  "orphans": '
    yield from json_lines(orphans)
    yield b"\n}\n"


def results_head(entries: Sequence[ResultEntry], meta: Mapping[str, Any]) -> bytes:
    """results.json's bytes before its first entry: `meta`, then the summary of `entries`
    (how many, by status). With the entries and the orphans, they make the whole file: two
    results files with the same head and the same entries in the same order are the same."""
    counts = dict.fromkeys(STATUSES, 0)
    for entry in entries:
        counts[entry.status] += 1
    if not counts["unfetched"]:
        # Only when there are some: a results file written before `unfetched` existed stays
        # byte for byte the same after an upgrade.
        del counts["unfetched"]
    head = {
        "version": RESULTS_FORMAT_VERSION,
        **meta,
        "summary": {"shots": len(entries), **counts},
    }
    lines = [f"  {_compact(name)}: {_compact(value)},\n" for name, value in head.items()]
    return ("{\n" + "".join(lines) + '  "shots": ').encode()


def _compact(value: Any) -> str:
    return _COMPACT.encode(value)


# json.dumps with an option builds an encoder per call: one for every line of a big file.
_COMPACT = json.JSONEncoder(ensure_ascii=False)


def json_lines(entries: Sequence[ResultEntry]) -> Iterator[bytes]:
    """A JSON list with one compact entry per line."""
    if not entries:
        yield b"[]"
        return
    yield b"[\n"
    last = len(entries) - 1
    for index, entry in enumerate(entries):
        ending = "\n" if index == last else ",\n"
        yield f"    {_compact(entry.to_json())}{ending}".encode()
    yield b"  ]"
