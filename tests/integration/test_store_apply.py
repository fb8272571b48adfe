"""apply with a shared store: machines, shards and accounts pay once; the assembling run.

Each "machine" is an output folder of its own (OUTPUT_DIR) applying the same shot list against
the fake DashScope server (which counts what it bills) and one store on moto's S3 server, or
the fake OSS where a test needs the server's log of requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgbatch.errors import FrozenError
from imgbatch.pacing.gate import RetryPolicy
from imgbatch.plan.decide import Action
from imgbatch.run.apply import ApplyOptions, apply, make_plan
from tests.conftest import FAKE_KEY, write_many_shots
from tests.support.fake_dashscope import FakeDashScope
from tests.support.object_servers import BUCKET, FakeOss, moto_server, s3_environ

SHOTS = 12
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def store_env(moto_endpoint: str, api_env: dict[str, str], request: pytest.FixtureRequest):
    """The environment of a machine with a key and the store's credentials; a fresh prefix."""
    prefix = request.node.name.replace("[", "-").replace("]", "")[:40]
    return {**api_env, **s3_environ(moto_endpoint), "IMGBATCH_STORE": f"s3://{BUCKET}/{prefix}"}


def machine(environ: dict[str, str], folder: Path, **overrides: Any) -> ApplyOptions:
    settings: dict[str, Any] = {
        "retry": FAST_RETRY,
        "environ": {**environ, "OUTPUT_DIR": str(folder)},
        "home": Path(environ["HOME"]),
        "rps": 1000.0,
        "concurrency": 4,
        "quota_store": False,
        **overrides,
    }
    return ApplyOptions(**settings)


def results(folder: Path, name: str = "store") -> dict[str, Any]:
    return json.loads((folder / name / "results.json").read_text())


def shot_lines(folder: Path, name: str = "store") -> dict[str, str]:
    """Each shot's line of results.json, exactly as written, by id."""
    lines = (folder / name / "results.json").read_text().splitlines()
    return {
        json.loads(line.rstrip(","))["id"]: line.rstrip(",")
        for line in lines
        if line.startswith("    {")
    }


def test_a_second_machine_restores_everything_and_pays_nothing(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "store", SHOTS)
    first = apply(manifest, machine(store_env, tmp_path / "a"))
    assert fake_server.successes == SHOTS and first.store is not None
    assert first.store.published == SHOTS
    second = apply(manifest, machine(store_env, tmp_path / "b"))
    assert fake_server.successes == SHOTS  # nothing paid again
    assert second.requests == 0 and second.store is not None and second.store.restored == SHOTS
    assert second.store.total_requests <= 2 * SHOTS  # a record and a blob per image
    assert shot_lines(tmp_path / "a") == shot_lines(tmp_path / "b")
    for index in range(SHOTS):
        name = f"store/shot-{index:03d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # results.json names each image by its blob in the store, with its SHA-256: no signed URL.
    for entry in results(tmp_path / "b")["shots"]:
        assert entry["image_url"] == f"{store_env['IMGBATCH_STORE']}/cas/{entry['sha256']}"
    # A plan for a third machine sees them in the store: nothing to pay.
    planned = make_plan(manifest, environ={**store_env, "OUTPUT_DIR": str(tmp_path / "c")})
    assert planned.paid_requests == 0 and planned.count(Action.RESTORE) == SHOTS
    assert "restored from s3://" in planned.shots[0].reason
    # A third run of the same folder asks the store nothing: results.json answers it all.
    third = apply(manifest, machine(store_env, tmp_path / "b"))
    assert third.store is not None and third.store.total_requests == 0


@pytest.mark.slow
def test_shards_cover_every_shot_once_and_the_assembling_run_is_identical(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "store", SHOTS)
    made: dict[str, str] = {}
    for index in (1, 2, 3):
        folder = tmp_path / f"shard{index}"
        report = apply(manifest, machine(store_env, folder, shard=(index, 3)))
        mine = {entry.id for entry in report.entries if entry.status == "generated"}
        assert not mine & made.keys()  # no shot in two shards
        made.update(
            {shot_id: line for shot_id, line in shot_lines(folder).items() if shot_id in mine}
        )
    assert len(made) == SHOTS and fake_server.successes == SHOTS
    assembled = apply(manifest, machine(store_env, tmp_path / "all", frozen=True))
    assert assembled.requests == 0 and fake_server.successes == SHOTS
    assert shot_lines(tmp_path / "all") == made
    for line in made.values():
        file = json.loads(line)["file"]
        shard = next(
            folder for folder in tmp_path.glob("shard*") if (folder / "store" / file).exists()
        )
        assert (tmp_path / "all" / "store" / file).read_bytes() == (
            shard / "store" / file
        ).read_bytes()


def every_file(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder by its path in it, but the state of the machine it is on
    (`.imgbatch/`: cache, state record, last run, lock) other than the contact sheet's
    thumbnails."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and (
            path.relative_to(folder).parts[0] != ".imgbatch"
            or path.relative_to(folder).parts[1] == "thumbs"
        )
    }


def test_the_assembling_run_writes_what_a_plain_apply_writes_byte_for_byte(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "store", 8)
    for index in (1, 2, 3, 4):
        apply(manifest, machine(store_env, tmp_path / f"shard{index}", shard=(index, 4)))
    assert fake_server.successes == 8
    assembled = apply(manifest, machine(store_env, tmp_path / "assembled", frozen=True))
    assert assembled.ok and assembled.requests == 0
    time.sleep(1.1)  # a run's time, were it in results.json, would differ by a second at least
    plain = apply(manifest, machine(store_env, tmp_path / "plain"))
    assert plain.ok and plain.requests == 0 and fake_server.successes == 8
    files = every_file(tmp_path / "assembled" / "store")
    assert {"results.json", "index.html", "shot-000.png"} <= files.keys()
    assert sum(name.startswith(".imgbatch/thumbs/") for name in files) == 8
    assert files == every_file(tmp_path / "plain" / "store")
    # results.json's time is the newest image's, as its maker received it: not a run's.
    document = results(tmp_path / "assembled")
    assert document["updated_at"] == max(entry["made_at"] for entry in document["shots"])
    # A no-op re-apply of either leaves every file as it was.
    apply(manifest, machine(store_env, tmp_path / "plain"))
    assert every_file(tmp_path / "plain" / "store") == files


def test_the_assembling_run_names_the_shots_no_job_made(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "store", 4)
    apply(manifest, machine(store_env, tmp_path / "a"))
    text = manifest.read_text() + '  - id: late\n    prompt: "a shot nobody made"\n'
    manifest.write_text(text)
    with pytest.raises(FrozenError, match=r"1 shot would need a paid request: late \(create"):
        apply(manifest, machine(store_env, tmp_path / "all", frozen=True))
    assert fake_server.successes == 4
    env = {**store_env, "OUTPUT_DIR": str(tmp_path / "cli")}
    done = subprocess.run(
        [sys.executable, "-m", "imgbatch", "apply", str(manifest), "--frozen"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "late (create" in done.stderr


def test_read_only_restores_pays_locally_and_never_writes(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "store", 4)
    with FakeOss() as oss:
        environ = {**api_env, **s3_environ(oss.endpoint), "IMGBATCH_STORE": f"oss://{BUCKET}/p"}
        apply(manifest, machine(environ, tmp_path / "a", only=("shot-000", "shot-001")))
        assert fake_server.successes == 2
        writes_before = [entry for entry in oss.log if entry[0] != "GET"]
        environ["IMGBATCH_STORE_READ_ONLY"] = "1"
        report = apply(manifest, machine(environ, tmp_path / "fork"))
        assert [entry for entry in oss.log if entry[0] != "GET"] == writes_before
        assert report.store is not None and report.store.read_only
        assert report.store.restored == 2 and fake_server.successes == 4  # two paid, locally
        assert sorted(key for method, key in oss.log if method == "PUT" and "ac/" in key) == sorted(
            f"p/ac/{entry['key']}" for entry in results(tmp_path / "a")["shots"]
        )


def test_no_credential_or_signed_url_in_what_a_run_writes(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "store", 3)
    env = {**os.environ, **store_env, "OUTPUT_DIR": str(tmp_path / "out")}
    done = subprocess.run(
        [sys.executable, "-m", "imgbatch", "apply", str(manifest), "--json", "-v"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["store"]["requests_per_image"] > 0
    assert document["store"]["url"] == store_env["IMGBATCH_STORE"]
    assert "Store s3://" in done.stderr
    written = [done.stdout, done.stderr]
    written += [
        path.read_text()
        for path in (tmp_path / "out").rglob("*")
        if path.suffix in (".json", ".html", ".jsonl")
    ]
    for text in written:
        for secret in (
            store_env["AWS_SECRET_ACCESS_KEY"],
            store_env["AWS_ACCESS_KEY_ID"],
            FAKE_KEY,
        ):
            assert secret not in text
        assert "X-Amz-Signature" not in text and "Signature=" not in text


def test_generate_shares_the_store_with_apply(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    from imgbatch.run.generate import generate

    request = {"prompt": "a lighthouse, take 0", "size": "1328*1328"}
    first = generate(request, environ={**store_env, "OUTPUT_DIR": str(tmp_path / "a")})
    assert not first["cached"] and fake_server.successes == 1
    second = generate(request, environ={**store_env, "OUTPUT_DIR": str(tmp_path / "b")})
    assert second["cached"] and fake_server.successes == 1
    assert Path(first["file"]).read_bytes() == Path(second["file"]).read_bytes()
