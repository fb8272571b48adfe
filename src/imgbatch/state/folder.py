"""The output folder's one owner: its paths, lock, checks, cache, journal, state and last run.

Takes an output folder's path; gives `OutputFolder`, the only code that knows what lives in it:

    <root>/results.json                the committed, reviewable file, rendered from the state
    <root>/.imgbatch/state.json        the state record (`imgbatch.state.record`): what decides
    <root>/.imgbatch/journal.jsonl     shots finished by a run not yet in the record
    <root>/.imgbatch/cache/            the image cache (`ImageCache`), one PNG per request key
    <root>/.imgbatch/thumbs/           the contact sheet's thumbnails, one per key
    <root>/.imgbatch/last-run.json     what the last apply changed (the sheet's marks)
    <root>/.imgbatch/lock              held by apply, generate and `gc --yes`
    <root>/.imgbatch/changed           rewritten by `gc --yes` when it deletes (see `version`)

`load` gives the state: the record with the journal of an unfinished run replayed over it (a
later line for a shot winning). results.json is never read back to decide anything, with one
exception: a results.json the record did not render (a folder made by an earlier version, which
has no record; one a `git pull` or checkout brought; one edited by hand) is imported once in
its place, so nothing paid for is paid again and nothing committed is overruled by an older
record. `save` writes results.json (only if its bytes change: a no-op apply leaves it as it
was, `updated_at` included), then the record, then drops the journal: a run killed between two
of these loses nothing (the record that did not render the results.json on disk imports it).

`version` is the identity of the files a plan reads the state from (the record, the journal,
results.json, and the mark `gc --yes` leaves when it deletes from the cache): apply plans before
it takes the lock, and plans again under the lock only if the version changed meanwhile.

The folder records the manifest that owns it: `claim` refuses another one (`FolderOwnedError`)
unless forced, and a forced one's entries are kept apart (`FolderState.split`), so neither
manifest plans, lists or prunes the other's shots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import filelock

from imgbatch.errors import FolderOwnedError, LockedError, StoreError
from imgbatch.state.cache import (
    TEMP_PREFIX,
    ImageCache,
    atomic_write,
    check_writable,
    real_subfolders,
    remove_temporaries,
)
from imgbatch.state.record import (
    FolderState,
    Owner,
    Rendered,
    read_owner,
    read_record,
    write_record,
)
from imgbatch.state.results import (
    RESULTS_FILE,
    FileIdentity,
    Journal,
    KnownShot,
    ResultEntry,
    Shared,
    compare_and_hash,
    exists_as_file,
    file_identity,
    file_sha256,
    hashed_file,
    read_journal,
    read_results,
    render_results,
    results_head,
)

STATE_DIR = ".imgbatch"
RECORD_FILE = "state.json"
JOURNAL_FILE = "journal.jsonl"
LAST_RUN_FILE = "last-run.json"
LOCK_FILE = "lock"
LOCK_HOLDER_FILE = "lock.holder"
LOCK_HOLDERS = ("apply", "generate", "gc")
CHANGED_FILE = "changed"
CACHE_DIR = "cache"
THUMBS_DIR = "thumbs"


class OutputFolder:
    """One output folder, as imgbatch keeps it (see the module doc).

    >>> folder = OutputFolder(Path("output/cyclist-spot"))
    >>> folder.results_path.name, folder.cache.root.name
    ('results.json', 'cache')
    """

    def __init__(self, root: Path, cache: ImageCache | None = None) -> None:
        self.root = root
        self.state_dir = root / STATE_DIR
        # The folder's own cache unless one is given (the seam for a cache kept elsewhere).
        self.cache = cache if cache is not None else ImageCache(self.state_dir / CACHE_DIR)

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def record_path(self) -> Path:
        return self.state_dir / RECORD_FILE

    @property
    def journal_path(self) -> Path:
        return self.state_dir / JOURNAL_FILE

    @property
    def last_run_path(self) -> Path:
        return self.state_dir / LAST_RUN_FILE

    @property
    def thumbs_dir(self) -> Path:
        return self.state_dir / THUMBS_DIR

    def thumb_path(self, key: str) -> Path:
        return self.thumbs_dir / key[:2] / f"{key}.webp"

    def is_made(self) -> bool:
        """Whether imgbatch has kept state here (an apply or generate wrote to it)."""
        return self.state_dir.is_dir()

    @contextlib.contextmanager
    def lock(self, holder: str = "apply") -> Iterator[None]:
        """One apply (or generate, or `gc --yes`: the `holder`) per output folder at a time; the
        second is refused (`LockedError`, naming the command that holds it), never interleaved.
        Makes the folder if it is missing."""
        self.refuse_links()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the output folder {self.root}: {exc}") from None
        path = self.state_dir / LOCK_FILE
        lock = filelock.FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            command, pid = _lock_holder(self.state_dir / LOCK_HOLDER_FILE)
            raise LockedError(
                f"another imgbatch {command} is writing to {self.root}{pid}; wait for it to "
                "finish (the lock is released when that process exits, even if it crashed)"
            ) from None
        except OSError as exc:
            # A folder or a symbolic link in its place (filelock never follows a link).
            raise StoreError(
                f"cannot take the lock {path} ({exc.strerror or exc}); move it aside and run "
                "apply again"
            ) from None
        with self._holder_named(holder):
            try:
                yield
            finally:
                lock.release()

    @contextlib.contextmanager
    def _holder_named(self, holder: str) -> Iterator[None]:
        """Who holds the lock, for another command's refusal; gone again before the lock is
        released, so a command that changes nothing leaves nothing changed. Never worth
        failing for."""
        named = self.state_dir / LOCK_HOLDER_FILE
        with contextlib.suppress(OSError, StoreError):  # StoreWriteError: a folder not writable
            atomic_write(named, f"{holder} {os.getpid()}\n".encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                named.unlink(missing_ok=True)

    def refuse_links(self) -> None:
        """Refuse a state folder, cache or thumbnails folder that is a symbolic link: a shot
        list can come from a pull request, and a link committed in their place would have
        imgbatch write its cache, lock or thumbnails wherever it points."""
        for folder in (self.state_dir, self.cache.root, self.thumbs_dir):
            if folder.is_symlink():
                raise StoreError(
                    f"{folder} is a symbolic link; imgbatch keeps its state only in a real "
                    "folder (replace the link by a folder); nothing was sent or written"
                )

    def prepare(self) -> None:
        """Under the lock, before the first request: check that the folder, its state folder and
        cache can be written (a folder that cannot would waste every image), and remove the
        temporary files a killed run left."""
        check_writable(self.root)
        check_writable(self.state_dir)
        if self.cache.root.exists():
            check_writable(self.cache.root)
        remove_temporaries(
            [self.root, self.state_dir, *real_subfolders(self.cache.root)]
            + real_subfolders(self.thumbs_dir)
        )

    def temporaries(self) -> list[Path]:
        """The temporary files a killed run left (regular files only, links never followed)."""
        folders = [self.root, self.state_dir]
        folders += real_subfolders(self.cache.root) + real_subfolders(self.thumbs_dir)
        return [
            path
            for folder in folders
            for path in _listing(folder)
            if path.name.startswith(TEMP_PREFIX) and path.name.endswith(".tmp") and _regular(path)
        ]

    def load(self, known: Mapping[str, KnownShot] | None = None) -> FolderState:
        """Every shot's last known entry, and who owns the folder (see the module doc).
        `known`: the shots the caller holds, by id, whose strings their entries share
        (`imgbatch.state.results.Shared`: what they say is the same)."""
        shared = Shared(known)
        record = read_record(self.record_path, shared)
        digest, identity = (
            hashed_file(self.results_path) if exists_as_file(self.results_path) else (None, None)
        )
        if record is not None and digest is None:
            state = record
        elif record is not None and digest == record.rendered.sha256:
            state = dataclasses.replace(record, results_file=identity)
        elif exists_as_file(self.results_path):
            state = self._imported(record, shared)
        else:
            state = FolderState()
        journal = read_journal(self.journal_path)
        if not journal:
            return state
        entries = dict(state.entries)
        for entry in journal:
            entries[entry.id] = entry
        return FolderState(entries, state.owner, state.guests, state.rendered, known=True)

    def _imported(self, record: FolderState | None, shared: Shared) -> FolderState:
        """The state read from a results.json the record did not render (see the module doc)."""
        entries, head = read_results(self.results_path, shared)
        manifest = head.get("manifest")
        owner = record.owner if record is not None else None
        if owner is None and isinstance(manifest, str):
            owner = Owner(manifest, None)  # an earlier version's file: who wrote it last
        by_id = {entry.id: entry for entry in entries}
        guests = {} if record is None else {i: o for i, o in record.guests.items() if i in by_id}
        updated_at = head.get("updated_at")
        rendered = Rendered(
            updated_at if isinstance(updated_at, str) else None, file_sha256(self.results_path)
        )
        return FolderState(by_id, owner, guests, rendered, known=True)

    def version(self) -> tuple[FileIdentity | None, ...]:
        """Where the folder's state stands, cheaply (four stats, nothing read): the identity of
        the record, the journal and results.json (`FileIdentity`: an atomic write or any edit
        changes it), and of the mark `mark_changed` leaves. Another run that changes what a
        plan is made from changes it: an apply journals what it makes, then writes the record
        and results.json (an apply that leaves them as they were only put back what they
        already said), a killed one leaves its journal, `gc --yes` marks its deletions and
        `generate` an image it adds to the cache. Read
        before the state a plan is made from, so that a change after it shows."""
        paths = (self.record_path, self.journal_path, self.results_path, self._changed_path)
        return tuple(file_identity(path) for path in paths)

    def mark_changed(self) -> None:
        """Under the lock, after deleting from the cache or the folder (`gc --yes`): change the
        `version`, so that an apply that planned before taking the lock plans again."""
        atomic_write(self._changed_path, f"{uuid.uuid4().hex}\n".encode())

    @property
    def _changed_path(self) -> Path:
        return self.state_dir / CHANGED_FILE

    def journal(self) -> Journal:
        """The journal a run appends each finished shot to (`Journal.record`)."""
        return Journal(self.journal_path)

    def claim(self, state: FolderState | None, owner: Owner, *, shown: str, force: bool) -> None:
        """Refuse (`FolderOwnedError`) to apply `owner`, shown as `shown`, into a folder another
        manifest owns, unless `force`. With no `state`, the record's head alone is read: a
        cheap look before anything is fetched (the state, once loaded, is asked again)."""
        theirs = read_owner(self.record_path) if state is None else state.owner
        if theirs is None or theirs.same(owner) or force:
            return
        where = os.path.normpath(self.root / theirs.manifest) if theirs.manifest else "a manifest"
        named = f" (name: {theirs.name})" if theirs.name else ""
        raise FolderOwnedError(
            f"{self.root} is the output folder of {where}{named}; {shown} (name: {owner.name}) "
            "would share it, and each would see the other's shots as orphans. Give "
            f"{shown} its own name: (or output.dir), or pass --force to apply it there anyway "
            "(each manifest's shots are then kept apart: neither lists nor prunes the "
            "other's); nothing was sent or written"
        )

    def save(
        self,
        entries: Sequence[ResultEntry],
        orphans: Sequence[ResultEntry],
        kept: Sequence[ResultEntry],
        meta: Mapping[str, Any],
        *,
        owner: Owner,
        before: FolderState,
        now: str,
    ) -> Path:
        """Write the state after a run: `entries` (the manifest's shots, in its order), its
        `orphans`, and the entries of other manifests `kept` as they are; gives results.json's
        path. `meta` heads results.json; its `updated_at` is the newest entry's `made_at` (for
        entries older than `made_at`: `now`, when something in it changed since `before` was
        rendered)."""
        folder_owner = owner.fill(before.owner)
        guests = {e.id: before.guests[e.id] for e in kept if e.id in before.guests}
        if not owner.same(folder_owner):
            guests.update({entry.id: owner for entry in (*entries, *orphans)})
        listed = [*orphans, *kept]
        rendered = self._render(entries, listed, meta, before, now)
        everything = {entry.id: entry for entry in (*entries, *listed)}
        after = FolderState(everything, folder_owner, guests, rendered, synced=True, known=True)
        if not (before.synced and before.same_record(after)):
            write_record(self.record_path, after)
        self.journal_path.unlink(missing_ok=True)
        return self.results_path

    def _render(
        self,
        entries: Sequence[ResultEntry],
        orphans: Sequence[ResultEntry],
        meta: Mapping[str, Any],
        before: FolderState,
        now: str,
    ) -> Rendered:
        """Write results.json unless it already holds these bytes; gives what it now holds.
        Its `updated_at` is the newest entry's `made_at`: a time of the data, so that two runs
        that end with the same entries (an assembling run, a plain apply) write the same bytes.
        Only entries older than `made_at` leave `now` (the run's time) as the time of a change."""
        now = newest_made_at((*entries, *orphans), now) or now
        last = before.rendered
        if last.updated_at is not None:
            kept_meta = {**meta, "updated_at": last.updated_at}
            head = hashlib.sha256(results_head(entries, kept_meta)).hexdigest()
            if self._holds(before, head, [*entries, *orphans]):
                return last  # nothing changed since, and the file is the one rendered then
            same, digest = compare_and_hash(
                self.results_path, render_results(entries, orphans, kept_meta)
            )
            if digest == last.sha256:  # nothing changed since: the file keeps its updated_at
                if not same:  # deleted or edited by hand: put back as it was
                    self._write_results(entries, orphans, kept_meta)
                return Rendered(last.updated_at, last.sha256, head)
        meta = {**meta, "updated_at": now}
        head = hashlib.sha256(results_head(entries, meta)).hexdigest()
        return Rendered(now, self._write_results(entries, orphans, meta), head)

    def _holds(self, before: FolderState, head: str, entries: Sequence[ResultEntry]) -> bool:
        """Whether results.json holds what rendering `entries` (shots, then orphans) under the
        head whose SHA-256 is `head` would write, known without rendering it: the file is the
        one the record rendered (unchanged since `load` checked it), from these entries in this
        order (the record's), under this head. Rendering 100,000 entries to compare them was a
        fifth of a no-op apply."""
        return (
            before.synced
            and before.results_file is not None
            and before.rendered.head == head
            and len(before.entries) == len(entries)
            and all(a is b or a == b for a, b in zip(before.entries.values(), entries, strict=True))
            and file_identity(self.results_path) == before.results_file
        )

    def _write_results(
        self,
        entries: Sequence[ResultEntry],
        orphans: Sequence[ResultEntry],
        meta: Mapping[str, Any],
    ) -> str:
        digest = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for piece in render_results(entries, orphans, meta):
                digest.update(piece)
                yield piece

        atomic_write(self.results_path, hashed())
        return digest.hexdigest()

    def read_last_run(self) -> Any:
        """The last-run document `write_last_run` wrote; None if missing or unreadable (it only
        decorates the contact sheet)."""
        try:
            return json.loads(self.last_run_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def write_last_run(self, document: Mapping[str, Any]) -> None:
        data = json.dumps(document, ensure_ascii=False, indent=1) + "\n"
        atomic_write(self.last_run_path, data.encode("utf-8"))

    def remove_empty_shards(self) -> None:
        """Remove the cache's and thumbnails' empty shard folders (after `gc` deleted files)."""
        for shard in real_subfolders(self.cache.root) + real_subfolders(self.thumbs_dir):
            with contextlib.suppress(OSError):  # not empty: something of someone's
                shard.rmdir()


def _lock_holder(named: Path) -> tuple[str, str]:
    """Which command holds the lock and " (process N)", as the holder wrote them beside it
    (read, never trusted: only a known command and a number are shown); else "command", ""."""
    try:
        with open(named, "rb") as stream:
            command, _, pid = stream.read(64).decode("ascii").strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return "command", ""
    if command not in LOCK_HOLDERS:
        return "command", ""
    return command, f" (process {pid})" if pid.isdigit() else ""


def owner_of(manifest: Path | None, name: str | None, root: Path) -> Owner:
    """The `Owner` a manifest file (None: a manifest given as data) named `name` is, for the
    folder `root`: its path relative to the folder, so both can move together."""
    if manifest is None:
        return Owner(None, name)
    return Owner(os.path.relpath(manifest.resolve(), root.resolve()), name)


def _listing(folder: Path) -> Iterable[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


# A time as imgbatch stamps `made_at` (`run.entries.made_now`): UTC, to the second, so that
# string order is time order.
_MADE_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")
# Machines' clocks differ: a made_at up to this far after the run's time is believed.
_SKEW = timedelta(days=1)


def newest_made_at(entries: Iterable[ResultEntry], now: str) -> str | None:
    """The newest `made_at` of `entries` that is a time as imgbatch writes it and no more than
    a day after `now` (the run's time, as `made_at` is written), or None. A hand-edited one
    (any text, a year 9999) is left out: by string order it headed results.json as its
    `updated_at`, and stayed there for good."""
    stamps = {entry.made_at for entry in entries if entry.made_at}
    newest = max(stamps, default=None)
    if newest is None or _believable(newest, now):
        return newest  # the usual case: one max over the entries, no time parsed but one
    return max((stamp for stamp in stamps if _believable(stamp, now)), default=None)


def _believable(stamp: str, now: str) -> bool:
    if type(stamp) is not str or not _MADE_AT.fullmatch(stamp):
        return False
    try:
        return datetime.fromisoformat(stamp) <= datetime.fromisoformat(now) + _SKEW
    except ValueError:  # 2026-02-30 and the like
        return False
