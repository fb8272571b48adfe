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
- Meanwhile (an apply's `open_sharing`), the run follows the others: it lists `claims/` about
  once a second and restores each image another process publishes for one of its keys as the
  claim goes, in the background, so that shot's turn finds it in place with no request; the
  same listing wakes the shots waiting on a claim.
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
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from imgbatch.errors import (
    AuthError,
    SharedEntryDamaged,
    SharedStoreError,
    StoreError,
    TransientError,
)
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
from imgbatch.state.store import Record, SharedCache, chosen_store, open_shared, read_only_from
from imgbatch.state.store.claims import Claim, ClaimInfo

if TYPE_CHECKING:
    from PIL import Image

# Lookups of a warm store in flight at once (a plan of 10,000 misses is not 10,000 sockets).
LOOKUPS_IN_FLIGHT = 32
# A process waiting on another's claim looks for its record after FIRST_POLL_SECONDS, then
# half as long again each time, at most every MAX_POLL_SECONDS: a record comes when the service
# has answered (seconds to a minute), and each look is a request.
FIRST_POLL_SECONDS = 0.5
MAX_POLL_SECONDS = 5.0
# How often a process lists the claims others hold on the keys it will need (`_follow`): every
# FOLLOW_SECONDS while it finds some, backing off to MAX_FOLLOW_SECONDS while it finds none.
FOLLOW_SECONDS = 1.0
MAX_FOLLOW_SECONDS = 8.0
# Images it restores at once, found so.
RESTORES_AHEAD = 4
# The longest `close` waits for the restores under way (a GET and a decode each).
CLOSE_SECONDS = 30.0


@dataclass(frozen=True)
class Restored:
    """The key's image, made by another process: its checked bytes and its record; `cached`
    when the bytes are the local cache's entry already, read back and checked by SHA-256 (the
    background restore put them there: no need to write them again)."""

    data: bytes
    record: Record
    cached: bool = False


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
    chosen = chosen_store(flag, environ, manifest.store, manifest.base_dir)
    if chosen is None:
        return None
    url, base = chosen
    read_only = read_only_from(read_only, environ)
    shared = await stack.enter_async_context(
        open_shared(url, environ, read_only=read_only, base=base)
    )
    thumbnail = functools.partial(write_thumbnail, output_dir)
    run = SharedRun(shared, OutputFolder(output_dir).cache, thumbnail, follow=True)
    stack.push_async_callback(run.close)
    return run


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
    chosen = chosen_store(flag, environ, manifest.store, manifest.base_dir)
    paid = [item for item in plan.shots if item.paid and item.shot is not None]
    if chosen is None or not paid:
        return plan
    url, base = chosen

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
    decode that checks it (a second decode would double the CPU of a restore). With `follow`,
    the images others make for this run's keys are restored as they are published, in the
    background (`_follow`), rather than when each shot's turn comes; `close` stops that."""

    def __init__(
        self,
        shared: SharedCache,
        local: ImageCache,
        thumbnail: Callable[[str, Image.Image], object] | None = None,
        *,
        follow: bool = False,
    ) -> None:
        self.shared = shared
        self.local = local
        self.thumbnail = thumbnail
        self.follow = follow
        self.records: dict[str, Record] = {}
        self.notices: list[tuple[str, str]] = []  # (shot id, what was wrong)
        self.restored = 0
        self.published = 0
        self.kept_local = 0  # local copies kept for a gc at work (`run.store_only.confirmed`)
        # Keys the store missed that no shot's turn has reached yet, and those of them restored
        # since in the background (checked, in the local cache), with their records.
        self._wanted: dict[str, Shot] = {}
        self._ahead: dict[str, Record] = {}
        # Keys `_follow` is restoring now, each set when done: a turn that finds its key's
        # record meanwhile waits for it rather than fetching and decoding the image again.
        self._restoring: dict[str, asyncio.Event] = {}
        # Shots waiting on another's claim, by key: set when `_follow` finds the claim gone.
        self._waiting: dict[str, asyncio.Event] = {}
        # Wanted keys another process held a live claim on at the last listing.
        self._others: set[str] = set()
        self._follower: asyncio.Task[None] | None = None
        self._closing = False
        self._poke = asyncio.Event()
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
            else:
                self._wanted[shot.request.key] = shot

        await asyncio.gather(*(one(shot) for shot in first.values()))
        if self._wanted:
            self._start_following()

    def _start_following(self) -> None:
        """Have `_follow` list the claims now (started again if it had stopped)."""
        if not self.follow or self._closing:
            return
        if self._follower is None or self._follower.done():
            self._follower = asyncio.ensure_future(self._follow())
        self._poke.set()

    async def _follow(self) -> None:
        """Restore, as they are published, the images other processes make for the keys this
        run will need, and wake the shots waiting on another's claim when it goes: list
        `claims/` (one request: only the keys being paid for now, by anyone, with their ages:
        a shot whose turn comes while another's claim on its key is live waits for it without
        a request) every second, and
        look up the record of each wanted key whose claim went since the last listing (its
        holder releases it after publishing). Restores are so spread over the run, not left to
        each shot's turn (which comes, in a random order, mostly near the end, when most keys
        are made: a burst of decodes that held four processes up on two cores), and a waiting
        shot looks for its record once, when it is there, rather than polling. A key missed
        here is restored at its turn as before; nothing here pays or claims."""
        period, listed = FOLLOW_SECONDS, set[str]()
        while (self._wanted or self._waiting) and not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poke.wait(), period)
            self._poke.clear()
            mine, lease = self.shared.claims.held, self.shared.claims.claims.lease
            try:
                ages = {
                    item.name.removeprefix("claims/"): item.age
                    for item in await self.shared.objects.listing("claims/")
                }
                claimed = ages.keys() - mine.keys()
                for key, gone in list(self._waiting.items()):
                    if key not in claimed:
                        gone.set()
                released = [key for key in listed - claimed if key in self._wanted]
                listed = claimed & self._wanted.keys()
                # Live by the store's clock, with a second to spare: a turn meeting one waits.
                self._others = {key for key in listed if ages[key] + 1 < lease}
                # Concurrently, a few at a time: others publish up to their quotas together.
                limit = asyncio.Semaphore(RESTORES_AHEAD)
                done = await asyncio.gather(
                    *(self._restore_ahead(key, limit) for key in released), return_exceptions=True
                )
                for failed in done:
                    if isinstance(failed, BaseException):
                        raise failed
            except (StoreError, OSError):
                # Each shot's turn looks for itself, and says what fails; a claim listed live
                # must not keep a waiting shot from taking it over once it goes stale.
                self._others = set()
                return
            busy = listed or released or self._waiting
            period = FOLLOW_SECONDS if busy else min(period * 2, MAX_FOLLOW_SECONDS)

    async def _restore_ahead(self, key: str, limit: asyncio.Semaphore) -> None:
        """`key`'s image, just published by another process, checked into the local cache for
        its shot's turn; nothing when it is not there (that turn looks again)."""
        async with limit:
            shot = self._wanted.get(key)
            if shot is None or key in self._restoring or self._closing:
                return
            self._restoring[key] = done = asyncio.Event()
            try:
                await self._restore_into_cache(shot, key)
            finally:
                del self._restoring[key]
                done.set()

    async def _restore_into_cache(self, shot: Shot, key: str) -> None:
        """`_restore_ahead`'s work, once it holds the key."""
        try:
            record = await self.shared.lookup(key)
            if record is None or key not in self._wanted:
                return  # a turn that came meanwhile looks for itself
            data = await self._checked(shot, record, say=False)
        except SharedEntryDamaged:
            return  # said when the shot's turn finds it
        if data is None:
            return
        await asyncio.to_thread(self.local.put, key, data)
        self._ahead[key] = record
        self._wanted.pop(key, None)

    async def close(self) -> None:
        """Stop restoring in the background (the run is over): no restore starts any more, and
        those under way are waited for (up to CLOSE_SECONDS), because their threads write into
        the output folder, which must not change once the run has let go of its lock."""
        follower, self._closing = self._follower, True
        if follower is None or follower.done():
            return
        self._poke.set()
        try:
            await asyncio.wait_for(asyncio.shield(follower), CLOSE_SECONDS)
        except TimeoutError:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

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
        (said: the shot is then made as if the store had nothing). One restored in the
        background already (checked then) is read from the local cache: no request, no decode;
        one being restored so now is waited for (a key's image is fetched once at a time)."""
        restoring = self._restoring.get(record.key)
        if restoring is not None:
            await restoring.wait()
        data = await asyncio.to_thread(self._kept, record)
        cached = data is not None
        if data is None:
            data = await self._checked(shot, record)
        if data is None:
            return None
        self.records[record.key] = record
        self.restored += 1
        return Restored(data, record, cached)

    async def _checked(self, shot: Shot, record: Record, *, say: bool = True) -> bytes | None:
        """`record`'s blob from the store, checked and decoded once (its thumbnail made from
        that decode); None if damaged (said, unless `say` is False: then `SharedEntryDamaged`)."""
        thumbnail, key = self.thumbnail, record.key
        then = None if thumbnail is None else lambda decoded: thumbnail(key, decoded)
        try:
            return await self.shared.fetch(record, shot.request.dimensions, then)
        except SharedEntryDamaged as damaged:
            if not say:
                raise
            self.notices.append((shot.id, f"{damaged}; not used"))
            return None

    def _kept(self, record: Record) -> bytes | None:
        """The bytes `_follow` restored for `record` into the local cache, if they are still
        exactly those (by SHA-256); None otherwise (then fetched again)."""
        if self._ahead.get(record.key) != record:
            return None
        try:
            data = self.local.path(record.key).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == record.sha256 else None

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
        self._wanted.pop(key, None)  # its turn has come: `_follow` leaves it to this
        ahead = self._ahead.get(key)
        if ahead is not None:
            return ahead  # restored in the background: no request
        if look and key in self._others:
            # Being paid for by another process a second ago: wait for it (`settle`, woken
            # when its claim goes) without the three requests that would say so again.
            return ClaimInfo(key, "another process", None, None, 0.0, False)
        record = await self._lookup(shot) if look else None
        if record is not None or self.shared.read_only:
            return record if record is not None else Claim(key, "read-only", etag="")
        await self.shared.probe()  # before the first claim: a store must refuse a second create
        claim = await self.shared.claims.acquire(key)
        if isinstance(claim, ClaimInfo):
            return claim  # another's: `settle` looks for its record (no look now, a request)
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
        claim goes stale (taken over). With `follow`, the key is looked at when `_follow` finds
        the claim gone (its record, else claimed: its holder gave up), and its record polled
        only every MAX_POLL_SECONDS besides; else the record is polled after FIRST_POLL_SECONDS,
        then half as long again each time, up to MAX_POLL_SECONDS. The claim is read again
        every half lease. The executor cuts the wait when the run stops."""
        key, lease = shot.request.key, self.shared.claims.claims.lease
        gone = self._waiting.setdefault(key, asyncio.Event())
        self._start_following()
        wait = min(MAX_POLL_SECONDS if self.follow else FIRST_POLL_SECONDS, lease / 4)
        checked = time.monotonic()
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(gone.wait(), wait)
                wait = min(wait * 1.5, MAX_POLL_SECONDS, lease / 4)
                if gone.is_set() or time.monotonic() - checked >= lease / 2:
                    gone.clear()
                    checked = time.monotonic()
                    found = await self.try_claim(shot)
                    if not isinstance(found, ClaimInfo):
                        return found
                    continue
                record = await self._lookup(shot)
                if record is not None:
                    return record
        finally:
            self._waiting.pop(key, None)

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
