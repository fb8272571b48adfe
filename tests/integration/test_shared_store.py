"""The shared store's backends, layout and claims against real servers on 127.0.0.1.

moto for behaviour, SeaweedFS for races (moto checks a condition and then writes without a lock),
a fake OSS for what OSS lacks, and a local folder, which must behave as the buckets do.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from PIL import Image

from imgbatch.errors import ConfigError, SharedEntryDamaged, SharedStoreError
from imgbatch.state.store import choose_store, location, open_shared, read_only_from
from imgbatch.state.store.claims import Claim, ClaimInfo, Claims
from imgbatch.state.store.layout import SharedCache
from imgbatch.state.store.objects import Conflict, Exists
from tests.support.object_servers import BUCKET, FakeOss, s3_environ


@pytest.fixture(params=["folder", "moto", "seaweed"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., object]:
    """Opens a fresh prefix of one backend (as many times as a test likes: one per process)."""
    prefix = uuid.uuid4().hex[:12]
    if request.param == "folder":
        url, environ = str(tmp_path / "store"), {}
    else:
        endpoint = request.getfixturevalue(f"{request.param}_endpoint")
        url, environ = f"s3://{BUCKET}/{prefix}", s3_environ(endpoint)

    def open_one(**kwargs: object) -> object:
        return open_shared(url, {**environ, **kwargs.pop("environ", {})}, **kwargs)  # type: ignore[arg-type]

    return open_one


def png(width: int = 16, height: int = 8, colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_create_is_create_only_and_replace_needs_the_etag_read(opener) -> None:
    async def scenario() -> None:
        async with opener() as cache:
            objects = cache.objects
            assert await objects.get("claims/k") is None
            etag = await objects.create("claims/k", b"one")
            with pytest.raises(Exists):
                await objects.create("claims/k", b"two")
            stored = await objects.get("claims/k")
            assert stored is not None and stored.data == b"one" and stored.etag == etag
            with pytest.raises(Conflict):
                await objects.replace("claims/k", b"three", _not(etag))
            new = await objects.replace("claims/k", b"four", etag)
            assert new != etag and (await objects.get("claims/k")).data == b"four"
            with pytest.raises(Conflict):  # the old tag no longer matches
                await objects.replace("claims/k", b"five", etag)
            assert await objects.names("claims/") == ["claims/k"]
            await objects.delete("claims/k")
            assert await objects.get("claims/k") is None
            with pytest.raises(Conflict):  # gone: nothing to replace
                await objects.replace("claims/k", b"six", new)
            await cache.probe()
            assert await objects.names("probes/") == []  # the probe cleans up after itself

    run(scenario())


def _not(etag: str) -> str:
    return etag.replace(etag.strip('"')[0], "0" if etag.strip('"')[0] != "0" else "1", 1)


def test_a_record_is_published_after_its_blob_and_restored_checked(opener) -> None:
    data = png()
    entry = {"id": "s01", "status": "generated", "width": 16, "height": 8}

    async def scenario() -> None:
        async with opener() as cache:
            assert await cache.lookup("key1") is None
            record = await cache.publish("key1", data, entry)
            found = await cache.lookup("key1")
            assert found == record and found.entry == entry
            assert await cache.fetch(found, (16, 8)) == data
            assert cache.blob_url(record.sha256).endswith(f"/cas/{record.sha256}")
            # A second maker's record does not replace the first's.
            await cache.publish("key1", png(colour="blue"), {**entry, "id": "other"})
            assert (await cache.lookup("key1")).entry["id"] == "s01"
            with pytest.raises(SharedEntryDamaged, match=r"records a 16\*8 image"):
                await cache.fetch(found, (8, 8))

    run(scenario())


def test_a_blob_lost_or_damaged_after_its_record_is_damage_not_a_miss(opener) -> None:
    data = png()

    async def scenario() -> None:
        async with opener() as cache:
            record = await cache.publish("k", data, {"width": 16, "height": 8})
            blob = f"cas/{record.sha256}"
            await cache.objects.delete(blob)
            with pytest.raises(SharedEntryDamaged, match="is missing, though ac/k names it"):
                await cache.fetch(record, (16, 8))
            await cache.objects.create(blob, data[:-10])  # damaged bytes under its name
            with pytest.raises(SharedEntryDamaged, match="does not match its record"):
                await cache.fetch(record, (16, 8))
            await cache.objects.create("ac/bad", b"{not json")
            with pytest.raises(SharedEntryDamaged, match="is not a record"):
                await cache.lookup("bad")

    run(scenario())


def test_read_only_writes_nothing(opener) -> None:
    async def scenario() -> None:
        async with opener(read_only=True) as cache:
            await cache.publish("k", png(), {"width": 16, "height": 8})
            assert await cache.lookup("k") is None
            assert cache.objects.requests["put"] == 0

    run(scenario())


def test_claims_pay_once_renew_and_take_over_a_stale_one(opener) -> None:
    async def scenario() -> None:
        async with opener() as first, opener() as second:
            mine = await first.claims.acquire("k")
            assert isinstance(mine, Claim)
            theirs = await second.claims.acquire("k")
            assert isinstance(theirs, ClaimInfo) and not theirs.stale
            assert theirs.holder == first.claims.claims.holder
            await first.claims.note_answer("k", "https://images.example/k.png", "req-1")
            # Stale: the second process takes it over and inherits the image URL.
            second.claims.claims.lease = 0.01
            await asyncio.sleep(1.1)  # ages have a resolution of a second on S3
            taken = await second.claims.acquire("k")
            assert isinstance(taken, Claim)
            assert taken.inherited is not None
            assert taken.image_url == "https://images.example/k.png"
            # The first holder finds it lost: its renewal fails, its release removes nothing.
            assert await first.claims.claims.renew(first.claims.held["k"]) is None
            await first.claims.release("k")
            assert await second.objects.get("claims/k") is not None
            await second.claims.release("k")
            assert await second.objects.get("claims/k") is None

    run(scenario())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["folder", "seaweed"])
def test_racing_creates_and_takeovers_have_one_winner(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Twelve clients at once (their own connections): one create wins; of twelve taking over
    one stale claim, one does."""
    if backend == "folder":
        url, environ = str(tmp_path / "store"), {}
    else:
        endpoint = request.getfixturevalue("seaweed_endpoint")
        url, environ = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", s3_environ(endpoint)

    async def scenario() -> None:
        async with _many(url, environ, 12) as caches:
            for round_ in range(3):
                name = f"claims/race{round_}"
                results = await asyncio.gather(
                    *(
                        cache.objects.create(name, f"{i}".encode())
                        for i, cache in enumerate(caches)
                    ),
                    return_exceptions=True,
                )
                assert sum(not isinstance(r, BaseException) for r in results) == 1
                assert all(isinstance(r, (str, Exists)) for r in results)
            holder = await caches[0].claims.acquire("stale")
            assert isinstance(holder, Claim)
            # Stale for the takers (older than their lease of 1 s; S3 ages are whole seconds),
            # while the claim one of them writes stays fresh for the others.
            await asyncio.sleep(2.1)
            for cache in caches[1:]:
                cache.claims.claims.lease = 1.0
            taken = await asyncio.gather(*(cache.claims.acquire("stale") for cache in caches[1:]))
            assert sum(isinstance(found, Claim) for found in taken) == 1

    run(scenario())


@asynccontextmanager
async def _many(url: str, environ: dict[str, str], count: int) -> AsyncIterator[list[SharedCache]]:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_shared(url, environ)) for _ in range(count)]


def test_a_store_that_ignores_if_none_match_is_refused() -> None:
    with FakeOss(ignore_conditions=True) as server:

        async def scenario() -> None:
            async with open_shared(f"s3://{BUCKET}/p", s3_environ(server.endpoint)) as cache:
                with pytest.raises(SharedStoreError, match="accepted a second create"):
                    await cache.publish("k", png(), {"width": 16, "height": 8})
                assert await cache.lookup("k") is None  # nothing shared through it

        run(scenario())


def test_oss_creates_with_forbid_overwrite_and_leaves_stale_claims_to_unlock() -> None:
    with FakeOss() as server:
        environ = s3_environ(server.endpoint)

        async def scenario() -> None:
            # Plain S3 conditions: OSS answers NotImplemented, and the message says so.
            async with open_shared(f"s3://{BUCKET}/p", environ) as wrong:
                with pytest.raises(SharedStoreError, match="501 NotImplemented"):
                    await wrong.probe()
            async with (
                open_shared(f"oss://{BUCKET}/p", environ) as first,
                open_shared(f"oss://{BUCKET}/p", environ) as second,
            ):
                assert not first.objects.if_match
                await first.publish("k", png(), {"width": 16, "height": 8})
                assert (await second.lookup("k")).width == 16
                assert isinstance(await first.claims.acquire("c"), Claim)
                second.claims.claims.lease = 0.01
                await asyncio.sleep(1.1)
                found = await second.claims.acquire("c")
                assert isinstance(found, ClaimInfo) and found.stale  # never taken over alone
                listed = await Claims(second.objects).held()
                assert [(info.key, info.stale) for info in listed] == [("c", False)]
                assert await Claims(second.objects).unlock("c")
                assert isinstance(await second.claims.acquire("c"), Claim)

        run(scenario())


def test_store_location_and_precedence(tmp_path: Path) -> None:
    assert location("oss://b/a/b/", tmp_path) == ("oss", "b", "a/b")
    assert location("file:///srv/cache", tmp_path) == Path("/srv/cache")
    assert location("cache", tmp_path) == tmp_path / "cache"
    for bad in ("s3://key:secret@b/p", "gs://b/p", "s3:///p", "s3://b/p?x=1"):
        with pytest.raises(ConfigError):
            location(bad, tmp_path)
    environ = {"IMGBATCH_STORE": "s3://env/p"}
    assert choose_store("s3://flag/p", environ, "m") == ("s3://flag/p", "--store")
    assert choose_store(None, environ, "m") == ("s3://env/p", "IMGBATCH_STORE")
    assert choose_store(None, {}, "m") == ("m", "output.store")
    assert choose_store(None, {}, None) is None
    assert read_only_from(False, {"IMGBATCH_STORE_READ_ONLY": "1"})
    assert not read_only_from(False, {"IMGBATCH_STORE_READ_ONLY": "0"})


def test_store_claims_lists_and_store_unlock_releases(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from imgbatch.cli.main import main

    key = "ab" * 32
    with FakeOss() as server:
        environ = s3_environ(server.endpoint)
        url = f"oss://{BUCKET}/team"

        async def hold() -> None:
            async with open_shared(url, environ) as cache:
                assert isinstance(await cache.claims.acquire(key), Claim)

        run(hold())
        runner = CliRunner(env=environ)
        listed = runner.invoke(main, ["store", "claims", "--store", url])
        assert listed.exit_code == 0, listed.output
        assert listed.output.startswith(f"{key}  live  ")
        released = runner.invoke(main, ["store", "unlock", key, "--store", url])
        assert released.exit_code == 0 and f"Released the claim on {key}." in released.output
        assert runner.invoke(main, ["store", "unlock", key, "--store", url]).exit_code == 1
        empty = runner.invoke(main, ["store", "claims"], env={"IMGBATCH_STORE": url})
        assert empty.output == f"No claims in {url}.\n"
        bad = runner.invoke(main, ["store", "unlock", "../x", "--store", url])
        assert bad.exit_code == 2 and "is not a request key" in bad.output


def test_what_a_store_says_reaches_the_terminal_without_control_characters(
    tmp_path: Path,
) -> None:
    # Anyone who can write the store writes claims and probes: a holder or an object name
    # with ESC and BEL in it was printed as it was (an OSC sequence sets the terminal's title,
    # writes its clipboard, or hides a line), by `store claims` and `gc --store`.
    import json
    import os
    import time

    from click.testing import CliRunner

    from imgbatch.cli.main import main

    store = tmp_path / "store"
    hostile = "\x1b]0;pwned\x07\x1b[2Khost"
    (store / "claims").mkdir(parents=True)
    claim = {"holder": hostile, "request_id": hostile, "image_url": "https://x.example/y.png"}
    (store / "claims" / ("b" * 64)).write_text(json.dumps(claim))
    (store / "probes").mkdir()
    probe = store / "probes" / f"{hostile}-probe"
    probe.write_bytes(b"x")
    old = time.time() - 3 * 86400
    os.utime(probe, (old, old))
    (tmp_path / "shots.yaml").write_text(
        'version: 1\nname: n\nshots:\n  - id: a\n    prompt: "a"\n', encoding="utf-8"
    )
    runner = CliRunner()
    listed = runner.invoke(main, ["store", "claims", "--store", str(store)])
    collected = runner.invoke(main, ["gc", str(tmp_path / "shots.yaml"), "--store", str(store)])
    for result in (listed, collected):
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
        assert "pwned" in result.output  # shown, escaped: \x1b]0;pwned\x07


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAEXAMPLE:wJalrXUtnFEMIsecret@team-images/imgbatch",
        "s3://team-images/imgbatch?X-Amz-Signature=wJalrXUtnFEMIsecret",
        "oss://team-images/imgbatch#wJalrXUtnFEMIsecret",
        "https://AKIAEXAMPLE:wJalrXUtnFEMIsecret@team-images.example/imgbatch",
        "file://AKIAEXAMPLE:wJalrXUtnFEMIsecret@host/imgbatch",
    ],
)
def test_a_store_url_refused_for_its_credentials_does_not_print_them(
    tmp_path: Path, url: str
) -> None:
    # Refused, rightly, but quoted whole: the secret went to the terminal and the CI log.
    with pytest.raises(ConfigError) as refused:
        location(url, tmp_path)
    assert "wJalrXUtnFEMIsecret" not in str(refused.value)
    assert "AKIAEXAMPLE" not in str(refused.value)
    assert "team-images" in str(refused.value) or "host" in str(refused.value)


def test_a_store_no_folder_or_url_can_name_is_a_usage_error_not_a_crash(tmp_path: Path) -> None:
    # A link loop, an unknown user's home and an unbalanced bracket ended in "unexpected
    # RuntimeError/ValueError" (exit 1, a crash log) from making a folder canonical or reading
    # the URL; the same text as a results.json `image_url` crashed every plan of the folder.
    from click.testing import CliRunner

    from imgbatch.cli.main import main

    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    manifest = tmp_path / "shots.yaml"
    manifest.write_text('version: 1\nname: n\nshots:\n  - id: a\n    prompt: "a"\n')
    spellings = [
        str(tmp_path / "loop1" / "store"),
        f"file://{tmp_path}/loop1",
        "~no-such-user-imgbatch/store",
        "s3://team]images/p",
        "s3://[::1/p",
        "file:///tmp/a\0b",
    ]
    for url in spellings:
        with pytest.raises(ConfigError) as refused:
            location(url, tmp_path)
        assert "store" in str(refused.value)
        result = CliRunner().invoke(
            main, ["plan", str(manifest), "--provider", "placeholder", "--store", url]
        )
        assert result.exit_code == 2, (url, result.output)
        assert result.stderr.startswith("error: store "), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop1", "loop2", "shots.yaml"]


def test_a_results_file_naming_a_store_no_folder_can_be_still_plans(tmp_path: Path) -> None:
    # What results.json says is data: an entry kept in a store whose URL cannot be made
    # canonical is kept in that store, as written (the plan refuses to pay for it, naming it).
    from click.testing import CliRunner

    from imgbatch.cli.main import main

    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    manifest = tmp_path / "shots.yaml"
    manifest.write_text('version: 1\nname: n\nshots:\n  - id: a\n    prompt: "a"\n')
    runner = CliRunner(env={"HOME": str(tmp_path)})
    store = ["--store", str(tmp_path / "store")]
    made = runner.invoke(main, ["apply", str(manifest), "--provider", "placeholder", *store])
    assert made.exit_code == 0, made.output
    gone = runner.invoke(
        main, ["apply", str(manifest), "--provider", "placeholder", "--no-local-copy", *store]
    )
    assert gone.exit_code == 0, gone.output
    results = tmp_path / "output" / "n" / "results.json"
    for odd in (f"file://{tmp_path}/loop1", "file:///a%00b", "s3://team]images/p"):
        text = results.read_text().replace((tmp_path / "store").as_uri(), odd)
        results.write_text(text)
        planned = runner.invoke(main, ["plan", str(manifest), "--provider", "placeholder"])
        assert planned.exit_code == 2, (odd, planned.output)
        assert "kept in a shared store only" in planned.stderr
        results.write_text(text.replace(odd, (tmp_path / "store").as_uri()))
