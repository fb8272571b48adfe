"""A run's use of a shared store: restore what any process made, claim before paying, publish.

Takes an open `SharedCache` (`state/store`) and the output folder's `ImageCache`; gives the
executor four steps, each a few store requests per image at most:

- `hydrate(shots)`: before the plan, each key that needs work is looked up (`ac/<key>`,
  concurrently, bounded); a record's blob is fetched, checked and put in the local cache, so the
  plan restores it like any cached image. Shots results.json already answers cost nothing here.
- `settle(shot)`: before paying, claim the key. A claim found live is waited on until its
  record appears (then restored) or it goes stale (then taken over). A key whose record appeared
  meanwhile is restored instead of paid; a stale claim whose holder had been answered gives its
  image URL, fetched instead of paying again.
- `answered(key, image)`: the service made it: its URL goes into the claim.
- `made(shot, data, entry)`: the image is in place: published (blob, then record) and the claim
  released. The entry's `image_url` becomes the blob's URL in the store (`s3://.../cas/<sha>`:
  never a signed URL, never a credential).

Damaged records are said (`notices`) and treated as misses, never copied into place. A
read-only store (`--store-read-only`) restores but never claims nor writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from imgbatch.errors import AuthError, SharedEntryDamaged, SharedStoreError, TransientError
from imgbatch.manifest import Manifest
from imgbatch.plan.decide import Action, Plan
from imgbatch.providers import is_metered
from imgbatch.review.outcome import StoreUse
from imgbatch.review.sheet import write_thumbnail
from imgbatch.run.entries import shot_entry
from imgbatch.shots.expand import Shot
from imgbatch.shots.request import GeneratedImage, ImageRequest
from imgbatch.state.cache import ImageCache
from imgbatch.state.folder import OutputFolder
from imgbatch.state.results import ResultEntry
from imgbatch.state.store import Record, SharedCache, choose_store, open_shared, read_only_from
from imgbatch.state.store.claims import Claim, ClaimInfo

if TYPE_CHECKING:
    from PIL import Image

# Lookups of a warm store in flight at once (a plan of 10,000 misses is not 10,000 sockets).
LOOKUPS_IN_FLIGHT = 32
# How often a process waiting on another's claim looks for its record, at most.
MAX_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Restored:
    """The key's image, made by another process: its checked bytes and its record."""

    data: bytes
    record: Record


@dataclass(frozen=True)
class Inherited:
    """A stale claim taken over whose holder the service had answered: its image's URL."""

    image_url: str
    request_id: str | None


async def open_sharing(
    stack: contextlib.AsyncExitStack,
    flag: str | None,
    read_only: bool,
    manifest: Manifest,
    environ: Mapping[str, str],
    output_dir: Path,
) -> SharedRun | None:
    """The run's shared store: `flag`, else `IMGBATCH_STORE`, else the manifest's
    `output.store` (a folder there is relative to the manifest); None when none is named.
    Open until `stack` closes."""
    chosen = choose_store(flag, environ, manifest.store)
    if chosen is None:
        return None
    url, origin = chosen
    base = manifest.base_dir if origin == "output.store" else Path.cwd()
    read_only = read_only_from(read_only, environ)
    shared = await stack.enter_async_context(
        open_shared(url, environ, read_only=read_only, base=base)
    )
    thumbnail = functools.partial(write_thumbnail, output_dir)
    return SharedRun(shared, OutputFolder(output_dir).cache, thumbnail)


class Unsent:
    """The provider of an assembling run (`apply --frozen` with a store) that has no key: it
    sends nothing, and needs nothing (every shot comes from the store, or the run is refused
    before it starts)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.metered = is_metered(name)

    async def __aenter__(self) -> Unsent:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def generate(self, request: ImageRequest, *, label: str) -> GeneratedImage:
        raise AuthError(f"{label}: no key: an assembling run sends no request")

    async def fetch(self, image: GeneratedImage, sink: Callable[[bytes], None]) -> None:
        raise TransientError("no key: an assembling run downloads nothing from the service")

    def describe_credentials(self) -> str:
        return "none (an assembling run sends no request)"


def planned_with_store(
    plan: Plan, flag: str | None, manifest: Manifest, environ: Mapping[str, str]
) -> Plan:
    """`plan` with each paid shot whose key the store has a record for planned as a restore
    (nothing is written or downloaded: one lookup per such key, concurrently)."""
    chosen = choose_store(flag, environ, manifest.store)
    paid = [item for item in plan.shots if item.paid and item.shot is not None]
    if chosen is None or not paid:
        return plan
    url, origin = chosen
    base = manifest.base_dir if origin == "output.store" else Path.cwd()

    async def lookups() -> set[str]:
        limit = asyncio.Semaphore(LOOKUPS_IN_FLIGHT)
        async with open_shared(url, environ, read_only=True, base=base) as shared:

            async def one(key: str) -> str | None:
                async with limit:
                    try:
                        return key if await shared.lookup(key) is not None else None
                    except SharedEntryDamaged:
                        return None

            keys = {item.shot.request.key for item in paid if item.shot is not None}
            return {key for key in await asyncio.gather(*map(one, keys)) if key}

    found = asyncio.run(lookups())
    reason = f"made by another run: restored from {url}, no request"
    shots = tuple(
        replace(item, action=Action.RESTORE, reason=reason)
        if item.paid and item.shot is not None and item.shot.request.key in found
        else item
        for item in plan.shots
    )
    return replace(plan, shots=shots)


class SharedRun:
    """One run's view of the shared store `shared`, over the local cache `local`; `thumbnail`
    (key, decoded image) makes the contact sheet's thumbnail of each image restored from the
    decode that checks it (a second decode would double the CPU of a restore)."""

    def __init__(
        self,
        shared: SharedCache,
        local: ImageCache,
        thumbnail: Callable[[str, Image.Image], object] | None = None,
    ) -> None:
        self.shared = shared
        self.local = local
        self.thumbnail = thumbnail
        self.records: dict[str, Record] = {}
        self.notices: list[tuple[str, str]] = []  # (shot id, what was wrong)
        self.restored = 0
        self.published = 0
        self.kept_local = 0  # local copies kept for a gc at work (`run.store_only.confirmed`)
        # When this run first read the store: a `gc --store` marker written since means the
        # store may have lost what the run looked up (`run.store_only.confirmed`).
        self.opened = time.monotonic()

    def use(self) -> StoreUse:
        """What this run did with the store, for its report."""
        return StoreUse(
            self.shared.url,
            self.shared.read_only,
            dict(self.shared.objects.requests),
            self.restored,
            self.published,
            tuple(self.notices),
            self.kept_local,
        )

    async def hydrate(self, shots: Iterable[Shot]) -> None:
        """Put every image the store has for `shots` (the ones needing work) in the local
        cache, checked."""
        limit = asyncio.Semaphore(LOOKUPS_IN_FLIGHT)
        first: dict[str, Shot] = {}
        for shot in shots:
            first.setdefault(shot.request.key, shot)

        async def one(shot: Shot) -> None:
            async with limit:
                found = await self._restore(shot)
            if found is not None:
                await asyncio.to_thread(self.local.put, shot.request.key, found.data)

        await asyncio.gather(*(one(shot) for shot in first.values()))

    async def _restore(self, shot: Shot) -> Restored | None:
        """The store's image for `shot`'s key, checked; None on a miss or damage (said)."""
        record = await self._lookup(shot)
        return None if record is None else await self.fetch(shot, record)

    async def _lookup(self, shot: Shot) -> Record | None:
        """`shot`'s key's record; None on a miss, or a record that is not one (said)."""
        try:
            return await self.shared.lookup(shot.request.key)
        except SharedEntryDamaged as damaged:
            self.notices.append((shot.id, f"{damaged}; not used"))
            return None

    async def fetch(self, shot: Shot, record: Record) -> Restored | None:
        """`record`'s blob, checked against it and decoded at `shot`'s size; None if damaged
        (said: the shot is then made as if the store had nothing)."""
        thumbnail, key = self.thumbnail, record.key
        then = None if thumbnail is None else lambda decoded: thumbnail(key, decoded)
        try:
            data = await self.shared.fetch(record, shot.request.dimensions, then)
        except SharedEntryDamaged as damaged:
            self.notices.append((shot.id, f"{damaged}; not used"))
            return None
        self.records[record.key] = record
        self.restored += 1
        return Restored(data, record)

    def entry_for(self, shot: Shot, sha256: str, size: int) -> ResultEntry | None:
        """The results entry of `shot` restored from the store: the shot's own (id, file, key,
        request, prompt, the blob's URL in this store) with its maker's provenance (request id,
        attempts, prompt sent, made_at); None when the store did not give it or its maker's
        entry cannot be read. Nothing else a record says is believed: whoever can
        write the store writes records, and results.json is reviewed as the shot list's."""
        record = self.records.get(shot.request.key)
        if record is None or record.sha256 != sha256:
            return None
        try:
            made = ResultEntry.from_json({**record.entry, "id": shot.id, "file": shot.file})
        except (ValueError, TypeError):
            return None
        # Generated, whatever the record says: its blob is this request's image, checked.
        width, height = shot.request.dimensions
        own = shot_entry(
            shot, "generated", None, width, height, sha256, size, attempts=made.attempts
        )
        return replace(
            own,
            image_url=self.shared.blob_url(sha256),
            request_id=made.request_id,
            prompt_sent=made.prompt_sent,
            simplified=made.simplified,
            made_at=made.made_at,
        )

    async def try_claim(
        self, shot: Shot, *, look: bool = True
    ) -> Claim | Record | Inherited | ClaimInfo:
        """As `shot`'s turn to be sent comes (a few requests: the pacing turn is held): its
        record, if another process made it meanwhile (restore it, after giving the turn back);
        else this process's claim (pay), a paid image's URL from a stale claim taken over
        (fetch it), or another process's live claim (wait: `settle`). `look=False` claims
        without looking for a record first (the one found was damaged)."""
        key = shot.request.key
        record = await self._lookup(shot) if look else None
        if record is not None or self.shared.read_only:
            return record if record is not None else Claim(key, "read-only", etag="")
        await self.shared.probe()  # before the first claim: a store must refuse a second create
        claim = await self.shared.claims.acquire(key)
        # Published between the look and the claim: never pay for it twice.
        record = await self._lookup(shot) if look else None
        if record is not None:
            if isinstance(claim, Claim):
                await self.shared.claims.release(key)
            return record
        if isinstance(claim, Claim) and claim.image_url is not None:
            return Inherited(claim.image_url, claim.request_id)
        return claim

    async def settle(self, shot: Shot) -> Claim | Record | Inherited:
        """Wait on another process's claim on `shot`'s key until its record appears or the
        claim goes stale (taken over). The record is polled (one request), the claim read again
        only every half lease. The executor cuts the wait when the run stops."""
        wait, lease = 0.2, self.shared.claims.claims.lease
        checked = time.monotonic()
        while True:
            await asyncio.sleep(wait)
            wait = min(wait * 1.5, MAX_POLL_SECONDS, lease / 4)
            if time.monotonic() - checked >= lease / 2:
                checked = time.monotonic()
                found = await self.try_claim(shot)
                if not isinstance(found, ClaimInfo):
                    return found
                continue
            record = await self._lookup(shot)
            if record is not None:
                return record

    async def answered(self, key: str, image_url: str, request_id: str | None) -> None:
        if not self.shared.read_only:
            try:
                await self.shared.claims.note_answer(key, image_url, request_id)
            except SharedStoreError:
                pass  # the claim stays as it was: a crash now costs one more payment at most

    async def made(self, shot: Shot, data: bytes, entry: ResultEntry) -> ResultEntry:
        """Publish `shot`'s image, just placed, and release its claim; give its entry naming
        the blob in the store. A store that fails is said, and the entry kept as it was."""
        key = shot.request.key
        if self.shared.read_only:
            return entry
        published = replace(entry, image_url=self.shared.blob_url(entry.sha256 or ""))
        try:
            record = await self.shared.publish(key, data, published.to_json())
            await self.shared.claims.release(key)
        except SharedStoreError as exc:
            self.notices.append((shot.id, f"not shared: {exc}"))
            return entry
        self.records[key] = record
        self.published += 1
        return published

    async def finished(self, key: str, entry: ResultEntry | None) -> None:
        """A shot is done with: a claim still held is released, unless the image was paid for
        and not downloaded (its URL stays in the claim, for whoever takes it over)."""
        if self.shared.read_only or key not in self.shared.claims.held:
            return
        if entry is not None and entry.status == "unfetched":
            return
        try:
            await self.shared.claims.release(key)
        except SharedStoreError:
            pass  # it goes stale after its lease
