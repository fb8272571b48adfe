"""`imgbatch gc --store`: a shared store collected safely, while a team keeps using it.

Takes the store (its URL, as plan and apply resolve it) and a `StorePolicy`; gives a
`StoreCollection`: what the policy lets go, with sizes and ages, deleted only when asked. The
store is shared by every manifest, folder, machine and account that uses it, so what one
manifest does not name is never a reason to delete anything. The policy:

* a blob (`cas/<sha256>`) goes only when no record names it (every record is read: one GET of
  a few hundred bytes each, only when some blob is old enough to go) and it is older than the
  grace period (default a day): a writer creates its blob before its record, so a young orphan
  may be one in flight;
* a record (`ac/<key>`) goes only on request: `older_than`, by the record's last write (the
  store's clock). Its blob then goes with it when no other record names it and the blob is past
  the grace period, else at a later gc;
* never, whatever its age, the record or blob of an image the manifests' folders keep in the
  store only (`apply --no-local-copy`): the store holds its only copy;
* a claim goes once it is stale (not renewed within its lease), taken over first with If-Match
  so that a holder renewing it at that moment keeps it, then removed. A stale claim that holds
  a paid image's URL stays until that URL expires (whoever takes it over fetches the image
  instead of paying again). On OSS (no If-Match) no claim is ever removed: they are listed,
  for `imgbatch store unlock`;
* a probe (`probes/…`) a killed run left goes after the grace period, and so does the marker
  (`gc/…`) of a killed gc. Nothing else under the prefix is imgbatch's, and nothing else is
  touched.

Racing an apply that moves images into the store only (`apply --no-local-copy`, into a folder
of the given manifests): before deleting anything, gc creates its marker (`gc/<id>`, renewed
every third of the lease while it deletes and written once more when it is done, then left for
a later gc to collect), then reads the folders' results again (`StorePolicy.recheck`) and
spares what they keep in the store only by now. The apply, once its results.json says so, drops
its local copies only if no marker was written since it opened the store (`collecting`: one
LIST). Either gc's second read sees the apply's results (written before gc's marker existed),
or the apply sees a marker written after it looked its images up: no image loses its last
copy, whatever the interleaving (Dekker's: each side writes, then reads the other's).

Listings are paginated LISTs of each folder of the layout, never a request per blob. After
deleting, the records written meanwhile are listed and read: one naming a blob this gc deleted
(a writer that found the blob already there, between gc's reading and its deleting) is removed
too, so its key is a plain miss (made again once) rather than damage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from imgbatch.errors import ConfigError
from imgbatch.manifest.loader import ManifestSource, read_manifest
from imgbatch.providers.image_url import url_expired_at
from imgbatch.state.store import choose_store, chosen_store, open_shared, read_only_from, store_url
from imgbatch.state.store.claims import Claim, ClaimInfo, Claims, lease_from
from imgbatch.state.store.objects import Conflict, Listed, ObjectStore

# An orphan blob or a probe younger than this is left: it may be a write in flight.
DEFAULT_GRACE = 24 * 3600.0
# Records read at once (a store of 100,000 records is not 100,000 sockets).
READS_IN_FLIGHT = 32
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Where a gc that deletes says so, one marker each (`gc/<id>`), renewed every third of the lease
# while it deletes: an apply moving images into the store only keeps its local copies meanwhile.
MARKERS = "gc/"
# At most 12 digits a unit (30,000 centuries of days): more is no age, and overflowed float().
_AGE = re.compile(r"(?:(\d{1,12})d)?(?:(\d{1,12})h)?(?:(\d{1,12})m)?(?:(\d{1,12})s)?")


def parse_age(text: str) -> float:
    """Seconds in `30d`, `12h`, `90m`, `45s`, `1d12h` or `0s`; ValueError otherwise."""
    match = _AGE.fullmatch(text.strip().lower())
    if not text.strip() or match is None or not any(part is not None for part in match.groups()):
        raise ValueError(f"{text!r} is not an age: give one such as 30d, 12h, 90m or 45s")
    units = (86400, 3600, 60, 1)
    return float(
        sum(int(part) * unit for part, unit in zip(match.groups(), units, strict=True) if part)
    )


@dataclass(frozen=True)
class StorePolicy:
    """What `gc --store` may delete: records older than `older_than` (None: none at all),
    orphan blobs and probes older than `grace`, claims stale after their lease (at most
    `lease`). Never the records of `keep_records` (request keys) nor the blobs of `keep_blobs`
    (SHA-256s): the images the manifests' folders keep in the store only."""

    older_than: float | None = None
    grace: float = DEFAULT_GRACE
    lease: float | None = None
    keep_records: frozenset[str] = frozenset()
    keep_blobs: frozenset[str] = frozenset()
    # Reads `keep_records` and `keep_blobs` again, as they are now: called once gc's marker is
    # in the store and before anything is deleted (see the module doc). None: not read again.
    recheck: Callable[[], tuple[frozenset[str], frozenset[str]]] | None = None


@dataclass(frozen=True, slots=True)
class StoreGarbage:
    # Under the store's prefix: ac/<key>, cas/<sha256>, claims/<key>, probes/<id>, gc/<id>.
    name: str
    size: int
    age: float
    why: str


@dataclass(frozen=True)
class StoreCollection:
    """What the policy lets go in the store at `url`, by name; `deleted` when it is gone.
    `kept` says which stale claims stay, and why; `requests` counts the store's requests."""

    url: str
    items: tuple[StoreGarbage, ...]
    deleted: bool
    kept: tuple[tuple[str, str], ...] = ()
    requests: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(item.size for item in self.items)


def store_for_gc(
    flag: str | None,
    environ: Mapping[str, str],
    manifests: Iterable[ManifestSource],
    *,
    allow_reference_outside: bool = False,
) -> tuple[str, Path] | None:
    """The store to collect and the folder a relative one is in: `flag`, else IMGBATCH_STORE,
    else the manifests' `output.store`; None when none is named. `ConfigError` when the
    manifests name different stores and nothing else chooses."""
    loaded = [read_manifest(m, allow_reference_outside=allow_reference_outside) for m in manifests]
    named = {(m.store, m.base_dir) for m in loaded if m.store}
    stores = {store_url(store, base) for store, base in named}  # one folder, however written
    if len(stores) > 1 and choose_store(flag, environ, None) is None:
        raise ConfigError(
            f"the manifests name {len(stores)} different stores ({', '.join(sorted(stores))}): "
            "give --store URL to say which to collect"
        )
    first = next(iter(sorted(named)), (None, Path.cwd()))
    return chosen_store(flag, environ, *first)


def collect_store(
    url: str,
    environ: Mapping[str, str],
    policy: StorePolicy,
    *,
    delete: bool = False,
    read_only: bool = False,
    base: Path = Path("."),
) -> StoreCollection:
    """List (and with `delete`, delete) what `policy` lets go in the store at `url` (see the
    module doc). `ConfigError` for `delete` on a store this process may only read."""
    if delete and read_only_from(read_only, environ):
        raise ConfigError(
            f"{url} is read-only here (--store-read-only or IMGBATCH_STORE_READ_ONLY): gc "
            "deletes nothing in it; run without --yes to list what it would delete"
        )
    lease = policy.lease or lease_from(environ)

    async def run() -> StoreCollection:
        async with open_shared(url, environ, base=base) as shared:
            objects = shared.objects
            started = time.monotonic()
            found = await _find(objects, policy, lease)
            if delete and found.items:
                if any(item.name.startswith("claims/") for item in found.items):
                    await shared.probe()  # If-Match must really hold before a takeover
                async with _marked(objects, lease):
                    found = await _spared(found, policy)
                    extra = await _delete(objects, found.items, lease, started)
                found = StoreCollection(found.url, found.items + extra, True, found.kept)
            return StoreCollection(
                found.url, found.items, delete, found.kept, dict(objects.requests)
            )

    return asyncio.run(run())


async def _find(objects: ObjectStore, policy: StorePolicy, lease: float) -> StoreCollection:
    records, blobs, claims, probes, markers = await asyncio.gather(
        objects.listing("ac/"),
        objects.listing("cas/"),
        objects.listing("claims/"),
        objects.listing("probes/"),
        objects.listing(MARKERS),
    )
    records = [item for item in records if _HEX64.fullmatch(item.name.removeprefix("ac/"))]
    old = policy.older_than
    doomed = [
        item
        for item in records
        if old is not None
        and item.age > old
        and item.name.removeprefix("ac/") not in policy.keep_records
    ]
    items = [StoreGarbage(r.name, r.size, r.age, "record older than --older-than") for r in doomed]
    candidates = [
        item
        for item in blobs
        if _HEX64.fullmatch(sha := item.name.removeprefix("cas/"))
        and item.age > policy.grace
        and sha not in policy.keep_blobs
    ]
    if candidates:
        gone = {item.name for item in doomed}
        named = await _named_blobs(objects, [r for r in records if r.name not in gone])
        items += [
            StoreGarbage(b.name, b.size, b.age, "blob no record names")
            for b in candidates
            if b.name.removeprefix("cas/") not in named
        ]
    stale, kept = await _stale_claims(objects, claims, lease)
    items += stale
    items += [
        StoreGarbage(p.name, p.size, p.age, "probe a killed run left")
        for p in probes
        if p.age > policy.grace
    ]
    items += [  # not renewed within its lease either: its gc is gone
        StoreGarbage(m.name, m.size, m.age, "marker a killed gc left")
        for m in markers
        if m.age > max(policy.grace, lease)
    ]
    items += [
        StoreGarbage(m.name, m.size, m.age, "marker dated in the future: no gc's at work")
        for m in markers
        if _ahead(m, lease)
    ]
    return StoreCollection(objects.url, tuple(items), False, kept)


async def collecting(objects: ObjectStore, seconds: float, lease: float) -> bool:
    """Whether a gc may have deleted something in the store in the last `seconds`: the marker
    of one written since (one LIST of the markers' folder, a few objects). A gc writes its
    marker every third of its `lease` while it deletes and once more after, so one killed
    midway shows it within a lease: give the time since the store was first read, plus a
    lease. A marker dated more than a lease ahead is no gc's at work (`_ahead`)."""
    # A store's clock counts whole seconds: one more, so that an age rounded up still counts.
    return any(
        item.age <= seconds + 1.0 and not _ahead(item, lease)
        for item in await objects.listing(MARKERS)
    )


def _ahead(item: Listed, lease: float) -> bool:
    """Whether `item` is dated more than a lease ahead of the store's clock: a folder store's
    objects are dated by their writers' clocks, and every clock sharing one store is taken to
    be within a lease of the others (a claim's staleness assumes it too). A gc's marker so
    dated is a skewed clock's or anyone's who can write the store: taken for one at work, it
    kept every apply's local copies for good, and was never old enough to collect."""
    return item.age < -lease


@contextlib.asynccontextmanager
async def _marked(objects: ObjectStore, lease: float) -> AsyncIterator[None]:
    """This gc's marker in the store while the block runs: created first, written again every
    third of `lease` and once after the block (a gc paused longer than its lease is taken for
    dead, as a claim's holder is), then left: a later gc collects it after the grace."""
    name = f"{MARKERS}{uuid.uuid4().hex}"
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
    etag = [await objects.create(name, body)]  # the latest, for the next If-Match

    async def write() -> None:
        with contextlib.suppress(Conflict):  # another's hand on it: a later gc collected it
            etag[0] = await objects.replace(name, body, etag[0])

    async def renew() -> None:
        while True:
            await asyncio.sleep(lease / 3)
            await write()

    renewing = asyncio.ensure_future(renew())
    try:
        yield
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        # Written after the last delete, never removed meanwhile: an apply that looked its
        # images up before any of them sees the marker younger than its run, and keeps them.
        await write()


async def _spared(found: StoreCollection, policy: StorePolicy) -> StoreCollection:
    """`found` without the records and blobs the folders keep in the store only now
    (`policy.recheck`, read once gc's marker is in the store), each said in `kept`."""
    if policy.recheck is None:
        return found
    keys, blobs = await asyncio.to_thread(policy.recheck)
    why = "kept in the store only by a folder since gc began (apply --no-local-copy)"
    items, kept = [], list(found.kept)
    for item in found.items:
        folder, _, name = item.name.partition("/")
        if (folder == "ac" and name in keys) or (folder == "cas" and name in blobs):
            kept.append((item.name, why))
        else:
            items.append(item)
    return replace(found, items=tuple(items), kept=tuple(kept))


async def _named_blobs(objects: ObjectStore, records: Iterable[Listed]) -> set[str]:
    """The SHA-256 of every blob the `records` name (each read; one that is gone names none).
    A record read as JSON with a `sha256` protects that blob even if the rest of it is bad."""
    limit = asyncio.Semaphore(READS_IN_FLIGHT)

    async def one(name: str) -> str | None:
        async with limit:
            stored = await objects.get(name)
        if stored is None:
            return None
        try:
            body = json.loads(stored.data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):  # (nested too deep)
            return None
        sha = body.get("sha256") if isinstance(body, dict) else None
        return sha if isinstance(sha, str) else None

    found = await asyncio.gather(*(one(item.name) for item in records))
    return {sha for sha in found if sha}


async def _stale_claims(
    objects: ObjectStore, listed: Iterable[Listed], lease: float
) -> tuple[list[StoreGarbage], tuple[tuple[str, str], ...]]:
    """The stale claims that may go, and those kept (with why): each claim is read (claims
    are only the keys being paid for now, a few), its own lease saying when it is stale."""
    reader = Claims(objects, lease)
    garbage: list[StoreGarbage] = []
    kept: list[tuple[str, str]] = []
    for item in listed:
        key = item.name.removeprefix("claims/")
        info = await reader.read(key) if _HEX64.fullmatch(key) else None
        if info is None or not info.stale:
            continue
        why = _kept_claim(info, objects.if_match)
        if why is not None:
            kept.append((item.name, why))
        else:
            garbage.append(StoreGarbage(item.name, item.size, info.age, "stale claim"))
    return garbage, tuple(kept)


def _kept_claim(info: ClaimInfo, if_match: bool) -> str | None:
    """Why a stale claim stays, or None when it may go."""
    if info.image_url and url_expired_at(info.image_url, time.time()) is None:
        return "holds a paid image's URL, not expired: taking it over fetches the image"
    if not if_match:
        return (
            "the store has no If-Match (OSS): release it with `imgbatch store unlock "
            f"{info.key}` once its holder ({info.holder}) is gone"
        )
    return None


async def _delete(
    objects: ObjectStore, items: tuple[StoreGarbage, ...], lease: float, started: float
) -> tuple[StoreGarbage, ...]:
    """Delete `items`: records first (a reader then finds a miss, not damage), then blobs,
    probes and claims (each taken over with If-Match first). Gives the records written since
    `started` (monotonic: before the listings) that named a deleted blob, removed too."""
    limit = asyncio.Semaphore(READS_IN_FLIGHT)

    async def remove(name: str) -> None:
        async with limit:
            await objects.delete(name)

    order = ("ac/", "cas/", "probes/", MARKERS)
    for folder in order:
        await asyncio.gather(*(remove(i.name) for i in items if i.name.startswith(folder)))
    claims = Claims(objects, lease)
    for item in items:
        if item.name.startswith("claims/"):
            taken = await claims.acquire(item.name.removeprefix("claims/"))
            if isinstance(taken, Claim):  # stale still, and now gc's: nobody else's to lose
                await claims.release(taken)
    deleted = {i.name.removeprefix("cas/") for i in items if i.name.startswith("cas/")}
    if not deleted:
        return ()
    return await _unnamed_since(objects, deleted, time.monotonic() - started + 2.0)


async def _unnamed_since(
    objects: ObjectStore, deleted: set[str], seconds: float
) -> tuple[StoreGarbage, ...]:
    """The records written in the last `seconds` that name a blob in `deleted`, removed."""
    recent = [item for item in await objects.listing("ac/") if item.age <= seconds]
    found: list[StoreGarbage] = []
    for item in recent:
        if (await _named_blobs(objects, [item])) & deleted:
            await objects.delete(item.name)
            why = "record written during gc naming a blob it deleted"
            found.append(StoreGarbage(item.name, item.size, item.age, why))
    return tuple(found)
