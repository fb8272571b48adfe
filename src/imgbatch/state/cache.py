"""Bytes on disk: atomic writes, the content-addressed image cache, image verification.

Takes image bytes and keys; gives files that are either whole or absent. Every write goes to a
temporary file named `.imgbatch-tmp-*.tmp` in the same folder (a name only imgbatch makes, so the
cleanup of a killed run's leftovers never touches a user's file), is flushed to disk, then
renamed over the target, so a reader (or a crash) never sees half an image. Files are created
0666 minus the umask, as `open()` would. A write that fails raises `StoreWriteError` naming the
file (`disk_full` when the filesystem is out of space).

The cache keeps one PNG per request key under its root, as `ab/<key>.png`. Its
entries are read without following symbolic links, and every restore checks the bytes against
what was recorded for that key (size and SHA-256), or, without a record, that they decode as a
PNG of the shot's size (`imgbatch.png`: PNG only, its size read from its header first): a damaged
entry raises `CacheEntryDamaged` and is discarded, never copied into place. The executor never
learns where bytes live beyond this interface, so an object-store cache can replace it.

An image is in the cache and in the output folder, but its bytes are stored once where the file
system can share them safely: a restore (and `place`, after a new image is cached) makes the
output file a reflink of the cache entry (`FICLONE`: btrfs, XFS, bcachefs, overlayfs on those,
NFS 4.2 with server-side clone). A reflink is copy-on-write: a tool that edits the output file in
place changes its own copy, never the cache entry. Elsewhere (ext4, tmpfs) the bytes are copied.
Never a hard link: image editors and `open(path, "wb")` rewrite a file in place, which through a
hard link would rewrite the cache entry too (the SHA-256 check would catch it, but the image would
be lost). A restore reads the bytes to verify them anyway, so it copies what it read.

A new image is written into the cache as it arrives (`ImageCache.receive` gives an `Incoming`):
each piece is hashed and written to a temporary file in the entry's shard as it comes, so no
image is held in memory whole while it downloads; it becomes the entry (fsynced, then renamed)
only once `commit`ted, and is put at the shot's file from that same open file, in the kernel
(`os.copy_file_range`) where it is not a reflink.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

from imgbatch.errors import CacheEntryDamaged, ImageError, StoreError, StoreWriteError
from imgbatch.png import check_png, decode_png, png_dimensions

if TYPE_CHECKING:
    from PIL import Image

TEMP_PREFIX = ".imgbatch-tmp-"
# A cache entry larger than any image the service makes is not one (and is never read whole).
MAX_CACHED_BYTES = 64 * 1024 * 1024
# linux/fs.h: _IOW(0x94, 9, int). Makes the file a reflink of another on the same file system.
FICLONE = 0x40049409
# Pieces one writev takes (POSIX guarantees 16; Linux and macOS take 1,024).
_IOV_MAX = 1024
_T = TypeVar("_T")


def atomic_write(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write `data` to `path` so that `path` is always either the old or the new content.

    `data` is the whole content, or its pieces in order, written as they come (a large file
    need not be held in memory whole). Raises `StoreWriteError` naming `path`.
    """
    pieces = [data] if isinstance(data, bytes) else data

    def fill(fd: int) -> None:
        for piece in pieces:
            _write_fd(fd, piece, path)

    _atomic(path, fill)


def _atomic(path: Path, fill: Callable[[int], _T]) -> _T:
    """Give `path` the content `fill` puts in a new temporary file beside it, atomically.

    `fill` gets the temporary file's descriptor (open for reading and writing); an OSError from
    it is a failed write of `path` (`StoreWriteError`), anything else is raised as it is. Either
    way the temporary file is gone and `path` untouched.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = _create_temp(path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        try:
            result = fill(fd)
            # mkstemp makes 0600 files; give what open() would, so an image or results.json
            # under umask 022 stays readable by the group and others.
            os.fchmod(fd, 0o666 & ~_umask())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as exc:
        Path(temp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    return result


def clone(source_fd: int, target_fd: int) -> bool:
    """Make the empty file `target_fd` a reflink of `source_fd` (shared, copy-on-write bytes);
    False, with `target_fd` still empty, where the file system cannot (or across file systems).
    """
    if sys.platform != "linux":
        return False
    import fcntl

    try:
        fcntl.ioctl(target_fd, FICLONE, source_fd)
    except OSError:
        # EOPNOTSUPP (ext4, tmpfs), EXDEV (another file system), EINVAL (overlayfs across
        # layers), ENOTTY: any refusal means "copy instead". A failed clone may have left part
        # of the range behind on some file systems.
        _empty(target_fd)
        return False
    return True


def write_error(path: Path, error: OSError) -> StoreWriteError:
    """The error for a failed write of `path`, saying which filesystem to free when it is full."""
    return StoreWriteError(str(path), error, _mount_point(path))


def check_writable(folder: Path) -> None:
    """Raise StoreError naming `folder` unless a file can be created and removed in it."""
    try:
        if not folder.is_dir():
            raise StoreError(f"{folder} is not a folder; move it aside and run apply again")
        fd, temp = _create_temp(folder)
        os.close(fd)
        os.unlink(temp)
    except OSError as exc:
        raise StoreError(
            f"cannot write in {folder}: {exc.strerror or exc}; nothing was sent"
        ) from None


def remove_temporaries(folders: Iterable[Path]) -> int:
    """Delete the temp files a killed run left in `folders` (never their subfolders); call
    only while holding the output lock (another run's temp file is never in flight then)."""
    removed = 0
    for folder in folders:
        # Names looked at one at a time: `Path.glob` lists the whole folder first, and an
        # output folder of 100,000 images made that list the peak of a no-op apply's memory.
        try:
            with os.scandir(folder) as listing:
                names = [
                    item.name
                    for item in listing
                    if item.name.startswith(TEMP_PREFIX) and item.name.endswith(".tmp")
                ]
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # as glob: nothing there to remove
        for name in names:
            (folder / name).unlink(missing_ok=True)
            removed += 1
    return removed


def real_subfolders(root: Path) -> list[Path]:
    """The folders directly in `root` that are real ones (a link to a folder is not followed)."""
    try:
        return sorted(path for path in root.iterdir() if _is_real_folder(path))
    except OSError:
        return []


def verify_image(
    data: bytes | IO[bytes],
    width: int,
    height: int,
    *,
    then: Callable[[Image.Image], object] | None = None,
) -> None:
    """Raise `ImageError` (a ValueError) unless `data` (bytes, or a binary file open at its
    start) decodes fully as a PNG of `width` x
    `height` (the size the request asked for: what the service reports about it is not
    evidence). The size is read from the PNG header before a pixel is decoded. `then` is given
    the decoded image (to make a thumbnail from the one decode), only once it has passed."""
    with decode_png(data, "downloaded bytes", size=(width, height)) as image:
        if then is not None:
            then(image)


class AppendLog:
    """A file appended to a line at a time, each line on disk before `append` returns.

    Opened without following a symbolic link. A line whose write failed (a full disk) may be
    left torn; the next line starts on a line of its own, so only the failed one is lost.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, flags, 0o666)
            size = os.fstat(self._fd).st_size
            # A killed run left a torn line: end it, so our first line stands on its own.
            self._torn = size > 0 and os.pread(self._fd, 1, size - 1) != b"\n"
        except OSError as exc:
            raise StoreError(
                f"cannot open {path} for writing ({exc.strerror or exc}); move it aside and "
                "run apply again"
            ) from None

    def append(self, line: bytes) -> None:
        data = b"\n" + line if self._torn else line
        try:
            self._torn = True
            _write_fd(self._fd, data, self.path)
            os.fsync(self._fd)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self._torn = not line.endswith(b"\n")

    def close(self) -> None:
        os.close(self._fd)


class ImageCache:
    """One verified PNG per request key under `root`, never overwritten once written.

    Its operations are `has`, `put`, `restore` (checked against the key's record), `place`
    and `discard`; nothing outside it knows how entries are laid out beyond `path`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def has(self, key: str) -> bool:
        """An entry exists (a link or a damaged file too: `restore` finds out, and says so)."""
        try:
            mode = self.path(key).lstat().st_mode
        except OSError:
            return False
        return stat.S_ISREG(mode) or stat.S_ISLNK(mode)

    def put(self, key: str, data: bytes) -> None:
        self._real_shard(key)
        atomic_write(self.path(key), data)

    def receive(self, key: str) -> Incoming:
        """A new entry for `key`, written as its bytes arrive (see `Incoming`). Raises
        `StoreWriteError` when its temporary file cannot be made."""
        self._real_shard(key)
        return Incoming(self.path(key))

    def _real_shard(self, key: str) -> None:
        shard = self.path(key).parent
        if shard.is_symlink():
            # Never write through a link inside the cache: make the folder a real one.
            shard.unlink()

    def restore(
        self,
        key: str,
        target: Path,
        *,
        sha256: str | None,
        size: int | None,
        dimensions: tuple[int, int],
    ) -> tuple[str, int]:
        """Put the entry at `target` once it is checked; give its SHA-256 and size.

        Checked against the recorded `sha256` and `size` when there is a record, else decoded
        at `dimensions`. The bytes checked are the ones placed: where `target` is made a reflink
        of the entry, the reflink is what is read and checked. Raises `CacheEntryDamaged`
        (nothing written) or `StoreWriteError`.
        """
        path = self.path(key)
        entry = self._open(key)
        try:

            def fill(fd: int) -> tuple[str, int]:
                shared = clone(entry, fd)
                data = _read_fd(fd if shared else entry, path)
                digest = _check_entry(path, data, sha256, size, dimensions)
                if not shared:
                    _write_fd(fd, data, target)
                return digest, len(data)

            return _atomic(target, fill)
        finally:
            os.close(entry)

    def place(self, key: str, target: Path, data: bytes) -> None:
        """Put `data`, just cached under `key` by `put`, at `target` too: a reflink of the entry
        where the file system allows it, else a copy. Raises `StoreWriteError` naming `target`.
        """
        try:
            entry = self._open(key)
        except CacheEntryDamaged:
            atomic_write(target, data)  # gone or replaced meanwhile: the bytes are at hand
            return
        try:

            def fill(fd: int) -> None:
                # An entry of another size is not the one `put` just wrote: copy `data`.
                if clone(entry, fd):
                    if os.fstat(fd).st_size == len(data):
                        return
                    _empty(fd)
                _write_fd(fd, data, target)

            _atomic(target, fill)
        finally:
            os.close(entry)

    def discard(self, key: str) -> None:
        """Remove a damaged entry (a link itself, never what it points to)."""
        path = self.path(key)
        try:
            if path.parent.is_symlink():
                path.parent.unlink()
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass  # the next put replaces it

    def _open(self, key: str) -> int:
        """The entry open for reading, checked to be a regular file of an image's size at most;
        never through a symbolic link (the entry's or its shard folder's)."""
        path = self.path(key)
        nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            shard = os.open(path.parent, nofollow | os.O_DIRECTORY)
            try:
                fd = os.open(path.name, nofollow | os.O_NONBLOCK, dir_fd=shard)
            finally:
                os.close(shard)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CacheEntryDamaged(
                    f"cache entry {path} is a symbolic link; imgbatch never follows links in "
                    "its cache"
                ) from None
            raise CacheEntryDamaged(f"cache entry {path} cannot be read ({exc})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CacheEntryDamaged(f"cache entry {path} is not a regular file")
            if info.st_size > MAX_CACHED_BYTES:
                raise CacheEntryDamaged(f"cache entry {path} is too large to be an image")
        except BaseException:
            os.close(fd)
            raise
        return fd


class Incoming:
    """A cache entry being received: `write` its pieces in order (each hashed and written to a
    temporary file beside the entry as it comes, nothing kept in memory), `read` them back to
    check them, `commit` to make it the entry, `place` to put it at a shot's file too, and
    always `close`. Until committed, the entry is untouched; a closed, uncommitted file is gone.
    A write that fails raises `StoreWriteError` naming the entry.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd, self._temp = _create_temp(path.parent)
        except OSError as exc:
            raise write_error(path, exc) from None
        self._hash = hashlib.sha256()
        self.size = 0
        self._committed = False

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, piece: bytes | memoryview | Sequence[bytes | memoryview]) -> None:
        """Hash and write `piece`, or the pieces in order in one system call (a download's
        network chunk comes back from the provenance stamper in a piece per PNG chunk: a
        `write` each was 118 system calls a 3.3 MB image, 0.7 ms more CPU than 13)."""
        pieces = [piece] if isinstance(piece, bytes | memoryview) else piece
        for one in pieces:
            self._hash.update(one)
            self.size += len(one)
        try:
            _write_fd(self._fd, piece, self.path)
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def reader(self) -> IO[bytes]:
        """The bytes written so far, as a file of their own open at the start (to decode them in
        a decode thread, one image per core, without a copy of them in memory); the caller
        closes it. `StoreWriteError` when it cannot be opened."""
        try:
            fd = os.open(self._temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        return os.fdopen(fd, "rb")

    def read(self) -> bytes:
        """The bytes written so far, whole (for the shared store, which sends them on)."""
        try:
            return _read_fd(self._fd, self.path)
        except CacheEntryDamaged as exc:
            error = OSError(str(exc))
            raise StoreWriteError(str(self.path), error, _mount_point(self.path)) from None

    def commit(self) -> None:
        """Make the bytes written the entry: on disk first (fsync), then renamed into place."""
        try:
            os.fchmod(self._fd, 0o666 & ~_umask())
            os.fsync(self._fd)
            os.replace(self._temp, self.path)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self._committed = True

    def place(self, target: Path) -> None:
        """Put the committed entry at `target`, atomically: a reflink where the file system
        allows it, else a copy made in the kernel. Raises `StoreWriteError` naming `target`."""

        def fill(fd: int) -> None:
            if not clone(self._fd, fd):
                _copy_fd(self._fd, fd, self.size, target)

        _atomic(target, fill)

    def close(self) -> None:
        os.close(self._fd)
        if not self._committed:
            Path(self._temp).unlink(missing_ok=True)


def _copy_fd(source: int, target: int, size: int, path: Path) -> None:
    """Copy the first `size` bytes of `source` to the empty `target` (open on a temporary file
    beside `path`): in the kernel where it can, the rest through a 1 MiB buffer."""
    offset = _copy_in_kernel(source, target, size)
    os.lseek(target, offset, os.SEEK_SET)
    while offset < size:
        piece = os.pread(source, min(1 << 20, size - offset), offset)
        if not piece:
            raise OSError(errno.EIO, f"{path}: the cache entry ended after {offset} bytes")
        _write_fd(target, piece, path)
        offset += len(piece)


def _copy_in_kernel(source: int, target: int, size: int) -> int:
    """How many of the first `size` bytes of `source` `os.copy_file_range` copied to `target`
    (none where the kernel or file system cannot; a test seam, like `_write_fd`)."""
    offset = 0
    try:
        while offset < size:
            copied = os.copy_file_range(source, target, size - offset, offset, offset)
            if not copied:
                break
            offset += copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    return offset


def _read_fd(fd: int, path: Path) -> bytes:
    """The bytes of the file open as `fd` (a cache entry, or a reflink of one), from the start;
    a read that fails, or more than an image can be, makes the entry at `path` damaged."""
    pieces: list[bytes] = []
    offset = 0
    try:
        while offset <= MAX_CACHED_BYTES:
            piece = os.pread(fd, 1 << 20, offset)
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)
            offset += len(piece)
    except OSError as exc:
        raise CacheEntryDamaged(f"cache entry {path} cannot be read ({exc})") from None
    raise CacheEntryDamaged(f"cache entry {path} is too large to be an image")


def _check_entry(
    path: Path,
    data: bytes,
    sha256: str | None,
    size: int | None,
    dimensions: tuple[int, int],
) -> str:
    """The SHA-256 of `data`, the entry at `path`, once checked against its record (or, without
    one, decoded at `dimensions`); else `CacheEntryDamaged`."""
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None:
        if len(data) != size or digest != sha256:
            raise CacheEntryDamaged(
                f"cache entry {path} does not match its record ({len(data)} bytes, "
                f"recorded {size}; SHA-256 {digest[:12]}..., recorded {sha256[:12]}...)"
            )
        return digest
    try:
        found = png_dimensions(data, "its bytes")
        if found == dimensions:
            check_png(data, "its bytes", dimensions)
    except ImageError as exc:
        raise CacheEntryDamaged(f"cache entry {path} is damaged: {exc}") from None
    if found != dimensions:
        raise CacheEntryDamaged(
            f"cache entry {path} is {found[0]}*{found[1]}, but the shot is "
            f"{dimensions[0]}*{dimensions[1]}"
        )
    return digest


def _empty(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)


def _create_temp(folder: Path) -> tuple[int, str]:
    """A new, empty temporary file in `folder` (a test seam: a refused folder fails here)."""
    return tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=".tmp")


def _write_fd(fd: int, data: bytes | memoryview | Sequence[bytes | memoryview], path: Path) -> None:
    """Write all of `data` (bytes, or pieces written in order with one `writev` while the
    kernel takes them whole) to `fd`, open on `path` (or on a temporary file beside it).

    The one place imgbatch's bytes go to disk: tests fill the disk here.
    """
    if isinstance(data, bytes | memoryview):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return
    views = [memoryview(piece) for piece in data if len(piece)]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= len(views[0]):  # drop what went whole, keep the rest
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


def _umask() -> int:
    # Read, not set-and-restore: os.umask() changes it for a moment for every thread, and
    # writes run in worker threads.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mount_point(path: Path) -> str:
    """The mount point of the filesystem holding `path` (or its nearest existing parent)."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    try:
        device = current.stat().st_dev
        while current != current.parent and current.parent.stat().st_dev == device:
            current = current.parent
    except OSError:
        pass
    return str(current)


def _is_real_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False
