"""`imgbatch store claims` and `imgbatch store unlock`: the claims in a shared store, for people.

Takes a store's URL and the environment; gives the claims held in it (key, holder, age, stale,
and whether the service had answered their holder) and releases one by its key. Where the store
has If-Match (S3), a stale claim is taken over on its own by the next process that needs its
key; where it has not (OSS), a claim whose holder died stays until `unlock` releases it, as
Terraform's `force-unlock` does for its lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from imgbatch.errors import ConfigError
from imgbatch.state.store import choose_store, open_shared
from imgbatch.state.store.claims import ClaimInfo, Claims


def _url(flag: str | None, environ: Mapping[str, str]) -> str:
    chosen = choose_store(flag, environ, None)
    if chosen is None:
        raise ConfigError("no store: give --store URL or set IMGBATCH_STORE")
    return chosen[0]


def list_claims(flag: str | None, environ: Mapping[str, str]) -> tuple[str, list[ClaimInfo]]:
    """The store's URL and every claim in it (one LIST, then one GET per claim)."""
    url = _url(flag, environ)

    async def run() -> list[ClaimInfo]:
        async with open_shared(url, environ) as shared:
            return await Claims(shared.objects, shared.claims.claims.lease).held()

    return url, asyncio.run(run())


def unlock(flag: str | None, environ: Mapping[str, str], key: str) -> bool:
    """Release `key`'s claim whoever holds it; False if there was none."""
    url = _url(flag, environ)
    if not key or not all(char in "0123456789abcdef" for char in key):
        raise ConfigError(f"{key!r} is not a request key (64 hexadecimal digits)")

    async def run() -> bool:
        async with open_shared(url, environ) as shared:
            return await Claims(shared.objects).unlock(key)

    return asyncio.run(run())
