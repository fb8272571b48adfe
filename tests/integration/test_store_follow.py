"""A run sharing a store follows the claims others hold on the keys it needs (`SharedRun`):
it restores their images as they are published rather than at each shot's turn, and a shot
waiting on another's claim looks for the record once, when the claim goes, instead of polling.

Against moto's S3 server on 127.0.0.1: one `SharedRun` (this process) and a second store
client standing for another process; the store's own request counts are the evidence.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from PIL import Image

from imgbatch.errors import SharedStoreError
from imgbatch.review.outcome import ApplyReport
from imgbatch.run.apply import ApplyOptions, apply, make_plan
from imgbatch.run.sharing import Restored, SharedRun
from imgbatch.shots.expand import Shot
from imgbatch.shots.request import ImageRequest
from imgbatch.state.cache import ImageCache
from imgbatch.state.store import open_shared
from imgbatch.state.store.claims import Claim, ClaimInfo
from imgbatch.state.store.layout import Record, SharedCache
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_many_shots
from tests.support.object_servers import BUCKET, s3_environ

SIZE = 64


def png(colour: str, size: int = SIZE) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, "PNG")
    return out.getvalue()


def shots(count: int) -> list[Shot]:
    return [
        Shot(
            f"s{index}",
            ImageRequest(prompt=f"take {index}", size=f"{SIZE}*{SIZE}"),
            f"s{index}.png",
        )
        for index in range(count)
    ]


@asynccontextmanager
async def two_processes(
    endpoint: str, tmp_path: Path, *, follow: bool = True
) -> AsyncIterator[tuple[SharedRun, SharedCache]]:
    """This process's run (following, unless told not to) and another process's store client,
    on one fresh prefix."""
    url, environ = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", s3_environ(endpoint)
    async with open_shared(url, environ) as mine, open_shared(url, environ) as theirs:
        run = SharedRun(mine, ImageCache(tmp_path / "cache"), follow=follow)
        try:
            yield run, theirs
        finally:
            await run.close()


async def make(theirs: SharedCache, shot: Shot, colour: str) -> None:
    """The other process publishes `shot`'s image and releases its claim, as a run does."""
    entry = {"width": SIZE, "height": SIZE, "id": shot.id}
    await theirs.publish(shot.request.key, png(colour), entry)
    await theirs.claims.release(shot.request.key)


async def claimed_by_them(theirs: SharedCache) -> Shot:
    """A shot whose key the other process has claimed: it is paying for it."""
    (shot,) = shots(1)
    assert isinstance(await theirs.claims.acquire(shot.request.key), Claim)
    return shot


def test_images_others_publish_are_restored_before_their_turn_comes(
    moto_endpoint: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with two_processes(moto_endpoint, tmp_path) as (run, theirs):
            wanted = shots(3)
            for shot in wanted:  # the other process is paying for them
                assert isinstance(await theirs.claims.acquire(shot.request.key), Claim)
            await run.hydrate(wanted)  # all misses: not made yet
            await asyncio.sleep(0.5)  # this run lists the claims meanwhile
            for shot, colour in zip(wanted, ("red", "green", "blue"), strict=True):
                await make(theirs, shot, colour)
            deadline = time.monotonic() + 6
            while not all(run.local.has(shot.request.key) for shot in wanted):
                assert time.monotonic() < deadline, "not restored in the background"
                await asyncio.sleep(0.1)
            # Each shot's turn: its record and image are already here, checked: no request.
            before = sum(run.shared.objects.requests.values())
            for shot, colour in zip(wanted, ("red", "green", "blue"), strict=True):
                record = await run.try_claim(shot)
                assert isinstance(record, Record)
                restored = await run.fetch(shot, record)
                assert isinstance(restored, Restored) and restored.data == png(colour)
            assert sum(run.shared.objects.requests.values()) == before
            assert run.restored == 3

    asyncio.run(scenario())


def test_a_shot_waiting_on_a_claim_looks_for_the_record_once_the_claim_goes(
    moto_endpoint: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with two_processes(moto_endpoint, tmp_path) as (run, theirs):
            (shot,) = shots(1)
            await run.hydrate([shot])
            assert isinstance(await theirs.claims.acquire(shot.request.key), Claim)
            assert isinstance(await run.try_claim(shot), ClaimInfo)  # its turn: another's claim
            gets = run.shared.objects.requests["get"]
            waiting = asyncio.ensure_future(run.settle(shot))
            await asyncio.sleep(3.0)  # the service answering the other process
            # While it was paid for, no look at the record at all (polling made 5 in 3 s)...
            assert run.shared.objects.requests["get"] == gets
            await make(theirs, shot, "red")
            found = await asyncio.wait_for(waiting, 4)
            assert isinstance(found, Record)
            # ...then one, once the claim had gone.
            assert run.shared.objects.requests["get"] == gets + 1

    asyncio.run(scenario())


def test_a_claim_given_up_without_an_image_is_taken_at_once(
    moto_endpoint: str, tmp_path: Path
) -> None:
    """Its holder released it without publishing (the service refused it, say): the waiting
    shot claims the key when the claim goes, not a half lease (minutes) later."""

    async def scenario() -> None:
        async with two_processes(moto_endpoint, tmp_path) as (run, theirs):
            (shot,) = shots(1)
            await run.hydrate([shot])
            assert isinstance(await theirs.claims.acquire(shot.request.key), Claim)
            assert isinstance(await run.try_claim(shot), ClaimInfo)
            waiting = asyncio.ensure_future(run.settle(shot))
            await asyncio.sleep(1.0)
            await theirs.claims.release(shot.request.key)
            found = await asyncio.wait_for(waiting, 5)
            assert isinstance(found, Claim) and found.holder == run.shared.claims.claims.holder

    asyncio.run(scenario())


def test_meeting_a_live_claim_costs_two_requests(moto_endpoint: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with two_processes(moto_endpoint, tmp_path, follow=False) as (run, theirs):
            shot = await claimed_by_them(theirs)
            await run.shared.probe()  # once per run, before its first claim
            before = dict(run.shared.objects.requests)
            found = await run.try_claim(shot)
            assert isinstance(found, ClaimInfo)
            spent = {
                op: count - before.get(op, 0) for op, count in run.shared.objects.requests.items()
            }
            # The record (a miss), the create-only claim (refused) and the claim read: the
            # record is looked for again only by the wait that follows.
            assert (spent["get"], spent["put"], spent.get("delete", 0)) == (2, 1, 0)

    asyncio.run(scenario())


def test_a_turn_meeting_a_claim_the_last_listing_showed_waits_without_a_request(
    moto_endpoint: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with two_processes(moto_endpoint, tmp_path) as (run, theirs):
            shot = await claimed_by_them(theirs)
            await run.hydrate([shot])  # a miss: this run lists the claims at once
            await asyncio.sleep(0.5)
            await run.shared.probe()
            before = sum(run.shared.objects.requests.values())
            found = await run.try_claim(shot)
            assert isinstance(found, ClaimInfo) and not found.stale
            assert sum(run.shared.objects.requests.values()) == before
            # And it is settled as any wait on a claim: the record, once the claim goes.
            waiting = asyncio.ensure_future(run.settle(shot))
            await make(theirs, shot, "red")
            assert isinstance(await asyncio.wait_for(waiting, 4), Record)

    asyncio.run(scenario())


def test_a_stale_claim_in_the_listing_is_taken_over_at_the_turn(
    moto_endpoint: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with two_processes(moto_endpoint, tmp_path) as (run, theirs):
            shot = await claimed_by_them(theirs)
            await asyncio.sleep(2.1)  # ages have a resolution of a second on S3
            run.shared.claims.claims.lease = 1.0  # its holder died a lease ago
            await run.hydrate([shot])
            await asyncio.sleep(0.5)  # listed, with its age
            found = await run.try_claim(shot)
            assert isinstance(found, Claim) and found.inherited is not None

    asyncio.run(scenario())


def test_a_turn_that_comes_while_its_image_is_restored_in_the_background_joins_it(
    moto_endpoint: str, tmp_path: Path
) -> None:
    """One restore of a key at a time: the turn waits for the background one rather than
    fetching and decoding the image again (10 images in 200 were, on the bench)."""
    decoding, go = threading.Event(), threading.Event()
    decodes: list[str] = []

    def thumbnail(key: str, image: Image.Image) -> None:
        # The contact sheet's thumbnail, made from the restore's one decode: held here until
        # the turn has come, as a decode on a busy machine takes its time.
        decodes.append(key)
        decoding.set()
        go.wait(10)

    async def scenario() -> None:
        async with two_processes(moto_endpoint, tmp_path) as (run, theirs):
            run.thumbnail = thumbnail
            shot = await claimed_by_them(theirs)
            await run.hydrate([shot])
            await asyncio.sleep(0.5)  # listed: being paid for
            await make(theirs, shot, "red")
            assert await asyncio.to_thread(decoding.wait, 6), "not restored in the background"
            gets = run.shared.objects.requests["get"]
            record = await run.try_claim(shot)  # the turn: the record is published
            assert isinstance(record, Record)
            joining = asyncio.ensure_future(run.fetch(shot, record))
            await asyncio.sleep(0.3)
            go.set()
            restored = await asyncio.wait_for(joining, 5)
            assert isinstance(restored, Restored) and restored.data == png("red")
            # The turn's look at the record, and no second GET of the blob nor decode.
            assert run.shared.objects.requests["get"] == gets + 1
            assert decodes == [shot.request.key]
            assert restored.cached  # in the local cache, checked: the executor writes it no more

    try:
        asyncio.run(scenario())
    finally:
        go.set()


def test_an_image_restored_in_the_background_is_not_written_again_at_its_turn(
    tmp_path: Path,
    store_env: dict[str, str],
    fake_server: FakeDashScope,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole apply: the cache entry the background restore wrote (and the turn read back and
    checked by SHA-256) is the one the shot's file is placed from: each key's image is written
    into the local cache once (each write an fsync)."""
    manifest = write_many_shots(tmp_path, "store", 4)
    environ = {**store_env, "OUTPUT_DIR": str(tmp_path / "b"), "HOME": str(tmp_path)}
    keys = [
        item.shot.request.key for item in make_plan(manifest, environ=environ).shots if item.shot
    ]
    # Counted, not replaced: the real writes happen.
    writes: list[str] = []
    real_put = ImageCache.put

    def put(cache: ImageCache, key: str, data: bytes) -> None:
        writes.append(key)
        real_put(cache, key, data)

    monkeypatch.setattr(ImageCache, "put", put)
    planned = threading.Event()
    options = ApplyOptions(environ=environ, home=tmp_path, rps=1.0, quota_store=False)

    async def scenario() -> ApplyReport:
        url = store_env["IMGBATCH_STORE"]
        async with open_shared(url, store_env) as theirs:
            for key in keys:  # the other process is paying for them all
                assert isinstance(await theirs.claims.acquire(key), Claim)
            run = asyncio.ensure_future(
                asyncio.to_thread(apply, manifest, options, on_plan=lambda plan: planned.set())
            )
            assert await asyncio.to_thread(planned.wait, 30)  # looked up: all misses
            await asyncio.sleep(0.3)
            for index, key in enumerate(keys):  # made
                entry = {"width": 1328, "height": 1328, "id": f"shot-{index:03d}"}
                colour = ("red", "green", "blue", "white")[index]
                await theirs.publish(key, png(colour, 1328), entry)
                await theirs.claims.release(key)
            return await asyncio.wait_for(run, 30)

    report = asyncio.run(scenario())
    assert report.count("from_store") == 4 and fake_server.successes == 0
    assert sorted(writes) == sorted(keys)  # each once: none written again at its turn


def test_a_listing_that_fails_leaves_no_claim_taken_for_live(
    moto_endpoint: str, tmp_path: Path
) -> None:
    """Once listing `claims/` fails, following stops: what the last listing said of others'
    claims must then not keep a shot's turn from taking over a claim that has gone stale."""

    async def scenario() -> None:
        async with two_processes(moto_endpoint, tmp_path) as (run, theirs):
            shot = await claimed_by_them(theirs)
            run.shared.claims.claims.lease = 4.0
            await run.hydrate([shot])
            await asyncio.sleep(0.5)  # listed live: the turn would wait without a request
            real = run.shared.objects.listing

            async def failing(prefix: str) -> list[object]:
                raise SharedStoreError("the store refused the listing")

            run.shared.objects.listing = failing  # type: ignore[method-assign]
            run._start_following()
            await asyncio.sleep(0.3)
            run.shared.objects.listing = real  # type: ignore[method-assign]
            await asyncio.sleep(5.2)  # its holder died: the claim is a lease old
            found = await run.try_claim(shot)
            assert isinstance(found, Claim) and found.inherited is not None

    asyncio.run(scenario())


def test_closing_waits_for_the_restores_under_way(moto_endpoint: str, tmp_path: Path) -> None:
    """A background restore's thread writes into the output folder (the cache entry, the
    thumbnail): `close`, which the apply calls before letting go of the folder's lock, waits
    for it, so nothing is written there after the run."""
    decoding, go = threading.Event(), threading.Event()

    def thumbnail(key: str, image: Image.Image) -> None:
        decoding.set()
        go.wait(10)

    async def scenario() -> None:
        async with two_processes(moto_endpoint, tmp_path) as (run, theirs):
            run.thumbnail = thumbnail
            shot = await claimed_by_them(theirs)
            await run.hydrate([shot])
            await asyncio.sleep(0.5)
            await make(theirs, shot, "red")
            assert await asyncio.to_thread(decoding.wait, 6), "not restored in the background"
            closing = asyncio.ensure_future(run.close())
            await asyncio.sleep(0.5)
            assert not closing.done(), "closed while a restore was still writing"
            go.set()
            await asyncio.wait_for(closing, 5)
            assert run.local.path(shot.request.key).read_bytes() == png("red")

    try:
        asyncio.run(scenario())
    finally:
        go.set()
