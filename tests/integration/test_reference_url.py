"""Reference URLs: `plan` downloads nothing, `apply` and `generate` fetch each URL once.

Takes: an HTTP server on 127.0.0.1 serving the reference images (counting every fetch, its
content changeable between runs), the fake DashScope server, the CLI through click's runner and
the Python API. Gives: evidence that plan (command and API) makes no connection and says what it
assumes about a URL it did not fetch; that apply fetches each distinct URL once, a few at a
time, keys shots by the content and then decides unchanged/restore/create/replace as for a
local file (a frozen run pays nothing when the content did not change, and refuses when it
did); that a URL which cannot be fetched fails its shots only, naming the field; and that
results.json records each shot's reference URL.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import imgbatch
from imgbatch.cli.main import main
from imgbatch.manifest.reference import ReferenceImage
from imgbatch.plan.decide import Action
from imgbatch.run.apply import ApplyOptions, apply, make_plan
from imgbatch.shots.request import ImageRequest
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest
from tests.support.reference_images import PNG, PNG_OTHER, ReferenceServer


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def shots_with(url: str, *, name: str = "refs", extra: str = "") -> str:
    return (
        f"version: 1\nname: {name}\nprovider: placeholder\n"
        'defaults:\n  size: "1328*1328"\nshots:\n'
        f'  - id: front\n    prompt: a helmet, front\n    reference_image: "{url}"\n'
        f'  - id: side\n    prompt: a helmet, side\n    reference_image: "{url}"\n'
        f"{extra}"
    )


def results_of(path: Path, name: str = "refs") -> dict[str, dict[str, Any]]:
    document = json.loads((path.parent / "output" / name / "results.json").read_text())
    return {entry["id"]: entry for entry in document["shots"]}


@pytest.fixture
def server() -> Any:
    with ReferenceServer({"/helmet.png": PNG, "/moved.png": PNG, "/gone.png": PNG}) as running:
        yield running


def test_plan_downloads_nothing_and_assumes_the_url_serves_what_it_served(
    tmp_path: Path, server: ReferenceServer
) -> None:
    path = write_manifest(tmp_path, shots_with(server.url("/helmet.png")))

    before = run("plan", str(path))
    assert before.exit_code == 0, before.output
    assert make_plan(path).count(Action.CREATE) == 2
    assert imgbatch.make_plan(str(path)).count(Action.CREATE) == 2
    assert server.total == 0  # no connection from the command nor from the API

    applied = apply(path)
    assert applied.ok and applied.requests == 2
    assert server.requests == {"/helmet.png": 1}  # two shots, one URL: fetched once
    server.requests.clear()

    plan = make_plan(path)
    assert [item.action for item in plan.shots] == [Action.UNCHANGED] * 2
    assert all("unless the reference URL's content changed" in i.reason for i in plan.shots)
    shown = run("plan", str(path), "--detailed-exitcode", "-v")  # -v: list unchanged shots
    assert shown.exit_code == 0, shown.output  # nothing to do, as far as a plan can know
    assert "unchanged  image matches, unless the reference URL's content changed" in shown.output
    as_json = json.loads(run("plan", str(path), "--json").stdout)
    assert [shot["action"] for shot in as_json["shots"]] == ["unchanged"] * 2

    # The file deleted: restored from the cache, on the same assumption.
    (tmp_path / "output" / "refs" / "side.png").unlink()
    (side,) = [item for item in make_plan(path).shots if item.id == "side"]
    assert side.action is Action.RESTORE
    assert side.reason.endswith(", unless the reference URL's content changed")
    # Another field changed: a replace, as for a local reference.
    edited = path.read_text().replace("a helmet, front", "a helmet, from the front")
    path.write_text(edited)
    (front,) = [item for item in make_plan(path).shots if item.id == "front"]
    assert (front.action, front.reason) == (Action.REPLACE, "changed: text")
    assert server.total == 0


def test_apply_keys_by_content_restores_and_replaces_as_for_a_local_file(
    tmp_path: Path, server: ReferenceServer
) -> None:
    url = server.url("/helmet.png")
    path = write_manifest(tmp_path, shots_with(url))
    first = apply(path)
    assert first.ok and first.requests == 2
    entries = results_of(path)
    assert entries["front"]["reference_url"] == url
    assert entries["front"]["request"]["reference_sha256"] == hashlib.sha256(PNG).hexdigest()
    assert url not in json.dumps(entries["front"]["request"])  # the key names no URL

    # Same URL, other content: the plan cannot know; apply fetches and replaces.
    server.bodies["/helmet.png"] = PNG_OTHER
    assert make_plan(path).count(Action.UNCHANGED) == 2
    changed = apply(path)
    assert changed.ok and changed.requests == 2 and changed.count("generated") == 2
    assert [item.reason for item in changed.plan.shots] == ["changed: reference_sha256"] * 2
    assert results_of(path)["front"]["request"]["reference_sha256"] == (
        hashlib.sha256(PNG_OTHER).hexdigest()
    )

    # The old content back at the URL: its images come from the cache, nothing is sent.
    server.bodies["/helmet.png"] = PNG
    reverted = apply(path)
    assert reverted.ok and reverted.requests == 0 and reverted.count("cached") == 2
    # Nothing changed at all: unchanged, nothing sent, the URL still fetched once.
    server.requests.clear()
    again = apply(path)
    assert again.requests == 0 and again.unchanged == 2
    assert server.requests == {"/helmet.png": 1}


def test_the_same_content_at_a_new_url_changes_no_image(
    tmp_path: Path, server: ReferenceServer
) -> None:
    path = write_manifest(tmp_path, shots_with(server.url("/helmet.png")))
    assert apply(path).ok
    path.write_text(shots_with(server.url("/moved.png")))

    (front, _) = make_plan(path).shots
    assert front.action is Action.REPLACE
    assert front.reason.startswith("changed: reference URL (nothing is paid if it serves")

    moved = apply(path)
    assert moved.requests == 0 and moved.unchanged == 2
    assert results_of(path)["front"]["reference_url"] == server.url("/moved.png")
    # The next plan compares with the URL now recorded.
    assert make_plan(path).count(Action.UNCHANGED) == 2


def test_frozen_fetches_and_pays_nothing_unless_the_content_changed(
    tmp_path: Path, server: ReferenceServer, fake_server: FakeDashScope, api_env: dict[str, str]
) -> None:
    url = server.url("/helmet.png")
    path = write_manifest(tmp_path, shots_with(url).replace("provider: placeholder\n", ""))
    made = run("apply", str(path))
    assert made.exit_code == 0, made.output
    assert fake_server.generation_count == 2
    results = path.parent / "output" / "refs" / "results.json"
    committed = results.read_bytes()

    server.requests.clear()
    frozen = run("apply", str(path), "--frozen")
    assert frozen.exit_code == 0, frozen.output
    assert fake_server.generation_count == 2  # nothing paid
    assert server.requests == {"/helmet.png": 1}
    assert results.read_bytes() == committed

    server.bodies["/helmet.png"] = PNG_OTHER
    assert run("plan", str(path), "--detailed-exitcode").exit_code == 0  # a plan cannot know
    refused = run("apply", str(path), "--frozen")
    assert refused.exit_code == 1, refused.output
    assert "2 shots would need a paid request" in refused.output
    assert "front (replace: changed: reference_sha256)" in refused.output
    assert fake_server.generation_count == 2
    assert results.read_bytes() == committed


def test_a_url_that_cannot_be_fetched_fails_its_shots_only(
    tmp_path: Path, server: ReferenceServer
) -> None:
    missing = server.url("/missing.png")
    extra = "  - id: plain\n    prompt: a plain helmet\n"
    path = write_manifest(tmp_path, shots_with(missing, extra=extra))

    result = run("apply", str(path))

    assert result.exit_code == 1, result.output
    expected = f"failed front: field reference_image: '{missing}' cannot be fetched: HTTP 404"
    assert expected in result.output
    assert "Plan: 3 create. 1 offline request." in result.output  # the failing two cost nothing
    assert server.requests == {"/missing.png": 1}
    entries = results_of(path)
    assert entries["plain"]["status"] == "generated"
    assert "reference_url" not in entries["plain"]  # only URL-referenced shots have one
    assert [entries[name]["status"] for name in ("front", "side")] == ["failed"] * 2
    assert entries["side"]["error"].endswith("HTTP 404; nothing was sent")
    assert entries["side"]["attempts"] == 0
    assert not (path.parent / "output" / "refs" / "front.png").exists()

    # Frozen: not refused as paid (nothing would be paid for them); they fail as before.
    frozen = run("apply", str(path), "--frozen")
    assert frozen.exit_code == 1, frozen.output
    assert "would need a paid request" not in frozen.output
    assert "failed front: field reference_image" in frozen.output

    server.bodies["/missing.png"] = PNG
    (front, side, plain) = make_plan(path).shots
    assert (front.action, plain.action) == (Action.CREATE, Action.UNCHANGED)
    assert front.reason.startswith("failed last time: field reference_image:")
    assert apply(path).ok


def test_apply_fetches_distinct_urls_concurrently_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("imgbatch.manifest.reference.REFERENCE_URL_CONCURRENCY", 3, raising=False)
    bodies = {f"/r{index}.png": PNG for index in range(7)}
    with ReferenceServer(bodies, delay=0.3) as server:
        lines = ["version: 1", "name: many", "provider: placeholder", "shots:"]
        for index in range(14):
            lines += [
                f"  - id: s{index}",
                f"    prompt: take {index}",
                f'    reference_image: "{server.url(f"/r{index % 7}.png")}"',
            ]
        path = write_manifest(tmp_path, "\n".join(lines) + "\n")
        report = apply(path, ApplyOptions())
    assert report.ok and report.requests == 14
    assert server.requests == {name: 1 for name in bodies}
    assert server.max_in_flight == 3


def test_generate_fetches_the_url_and_a_failure_names_the_field(
    tmp_path: Path, server: ReferenceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    request = {"prompt": "a helmet", "size": "1328*1328", "reference_image": ""}
    request["reference_image"] = server.url("/helmet.png")
    first = imgbatch.generate(request, provider="placeholder")
    again = imgbatch.generate(request, provider="placeholder")
    assert (first["cached"], again["cached"]) == (False, True)
    assert server.requests == {"/helmet.png": 2}  # each run keys it by what it serves now

    request["reference_image"] = server.url("/missing.png")
    result = run("generate", "--request", json.dumps(request), "--provider", "placeholder")
    assert result.exit_code == 1, result.output
    assert "field reference_image" in result.output and "HTTP 404" in result.output


def test_an_unfetched_url_shares_no_key_and_a_fetched_one_is_keyed_by_content() -> None:
    plain = ImageRequest(prompt="a helmet")
    unfetched = replace(plain, reference=ReferenceImage.at_url("http://a.test/h.png"))
    digest = hashlib.sha256(PNG).hexdigest()
    fetched = replace(plain, reference=ReferenceImage(digest, "http://a.test/h.png"))
    moved = replace(plain, reference=ReferenceImage(digest, "http://b.test/other.png"))
    # Unknown content never names a cached image: not the one without a reference, nor any
    # content's (the provisional key names the URL, which a content key never does).
    assert len({plain.key, unfetched.key, fetched.key}) == 3
    assert fetched.key == moved.key
    assert "reference_sha256" not in unfetched.canonical()
