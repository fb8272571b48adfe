"""`apply --no-local-copy`: images in the store only, against moto's S3 server.

The output folder keeps no image (thumbnails are WebP), results.json names each blob by its
`s3://` URL and SHA-256, and the contact sheet opens every full image through a URL signed when
it was drawn, which really fetches the image from the server, with the links' expiry on the
page. No signature and no credential anywhere but the sheet.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from imgbatch.cli.main import main
from imgbatch.plan.decide import Action
from imgbatch.review.sheet_data import read_data
from imgbatch.run.apply import make_plan
from tests.conftest import write_manifest, write_many_shots
from tests.support.fake_dashscope import FakeDashScope

SHOTS = 4
# What must never leave the sheet: a signature, a credential, the secret itself.
SECRETS = (
    "X-Amz-Signature",
    "X-Amz-Credential",
    "AWSAccessKeyId",
    "Signature=",
    "test-secret",
    "test-key-id",
)


def run(environ: dict[str, str], *args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args], env=environ)


def apply_json(environ: dict[str, str], manifest: Path, *flags: str) -> tuple[Result, Any]:
    result = run(environ, "apply", manifest, "--rps", "1000", "--json", *flags)
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout)


def applied_store_only(tmp_path: Path, environ: dict[str, str]) -> tuple[Path, Path]:
    """Two shots applied with --no-local-copy into the store `environ` names: the shot list
    and the output folder."""
    manifest = write_many_shots(tmp_path, "nolocal", 2)
    apply_json(environ, manifest, "--no-local-copy")
    return manifest, tmp_path / "output" / "nolocal"


def kept_in_a_folder(
    tmp_path: Path, api_env: dict[str, str], name: str
) -> tuple[Path, Path, Path, dict[str, str]]:
    """`applied_store_only` into the folder store `name`: the shot list, the output folder, the
    store and the environment naming it."""
    store = tmp_path / name
    environ = {**api_env, "IMGBATCH_STORE": str(store)}
    return (*applied_store_only(tmp_path, environ), store, environ)


def entries(output: Path) -> dict[str, dict[str, Any]]:
    document = json.loads((output / "results.json").read_text())
    return {entry["id"]: entry for entry in document["shots"]}


def pngs(output: Path) -> list[Path]:
    return sorted(path for path in output.rglob("*") if path.suffix.lower() == ".png")


def test_no_local_copy_keeps_images_in_the_store_and_the_sheet_links_them(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "nolocal", SHOTS)
    output = tmp_path / "output" / "nolocal"
    before = datetime.now(UTC)
    result, document = apply_json(store_env, manifest, "--no-local-copy", "-v")
    after = datetime.now(UTC)
    assert fake_server.successes == SHOTS
    assert pngs(output) == []  # not in the folder, not in the cache: thumbnails are WebP
    assert len(list((output / ".imgbatch" / "thumbs").rglob("*.webp"))) == SHOTS
    made = entries(output)
    prefix = store_env["IMGBATCH_STORE"]
    for entry in made.values():
        assert entry["local_copy"] is False
        assert entry["image_url"] == f"{prefix}/cas/{entry['sha256']}"
    cards = {card["id"]: card for card in read_data(output)}
    for shot_id, entry in made.items():
        link = cards[shot_id]["file"]
        assert link.startswith(store_env["AWS_ENDPOINT_URL"]) and "X-Amz-Signature=" in link
        with urllib.request.urlopen(link, timeout=10) as answer:  # the moto server, 127.0.0.1
            image = answer.read()
        assert hashlib.sha256(image).hexdigest() == entry["sha256"]
        assert len(image) == entry["bytes"]
    page = (output / "index.html").read_text()
    shown = re.search(r"full images: links valid until (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", page)
    assert shown is not None
    until = datetime.strptime(shown.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    week = timedelta(days=7)
    assert before + week - timedelta(minutes=1) <= until <= after + week
    assert f"img-src 'self' file: data: {store_env['AWS_ENDPOINT_URL']};" in page
    # Nowhere but the sheet: not results.json, the state, --json or what the run printed.
    said = [
        (output / "results.json").read_text(),
        (output / ".imgbatch" / "state.json").read_text(),
        json.dumps(document),
        result.output,
        result.stderr,
    ]
    for text in said:
        assert not [secret for secret in SECRETS if secret in text]


def test_a_second_apply_with_the_flag_fetches_nothing_and_signs_the_links_again(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "nolocal", SHOTS)
    output = tmp_path / "output" / "nolocal"
    apply_json(store_env, manifest, "--no-local-copy")
    first = {card["id"]: card["file"] for card in read_data(output)}
    planned = make_plan(manifest, environ=store_env, no_local_copy=True)
    assert {item.action for item in planned.shots} == {Action.UNCHANGED}
    assert "kept in the store only" in planned.shots[0].reason
    _, document = apply_json(store_env, manifest, "--no-local-copy")
    assert fake_server.successes == SHOTS
    # No request to the store at all: results.json answers for every shot.
    assert document["store"]["requests"] == {}
    assert pngs(output) == []
    again = {card["id"]: card["file"] for card in read_data(output)}
    assert again.keys() == first.keys() and all("X-Amz-Signature=" in url for url in again.values())


def test_a_later_apply_without_the_flag_puts_the_images_back(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "nolocal", SHOTS)
    output = tmp_path / "output" / "nolocal"
    apply_json(store_env, manifest, "--no-local-copy")
    _, document = apply_json(store_env, manifest)
    assert fake_server.successes == SHOTS  # restored from the store, nothing paid
    restored = entries(output)
    for entry in restored.values():
        assert "local_copy" not in entry
        image = (output / entry["file"]).read_bytes()
        assert hashlib.sha256(image).hexdigest() == entry["sha256"]
    cards = {card["id"]: card for card in read_data(output)}
    assert all(card["file"] == f"{card['id']}.png" for card in cards.values())
    assert "links valid until" not in (output / "index.html").read_text()
    assert document["store"]["restored"] == SHOTS


def test_sheet_signs_the_links_again_when_it_is_drawn(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "nolocal", SHOTS)
    output = tmp_path / "output" / "nolocal"
    apply_json(store_env, manifest, "--no-local-copy")
    (output / "index.html").unlink()
    result = run(store_env, "sheet", manifest)
    assert result.exit_code == 0, result.output
    assert "links valid until" in (output / "index.html").read_text()
    card = read_data(output)[0]
    with urllib.request.urlopen(card["file"], timeout=10) as answer:
        image = answer.read()
    assert hashlib.sha256(image).hexdigest() == entries(output)[card["id"]]["sha256"]
    assert not [secret for secret in SECRETS if secret in result.output]


def test_a_folder_store_links_its_files_and_nothing_expires(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest, output, store, environ = kept_in_a_folder(tmp_path, api_env, "team-store")
    assert pngs(output) == []
    for card in read_data(output):
        sha = entries(output)[card["id"]]["sha256"]
        assert card["file"] == (store / "cas" / sha).as_uri()
    assert "links valid until" not in (output / "index.html").read_text()


def test_no_local_copy_without_a_store_is_a_usage_error(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "nolocal", 2)
    for command in ("apply", "plan"):
        result = run(api_env, command, manifest, "--no-local-copy")
        assert result.exit_code == 2, result.output
        assert "--no-local-copy keeps images only in a shared store, and none is named" in (
            result.stderr
        )
    assert fake_server.requests == []
    assert not (tmp_path / "output").exists()


def test_images_already_in_the_folder_move_to_the_store(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "nolocal", SHOTS)
    output = tmp_path / "output" / "nolocal"
    local_only = {key: value for key, value in store_env.items() if key != "IMGBATCH_STORE"}
    apply_json(local_only, manifest)  # made before the team had a store: in the folder only
    assert len(pngs(output)) == SHOTS * 2  # each image and its cache entry
    _, document = apply_json(store_env, manifest, "--no-local-copy")
    assert fake_server.successes == SHOTS  # nothing made again
    assert document["store"]["published"] == SHOTS
    assert pngs(output) == []
    for entry in entries(output).values():
        assert entry["local_copy"] is False
        assert entry["image_url"] == f"{store_env['IMGBATCH_STORE']}/cas/{entry['sha256']}"
    for card in read_data(output):
        with urllib.request.urlopen(card["file"], timeout=10) as answer:
            image = answer.read()
        assert hashlib.sha256(image).hexdigest() == entries(output)[card["id"]]["sha256"]
    # The next one asks the store nothing: results.json says where every image is.
    _, again = apply_json(store_env, manifest, "--no-local-copy")
    assert again["store"]["requests"] == {}


def test_an_image_restored_from_the_local_cache_goes_to_the_store_only_too(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "nolocal", SHOTS)
    output = tmp_path / "output" / "nolocal"
    apply_json(store_env, manifest)  # published, and kept in the folder as usual
    for entry in entries(output).values():
        (output / entry["file"]).unlink()  # the cache still has them: a local restore
    _, document = apply_json(store_env, manifest, "--no-local-copy")
    assert fake_server.successes == SHOTS
    assert pngs(output) == []
    assert all(entry["local_copy"] is False for entry in entries(output).values())
    # One lookup of each record, no blob read (the store already had them all), and one LIST
    # of gc's markers before the local copies go (no gc at work: they go).
    assert document["store"]["requests"] == {"get": SHOTS, "list": 1}


def test_the_sheet_never_links_a_store_that_does_not_hold_the_image(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # Applied with --no-local-copy into one store, then with another: results.json still (and
    # rightly) names the first store's blobs, but the sheet linked the second store's names,
    # where nothing is: every full image link was dead.
    manifest = write_many_shots(tmp_path, "nolocal", 2)
    output = tmp_path / "output" / "nolocal"
    first, second = tmp_path / "first-store", tmp_path / "second-store"
    apply_json({**api_env, "IMGBATCH_STORE": str(first)}, manifest, "--no-local-copy")
    apply_json({**api_env, "IMGBATCH_STORE": str(second)}, manifest, "--no-local-copy")
    assert len(read_data(output)) == 2
    assert not [card for card in read_data(output) if str(second.as_uri()) in str(card["file"])]
    assert run({**api_env, "IMGBATCH_STORE": str(second)}, "sheet", manifest).exit_code == 0
    assert not [card for card in read_data(output) if str(second.as_uri()) in str(card["file"])]


def test_gc_and_prune_have_nothing_local_to_delete_and_keep_the_thumbnails(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "nolocal", SHOTS)
    output = tmp_path / "output" / "nolocal"
    apply_json(store_env, manifest, "--no-local-copy")
    thumbs = sorted((output / ".imgbatch" / "thumbs").rglob("*.webp"))
    collected = run(store_env, "gc", manifest, "--yes")
    assert collected.exit_code == 0, collected.output
    assert "Nothing to collect: every file is referred to by the results." in collected.output
    assert f"Store {store_env['IMGBATCH_STORE']}: nothing to collect" in collected.output
    assert sorted((output / ".imgbatch" / "thumbs").rglob("*.webp")) == thumbs
    # A shot dropped from the list: --prune drops its entry (no file to remove), the store
    # keeps its image (gc --store collects it by its own rules).
    dropped = '  - id: shot-003\n    prompt: "a lighthouse, take 3"\n'
    manifest.write_text(manifest.read_text().replace(dropped, ""))
    _, pruned = apply_json(store_env, manifest, "--no-local-copy", "--prune")
    assert "shot-003" not in entries(output)
    assert [item["reason"] for item in pruned["pruned"]] == ["its file was already gone"]
    assert pngs(output) == []


def test_without_credentials_the_sheet_has_no_links_and_nothing_crashes(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # A folder whose images are all in the store asks the store nothing on a no-op apply, so
    # missing credentials showed first when the links were signed: NoCredentialsError, as an
    # unexpected crash, of apply and of `imgbatch sheet`.
    manifest, output = applied_store_only(tmp_path, store_env)
    keyless = {
        **store_env,
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }
    for args in (("apply", manifest, "--no-local-copy", "--rps", "1000"), ("sheet", manifest)):
        result = run(keyless, *args)
        assert result.exit_code == 0, result.output
        assert "unexpected" not in result.output
        assert "links valid until" not in (output / "index.html").read_text()


def test_without_the_store_named_images_kept_in_it_are_not_paid_for_again(
    tmp_path: Path, store_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # A new shell without IMGBATCH_STORE, a clone of the repository with results.json, a CI job
    # that forgot --store: every image results.json keeps in the store only was planned as a
    # create, and paid for again.
    manifest, output = applied_store_only(tmp_path, store_env)
    before = (output / "results.json").read_bytes()
    paid = fake_server.generation_count
    unnamed = {name: value for name, value in store_env.items() if name != "IMGBATCH_STORE"}
    result = run(unnamed, "apply", manifest, "--rps", "1000")
    assert result.exit_code == 2, result.output
    assert "kept in a shared store only" in result.output
    assert store_env["IMGBATCH_STORE"] in result.output  # the store to name, from results.json
    assert fake_server.generation_count == paid
    assert (output / "results.json").read_bytes() == before
    assert pngs(output) == []


def test_another_store_named_pays_for_no_image_kept_in_the_first(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # The same with another store named (a typo in the prefix, a new bucket): it lacks the
    # images, so each was paid for again although results.json names where they are.
    manifest = write_many_shots(tmp_path, "nolocal", 2)
    first, second = tmp_path / "first-store", tmp_path / "second-store"
    apply_json({**api_env, "IMGBATCH_STORE": str(first)}, manifest, "--no-local-copy")
    paid = fake_server.generation_count
    result = run({**api_env, "IMGBATCH_STORE": str(second)}, "apply", manifest, "--rps", "1000")
    assert result.exit_code == 2, result.output
    assert first.as_uri() in result.output
    assert fake_server.generation_count == paid


@pytest.mark.parametrize("named", ["no store", "another store"])
def test_the_plan_refuses_as_apply_does_to_pay_for_images_kept_in_a_store(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope, named: str
) -> None:
    # The plan showed every image results.json keeps in the store only as a paid create while
    # apply refused them: the plan says what apply will do, from the one decision the plan
    # carries (`PlannedShot.kept_in`).
    manifest = write_many_shots(tmp_path, "nolocal", 2)
    first = tmp_path / "first-store"
    apply_json({**api_env, "IMGBATCH_STORE": str(first)}, manifest, "--no-local-copy")
    paid = fake_server.generation_count
    environ = dict(api_env)
    if named == "another store":
        environ["IMGBATCH_STORE"] = str(tmp_path / "second-store")
    planned = run(environ, "plan", manifest)
    applied = run(environ, "apply", manifest, "--rps", "1000")
    assert (planned.exit_code, applied.exit_code) == (2, 2), planned.output
    assert "kept in a shared store only" in planned.stderr
    assert first.as_uri() in planned.stderr
    assert planned.stderr == applied.stderr  # one decision, said once, in the same words
    assert run(environ, "plan", manifest, "--json").exit_code == 2
    assert run(environ, "plan", manifest, "--detailed-exitcode").exit_code == 1  # an error
    assert fake_server.generation_count == paid
    # Through the store that holds them, the plan restores them, as apply does.
    through = run({**api_env, "IMGBATCH_STORE": str(first)}, "plan", manifest, "--json")
    assert through.exit_code == 0, through.output
    assert [shot["action"] for shot in json.loads(through.stdout)["shots"]] == ["restore"] * 2


def test_every_spelling_of_a_folder_is_one_store(
    tmp_path: Path,
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `a/../b` and a link to `b` were stores of their own: another image_url in results.json,
    # and the sheet of a run naming `b` linked none of the images `a/../b` had kept.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "b")
    manifest = write_many_shots(tmp_path, "nolocal", 2)
    output = tmp_path / "output" / "nolocal"
    apply_json({**api_env, "IMGBATCH_STORE": "a/../b"}, manifest, "--no-local-copy")
    canonical = (tmp_path / "b").resolve().as_uri()
    for entry in entries(output).values():
        assert entry["image_url"] == f"{canonical}/cas/{entry['sha256']}"
    results = (output / "results.json").read_bytes()
    spellings = ["b", "./b", "b/", "link", "link/", "a/../link", f"{tmp_path}/b/"]
    spellings += [f"file://{tmp_path}/./b/", f"file://localhost{tmp_path}/link"]
    for spelling in spellings:
        environ = {**api_env, "IMGBATCH_STORE": spelling}
        apply_json(environ, manifest, "--no-local-copy")
        assert (output / "results.json").read_bytes() == results, spelling
        links = {card["file"] for card in read_data(output)}
        assert links == {f"{canonical}/cas/{e['sha256']}" for e in entries(output).values()}
    assert fake_server.generation_count == 2


def test_a_results_file_from_before_canonical_folders_still_names_its_store(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # An older imgbatch wrote `--store p/../store` as it was given: its entries still name the
    # store they are in (the sheet links them, nothing is refused or paid again).
    manifest, output, store, environ = kept_in_a_folder(tmp_path, api_env, "store")
    path = output / "results.json"
    spelled = f"file://{tmp_path}/p/../store/cas/"
    path.write_text(path.read_text().replace(f"{store.as_uri()}/cas/", spelled))
    apply_json(environ, manifest, "--no-local-copy")
    assert spelled in path.read_text()  # left as it was: results.json stays stable
    links = {card["file"] for card in read_data(output)}
    assert links == {(store / "cas" / e["sha256"]).as_uri() for e in entries(output).values()}
    # Lost from the store, such an image is made again (the store named is its store), not
    # refused as if kept in another.
    for blob in (store / "ac").rglob("*"):
        if blob.is_file():
            blob.unlink()
    result = run(environ, "apply", manifest, "--rps", "1000")
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == 4


PICKS = """version: 1
name: picks
defaults:
  size: "1328*1328"
shots:
  - id: poster
    prompt: "a minimalist poster of a cyclist"
    seed: 40
    variants: 2
    pick: 2
"""


def test_a_picked_take_kept_in_the_store_only_is_still_written_as_the_shot_file(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # `<shot>.png` is what a pipeline reads: --no-local-copy left it unwritten.
    manifest = write_manifest(tmp_path, PICKS)
    output = tmp_path / "output" / "picks"
    environ = {**api_env, "IMGBATCH_STORE": str(tmp_path / "store")}
    _, document = apply_json(environ, manifest, "--no-local-copy")
    made = entries(output)
    assert pngs(output) == [output / "poster.png"]  # the pick, and no take
    picked = (output / "poster.png").read_bytes()
    assert hashlib.sha256(picked).hexdigest() == made["poster-2"]["sha256"]
    assert made["poster-2"]["local_copy"] is False
    # Picked again after the takes went to the store: the take is fetched from it, checked.
    manifest.write_text(PICKS.replace("pick: 2", "pick: 1"))
    apply_json(environ, manifest, "--no-local-copy")
    assert pngs(output) == [output / "poster.png"]
    picked = (output / "poster.png").read_bytes()
    assert hashlib.sha256(picked).hexdigest() == made["poster-1"]["sha256"]
    assert fake_server.generation_count == 2


def test_a_shot_renamed_since_its_image_went_to_the_store_only_is_not_paid_for_again(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # A rename costs nothing, and an apply that forgets the store is refused: both together
    # paid, since the refusal looked at the entry under the shot's own id alone (the renamed
    # shot has none; its image is its old id's, an orphan's, kept in the store only).
    manifest = write_many_shots(tmp_path, "nolocal", 2)
    output = tmp_path / "output" / "nolocal"
    store = tmp_path / "store"
    apply_json(api_env, manifest, "--store", str(store))
    apply_json(api_env, manifest, "--store", str(store), "--no-local-copy", "--only", "shot-001")
    kept = entries(output)["shot-001"]
    assert kept["local_copy"] is False
    manifest.write_text(manifest.read_text().replace("shot-001", "renamed"))
    before = (output / "results.json").read_bytes()
    for result in (
        run(api_env, "plan", manifest),
        run(api_env, "apply", manifest, "--rps", "1000"),
    ):
        assert result.exit_code == 2, result.output
        assert "renamed" in result.stderr and store.as_uri() in result.stderr
    assert fake_server.generation_count == 2
    assert (output / "results.json").read_bytes() == before
    # Through the store that holds it, the renamed shot is restored from it.
    apply_json(api_env, manifest, "--store", str(store))
    assert entries(output)["renamed"]["sha256"] == kept["sha256"]
    assert fake_server.generation_count == 2


def test_what_a_committed_results_file_says_reaches_the_terminal_escaped(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # results.json comes with a pull: a store URL or a shot id with ESC and BEL in it was
    # printed as it was by the refusal to pay again and by the plan's table (an OSC sequence
    # sets the terminal's title or writes its clipboard).
    manifest, output, store, environ = kept_in_a_folder(tmp_path, api_env, "store")
    path = output / "results.json"
    original = path.read_text()
    hostile = "\\u001b]0;pwned\\u0007"
    path.write_text(original.replace(store.as_uri(), f"s3://team{hostile}images/p"))
    refused = run(api_env, "plan", manifest)
    path.write_text(original.replace('"id": "shot-001"', f'"id": "gone{hostile}"'))
    table = run(environ, "plan", manifest, "--no-local-copy")
    assert (refused.exit_code, table.exit_code) == (2, 0), refused.output + table.output
    for result in (refused, table):
        assert "\x1b" not in result.output and "\x07" not in result.output
        assert "pwned" in result.output  # shown, escaped: \x1b]0;pwned\x07
    assert fake_server.generation_count == 2


def test_a_file_edited_in_place_to_the_same_size_is_not_deleted_as_a_local_copy(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # Moving images to the store only deleted each file of the size imgbatch wrote, whatever
    # its bytes: an edit that kept the size (a retouch saved uncompressed, a text chunk
    # changed in place) was deleted although the store holds imgbatch's image, not the edit.
    manifest = write_many_shots(tmp_path, "nolocal", 2)
    output = tmp_path / "output" / "nolocal"
    environ = {**api_env, "IMGBATCH_STORE": str(tmp_path / "store")}
    apply_json(environ, manifest)
    edited = output / "shot-000.png"
    data = bytearray(edited.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes
    edited.write_bytes(bytes(data))
    apply_json(environ, manifest, "--no-local-copy")
    assert edited.read_bytes() == bytes(data)
    assert not (output / "shot-001.png").exists()  # imgbatch's own copy went
    assert fake_server.generation_count == 2


def test_a_no_op_apply_with_a_picked_take_in_the_store_only_asks_the_store_nothing(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    # The picked take, kept in the store only, was fetched again by every apply (a lookup, a
    # download, a decode and a LIST of gc's markers; "1 image restored") although `<shot>.png`
    # already held it: a no-op apply asks the store nothing.
    manifest = write_manifest(tmp_path, PICKS)
    output = tmp_path / "output" / "picks"
    environ = {**api_env, "IMGBATCH_STORE": str(tmp_path / "store")}
    apply_json(environ, manifest, "--no-local-copy")
    picked = (output / "poster.png").read_bytes()
    for _ in range(2):
        _, document = apply_json(environ, manifest, "--no-local-copy")
        assert document["store"]["requests"] == {}, document["store"]
        assert document["store"]["restored"] == 0
        assert (output / "poster.png").read_bytes() == picked
        assert pngs(output) == [output / "poster.png"]
    # The file lost or replaced, the take is fetched again to write it.
    (output / "poster.png").write_bytes(b"not the take")
    apply_json(environ, manifest, "--no-local-copy")
    assert (output / "poster.png").read_bytes() == picked
    assert fake_server.generation_count == 2
