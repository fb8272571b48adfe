"""Bytes on disk: atomic writes, the content-addressed image cache, image verification.

Takes image bytes and keys; gives files that are either whole or absent. Every write goes to a
temporary file in the same folder, is flushed to disk, then renamed over the target, so a reader
(or a crash) never sees half an image. The cache keeps one PNG per request key under
`<output>/.imgbatch/cache/ab/<key>.png`; the executor never learns where bytes live beyond this
interface, so an object-store cache can replace it.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from PIL import Image

STATE_DIR = ".imgbatch"


def atomic_write(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write `data` to `path` so that `path` is always either the old or the new content.

    `data` is the whole content, or its pieces in order, written as they come (a large file
    need not be held in memory whole).
    """
    pieces = [data] if isinstance(data, bytes) else data
    _write_atomically(path, lambda handle: handle.writelines(pieces))


def atomic_copy(source: Path, target: Path) -> None:
    """Copy `source` to `target` with the same whole-or-absent guarantee as `atomic_write`."""

    def copy(handle: BinaryIO) -> None:
        with source.open("rb") as reader:
            shutil.copyfileobj(reader, handle)

    _write_atomically(target, copy)


def _write_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def verify_image(data: bytes, width: int, height: int) -> None:
    """Raise ValueError unless `data` decodes fully as an image of `width` x `height` (the size
    the request asked for: what the service reports about it is not evidence)."""
    try:
        with warnings.catch_warnings():
            # A truncated or bomb-sized download is an error here, never a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
                image.load()
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        raise ValueError(f"downloaded bytes are not a whole image ({exc})") from None
    if size != (width, height):
        raise ValueError(
            f"downloaded image is {size[0]}*{size[1]}, not the {width}*{height} asked for"
        )


def remove_stale_temporaries(output_dir: Path) -> int:
    """Delete temp files a killed run left behind; call only while holding the output lock."""
    removed = 0
    for folder in (
        output_dir,
        output_dir / STATE_DIR,
        *(output_dir / STATE_DIR / "cache").glob("*"),
    ):
        for temp in folder.glob(".*.tmp"):
            temp.unlink(missing_ok=True)
            removed += 1
    return removed


class ImageCache:
    """One verified PNG per request key, never overwritten once written."""

    def __init__(self, output_dir: Path) -> None:
        self.root = output_dir / STATE_DIR / "cache"

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, data: bytes) -> None:
        atomic_write(self.path(key), data)

    def copy_to(self, key: str, target: Path) -> None:
        # A copy, not a hard link: editing the output file in place must not alter the cache.
        atomic_copy(self.path(key), target)
