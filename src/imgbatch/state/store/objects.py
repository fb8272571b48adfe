"""What every shared store backend offers: named objects with create-only and conditional writes.

Takes object names relative to the store's prefix (`cas/ab/<sha256>`, `ac/<key>`,
`claims/<key>`); gives their bytes with an entity tag and their age by the store's own clock.
The two writes that coordinate processes are `create` (fails with `Exists` when the name is
taken: S3's `If-None-Match: *`, OSS's `x-oss-forbid-overwrite`, a hard link on a folder) and
`replace` (fails with `Conflict` unless the object still has the entity tag read: S3's
`If-Match`; OSS has none, so `if_match` is False there). A backend counts every request it sends
in `requests`, by operation, so a run can say how many it made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

# A record or a claim is a few hundred bytes and an image at most this: a larger object under a
# store's prefix is not one of imgbatch's, and is never read whole.
MAX_OBJECT_BYTES = 64 * 1024 * 1024


class Exists(Exception):
    """`create` found the name taken: another process created it first."""


class Conflict(Exception):
    """`replace` found the object changed (or gone) since it was read."""


@dataclass(frozen=True)
class Stored:
    """An object as read: its bytes, its entity tag, and its age in seconds by the store's clock
    (the time since it was last written: claims go stale by it, never by a machine's clock)."""

    data: bytes
    etag: str
    age: float


@dataclass(frozen=True)
class Listed:
    """An object as a listing gives it, without reading it: its name, its size in bytes, and
    its age in seconds by the store's clock (since it was last written; negative when dated
    ahead of that clock, as a folder store's object written by a machine whose clock is)."""

    name: str
    size: int
    age: float


class ObjectStore(Protocol):
    """A prefix in a bucket or a folder; see the module docstring."""

    # The store's URL as the user gave it, normalised (`s3://bucket/prefix`, `file:///path`).
    url: str
    # Whether `replace` is conditional (If-Match). Without it a stale claim is not taken over on
    # its own; `imgbatch store unlock` releases it.
    if_match: bool
    requests: Counter[str]

    async def get(self, name: str) -> Stored | None:
        """The object, or None when there is none by that name."""
        ...

    async def create(self, name: str, data: bytes) -> str:
        """Write a new object and give its entity tag; `Exists` if the name is taken."""
        ...

    async def replace(self, name: str, data: bytes, etag: str) -> str:
        """Overwrite the object if it still has `etag` (unconditionally where `if_match` is
        False); give the new entity tag; `Conflict` if it changed or is gone."""
        ...

    async def exists(self, name: str) -> bool:
        """Whether there is an object by that name (a HEAD: its bytes are not read)."""
        ...

    async def delete(self, name: str) -> None:
        """Remove the object (nothing when there is none)."""
        ...

    async def names(self, prefix: str) -> list[str]:
        """The names under `prefix` (a folder of the layout, e.g. `claims/`), sorted."""
        ...

    async def listing(self, prefix: str) -> list[Listed]:
        """The objects under `prefix` with their sizes and ages, sorted by name: a paginated
        LIST, never a request per object (`imgbatch gc --store`)."""
        ...

    def object_url(self, name: str) -> str:
        """The object's URL in the store's own scheme: no signature, no credential."""
        ...

    async def signed_url(self, name: str, expires: int) -> str | None:
        """A URL a browser can open for `expires` seconds, or None where there is none to make
        (a local folder: the file's own path serves)."""
        ...

    async def close(self) -> None: ...
