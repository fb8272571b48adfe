"""Claims: who is paying for a request key now, so that processes sharing a store pay once.

Takes a `SharedCache`'s object store and a lease; gives `acquire` (the claim, or who holds it),
`renew`, `note_answer` (the image's URL once the service answered, so that another process can
fetch a paid image instead of paying again), `release`, and, for people, `held` and `unlock`.

A claim is `claims/<key>`, created create-only. Its holder renews it while it waits on the
service; a claim not written for longer than its lease (by the store's clock) is stale, and
`acquire` takes it over with If-Match on the entity tag it read, so of two processes taking
over one stale claim only one succeeds. The new holder inherits what the stale claim says (its
image URL), and keeps saying it. Where the store has no If-Match (OSS), a stale claim is never
taken over on its own: `imgbatch store claims` lists it and `imgbatch store unlock KEY` releases
it (Terraform's force-unlock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from imgbatch.state.store.objects import Conflict, Exists, ObjectStore

DEFAULT_LEASE = 300.0
LEASE_VARIABLE = "IMGBATCH_CLAIM_LEASE"


def lease_from(environ: Mapping[str, str]) -> float:
    """The claim lease: `IMGBATCH_CLAIM_LEASE` seconds (for tests), else five minutes."""
    text = environ.get(LEASE_VARIABLE)
    if not text:
        return DEFAULT_LEASE
    try:
        lease = float(text)
    except ValueError:
        lease = 0.0
    if not lease > 0 or lease == float("inf"):
        from imgbatch.errors import ConfigError

        raise ConfigError(f"{LEASE_VARIABLE} must be a number of seconds above 0, got {text!r}")
    return lease


@dataclass(frozen=True)
class ClaimInfo:
    """A claim as read: who holds it, what the service answered them, and how old it is."""

    key: str
    holder: str
    image_url: str | None
    request_id: str | None
    age: float
    stale: bool


@dataclass(frozen=True)
class Claim:
    """A claim this process holds. `inherited`: the stale claim it took over, if any (its
    image URL, if the service had answered its holder)."""

    key: str
    holder: str
    etag: str
    renewal: int = 0
    image_url: str | None = None
    request_id: str | None = None
    inherited: ClaimInfo | None = None

    def body(self, lease: float) -> bytes:
        data = {
            "key": self.key,
            "holder": self.holder,
            "lease": lease,
            # Each write differs: an entity tag read before a renewal must not match after it.
            "renewal": self.renewal,
            "nonce": uuid.uuid4().hex[:8],
            "image_url": self.image_url,
            "request_id": self.request_id,
        }
        return json.dumps(data, sort_keys=True).encode("utf-8")


class Claims:
    """The claims under `objects`' prefix, for one process (`holder`)."""

    def __init__(self, objects: ObjectStore, lease: float = DEFAULT_LEASE) -> None:
        self.objects = objects
        self.lease = lease
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def acquire(self, key: str) -> Claim | ClaimInfo:
        """This process's claim on `key`, or the live claim another process holds (a stale one
        too, where the store cannot take it over)."""
        name = f"claims/{key}"
        while True:
            claim = Claim(key, self.holder, etag="")
            try:
                etag = await self.objects.create(name, claim.body(self.lease))
                return replace(claim, etag=etag)
            except Exists:
                pass
            stored = await self.objects.get(name)
            if stored is None:
                continue  # released since: try again
            info = self._info(key, stored.data, stored.age)
            if not info.stale or not self.objects.if_match:
                return info
            taker = replace(
                claim, image_url=info.image_url, request_id=info.request_id, inherited=info
            )
            try:
                etag = await self.objects.replace(name, taker.body(self.lease), stored.etag)
            except Conflict:
                continue  # another process took it over first: it is live now
            return replace(taker, etag=etag)

    async def renew(self, claim: Claim) -> Claim | None:
        """`claim` written again (its lease starts over); None if it was taken over meanwhile
        (this process was too slow: whoever took it over may pay for the key too)."""
        renewed = replace(claim, renewal=claim.renewal + 1)
        try:
            etag = await self.objects.replace(
                f"claims/{claim.key}", renewed.body(self.lease), claim.etag
            )
        except Conflict:
            return None
        return replace(renewed, etag=etag)

    async def note_answer(
        self, claim: Claim, image_url: str, request_id: str | None
    ) -> Claim | None:
        """`claim` saying the service made its image at `image_url` (a crash after this lets
        whoever takes the claim over fetch the image instead of paying again)."""
        return await self.renew(replace(claim, image_url=image_url, request_id=request_id))

    async def release(self, claim: Claim) -> None:
        """Remove `claim`, if it is still this process's: a claim taken over (this process
        stalled past its lease) is the taker's, and removing it could let a third process pay
        for a key the taker is paying for."""
        name = f"claims/{claim.key}"
        stored = await self.objects.get(name)
        if stored is not None and stored.etag == claim.etag:
            await self.objects.delete(name)

    async def held(self) -> list[ClaimInfo]:
        """Every claim in the store (one LIST of `claims/`): for `imgbatch store claims`."""
        found = []
        for name in await self.objects.names("claims/"):
            stored = await self.objects.get(name)
            if stored is not None:
                found.append(self._info(name.removeprefix("claims/"), stored.data, stored.age))
        return found

    async def read(self, key: str) -> ClaimInfo | None:
        """`key`'s claim as it stands (one GET), or None when there is none."""
        stored = await self.objects.get(f"claims/{key}")
        return None if stored is None else self._info(key, stored.data, stored.age)

    async def unlock(self, key: str) -> bool:
        """Release `key`'s claim whoever holds it (`imgbatch store unlock`); False if none."""
        name = f"claims/{key}"
        if await self.objects.get(name) is None:
            return False
        await self.objects.delete(name)
        return True

    def _info(self, key: str, data: bytes, age: float) -> ClaimInfo:
        try:
            body: Any = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):  # (nested too deep: "[[[[...")
            body = None
        if not isinstance(body, dict):
            # Not a claim imgbatch wrote: stale at once, so it blocks no one for long.
            return ClaimInfo(key, "unknown", None, None, age, True)
        stated, lease = body.get("lease"), self.lease
        if isinstance(stated, (int, float)) and stated > 0:
            # Bounded before float(), which raises OverflowError on an int of 400 digits.
            lease = float(min(stated, self.lease))
        url, request_id = body.get("image_url"), body.get("request_id")
        return ClaimInfo(
            key,
            str(body.get("holder", "unknown")),
            url if isinstance(url, str) else None,
            request_id if isinstance(request_id, str) else None,
            age,
            age > min(lease, self.lease),
        )


class HeldClaims:
    """The claims this process holds, renewed every third of the lease in the background until
    each is released. Every write of one of them goes through here, one at a time, so that a
    renewal and a note of the service's answer never race each other's entity tag."""

    def __init__(self, claims: Claims) -> None:
        self.claims = claims
        self.held: dict[str, Claim] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def acquire(self, key: str) -> Claim | ClaimInfo:
        found = await self.claims.acquire(key)
        if isinstance(found, Claim):
            self.held[key] = found
            if self._task is None:
                self._task = asyncio.ensure_future(self._renew_all())
        return found

    async def note_answer(self, key: str, image_url: str, request_id: str | None) -> None:
        async with self._lock:
            claim = self.held.get(key)
            if claim is not None:
                self._update(key, await self.claims.note_answer(claim, image_url, request_id))

    async def release(self, key: str) -> None:
        async with self._lock:
            claim = self.held.pop(key, None)
            if claim is not None:
                await self.claims.release(claim)

    def _update(self, key: str, claim: Claim | None) -> None:
        if claim is None:
            self.held.pop(key, None)  # taken over by another process: no longer ours
        else:
            self.held[key] = claim

    async def _renew_all(self) -> None:
        while True:
            await asyncio.sleep(self.claims.lease / 3)
            async with self._lock:
                for key, claim in list(self.held.items()):
                    with contextlib.suppress(Exception):  # missed: the next renewal may do
                        self._update(key, await self.claims.renew(claim))

    async def close(self) -> None:
        """Stop renewing; the claims still held go stale after their lease (a paid image's
        URL stays in its claim for whoever takes it over)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
