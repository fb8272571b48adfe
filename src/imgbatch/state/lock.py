"""One apply (or generate, or gc deleting) per output folder at a time, across processes.

Takes an output folder; gives a context in which this process alone writes it. A second one is
refused at once (`LockedError`), never interleaved; the lock goes when the process exits, even
if it crashed. A state folder that is a symbolic link is refused before anything is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import filelock

from imgbatch.errors import LockedError, StoreError
from imgbatch.state.cache import STATE_DIR


@contextlib.contextmanager
def exclusive_output(output_dir: Path) -> Iterator[None]:
    """One apply (or generate) per output folder at a time; the second is refused, never
    interleaved."""
    for folder in (output_dir / STATE_DIR, output_dir / STATE_DIR / "cache"):
        if folder.is_symlink():
            # A shot list can come from a pull request: a link committed in place of the state
            # folder would have imgbatch write its cache and lock wherever the link points.
            raise StoreError(
                f"{folder} is a symbolic link; imgbatch keeps its state only in a real folder "
                "(replace the link by a folder); nothing was sent or written"
            )
    try:
        (output_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the output folder {output_dir}: {exc}") from None
    path = output_dir / STATE_DIR / "lock"
    lock = filelock.FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LockedError(
            f"another imgbatch apply is writing to {output_dir}; wait for it to finish "
            "(the lock is released when that process exits, even if it crashed)"
        ) from None
    except OSError as exc:
        # A folder or a symbolic link in its place (filelock never follows a link).
        raise StoreError(
            f"cannot take the lock {path} ({exc.strerror or exc}); move it aside and run apply "
            "again"
        ) from None
    try:
        yield
    finally:
        lock.release()
