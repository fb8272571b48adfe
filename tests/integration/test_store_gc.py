"""`imgbatch gc --store`: a shared store collected safely, against moto's S3 server (and the
fake OSS, for a store without If-Match).

Two shot lists share one store. gc, run for one of them, never deletes what the other's records
name; a blob written without its record yet (a writer in flight) stays; records go only with
--older-than; stale claims go, live ones and paid ones stay; nothing is deleted without --yes or
through a read-only store; and it lists, never HEADs each object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from imgbatch.cli.main import main
from imgbatch.housekeeping.gc import kept_in_store_only
from imgbatch.housekeeping.store_gc import (
    MARKERS,
    StorePolicy,
    collect_store,
    parse_age,
    store_for_gc,
)
from imgbatch.pacing.gate import RetryPolicy
from imgbatch.run.apply import ApplyOptions, apply
from imgbatch.state.store import open_shared, store_url
from imgbatch.state.store.claims import Claims
from tests.conftest import write_manifest
from tests.support.fake_dashscope import FakeDashScope
from tests.support.object_servers import BUCKET, FakeOss, s3_environ

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


def shot_list(directory: Path, name: str, subject: str, count: int = 2) -> Path:
    """A shot list of its own requests (its own keys): `count` shots of `subject`."""
    lines = ["version: 1", f"name: {name}", "defaults:", '  size: "1328*1328"', "shots:"]
    for index in range(count):
        lines += [f"  - id: {name}-{index}", f'    prompt: "{subject}, take {index}"']
    (directory / name).mkdir()
    return write_manifest(directory / name, "\n".join(lines) + "\n")


def options_into(
    environ: dict[str, str], folder: Path, *, no_local_copy: bool = False
) -> ApplyOptions:
    """An apply's options on a machine with `environ`, its output under `folder`."""
    return ApplyOptions(
        retry=FAST_RETRY,
        environ={**environ, "OUTPUT_DIR": str(folder)},
        home=Path(environ["HOME"]),
        rps=1000.0,
        quota_store=False,
        no_local_copy=no_local_copy,
    )


def apply_into(
    environ: dict[str, str], manifest: Path, folder: Path, *, no_local_copy: bool = False
) -> None:
    assert apply(manifest, options_into(environ, folder, no_local_copy=no_local_copy)).ok


def gc(environ: dict[str, str], *args: str | Path) -> Result:
    return CliRunner().invoke(main, ["gc", *map(str, args)], env=environ)


def names(environ: dict[str, str]) -> dict[str, int]:
    """Every object under the store's prefix, by name under it, with its size."""

    async def run() -> dict[str, int]:
        async with open_shared(environ["IMGBATCH_STORE"], environ) as shared:
            found: dict[str, int] = {}
            for folder in ("ac/", "cas/", "claims/", "probes/"):
                found.update({i.name: i.size for i in await shared.objects.listing(folder)})
            return found

    return asyncio.run(run())


def put(environ: dict[str, str], name: str, data: bytes) -> None:
    async def run() -> None:
        async with open_shared(environ["IMGBATCH_STORE"], environ) as shared:
            await shared.objects.create(name, data)

    asyncio.run(run())


def markers(environ: dict[str, str]) -> list[str]:
    """The names of gc's markers in the store (`gc/<id>`)."""

    async def run() -> list[str]:
        async with open_shared(environ["IMGBATCH_STORE"], environ) as shared:
            return [item.name for item in await shared.objects.listing(MARKERS)]

    return asyncio.run(run())


def record_keys(environ: dict[str, str]) -> set[str]:
    return {name for name in names(environ) if name.startswith("ac/")}


def orphan(environ: dict[str, str], seed: bytes) -> str:
    """A blob no record names (a writer killed between its blob and its record)."""
    data = b"\x89PNG not really " + seed
    name = f"cas/{hashlib.sha256(data).hexdigest()}"
    put(environ, name, data)
    return name


def two_lists(tmp_path: Path, environ: dict[str, str]) -> tuple[Path, Path]:
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    harbour = shot_list(tmp_path, "harbour", "a harbour")
    apply_into(environ, lighthouse, tmp_path / "out-lighthouse")
    apply_into(environ, harbour, tmp_path / "out-harbour")
    return lighthouse, harbour


def test_gc_never_deletes_what_a_record_names_whatever_the_manifest(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    lighthouse, _ = two_lists(tmp_path, store_env)
    before = names(store_env)
    assert len([name for name in before if name.startswith("ac/")]) == 4
    stray = orphan(store_env, b"killed writer")
    time.sleep(2.1)  # the store's clock counts whole seconds: the orphan is past a 1s grace
    result = gc(store_env, lighthouse, "--yes", "--grace", "1s")
    assert result.exit_code == 0, result.output
    after = names(store_env)
    assert after == before  # the harbour's records and blobs too: only the orphan went
    assert f"{store_env['IMGBATCH_STORE']}/{stray}" in result.output
    assert "blob no record names" in result.output
    assert f"Store {store_env['IMGBATCH_STORE']}: deleted 1 object" in result.output


def test_a_blob_whose_record_is_not_written_yet_is_not_deleted(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    lighthouse, _ = two_lists(tmp_path, store_env)
    in_flight = orphan(store_env, b"its record comes next")
    result = gc(store_env, lighthouse, "--yes")  # the default grace: a day
    assert result.exit_code == 0, result.output
    assert in_flight in names(store_env)
    assert "nothing to collect" in result.output


@pytest.mark.slow  # waits for the first list's records to age by the store's clock
def test_older_than_deletes_only_records_older_than_it_and_then_their_blobs(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    harbour = shot_list(tmp_path, "harbour", "a harbour")
    apply_into(store_env, lighthouse, tmp_path / "out-lighthouse")
    old = names(store_env)
    # Margins of seconds either side of the bound: the store's clock counts whole seconds, and
    # a loaded machine takes a while to apply the second list and run gc.
    time.sleep(6.1)
    apply_into(store_env, harbour, tmp_path / "out-harbour")
    young = set(names(store_env)) - set(old)
    listed = gc(store_env, harbour, "--older-than", "5s", "--grace", "5s")  # a dry run
    assert listed.exit_code == 0, listed.output
    assert set(names(store_env)) == set(old) | young
    assert "run again with --yes" in listed.output
    result = gc(store_env, harbour, "--older-than", "5s", "--grace", "5s", "--yes")
    assert result.exit_code == 0, result.output
    assert set(names(store_env)) == young  # the lighthouse's records and blobs went
    for name in old:  # each listed with its size and age before it went
        assert re.search(rf"{re.escape(name)}  [\d.]+ (bytes|KB|MB)  \d+ s old", listed.output)
    # Without --older-than no record ever goes, however old.
    again = gc(store_env, harbour, "--yes", "--grace", "0s")
    assert again.exit_code == 0 and set(names(store_env)) == young


def test_stale_claims_go_live_and_paid_ones_stay(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    stale, live, paid = "a" * 64, "b" * 64, "c" * 64
    later = int(time.time()) + 3600
    url = f"https://dashscope-result.example/x.png?Expires={later}&Signature=abc"

    async def claim() -> None:
        async with open_shared(store_env["IMGBATCH_STORE"], store_env) as shared:
            await Claims(shared.objects, lease=1).acquire(stale)
            taken = await Claims(shared.objects, lease=1).acquire(paid)
            await Claims(shared.objects, lease=1).note_answer(taken, url, "req-1")  # type: ignore[arg-type]
            await Claims(shared.objects).acquire(live)

    asyncio.run(claim())
    time.sleep(2.1)
    result = gc(store_env, lighthouse, "--yes")
    assert result.exit_code == 0, result.output
    left = {name for name in names(store_env) if name.startswith("claims/")}
    assert left == {f"claims/{live}", f"claims/{paid}"}
    assert f"kept {store_env['IMGBATCH_STORE']}/claims/{paid}: holds a paid image's URL" in (
        result.output
    )
    assert "stale claim" in result.output


def test_on_oss_a_stale_claim_is_listed_for_unlock_never_deleted(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    key = "d" * 64
    with FakeOss() as oss:
        environ = {**api_env, **s3_environ(oss.endpoint), "IMGBATCH_STORE": f"oss://{BUCKET}/t"}

        async def claim() -> None:
            async with open_shared(environ["IMGBATCH_STORE"], environ) as shared:
                await Claims(shared.objects, lease=1).acquire(key)

        asyncio.run(claim())
        time.sleep(2.1)  # the store says ages in whole seconds: past the 1 s lease
        result = gc(environ, lighthouse, "--yes")
        assert result.exit_code == 0, result.output
        assert f"t/claims/{key}" in oss.objects
        assert f"imgbatch store unlock {key}" in result.output
        assert not [entry for entry in oss.log if entry[0] == "DELETE" and "claims/" in entry[1]]


def test_a_read_only_store_is_not_collected(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    lighthouse, _ = two_lists(tmp_path, store_env)
    orphan(store_env, b"old")
    before = names(store_env)
    for flags, environ in (
        (("--store-read-only",), store_env),
        ((), {**store_env, "IMGBATCH_STORE_READ_ONLY": "1"}),
    ):
        result = gc(environ, lighthouse, "--yes", "--grace", "0s", *flags)
        assert result.exit_code == 2, result.output
        assert "is read-only here" in result.output
    assert names(store_env) == before
    assert gc(store_env, lighthouse, "--yes", "--dry-run").exit_code == 2


def test_gc_lists_the_store_and_reads_only_records_and_claims(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    two_lists(tmp_path, store_env)
    orphan(store_env, b"old")
    time.sleep(1.1)
    found = collect_store(store_env["IMGBATCH_STORE"], store_env, StorePolicy(grace=0.0))
    requests: dict[str, Any] = dict(found.requests)
    # One LIST per folder of the layout (gc's markers' too) and one GET per record: no HEAD, no
    # blob read.
    assert requests == {"list": 5, "get": 4}
    assert [item.why for item in found.items] == ["blob no record names"]
    assert not found.deleted


def test_ages_are_read_as_written() -> None:
    assert parse_age("30d") == 30 * 86400
    assert parse_age("1d12h") == 36 * 3600
    assert parse_age("90m") == 5400 and parse_age("0s") == 0
    with pytest.raises(ValueError, match="is not an age"):
        parse_age("soon")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_writer_racing_gc_never_leaves_a_record_without_its_blob(
    seaweed_endpoint: str, seed: int
) -> None:
    """Old orphan blobs get records again (the same bytes published under new keys) while gc
    deletes them, on a server whose conditional writes hold: whoever wins, no record is left
    naming a missing blob (the writer puts a blob gc took back; gc removes a record it
    orphaned)."""
    import random

    environ = {**s3_environ(seaweed_endpoint), "IMGBATCH_STORE": f"s3://{BUCKET}/gc-race-{seed}"}
    blobs = [b"\x89PNG race " + bytes([seed, index]) for index in range(6)]
    for data in blobs:
        put(environ, f"cas/{hashlib.sha256(data).hexdigest()}", data)
    time.sleep(2.1)
    chance = random.Random(seed)

    async def race() -> None:
        async with open_shared(environ["IMGBATCH_STORE"], environ) as shared:

            async def writer(index: int, data: bytes) -> None:
                await asyncio.sleep(chance.uniform(0, 0.4))
                key = hashlib.sha256(b"key %d %d" % (seed, index)).hexdigest()
                await shared.publish(key, data, {"width": 1, "height": 1})

            policy = StorePolicy(grace=1.0)
            collector = asyncio.to_thread(
                collect_store, environ["IMGBATCH_STORE"], environ, policy, delete=True
            )
            await asyncio.gather(collector, *(writer(i, d) for i, d in enumerate(blobs)))

    asyncio.run(race())
    stored = names(environ)
    for name in (name for name in stored if name.startswith("ac/")):

        async def named(record: str = name) -> str:
            async with open_shared(environ["IMGBATCH_STORE"], environ) as shared:
                found = await shared.objects.get(record)
                assert found is not None
                return str(json.loads(found.data)["sha256"])

        assert f"cas/{asyncio.run(named())}" in stored, name


def test_older_than_never_deletes_an_image_kept_only_in_the_store(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # A folder applied with --no-local-copy has its images in the store only: gc for that very
    # manifest must not delete their records and blobs, however old (the images would be lost,
    # the sheet's links dead, and the next apply would pay for each of them again).
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    folder = tmp_path / "out-lighthouse"
    options = options_into(store_env, folder, no_local_copy=True)
    assert apply(lighthouse, options).ok
    assert (folder / "lighthouse" / "results.json").is_file()
    assert not list((folder / "lighthouse").glob("*.png"))
    before = names(store_env)
    time.sleep(1.1)  # the store's clock counts whole seconds: past --older-than 0s
    environ = {**store_env, "OUTPUT_DIR": str(folder)}
    result = gc(environ, lighthouse, "--older-than", "0s", "--grace", "0s", "--yes")
    assert result.exit_code == 0, result.output
    assert {n for n in names(store_env) if n.startswith(("ac/", "cas/"))} == {
        n for n in before if n.startswith(("ac/", "cas/"))
    }
    paid = fake_server.generation_count
    back = apply(lighthouse, dataclasses.replace(options, no_local_copy=False))
    assert back.ok, back  # the images come back from the store, unpaid
    assert fake_server.generation_count == paid
    assert len(list((folder / "lighthouse").glob("*.png"))) == 2


@pytest.mark.parametrize("age", ["9" * 400 + "d", "9" * 5000 + "s"])
def test_an_age_too_long_to_mean_anything_is_an_error_naming_the_option(
    tmp_path: Path, age: str
) -> None:
    # 400 digits overflowed float() (a traceback); 5000 hit Python's limit on converting
    # digits (a message about sys.set_int_max_str_digits).
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    for option in ("--older-than", "--grace"):
        result = gc({"HOME": str(tmp_path)}, lighthouse, option, age)
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{option}'" in result.output
        assert "is not an age" in result.output


def test_gc_that_read_the_folders_before_an_apply_moved_their_images_spares_them(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # gc read the folders (nothing kept in the store only yet); an apply --no-local-copy then
    # moved their images into the store and dropped its copies; gc deleted by age: the images
    # were gone. gc now reads the folders again once its marker is in the store.
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    folder = tmp_path / "out"
    apply_into(store_env, lighthouse, folder)
    environ = {**store_env, "OUTPUT_DIR": str(folder)}
    read_first = kept_in_store_only([lighthouse], environ)
    assert read_first == (frozenset(), frozenset())
    apply_into(store_env, lighthouse, folder, no_local_copy=True)
    assert not list((folder / "lighthouse").glob("*.png"))
    time.sleep(1.1)  # the store's clock counts whole seconds: past --older-than 0s
    policy = StorePolicy(
        older_than=0.0,
        grace=0.0,
        keep_records=read_first[0],
        keep_blobs=read_first[1],
        recheck=functools.partial(kept_in_store_only, [lighthouse], environ),
    )
    found = collect_store(store_env["IMGBATCH_STORE"], store_env, policy, delete=True)
    assert not [item for item in found.items if item.name.startswith(("ac/", "cas/"))]
    assert len([name for name, why in found.kept if "since gc began" in why]) == 4
    # Its marker stays, written after its last delete: an apply that looked its images up
    # before sees it (a later gc collects it after the grace).
    assert len(markers(store_env)) == 1
    paid = fake_server.generation_count
    apply_into(store_env, lighthouse, folder)  # back from the store, unpaid
    assert fake_server.generation_count == paid
    assert len(list((folder / "lighthouse").glob("*.png"))) == 2


def test_an_apply_keeps_its_local_copies_while_a_gc_is_deleting(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # gc's marker is live (written since this apply opened the store, or within a lease): it
    # may have deleted what this apply looked up, so the local copies stay, for the next apply.
    environ = {**store_env, "IMGBATCH_CLAIM_LEASE": "1"}
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    folder = tmp_path / "out"
    apply_into(environ, lighthouse, folder)
    put(environ, f"{MARKERS}0123456789abcdef", b'{"host": "ci-runner-7", "pid": 4242}')
    apply_into(environ, lighthouse, folder, no_local_copy=True)
    results = json.loads((folder / "lighthouse" / "results.json").read_text())
    assert [entry["local_copy"] for entry in results["shots"]] == [False, False]
    assert len(list((folder / "lighthouse").glob("*.png"))) == 2
    time.sleep(3.1)  # older than the lease, plus a second of the store's clock: that gc is done
    apply_into(environ, lighthouse, folder, no_local_copy=True)
    assert not list((folder / "lighthouse").glob("*.png"))
    assert fake_server.generation_count == 2


def test_manifests_naming_one_folder_store_two_ways_name_one_store(tmp_path: Path) -> None:
    # `cache` and `x/../cache/` beside the manifests are one folder: not "2 different stores".
    first = write_manifest(tmp_path, "version: 1\nname: a\noutput:\n  store: cache\n", "a.yaml")
    text = "version: 1\nname: b\noutput:\n  store: x/../cache/\n"
    second = write_manifest(tmp_path, text, "b.yaml")
    for manifest in (first, second):
        with manifest.open("a", encoding="utf-8") as handle:
            handle.write('shots:\n  - id: s\n    prompt: "p"\n')
    chosen = store_for_gc(None, {}, [first, second])
    assert chosen is not None
    assert store_url(*chosen) == (tmp_path / "cache").as_uri()


def test_a_marker_dated_in_the_future_keeps_no_copy_for_good_and_is_collected(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # A folder store's marker is dated by its writer's clock: one dated a day ahead (a skewed
    # clock, or anyone who can write the store) was "written since this apply opened the
    # store" to every apply, which kept its local copies for good, silently, and gc never
    # collected it (its age was 0, never past the grace).
    store = tmp_path / "store"
    environ = {**api_env, "IMGBATCH_STORE": str(store)}
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    folder = tmp_path / "out"
    apply_into(environ, lighthouse, folder)
    bogus = store / "gc" / "0123456789abcdef"
    bogus.parent.mkdir(parents=True, exist_ok=True)
    bogus.write_text('{"host": "skewed", "pid": 1}')
    ahead = time.time() + 86400 * 2
    os.utime(bogus, (ahead, ahead))
    # A marker a little ahead (a clock a few seconds off) is still a gc at work: kept safe.
    near = store / "gc" / "fedcba9876543210"
    near.write_text('{"host": "near", "pid": 2}')
    os.utime(near, (time.time() + 10, time.time() + 10))
    apply_into(environ, lighthouse, folder, no_local_copy=True)
    assert len(list((folder / "lighthouse").glob("*.png"))) == 2
    near.unlink()
    apply_into(environ, lighthouse, folder, no_local_copy=True)
    assert not list((folder / "lighthouse").glob("*.png"))
    result = gc(environ, lighthouse, "--yes")
    assert result.exit_code == 0, result.output
    assert "gc/0123456789abcdef" in result.output and "in the future" in result.output
    assert not bogus.exists()
    assert fake_server.generation_count == 2


def test_an_apply_that_keeps_its_local_copies_for_a_gc_says_so(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # The copies stayed, results.json said `"local_copy": false`, and the run said nothing.
    environ = {**api_env, "IMGBATCH_STORE": str(tmp_path / "store")}
    lighthouse = shot_list(tmp_path, "lighthouse", "a lighthouse")
    folder = tmp_path / "out"
    apply_into(environ, lighthouse, folder)
    put(environ, f"{MARKERS}0123456789abcdef", b'{"host": "ci-runner-7", "pid": 4242}')
    environ["OUTPUT_DIR"] = str(folder)
    args = ["apply", str(lighthouse), "--no-local-copy", "--rps", "1000"]
    text = CliRunner().invoke(main, args, env=environ)
    document = json.loads(CliRunner().invoke(main, [*args, "--json"], env=environ).stdout)
    assert text.exit_code == 0, text.output
    assert "2 local copies kept: a gc of the store is at work" in text.output
    assert document["store"]["kept_local"] == 2
    assert len(list((folder / "lighthouse").glob("*.png"))) == 2
