"""The chosen takes: `pick: N` on a shot with variants makes apply also write `<shot>.png`.

Takes the output folder, the manifest's picks (the id a shot's variants share -> the chosen
take's id) and the run's results entries; gives the files it wrote. The copy is of the take's
image file as apply left it (provenance included), made only when it differs from what is there,
so a re-apply that changes nothing writes nothing. A take with no image yet (failed, or not
made) is skipped: its file appears with the apply that makes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from imgbatch.state.cache import atomic_write
from imgbatch.state.folder import OutputFolder
from imgbatch.state.results import ResultEntry


def place_picks(
    output_dir: Path, picks: Mapping[str, str], entries: Sequence[ResultEntry]
) -> tuple[str, ...]:
    """Write each chosen take as `<shot>.png`; gives the names of the files written."""
    by_id = {entry.id: entry for entry in entries}
    cache = OutputFolder(output_dir).cache
    written = []
    for shot, take in picks.items():
        entry = by_id.get(take)
        if entry is None or not entry.has_image:
            continue
        source = output_dir / entry.file if entry.file else cache.path(entry.key)
        if not source.is_file():
            source = cache.path(entry.key)
        try:
            data = source.read_bytes()
        except OSError:
            continue  # the take itself is missing: the next apply restores it, then this
        target = output_dir / f"{shot}.png"
        if _holds(target, data):
            continue
        atomic_write(target, data)
        written.append(target.name)
    return tuple(written)


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False
