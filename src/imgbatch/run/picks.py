"""The chosen takes: `pick: N` on a shot with variants makes apply also write `<shot>.png`.

Takes the output folder, the manifest's picks (the id a shot's variants share -> the chosen
take's id) and the run's results entries; gives the files it wrote. The copy is of the take's
image file as apply left it (provenance included; read never through a symbolic link, and only
if it is a PNG, else the take's image from the cache), made only when it differs from what is
there, so a re-apply that changes nothing writes nothing. A take with no image yet (failed, or not
made) is skipped: its file appears with the apply that makes it.

With `--no-local-copy` the takes are kept in the store only, and the picked `<shot>.png` is
written all the same: it is the one file per shot a pipeline reads, and the user asked for it
by name. A take this run placed is copied before its local copy goes; one not on this machine
(picked after the run that moved it to the store) is first fetched from the store
(`fetch_picked`), checked as every restore is.
"""

from __future__ import annotations

import asyncio
import hashlib
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from imgbatch.errors import ImageError, SharedEntryDamaged
from imgbatch.png import PNG_SIGNATURE, read_image_file
from imgbatch.run.sharing import SharedRun
from imgbatch.run.store_only import local_image
from imgbatch.shots.expand import Shot
from imgbatch.state.cache import atomic_write
from imgbatch.state.folder import OutputFolder
from imgbatch.state.results import ResultEntry


def place_picks(
    output_dir: Path, picks: Mapping[str, str], entries: Sequence[ResultEntry]
) -> tuple[str, ...]:
    """Write each chosen take as `<shot>.png`; gives the names of the files written."""
    by_id = {entry.id: entry for entry in entries}
    written = []
    for shot, take in picks.items():
        entry = by_id.get(take)
        if entry is None or not entry.has_image:
            continue
        data = _take(output_dir, entry)
        if data is None:
            continue  # the take itself is missing: the next apply restores it, then this
        target = output_dir / f"{shot}.png"
        if _holds(target, data):
            continue
        atomic_write(target, data)
        written.append(target.name)
    return tuple(written)


async def fetch_picked(
    sharing: SharedRun,
    output_dir: Path,
    picks: Mapping[str, str],
    entries: Sequence[ResultEntry],
    shots: Sequence[Shot],
) -> None:
    """Put in the local cache each picked take kept in the store only (`local_copy` false)
    whose image is neither in the output folder nor the cache: its record looked up and its
    blob fetched, checked against the record and decoded at the take's size (two requests),
    and only if the record is of the image the take's entry names. `place_picks` then copies
    it; the cache entry goes with the run's other store-only copies. A store that lacks it
    leaves the picked file as it was. A take whose `<shot>.png` already holds it (an earlier
    apply wrote it) is not fetched: a no-op apply asks the store nothing."""
    by_id = {entry.id: entry for entry in entries}
    by_shot = {shot.id: shot for shot in shots}
    for picked, take in picks.items():
        entry, shot = by_id.get(take), by_shot.get(take)
        if entry is None or shot is None or entry.local_copy is not False:
            continue
        if not entry.has_image or local_image(output_dir, entry).is_file():
            continue
        if _is_copy_of(output_dir / f"{picked}.png", entry):
            continue  # written by an earlier apply: nothing to fetch (a no-op asks nothing)
        try:
            record = await sharing.shared.lookup(entry.key)
        except SharedEntryDamaged:
            continue
        if record is None or record.sha256 != entry.sha256:
            continue
        restored = await sharing.fetch(shot, record)
        if restored is not None:
            await asyncio.to_thread(sharing.local.put, entry.key, restored.data)


def _take(output_dir: Path, entry: ResultEntry) -> bytes | None:
    """The take's image: its file in the output folder as it is (a hand edit too), else its
    cache entry; None when neither is there. Each is read as an image file is (`png.
    read_image_file`: never through a symbolic link) and taken only if it is a PNG: a take
    committed as a link to a secret, or any file put in its place, is never copied into
    `<shot>.png`, the file a pipeline publishes."""
    cache = OutputFolder(output_dir).cache.path(entry.key)
    for path in (output_dir / entry.file if entry.file else None, cache):
        if path is None:
            continue
        try:
            data = read_image_file(path)
        except ImageError:
            continue
        if data.startswith(PNG_SIGNATURE):
            return data
    return None


def _is_copy_of(path: Path, entry: ResultEntry) -> bool:
    """Whether the file at `path` (not through a link) holds `entry`'s image: its size, then
    its SHA-256 (read only when the size is the image's)."""
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size != entry.bytes:
            return False
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest() == entry.sha256
    except OSError:
        return False


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False
