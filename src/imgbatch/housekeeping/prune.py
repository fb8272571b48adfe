"""`apply --prune`: orphaned shots' files removed, their entries dropped from results.json.

Takes the orphans' entries (shots in the results that the manifest no longer has) and the files
the manifest's shots use; gives, for each orphan, a `Pruned`: whether its file was removed and
why not when it was kept, and the entries that stay in results.json's `orphans`. The cache is
never touched (`imgbatch gc` collects it), so adding the shot back restores it without a request.

A file is removed only if it is still what imgbatch wrote: a regular file in the output folder
whose size and SHA-256 are its entry's. A file changed since (retouched by hand), a link, a
folder, or one without a record to check against is kept with its entry, and the report says
why: delete it yourself and the next `--prune` drops the entry. An orphan whose file is already
gone, or that never had one (it failed), just leaves the results; one billed but not downloaded
(`unfetched`) stays until its URL expires, since a shot with its request recovers it for free.
"""

from __future__ import annotations

import hashlib
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgbatch.errors import StoreError
from imgbatch.providers.image_url import url_expired_at
from imgbatch.state.results import ResultEntry

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Pruned:
    id: str
    file: str | None
    removed: bool  # the orphan left results.json (its file, if any, is gone)
    reason: str


def prune_orphans(
    output_dir: Path, orphans: Sequence[ResultEntry], in_use: Iterable[str]
) -> tuple[tuple[Pruned, ...], tuple[ResultEntry, ...]]:
    """Remove the orphans' files that imgbatch wrote; give what was done and the orphans kept.

    `in_use` are the file names the manifest's shots have: never removed, whatever an orphan's
    entry says. Raises `StoreError` naming a file that cannot be removed.
    """
    used = set(in_use)
    done: list[Pruned] = []
    kept: list[ResultEntry] = []
    for entry in orphans:
        outcome = _prune(output_dir, entry, used)
        done.append(outcome)
        if not outcome.removed:
            kept.append(entry)
    return tuple(done), tuple(kept)


def _prune(output_dir: Path, entry: ResultEntry, used: set[str]) -> Pruned:
    name = entry.file
    if entry.status == "unfetched" and url_expired_at(entry.image_url, time.time()) is None:
        # A paid image not downloaded yet: a shot with the same request recovers it from this
        # entry's URL instead of paying again, until the URL expires.
        return Pruned(
            entry.id, None, False, "billed but not downloaded; kept until its image URL expires"
        )
    if name is None:
        return Pruned(entry.id, None, True, "it had no image")
    if Path(name).name != name or name in ("", ".", "..") or name in used:
        # A hand-edited entry naming a file elsewhere, or a current shot's: never removed.
        return Pruned(entry.id, name, False, "its file is not its own to remove")
    path = output_dir / name
    try:
        info = path.lstat()
    except FileNotFoundError:
        return Pruned(entry.id, name, True, "its file was already gone")
    except OSError as exc:
        return Pruned(entry.id, name, False, f"cannot be read ({exc.strerror or exc})")
    if not stat.S_ISREG(info.st_mode):
        return Pruned(entry.id, name, False, "it is not a regular file")
    if entry.sha256 is None or entry.bytes is None:
        return Pruned(entry.id, name, False, "no size and SHA-256 recorded to check it against")
    if info.st_size != entry.bytes or _sha256(path) != entry.sha256:
        return Pruned(entry.id, name, False, "changed since imgbatch wrote it")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot remove {path} ({exc.strerror or exc})") from None
    return Pruned(entry.id, name, True, "removed")


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while piece := handle.read(_CHUNK):
                digest.update(piece)
    except OSError:
        return None
    return digest.hexdigest()
