"""One apply (or generate, or gc deleting) per output folder at a time, across processes.

Takes an output folder and the command that wants it; gives a context in which this process
alone writes it. A second one is refused at once (`LockedError`, naming the command that holds
it), never interleaved; the lock goes when the process exits, even if it crashed. A state
folder that is a symbolic link is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import filelock

from imgbatch.errors import LockedError, StoreError
from imgbatch.state.cache import STATE_DIR, atomic_write
from imgbatch.state.last_run import THUMBS_DIR

LOCK_HOLDER = "lock.holder"
_HOLDERS = ("apply", "generate", "gc")


@contextlib.contextmanager
def exclusive_output(output_dir: Path, holder: str = "apply") -> Iterator[None]:
    """One apply (or generate, or gc: the `holder`) per output folder at a time; the second is
    refused, never interleaved, and told which command holds the folder."""
    state_dir = output_dir / STATE_DIR
    for folder in (state_dir, state_dir / "cache", state_dir / THUMBS_DIR):
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
        command, pid = _lock_holder(path)
        raise LockedError(
            f"another imgbatch {command} is writing to {output_dir}{pid}; wait for it to "
            "finish (the lock is released when that process exits, even if it crashed)"
        ) from None
    except OSError as exc:
        # A folder or a symbolic link in its place (filelock never follows a link).
        raise StoreError(
            f"cannot take the lock {path} ({exc.strerror or exc}); move it aside and run apply "
            "again"
        ) from None
    # Who holds it, for another command's refusal; gone again before the lock is released, so
    # a command that changes nothing leaves nothing changed. Never worth failing for.
    named = path.with_name(LOCK_HOLDER)
    with contextlib.suppress(OSError, StoreError):  # StoreWriteError: a folder it cannot write
        atomic_write(named, f"{holder} {os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            named.unlink(missing_ok=True)
        lock.release()


def _lock_holder(lock: Path) -> tuple[str, str]:
    """Which command holds `lock` and " (process N)", as the holder wrote them beside the lock
    (read, never trusted: only a known command and a number are shown); else "command", ""."""
    try:
        with open(lock.with_name(LOCK_HOLDER), "rb") as stream:
            command, _, pid = stream.read(64).decode("ascii").strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return "command", ""
    if command not in _HOLDERS:
        return "command", ""
    return command, f" (process {pid})" if pid.isdigit() else ""
