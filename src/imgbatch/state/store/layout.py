"""The shared cache's layout in a store, in the spirit of Bazel's remote cache.

Takes an `ObjectStore`; gives lookups, checked restores and publishing of images by request key:

    cas/<sha256>    an image's bytes, named by their SHA-256, created once (same bytes, same name)
    ac/<key>        a request key's record: which blob, its size in bytes and in pixels, and the
                    results entry its maker wrote; created after its blob
    claims/<key>    who is paying for a key now (`claims.py`)

A record is trusted for nothing: every blob restored is checked against its record's SHA-256
and size, and decoded at the shot's size. A record whose blob is missing or does not match is
`SharedEntryDamaged`, reported apart from a miss and never copied into place. Before the first
write of a run the store is probed: it must refuse a second create of one name (some
S3-compatible services ignore `If-None-Match` silently) and, where it claims to, a replace with a
stale entity tag. A read-only cache never writes at all (an untrusted job could poison it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imgbatch.errors import SharedEntryDamaged, SharedStoreError
from imgbatch.state.cache import verify_image
from imgbatch.state.store.claims import DEFAULT_LEASE, Claims, HeldClaims
from imgbatch.state.store.objects import MAX_OBJECT_BYTES, Conflict, Exists, ObjectStore

if TYPE_CHECKING:
    from PIL import Image

RECORD_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Record:
    """`ac/<key>`: the blob a request made, and the results entry its maker wrote for it."""

    key: str
    sha256: str
    size: int  # in bytes
    width: int
    height: int
    entry: Mapping[str, Any]

    def to_bytes(self) -> bytes:
        body = {
            "version": RECORD_VERSION,
            "key": self.key,
            "sha256": self.sha256,
            "bytes": self.size,
            "width": self.width,
            "height": self.height,
            "entry": dict(self.entry),
        }
        # Key order kept: the entry comes back exactly as its maker wrote it in results.json.
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    @classmethod
    def parse(cls, key: str, data: bytes) -> Record:
        """The record `data` holds for `key`; ValueError for anything else."""
        body = json.loads(data.decode("utf-8"))
        if not isinstance(body, dict) or body.get("key") != key:
            raise ValueError("it is not a record of this key")
        sha, size = body.get("sha256"), body.get("bytes")
        width, height, entry = body.get("width"), body.get("height"), body.get("entry", {})
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            raise ValueError("its sha256 is not one")
        if not all(type(value) is int and value > 0 for value in (size, width, height)):
            raise ValueError("its sizes are not positive integers")
        if not isinstance(entry, dict):
            raise ValueError("its entry is not an object")
        return cls(key, sha, int(size), int(width), int(height), entry)  # type: ignore[arg-type]


class SharedCache:
    """Images by request key in `objects`, and the claims on them (`lease` seconds each);
    `read_only` never writes (nor probes, nor claims)."""

    def __init__(
        self, objects: ObjectStore, *, read_only: bool = False, lease: float = DEFAULT_LEASE
    ) -> None:
        self.objects = objects
        self.read_only = read_only
        self.claims = HeldClaims(Claims(objects, lease))
        self._probed: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self.objects.url

    def blob_url(self, sha256: str) -> str:
        """The blob's URL in the store's own scheme (results.json's `image_url`)."""
        return self.objects.object_url(f"cas/{sha256}")

    async def view_links(self, sha256s: Sequence[str], seconds: int) -> tuple[dict[str, str], bool]:
        """A URL a browser opens each blob by, by SHA-256, and whether they are signed (valid
        for `seconds`) rather than a folder's `file://` URLs. Signing is local: no request.
        A signed URL is a credential while it lasts: only the contact sheet holds one."""
        urls: dict[str, str] = {}
        signed = False
        for sha256 in sha256s:
            name = f"cas/{sha256}"
            url = await self.objects.signed_url(name, seconds)
            signed = signed or url is not None
            urls[sha256] = url if url is not None else self.objects.object_url(name)
        return urls, signed

    async def lookup(self, key: str) -> Record | None:
        """The record for `key`, None on a miss; `SharedEntryDamaged` for one that is not."""
        stored = await self.objects.get(f"ac/{key}")
        if stored is None:
            return None
        try:
            return Record.parse(key, stored.data)
        # (RecursionError: JSON nested deeper than the parser goes, "[[[[...", not a ValueError.)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            where = self.objects.object_url(f"ac/{key}")
            raise SharedEntryDamaged(f"{where} is not a record: {exc}") from None

    async def fetch(
        self,
        record: Record,
        dimensions: tuple[int, int],
        then: Callable[[Image.Image], object] | None = None,
    ) -> bytes:
        """The record's blob, checked against it and decoded at `dimensions` (the shot's size);
        `SharedEntryDamaged` naming what is wrong otherwise. `then` is given the decoded image
        once it has passed (the contact sheet's thumbnail, from the one decode)."""
        where = self.blob_url(record.sha256)
        if record.size > MAX_OBJECT_BYTES:
            # Not fetched at all: no image imgbatch writes is that large.
            raise SharedEntryDamaged(
                f"ac/{record.key} names a blob of {record.size} bytes, larger than imgbatch writes"
            )
        stored = await self.objects.get(f"cas/{record.sha256}")
        if stored is None:
            raise SharedEntryDamaged(f"{where} is missing, though ac/{record.key} names it")
        data = stored.data
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != record.size or digest != record.sha256:
            raise SharedEntryDamaged(
                f"{where} does not match its record ({len(data)} bytes, recorded "
                f"{record.size}; SHA-256 {digest[:12]}...)"
            )
        if (record.width, record.height) != dimensions:
            raise SharedEntryDamaged(
                f"ac/{record.key} records a {record.width}*{record.height} image, but the shot "
                f"is {dimensions[0]}*{dimensions[1]}"
            )
        try:
            await asyncio.to_thread(verify_image, data, *dimensions, then=then)
        except ValueError as exc:
            raise SharedEntryDamaged(f"{where}: {exc}") from None
        return data

    async def publish(self, key: str, data: bytes, entry: Mapping[str, Any]) -> Record:
        """Put `data` (verified, as written to the output folder) under `key`: the blob first,
        then its record. A name already taken is left as it is (create-only: the first maker's
        record stands). Nothing is written by a read-only cache."""
        width, height = int(entry["width"]), int(entry["height"])
        digest = hashlib.sha256(data).hexdigest()
        record = Record(key, digest, len(data), width, height, entry)
        if self.read_only:
            return record
        await self.probe()
        blob = f"cas/{digest}"
        try:
            await self.objects.create(blob, data)
            found = False
        except Exists:
            found = True  # the same bytes (named by them), or damage a restore finds and says
        try:
            await self.objects.create(f"ac/{key}", record.to_bytes())
        except Exists:
            pass
        if found and not await self.objects.exists(blob):
            # A blob found already there may be an orphan `gc --store` deleted since: put it
            # back, so the record just written never names a missing blob. (gc, for its part,
            # removes the records written while it ran that name a blob it deleted.)
            with contextlib.suppress(Exists):
                await self.objects.create(blob, data)
        return record

    async def probe(self) -> None:
        """Once per run, before its first write: `SharedStoreError` unless the store refuses a
        second create of one name (and, where it offers If-Match, a stale replace)."""
        if self._probed is None:
            self._probed = asyncio.ensure_future(self._probe())
        await asyncio.shield(self._probed)

    async def _probe(self) -> None:
        name = f"probes/{uuid.uuid4().hex}"
        objects = self.objects
        try:
            etag = await objects.create(name, b"first")
            try:
                await objects.create(name, b"second")
            except Exists:
                pass
            else:
                raise SharedStoreError(
                    f"{objects.url} accepted a second create of {name} (it answered a write "
                    "with If-None-Match: * as if the object did not exist): it cannot keep "
                    "processes from paying twice, so imgbatch shares no writes through it; "
                    "use --store-read-only, or a service that honours conditional writes"
                )
            if objects.if_match:
                try:
                    await objects.replace(name, b"third", _other_etag(etag))
                except Conflict:
                    pass
                else:
                    raise SharedStoreError(
                        f"{objects.url} accepted a write of {name} with an If-Match that did "
                        "not match: it cannot hand over a stale claim safely, so imgbatch "
                        "shares no writes through it"
                    )
        finally:
            await objects.delete(name)


def _other_etag(etag: str) -> str:
    """An entity tag in `etag`'s form that is not it."""
    flipped = "0" if etag.strip('"')[:1] != "0" else "1"
    inner = flipped + etag.strip('"')[1:]
    return f'"{inner}"' if etag.startswith('"') else inner
