"""`apply --no-local-copy`: images kept in the shared store only, not in the output folder.

Takes a run's settled shots and its `SharedRun`; gives the shots whose entries say `local_copy:
false` (only those whose exact image the store is known to hold: restored from it or published
to it by this run, the record's SHA-256 the entry's), and removes their local copies (the file
in the output folder and the cache entry) once results.json and the sheet, with its thumbnails
and the links signed for it (`imgbatch.review.sheet.signed_links`), are written: every image
still passes through this machine, where it is checked and its thumbnail made.

An image the store cannot be shown to hold (a read-only store, a publish that failed, an image
restored from the local cache alone) stays in the folder as usual. So does every image of a
run during which a `gc --store` wrote its marker (`confirmed`): that gc may have deleted what
the run looked up, and the store must still hold an image when its last local copy goes.

A signed URL is a credential for as long as it lasts: it goes into the contact sheet alone,
never results.json, the state, a log or `--json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from imgbatch.errors import ConfigError, SharedEntryDamaged, SharedStoreError
from imgbatch.housekeeping.store_gc import collecting
from imgbatch.manifest import Manifest
from imgbatch.review.outcome import ShotOutcome
from imgbatch.run.sharing import LOOKUPS_IN_FLIGHT, SharedRun
from imgbatch.state.folder import OutputFolder
from imgbatch.state.results import ResultEntry
from imgbatch.state.store import Record, choose_store, chosen_store, store_url

_LEFT_ALONE = frozenset({"unchanged", "drift", "not_run"})
# The outcomes whose image is in the output folder as imgbatch wrote it.
_IN_FOLDER = frozenset({"unchanged", "generated", "cached"})


def require_store(flag: str | None, environ: Mapping[str, str], manifest: Manifest) -> None:
    """`ConfigError` (a usage error) unless a store is named: `--no-local-copy` needs one."""
    if choose_store(flag, environ, manifest.store) is None:
        raise ConfigError(
            "--no-local-copy keeps images only in a shared store, and none is named: give "
            "--store URL, set IMGBATCH_STORE, or set output.store in the shot list"
        )


def named_store(flag: str | None, environ: Mapping[str, str], manifest: Manifest) -> str | None:
    """The URL of the store the run names (`chosen_store`: a folder in `output.store` is
    relative to the manifest), as the store gives it (`store_url`): what the plan compares
    results.json's `image_url`s with. None when none is named; `ConfigError` for a bad URL."""
    chosen = chosen_store(flag, environ, manifest.store, manifest.base_dir)
    return None if chosen is None else store_url(*chosen)


def kept_in_store(
    shots: Sequence[ShotOutcome], sharing: SharedRun | None, no_local_copy: bool
) -> tuple[ShotOutcome, ...]:
    """`shots` with the entries this run made or restored saying where their image is kept:
    `local_copy` False when `no_local_copy` and the store holds that very image, else unset (a
    shot left alone keeps its entry as it was)."""
    records = sharing.records if sharing is not None else {}
    marked = []
    for shot in shots:
        entry = shot.entry
        if entry is not None and entry.has_image and shot.status not in _LEFT_ALONE:
            record = records.get(entry.key)
            stored = no_local_copy and record is not None and record.sha256 == entry.sha256
            where = False if stored else None
            if entry.local_copy is not where:
                shot = replace(shot, entry=replace(entry, local_copy=where))
        marked.append(shot)
    return tuple(marked)


async def moved_to_store(
    sharing: SharedRun | None, output_dir: Path, shots: Sequence[ShotOutcome]
) -> tuple[ShotOutcome, ...]:
    """`shots` with each image still in the folder (unchanged, or placed by this run without
    the store being known to hold it: restored from the local cache, or a publish that failed)
    marked as kept in the store only, once the store holds it: its record looked up (one
    request; none for a shot already in the store only) and, where the store has none, the
    image published (unless read-only), after checking the file is the one recorded. An image
    the store holds another image for (under the same key) stays in the folder."""
    limit = asyncio.Semaphore(LOOKUPS_IN_FLIGHT)

    async def one(shot: ShotOutcome) -> ShotOutcome:
        entry = shot.entry
        if sharing is None or entry is None or shot.status not in _IN_FOLDER:
            return shot
        if not entry.has_image or entry.local_copy is False or not entry.file:
            return shot
        async with limit:
            record = await _stored(sharing, output_dir, entry)
        if record is None or record.sha256 != entry.sha256:
            return shot
        blob = sharing.shared.blob_url(record.sha256)
        return replace(shot, entry=replace(entry, local_copy=False, image_url=blob))

    return tuple(await asyncio.gather(*map(one, shots)))


async def _stored(sharing: SharedRun, output_dir: Path, entry: ResultEntry) -> Record | None:
    """The store's record of `entry`'s key, publishing the file first where it has none."""
    try:
        record = await sharing.shared.lookup(entry.key)
    except SharedEntryDamaged:
        return None
    if record is not None or sharing.shared.read_only or entry.file is None:
        return record
    try:
        data = await asyncio.to_thread((output_dir / entry.file).read_bytes)
    except OSError:
        return None
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        return None  # not the image recorded (edited since): it stays where it is
    published = replace(entry, image_url=sharing.shared.blob_url(entry.sha256 or ""))
    try:
        record = await sharing.shared.publish(entry.key, data, published.to_json())
    except SharedStoreError:
        return None
    sharing.records[entry.key] = record
    sharing.published += 1
    return record


def local_image(output_dir: Path, entry: ResultEntry) -> Path:
    """Where `entry`'s image is on this machine: its file in `output_dir` as apply left it,
    else its cache entry (which may be missing too)."""
    if entry.file and (output_dir / entry.file).is_file():
        return output_dir / entry.file
    return OutputFolder(output_dir).cache.path(entry.key)


async def confirmed(
    sharing: SharedRun | None, output_dir: Path, entries: Sequence[ResultEntry]
) -> list[ResultEntry]:
    """`entries` (kept in the store only, as results.json says by now), or none at all when a
    `gc --store` may have deleted something since this run opened the store (`collecting`: one
    LIST, and only when some entry has a local copy to drop). The order is the point:
    results.json first, then the look; gc's marker first, then its second read of the
    folders. Either gc sees this folder keeps them, or this run sees gc was at work after it
    looked them up (see `housekeeping.store_gc`). Entries not dropped keep their local copies
    for the next apply to drop."""
    if sharing is None:
        return []
    here = [entry for entry in entries if local_image(output_dir, entry).is_file()]
    if not here:
        return []
    since = time.monotonic() - sharing.opened + sharing.shared.claims.claims.lease
    try:
        at_work = await collecting(
            sharing.shared.objects, since, sharing.shared.claims.claims.lease
        )
    except SharedStoreError:
        at_work = True  # unknown: kept, as for a gc at work
    if at_work:
        sharing.kept_local = len(here)  # said in the run's report (`StoreUse.kept_local`)
        return []
    return list(entries)


def stored_only(shots: Iterable[ShotOutcome]) -> list[ResultEntry]:
    """The entries of `shots` kept in the store only: their local copies, if any, go."""
    return [
        shot.entry
        for shot in shots
        if shot.entry is not None and shot.entry.has_image and shot.entry.local_copy is False
    ]


def drop_local_copies(output_dir: Path, entries: Iterable[ResultEntry]) -> None:
    """Remove each entry's file (if it is the image recorded, else it is not the one: kept) and
    its cache entry. Called after results.json and the sheet are written, for the entries
    `confirmed` gives: a run killed before this leaves the files, which the next plan finds
    unchanged, and the next apply drops."""
    cache = OutputFolder(output_dir).cache
    for entry in entries:
        if entry.file:
            path = output_dir / entry.file
            with contextlib.suppress(OSError):
                if _is_recorded(path, entry):
                    path.unlink()
        cache.discard(entry.key)


def _is_recorded(path: Path, entry: ResultEntry) -> bool:
    """Whether the regular file at `path` (not a link) holds `entry`'s image: its size, then
    its SHA-256 (a hand edit that kept the size is the user's, and the store holds imgbatch's
    image, not it). `OSError` when it cannot be read."""
    if entry.sha256 is None or entry.bytes is None:
        return False
    with open(path, "rb", opener=_no_links) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size != entry.bytes:
            return False
        return hashlib.file_digest(handle, "sha256").hexdigest() == entry.sha256


def _no_links(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
