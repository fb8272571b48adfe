"""The cache and the output folder share an image's bytes where the file system allows it safely.

Takes: `ImageCache.restore`, `ImageCache.place` and `imgbatch apply` on real folders.
Gives: proof that the output file holds the entry's bytes, is its own file (never a hard link), and
that an in-place edit of it leaves the cache entry intact, on any file system; and, where the
folder is on a file system with reflinks (btrfs, XFS...), that the two files share their extents
(read with FIEMAP). tmp_path is used when it has reflinks; otherwise the folder named by
`IMGBATCH_TEST_REFLINK_DIR` (say a loop-mounted XFS) when set; otherwise those tests skip.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import random
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from imgbatch.cli.main import main
from imgbatch.state import cache as store
from imgbatch.state.cache import ImageCache
from imgbatch.state.folder import OutputFolder
from tests.support.files import write_many_shots

FICLONE = 0x40049409  # linux/fs.h; asked here directly, not through the code under test
KEY = "ab" + "0123456789abcdef" * 3 + "0123456789abcd"
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_SHARED = 0x2000


def noisy_png(width: int = 384, height: int = 384) -> bytes:
    """Half a megabyte or so that does not compress: many blocks, several extents maybe."""
    rng = random.Random(7)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def can_reflink(folder: Path) -> bool:
    source, target = folder / f"probe-{uuid.uuid4().hex}", folder / f"probe-{uuid.uuid4().hex}"
    source.write_bytes(b"x" * 8192)
    try:
        with source.open("rb") as src, target.open("wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return True
    except OSError:
        return False
    finally:
        source.unlink()
        target.unlink(missing_ok=True)


def extents(path: Path) -> list[tuple[int, int, int]]:
    """(physical start, length, flags) of each extent of `path`, by the FIEMAP ioctl."""
    count = 256
    request = struct.pack("=QQIIII", 0, 2**64 - 1, FIEMAP_FLAG_SYNC, 0, count, 0)
    buffer = bytearray(request + bytes(56 * count))
    with path.open("rb") as handle:
        fcntl.ioctl(handle.fileno(), FS_IOC_FIEMAP, buffer)
    mapped = struct.unpack_from("=I", buffer, 20)[0]
    found = []
    for index in range(mapped):
        _, physical, length = struct.unpack_from("=QQQ", buffer, 32 + 56 * index)
        (flags,) = struct.unpack_from("=I", buffer, 32 + 56 * index + 40)
        found.append((physical, length, flags))
    return found


@pytest.fixture
def reflink_dir(tmp_path: Path) -> Iterator[Path]:
    if can_reflink(tmp_path):
        yield tmp_path
        return
    given = os.environ.get("IMGBATCH_TEST_REFLINK_DIR")
    if not given or not can_reflink(Path(given)):
        pytest.skip(
            f"{tmp_path} has no reflinks (ext4, tmpfs?) and IMGBATCH_TEST_REFLINK_DIR names no "
            "folder that has"
        )
    folder = Path(given) / f"imgbatch-test-{uuid.uuid4().hex}"
    folder.mkdir()
    yield folder
    for path in sorted(folder.rglob("*"), key=lambda item: len(item.parts), reverse=True):
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    folder.rmdir()


def assert_shared(entry: Path, target: Path) -> None:
    mine, theirs = extents(target), extents(entry)
    assert mine, "the placed file has no extents"
    assert [(physical, length) for physical, length, _ in mine] == [
        (physical, length) for physical, length, _ in theirs
    ]
    assert all(flags & FIEMAP_EXTENT_SHARED for _, _, flags in mine)


def assert_independent(entry: Path, target: Path, data: bytes) -> None:
    """The output file is a file of its own: an in-place edit never reaches the cache entry."""
    assert target.read_bytes() == data
    assert target.stat().st_ino != entry.stat().st_ino
    assert target.stat().st_nlink == 1 and entry.stat().st_nlink == 1
    with target.open("r+b") as handle:  # as an image editor saving over the file would
        handle.seek(len(data) // 2)
        handle.write(b"RETOUCHED" * 100)
    assert entry.read_bytes() == data
    assert target.read_bytes() != data


def restore(cache: ImageCache, target: Path, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    placed = cache.restore(KEY, target, sha256=digest, size=len(data), dimensions=(384, 384))
    assert placed == (digest, len(data))


def place(cache: ImageCache, target: Path, data: bytes) -> None:
    cache.place(KEY, target, data)


WAYS = {"restore": restore, "place": place}


# --- on any file system -------------------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
def test_the_output_file_is_never_a_link_and_edits_stay_out_of_the_cache(
    way: str, tmp_path: Path
) -> None:
    data = noisy_png()
    cache = OutputFolder(tmp_path).cache
    cache.put(KEY, data)
    target = tmp_path / "s01.png"
    WAYS[way](cache, target, data)
    assert_independent(cache.path(KEY), target, data)
    # The next restore finds the entry whole and puts the image back.
    restore(cache, target, data)
    assert target.read_bytes() == data
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(store.TEMP_PREFIX)]


@pytest.mark.parametrize("way", WAYS)
def test_the_cache_entry_is_offered_to_the_file_system_to_share(
    way: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the file system answers, the output file is asked to be a reflink of the entry
    (and copied when it cannot be)."""
    data = noisy_png()
    cache = OutputFolder(tmp_path).cache
    cache.put(KEY, data)
    asked: list[tuple[int, Path]] = []
    real = store.clone

    def spy(source_fd: int, target_fd: int) -> bool:
        asked.append((os.fstat(source_fd).st_ino, Path(f"/proc/self/fd/{target_fd}").readlink()))
        return real(source_fd, target_fd)

    monkeypatch.setattr(store, "clone", spy)
    target = tmp_path / "out" / "s01.png"
    WAYS[way](cache, target, data)
    assert len(asked) == 1
    inode, temporary = asked[0]
    assert inode == cache.path(KEY).stat().st_ino
    assert temporary.parent == target.parent and temporary.name.startswith(store.TEMP_PREFIX)
    assert target.read_bytes() == data


@pytest.mark.parametrize("way", WAYS)
def test_a_file_system_that_refuses_a_reflink_gets_a_copy(
    way: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = noisy_png()
    cache = OutputFolder(tmp_path).cache
    cache.put(KEY, data)
    real_ioctl = fcntl.ioctl

    def refuse(fd: int, request: int, arg: int = 0) -> object:
        if request == store.FICLONE:
            with open(fd, "wb", closefd=False) as handle:  # a refusal that left bytes behind
                handle.write(b"partial")
            raise OSError(95, "Operation not supported")
        return real_ioctl(fd, request, arg)

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    target = tmp_path / "s01.png"
    WAYS[way](cache, target, data)
    assert target.read_bytes() == data
    assert_independent(cache.path(KEY), target, data)


# --- where the file system has reflinks -----------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
def test_the_output_file_shares_the_entry_bytes_copy_on_write(way: str, reflink_dir: Path) -> None:
    data = noisy_png()
    cache = OutputFolder(reflink_dir).cache
    cache.put(KEY, data)
    target = reflink_dir / "s01.png"
    WAYS[way](cache, target, data)
    assert_shared(cache.path(KEY), target)
    assert_independent(cache.path(KEY), target, data)


def test_a_restore_checks_the_bytes_it_shares(reflink_dir: Path) -> None:
    data = noisy_png()
    cache = OutputFolder(reflink_dir).cache
    cache.put(KEY, data)
    with cache.path(KEY).open("r+b") as handle:  # damaged after it was recorded
        handle.seek(1000)
        handle.write(b"\0" * 16)
    target = reflink_dir / "s01.png"
    with pytest.raises(store.CacheEntryDamaged, match="does not match its record"):
        restore(cache, target, data)
    assert sorted(path.name for path in reflink_dir.iterdir()) == [".imgbatch"]


def test_apply_stores_each_image_once(reflink_dir: Path) -> None:
    manifest = write_many_shots(reflink_dir, "shared", 3)
    out = reflink_dir / "output" / "shared"
    runner = CliRunner()
    first = runner.invoke(main, ["apply", str(manifest), "--provider", "placeholder"])
    assert first.exit_code == 0, first.output
    state = OutputFolder(out).load().entries
    cache = OutputFolder(out).cache
    for entry in state.values():
        assert_shared(cache.path(entry.key), out / f"{entry.id}.png")  # generated
    (out / "shot-001.png").unlink()
    again = runner.invoke(main, ["apply", str(manifest), "--provider", "placeholder"])
    assert again.exit_code == 0, again.output
    assert "1 cached" in again.output
    restored = state["shot-001"]
    assert_shared(cache.path(restored.key), out / "shot-001.png")
    assert_independent(
        cache.path(restored.key),
        out / "shot-001.png",
        cache.path(restored.key).read_bytes(),
    )
