"""Garbage in output folders: what no results file refers to, listed and (on request) deleted.

Takes one or more manifests; gives a `Collection`: every file in their output folders that
none of those folders' results refer to, with its size, deleted only when asked. What is kept:

* every image key in results.json (its shots and its orphans) and in the journal of an
  unfinished run: a shot's current image, even a failed or orphaned shot's;
* the previous key of each shot the last apply changed (the folder's last run): the image the
  contact sheet shows beside a replaced one, so reverting that edit still costs nothing;
* every file at a shot's place (`<id>.png` of a shot in the results or in the manifests: a failed
  replace leaves the previous image there; a picked take's copy), every local reference image
  of the manifests, and every file imgbatch cannot prove it wrote: proof is its provenance chunk
  naming a key whose cache entry holds the very same bytes, never what a results file says (it
  may be hand-edited).

What is garbage: cache entries and thumbnails (in the folder's state, `OutputFolder`) of any
other key, temporary files a killed run left, and a PNG in the output folder that no entry
refers to, whose bytes are exactly those of a cache entry gc keeps and whose provenance names
that entry's key (an image imgbatch wrote and nobody retouched, whose bytes stay in the cache:
gc never deletes the last copy of an image). Results files are per output folder, so manifests
sharing a folder share its results, and naming one of them never loses the other's images. A
folder whose cache holds images but that has no state at all (no state record, no results file)
is refused (a results file moved aside is how a damaged one is recovered: its images are in the
cache).

Deleting takes each folder's apply lock (`OutputFolder.lock`), so it never runs beside an
apply, and lists again under the lock before deleting.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from imgbatch.errors import ImgbatchError, StoreError
from imgbatch.manifest.loader import ManifestSource, read_manifest
from imgbatch.png import PREFIX, read_image_file, read_provenance
from imgbatch.shots.expand import output_dir_for
from imgbatch.state.folder import OutputFolder
from imgbatch.state.last_run import load_changes

_KEY = re.compile(r"[0-9a-f]{64}")
_COMPARE_CHUNK = 1 << 20


class Kind(StrEnum):
    CACHE = "cache entry"
    THUMBNAIL = "thumbnail"
    IMAGE = "image"
    TEMPORARY = "temporary file"


@dataclass(frozen=True, slots=True)
class Garbage:
    path: Path
    size: int
    kind: Kind


@dataclass(frozen=True)
class Collection:
    """The garbage found, in path order; `deleted` when it is gone."""

    items: tuple[Garbage, ...]
    deleted: bool  # with `delete`: they are gone (an empty list was nothing to delete)

    @property
    def total(self) -> int:
        return sum(item.size for item in self.items)


@dataclass(frozen=True)
class _Folder:
    output_dir: Path
    shot_ids: frozenset[str]
    protected: frozenset[Path]


def collect_garbage(
    manifests: Sequence[ManifestSource],
    *,
    delete: bool = False,
    environ: Mapping[str, str] | None = None,
    allow_reference_outside: bool = False,
) -> Collection:
    """List (and with `delete`, delete) what no results of the manifests' folders refer to.

    Every manifest is read, and every folder's results loaded, before anything is deleted: an
    invalid manifest or an unreadable results file changes nothing.
    """
    folders = _folders(manifests, environ, allow_reference_outside)
    if not delete:
        return Collection(_find_all(folders), deleted=False)
    with contextlib.ExitStack() as locks:
        for folder in folders:
            # No state folder, no apply to wait for (and nothing of imgbatch's to delete).
            output = OutputFolder(folder.output_dir)
            if output.is_made():
                locks.enter_context(output.lock("gc"))
        items = _find_all(folders)
        _mark_changed(folders, items)
        for item in items:
            try:
                item.path.unlink(missing_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot delete {item.path} ({exc.strerror or exc}); the files listed "
                    "before it were deleted"
                ) from None
        for folder in folders:
            OutputFolder(folder.output_dir).remove_empty_shards()
    return Collection(items, deleted=True)


def kept_in_store_only(
    manifests: Sequence[ManifestSource],
    environ: Mapping[str, str] | None = None,
    allow_reference_outside: bool = False,
) -> tuple[frozenset[str], frozenset[str]]:
    """The request keys and the SHA-256s of the images the manifests' folders keep in a store
    only (`apply --no-local-copy`: an entry whose `local_copy` is false): `gc --store` keeps
    their records and blobs whatever their age, since the store holds their only copy."""
    keys: set[str] = set()
    blobs: set[str] = set()
    for folder in _folders(manifests, environ, allow_reference_outside):
        if not folder.output_dir.is_dir():
            continue
        for entry in OutputFolder(folder.output_dir).load().entries.values():
            if entry.local_copy is False:
                keys.add(entry.key)
                if entry.sha256:
                    blobs.add(entry.sha256)
    return frozenset(keys), frozenset(blobs)


def _mark_changed(folders: Sequence[_Folder], items: Sequence[Garbage]) -> None:
    """Before deleting, under the locks: each folder that loses something is marked changed,
    so that an apply that planned before taking its lock plans again (`OutputFolder.version`).
    """
    for folder in folders:
        output = OutputFolder(folder.output_dir)
        if output.is_made() and any(item.path.is_relative_to(folder.output_dir) for item in items):
            output.mark_changed()


def _folders(
    manifests: Sequence[ManifestSource],
    environ: Mapping[str, str] | None,
    allow_reference_outside: bool,
) -> list[_Folder]:
    by_dir: dict[Path, tuple[set[str], set[Path]]] = {}
    for source in manifests:
        manifest = read_manifest(source, allow_reference_outside=allow_reference_outside)
        # Resolved: two spellings of one folder are one folder (and one lock to take).
        output_dir = output_dir_for(manifest, environ).resolve()
        ids, protected = by_dir.setdefault(output_dir, (set(), set()))
        ids.update(spec.id for spec in manifest.shots)
        ids.update(manifest.picks)  # a chosen take's copy, <shot>.png, is a shot's place too
        protected.update(
            Path(reference.source)
            for reference in manifest.references.values()
            if os.path.isabs(reference.source)
        )
    return [
        _Folder(output_dir, frozenset(ids), frozenset(protected))
        for output_dir, (ids, protected) in by_dir.items()
    ]


def _find_all(folders: Iterable[_Folder]) -> tuple[Garbage, ...]:
    found: list[Garbage] = []
    for folder in folders:
        found += find_garbage(folder.output_dir, folder.shot_ids, folder.protected)
    return tuple(sorted(found, key=lambda item: item.path))


def find_garbage(
    output_dir: Path, shot_ids: Iterable[str] = (), protected: Iterable[Path] = ()
) -> list[Garbage]:
    """The garbage in one output folder (see the module doc); `shot_ids` and `protected` are
    the manifests' shots and reference files, kept whatever the results say."""
    if not output_dir.is_dir():
        return []
    folder = OutputFolder(output_dir)
    loaded = folder.load()
    state = loaded.entries
    entries = {key: path for key, path in _keyed_files(folder.cache.root, ".png")}
    if not loaded.known and entries:
        raise StoreError(
            f"{output_dir} has {len(entries)} cached images but no {folder.results_path.name}"
            ", so nothing says which are in use; run apply first (it restores its images from "
            f"the cache without a request), or delete {folder.cache.root} yourself"
        )
    keys = {entry.key for entry in state.values()}
    changes, _ = load_changes(output_dir)
    keys.update(change.previous.key for change in changes.values() if change.previous)
    garbage = [
        Garbage(path, _size(path), Kind.CACHE) for key, path in entries.items() if key not in keys
    ]
    garbage += [
        Garbage(path, _size(path), Kind.THUMBNAIL)
        for key, path in _keyed_files(folder.thumbs_dir, ".webp")
        if key not in keys
    ]
    garbage += [Garbage(path, _size(path), Kind.TEMPORARY) for path in folder.temporaries()]
    placed = {f"{shot_id}.png" for shot_id in shot_ids}
    for entry in state.values():
        placed.add(f"{entry.id}.png")
        if entry.file:
            placed.add(entry.file)
    kept = {path.resolve() for path in protected}
    candidates = [
        path
        for path in _listing(output_dir)
        if path.suffix.lower() == ".png"
        and path.name not in placed
        and path.resolve() not in kept
        and _is(path, stat.S_ISREG)
    ]
    # Only against entries gc keeps: a file matching an entry it collects would be the last copy
    # of that image (a take the user saved under another name before changing the shot).
    kept_entries = {key: path for key, path in entries.items() if key in keys}
    garbage += [
        Garbage(path, _size(path), Kind.IMAGE) for path in _own_images(candidates, kept_entries)
    ]
    return garbage


def _keyed_files(root: Path, suffix: str) -> Iterator[tuple[str, Path]]:
    """`(key, path)` of each `<root>/ab/<key><suffix>` that is a file or a link (never followed:
    a shard folder that is a link is not looked into)."""
    for shard in _listing(root):
        if not _is(shard, stat.S_ISDIR):
            continue
        for path in _listing(shard):
            key = path.name.removesuffix(suffix)
            if (
                path.name.endswith(suffix)
                and _KEY.fullmatch(key)
                and key.startswith(shard.name)
                and (_is(path, stat.S_ISREG) or _is(path, stat.S_ISLNK))
            ):
                yield key, path


def _own_images(candidates: Sequence[Path], entries: Mapping[str, Path]) -> Iterator[Path]:
    """The `candidates` whose bytes are exactly a cache entry's, and whose provenance names that
    entry's key: an image imgbatch wrote, never a user's file that a committed cache entry (or
    results file) copies. Only files no entry names are candidates, so a folder of thousands of
    shots compares next to nothing."""
    if not candidates:
        return
    by_size: dict[int, list[tuple[str, Path]]] = {}
    for key, entry in entries.items():
        if _is(entry, stat.S_ISREG):
            by_size.setdefault(_size(entry), []).append((key, entry))
    for path in candidates:
        if any(
            _same_bytes(path, entry) and _made_for(path, key)
            for key, entry in by_size.get(_size(path), ())
        ):
            yield path


def _made_for(path: Path, key: str) -> bool:
    """Whether the PNG at `path` carries imgbatch's provenance naming request `key`."""
    try:
        found = read_provenance(read_image_file(path), name=str(path))
    except (ImgbatchError, OSError):
        return False
    return found.get(PREFIX + "key") == key


def _same_bytes(one: Path, other: Path) -> bool:
    try:
        with one.open("rb") as first, other.open("rb") as second:
            while True:
                piece = first.read(_COMPARE_CHUNK)
                if piece != second.read(_COMPARE_CHUNK):
                    return False
                if not piece:
                    return True
    except OSError:
        return False


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _is(path: Path, test: Callable[[int], bool]) -> bool:
    try:
        return test(path.lstat().st_mode)
    except OSError:
        return False


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0
