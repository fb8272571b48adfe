"""`apply --prune`: orphaned shots' files removed, their entries dropped from results.json.

Takes the orphans' entries (shots in the results that the manifest no longer has) and the files
the manifest's shots use; gives, for each orphan, a `Pruned`: whether its file was removed and
why not when it was kept, and the entries that stay in results.json's `orphans`. The cache is
never touched (`imgbatch gc` collects it), so adding the shot back restores it without a request.

A file is removed only if imgbatch can prove it wrote it and it is unchanged since: a regular
file in the output folder whose size and SHA-256 are its entry's and whose provenance chunk
names the entry's request key (a hand-edited results.json can name any file with its real size
and SHA-256: README.md, the manifest). A file changed since (retouched by hand), a link, a
folder, one without imgbatch's provenance or without a record to check against is kept with
its entry, and the report says why: delete it yourself and the next `--prune` drops the entry.
An orphan whose file is already gone, or that never had one (it failed), just leaves the
results; one billed but not downloaded (`unfetched`) stays until its URL expires, since a shot
with its request recovers it for free.
"""

from __future__ import annotations

import hashlib
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgbatch.errors import ImageError, InspectError, StoreError
from imgbatch.png import PREFIX, read_image_file, read_provenance
from imgbatch.providers.image_url import url_expired_at
from imgbatch.state.results import ResultEntry


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
    if info.st_size != entry.bytes:
        return Pruned(entry.id, name, False, "changed since imgbatch wrote it")
    unproven = _unproven(path, entry)
    if unproven is not None:
        return Pruned(entry.id, name, False, unproven)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot remove {path} ({exc.strerror or exc})") from None
    return Pruned(entry.id, name, True, "removed")


def _unproven(path: Path, entry: ResultEntry) -> str | None:
    """Why the file at `path` cannot be shown to be the image imgbatch wrote for `entry`, or None
    when it can: its bytes are the recorded ones and its provenance names the entry's request.
    A results file can be edited by hand to name any file with its real size and SHA-256; only
    an image imgbatch stamped carries its request's key."""
    try:
        data = read_image_file(path)
    except ImageError as exc:
        return f"cannot be read ({exc})"
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        return "changed since imgbatch wrote it"
    try:
        found = read_provenance(data, name=str(path))
    except InspectError:
        return "it carries no provenance of imgbatch's for this shot: not its own to remove"
    if found.get(PREFIX + "key") != entry.key:
        return "its provenance names another request: not its own to remove"
    return None
