"""A shared store in a folder: the same protocol as a bucket, on one disk, a shared disk or NFS.

Takes a folder (a path or a `file://` URL); gives `ObjectStore`'s operations on files under it.
`create` writes a temporary file and hard-links it to its name, which fails when the name is
taken (atomic on local file systems and on NFS, where `O_EXCL` was not always); `replace`
compares and swaps under an advisory lock on the folder (`flock`), renaming a new file over the
old. An entity tag is the SHA-256 of the content; an age is the time since the file's last
change. Nothing here follows a symbolic link out of the folder: names are made by imgbatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from imgbatch.errors import SharedStoreError
from imgbatch.state.cache import TEMP_PREFIX, atomic_write
from imgbatch.state.store.objects import MAX_OBJECT_BYTES, Conflict, Exists, Listed, Stored
from imgbatch.units.bounded import read_at_most

_LOCK = ".imgbatch-lock"


class FolderStore:
    """`ObjectStore` over the folder `root` (created on first write)."""

    if_match = True

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.url = self.root.as_uri()
        self.requests: Counter[str] = Counter()

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
            raise ValueError(f"not an object name: {name!r}")
        return self.root.joinpath(*parts)

    async def get(self, name: str) -> Stored | None:
        self.requests["get"] += 1
        return await asyncio.to_thread(self._get, name)

    def _get(self, name: str) -> Stored | None:
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SharedStoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            data = read_at_most(handle, MAX_OBJECT_BYTES, info.st_size)
        etag = hashlib.sha256(data).hexdigest()
        return Stored(data, etag, max(0.0, time.time() - info.st_mtime))

    async def create(self, name: str, data: bytes) -> str:
        self.requests["put"] += 1
        return await asyncio.to_thread(self._create, name, data)

    def _create(self, name: str, data: bytes) -> str:
        path = self._path(name)
        temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{id(data):x}.tmp")
        try:
            atomic_write(temp, data)
            try:
                os.link(temp, path)
            except FileExistsError:
                raise Exists(name) from None
            except OSError as exc:
                raise SharedStoreError(f"cannot write {path}: {exc.strerror or exc}") from None
        finally:
            temp.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    async def replace(self, name: str, data: bytes, etag: str) -> str:
        self.requests["put"] += 1
        return await asyncio.to_thread(self._replace, name, data, etag)

    def _replace(self, name: str, data: bytes, etag: str) -> str:
        path = self._path(name)
        with self._locked(path.parent):
            current = self._get(name)
            if current is None or current.etag != etag:
                raise Conflict(name)
            atomic_write(path, data)
        return hashlib.sha256(data).hexdigest()

    async def exists(self, name: str) -> bool:
        self.requests["head"] += 1
        return await asyncio.to_thread(os.path.lexists, self._path(name))

    async def delete(self, name: str) -> None:
        self.requests["delete"] += 1
        await asyncio.to_thread(self._delete, name)

    def _delete(self, name: str) -> None:
        path = self._path(name)
        # Under the lock: a replace between its compare and its rename must not bring it back.
        with self._locked(path.parent):
            path.unlink(missing_ok=True)

    async def names(self, prefix: str) -> list[str]:
        self.requests["list"] += 1
        folder = self._path(prefix.rstrip("/"))
        try:
            found = [entry.name for entry in os.scandir(folder) if not entry.name.startswith(".")]
        except FileNotFoundError:
            return []
        return sorted(f"{prefix.rstrip('/')}/{name}" for name in found)

    async def listing(self, prefix: str) -> list[Listed]:
        self.requests["list"] += 1
        return await asyncio.to_thread(self._listing, prefix.rstrip("/"))

    def _listing(self, prefix: str) -> list[Listed]:
        now = time.time()
        found = []
        try:
            with os.scandir(self._path(prefix)) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    info = entry.stat(follow_symlinks=False)
                    age = now - info.st_mtime  # negative: dated ahead (a writer's clock)
                    found.append(Listed(f"{prefix}/{entry.name}", info.st_size, age))
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda item: item.name)

    def object_url(self, name: str) -> str:
        return self._path(name).as_uri()

    async def signed_url(self, name: str, expires: int) -> str | None:
        return None

    async def close(self) -> None:
        return None

    @contextlib.contextmanager
    def _locked(self, folder: Path) -> Iterator[None]:
        """An exclusive advisory lock on `folder`, across processes (and NFS clients, through
        the NFS lock manager)."""
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
