"""Never destroy what the user did: hand-edited images and paid images are kept.

Takes: the repository's example manifest (copied into tmp_path), applied against the fake
DashScope server, then one of its PNGs retouched as an image editor would (decoded, drawn on,
saved again), or the run started again without a key.
Gives: evidence that `plan` reports a hand-edited file as `drift` and `apply` keeps it (or moves
it aside, saying where, when the shot's request changed too), that `--overwrite-edited` puts
imgbatch's image back, and that placeholders never replace images a paid provider made unless
`--provider placeholder` is given by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from imgbatch.errors import PaidImagesError
from imgbatch.plan.decide import Action
from imgbatch.run.apply import ApplyOptions, apply, make_plan
from tests.cli.test_cli import (
    FAST,
    assert_clean,
    edit_manifest,
    expected_shots,
    no_key_env,
    output_dir,
    results,
    run,
)
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_many_shots


def retouch(path: Path) -> bytes:
    """Draw on the image and save it again, as an image editor would; gives the new bytes."""
    before = path.read_bytes()
    with Image.open(path) as image:
        image.load()
        ImageDraw.Draw(image).rectangle((10, 10, 200, 120), fill=(250, 20, 20))
        image.save(path, format="PNG")
    after = path.read_bytes()
    assert len(after) != len(before)
    return after


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def applied(api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path) -> Path:
    first = run("apply", example_manifest, *FAST)
    assert first.exit_code == 0, first.output
    return example_manifest


# ----- drift: an image edited by hand ------------------------------------------------------------


def test_an_edited_image_is_drift_in_plan_and_kept_by_apply(
    applied: Path, fake_server: FakeDashScope
) -> None:
    shot = list(expected_shots(applied))[3]
    out = output_dir(applied)
    edited = retouch(out / f"{shot}.png")
    results_before = (out / "results.json").read_bytes()
    sent = len(fake_server.requests)

    plan = run("plan", applied, "--detailed-exitcode")
    assert plan.exit_code == 0, plan.output  # nothing for apply to do: the edit is kept
    assert f"{shot}.png was edited since imgbatch wrote it" in plan.stdout
    assert "Plan: 7 unchanged, 1 drift. 0 paid requests." in plan.stdout

    result = run("apply", applied, "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert_clean(result)
    assert (out / f"{shot}.png").read_bytes() == edited
    assert (out / "results.json").read_bytes() == results_before
    assert len(fake_server.requests) == sent
    document = json.loads(result.stdout)
    statuses = {row["id"]: row["status"] for row in document["shots"]}
    assert statuses[shot] == "drift"
    assert document["summary"]["drift"] == 1
    assert "1 edited by hand and kept (--overwrite-edited puts them back)" in result.stderr
    assert not list(out.glob("*.edited*"))

    # Beside a restore, progress counts only the shots the run acts on.
    (out / f"{list(expected_shots(applied))[0]}.png").unlink()
    restored = run("apply", applied, *FAST)
    assert restored.exit_code == 0, restored.output
    assert "[1/1] 0 generated, 1 cached, 0 failed" in restored.stderr
    assert (out / f"{shot}.png").read_bytes() == edited


def test_overwrite_edited_puts_imgbatchs_image_back_from_the_cache(
    applied: Path, fake_server: FakeDashScope
) -> None:
    shot = list(expected_shots(applied))[3]
    out = output_dir(applied)
    entry = next(e for e in results(applied)["shots"] if e["id"] == shot)
    retouch(out / f"{shot}.png")
    sent = len(fake_server.requests)

    plan = run("plan", applied, "--overwrite-edited", "--detailed-exitcode")
    assert plan.exit_code == 2, plan.output
    assert "edited by hand; imgbatch's image is put back from the cache" in plan.stdout

    result = run("apply", applied, "--overwrite-edited", *FAST)
    assert result.exit_code == 0, result.output
    assert sha256((out / f"{shot}.png").read_bytes()) == entry["sha256"]
    assert len(fake_server.requests) == sent
    assert not list(out.glob("*.edited*"))


def test_an_edited_image_whose_request_changed_is_moved_aside_and_the_report_says_where(
    applied: Path, fake_server: FakeDashScope
) -> None:
    shots = list(expected_shots(applied))
    shot, untouched = shots[2], shots[5]
    out = output_dir(applied)
    edited = retouch(out / f"{shot}.png")

    def reprompt(doc: dict[str, Any]) -> None:
        doc["shots"][2]["prompt"] += ", seen from above"
        doc["shots"][5]["prompt"] += ", at night"

    edit_manifest(applied, reprompt)
    plan = run("plan", applied)
    assert f"edited {shot}.png is moved aside to {shot}.edited.png" in plan.stdout
    assert "Plan: 2 replace, 6 unchanged. 2 paid requests." in plan.stdout

    result = run("apply", applied, "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert (out / f"{shot}.edited.png").read_bytes() == edited
    entry = next(e for e in results(applied)["shots"] if e["id"] == shot)
    assert entry["status"] == "generated"
    assert sha256((out / f"{shot}.png").read_bytes()) == entry["sha256"]
    assert f"note {shot}: {shot}.png was edited by hand: moved aside to {shot}.edited.png" in (
        result.stderr
    )
    assert f"Edited by hand, moved aside: {shot} -> {shot}.edited.png" in result.stderr
    rows = {row["id"]: row for row in json.loads(result.stdout)["shots"]}
    assert rows[shot]["moved_aside"] == f"{shot}.edited.png"
    # A file imgbatch wrote and nobody touched is simply replaced.
    assert rows[untouched]["moved_aside"] is None
    assert not (out / f"{untouched}.edited.png").exists()


def test_a_deleted_image_is_restored_not_drift(applied: Path) -> None:
    shot = list(expected_shots(applied))[1]
    out = output_dir(applied)
    original = (out / f"{shot}.png").read_bytes()
    (out / f"{shot}.png").unlink()

    plan = run("plan", applied)
    assert "file missing; restored from the cache" in plan.stdout
    assert run("apply", applied, *FAST).exit_code == 0
    assert (out / f"{shot}.png").read_bytes() == original


# ----- placeholders never replace paid images by accident --------------------------------------


def test_auto_without_a_key_refuses_to_replace_paid_images(
    applied: Path,
    fake_server: FakeDashScope,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    shots = list(expected_shots(applied))
    out = output_dir(applied)
    no_key_env(monkeypatch, tmp_path / "empty-home")  # CI without its secret
    before = snapshot(out)
    sent = len(fake_server.requests)

    result = run("apply", applied, "--provider", "auto", *FAST)
    assert result.exit_code == 2, result.output
    assert_clean(result)
    assert (
        "--provider auto found no DashScope API key, so it chose the offline placeholder "
        "provider, which would replace 8 images made by dashscope (a paid provider) with "
        f"placeholders: {', '.join(shots)}; nothing was sent or written." in result.stderr
    )
    assert "or pass --provider placeholder to replace them on purpose" in result.stderr
    assert snapshot(out) == before
    assert len(fake_server.requests) == sent

    plan = run("plan", applied, "--provider", "auto", "--detailed-exitcode")
    assert plan.exit_code == 1, plan.output
    assert "would replace 8 images made by dashscope" in plan.stderr
    assert run("plan", applied, "--provider", "auto").exit_code == 2

    # Asked for by name, it is done.
    chosen = run("apply", applied, "--provider", "placeholder")
    assert chosen.exit_code == 0, chosen.output
    assert {e["request"]["provider"] for e in results(applied)["shots"]} == {"placeholder"}


def test_a_manifest_that_says_placeholder_is_not_asking_by_name(
    applied: Path, fake_server: FakeDashScope
) -> None:
    def to_placeholder(doc: dict[str, Any]) -> None:
        doc["provider"] = "placeholder"

    edit_manifest(applied, to_placeholder)
    out = output_dir(applied)
    before = snapshot(out)

    result = run("apply", applied)
    assert result.exit_code == 2, result.output
    assert "the manifest's provider: placeholder chose the offline placeholder provider" in (
        result.stderr
    )
    assert snapshot(out) == before
    assert run("apply", applied, "--provider", "placeholder").exit_code == 0


def test_the_refusal_names_the_first_20_shots_and_counts_the_rest(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_many_shots(tmp_path, "many", 23)
    options = ApplyOptions(environ=api_env, rps=1000.0, home=tmp_path / "home")
    assert apply(manifest, options).ok
    no_key = {"HOME": api_env["HOME"]}

    with pytest.raises(PaidImagesError) as raised:
        make_plan(manifest, provider="auto", environ=no_key, home=tmp_path / "home")
    message = str(raised.value)
    assert "would replace 23 images made by dashscope" in message
    named = ", ".join(f"shot-{index:03d}" for index in range(20))
    assert f"placeholders: {named}, and 3 more;" in message

    with pytest.raises(PaidImagesError):
        apply(manifest, ApplyOptions(provider="auto", environ=no_key, home=tmp_path / "home"))
    # New shots alone are no one's paid images: auto may make placeholders for them.
    (tmp_path / "other").mkdir()
    fresh = write_many_shots(tmp_path / "other", "fresh", 2)
    plan = make_plan(fresh, provider="auto", environ=no_key, home=tmp_path / "home")
    assert [item.action for item in plan.shots] == [Action.CREATE, Action.CREATE]
