"""Work not done twice: the same request is paid once, local drawing is not queued 512 deep.

Takes: a manifest whose two shots differ only in id (same prompt, size, seed, model), applied
against the fake DashScope server.
Gives: evidence that the plan counts one paid request, that the server sees one generation, that
both files hold the same image, and that a later restore of either is free and trusted (before,
the second image overwrote the cache entry the first shot's record named, so restoring the first
found a "damaged" entry and paid again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import imgbatch
from imgbatch.errors import ConfigError
from imgbatch.plan.decide import Action
from imgbatch.providers.placeholder import PlaceholderProvider
from imgbatch.review.report import apply_summary
from imgbatch.run.apply import apply, make_plan
from imgbatch.shots.request import ImageRequest
from tests.cli.test_cli import FAST, assert_clean, run
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest, write_many_shots

TWINS = """\
version: 1
name: twins
defaults:
  size: "1328*1328"
  seed: 7
shots:
  - id: first
    prompt: "a lighthouse at dawn"
  - id: other
    prompt: "a lone cyclist"
  - id: second
    prompt: "a lighthouse at dawn"
"""


def test_the_same_request_twice_is_paid_once_and_restores_stay_free(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, TWINS)
    plan = make_plan(manifest)
    assert [item.action for item in plan.shots] == [Action.CREATE, Action.CREATE, Action.RESTORE]
    assert plan.shots[2].twin_of == "first"
    assert "the same request as shot first" in plan.shots[2].reason
    assert plan.paid_requests == 2

    result = run("apply", manifest, *FAST)
    assert_clean(result)
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == 2
    output = tmp_path / "output" / "twins"
    first, second = (output / f"{name}.png" for name in ("first", "second"))
    assert first.read_bytes() == second.read_bytes()
    entries = {e["id"]: e for e in json.loads((output / "results.json").read_text())["shots"]}
    assert entries["second"]["status"] == "cached"
    assert entries["second"]["sha256"] == entries["first"]["sha256"]

    # Either file deleted comes back from the cache, trusted and free.
    first.unlink()
    second.unlink()
    again = run("apply", manifest, *FAST)
    assert_clean(again)
    assert again.exit_code == 0, again.output
    assert "damaged" not in again.output
    assert fake_server.generation_count == 2
    assert first.read_bytes() == second.read_bytes()


def test_a_twin_of_a_failed_shot_fails_naming_it_and_sends_nothing(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, TWINS)
    fake_server.enqueue_error(400, "InvalidParameter", "the prompt was refused")
    result = run("apply", manifest, *FAST, "--concurrency", "1")
    assert_clean(result)
    assert result.exit_code == 1, result.output
    assert fake_server.generation_count == 2
    output = tmp_path / "output" / "twins"
    entries = {e["id"]: e for e in json.loads((output / "results.json").read_text())["shots"]}
    assert entries["first"]["status"] == "failed"
    assert entries["second"]["status"] == "failed"
    assert "the same request as shot first, which has no image" in entries["second"]["error"]
    assert "the prompt was refused" in entries["second"]["error"]


@pytest.mark.parametrize("recover_first", [True, False], ids=["recover-first", "recover-last"])
def test_a_twin_of_an_image_billed_but_not_downloaded_is_not_paid_again(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path, recover_first: bool
) -> None:
    manifest = write_manifest(tmp_path, TWINS)
    fake_server.cut_download_rate = 1.0  # billed, never downloaded: first is unfetched
    result = run("apply", manifest, *FAST)
    assert_clean(result)
    assert fake_server.generation_count == 2
    output = tmp_path / "output" / "twins"
    entries = {e["id"]: e for e in json.loads((output / "results.json").read_text())["shots"]}
    assert entries["first"]["status"] == "unfetched"
    assert entries["second"]["status"] == "failed"  # its twin had no image

    fake_server.cut_download_rate = 0.0
    if not recover_first:  # the twin now comes before the shot whose image was billed
        manifest.write_text(_swapped(TWINS), encoding="utf-8")
    plan = {item.id: item for item in make_plan(manifest).shots}
    # The image billed as first's is fetched once, by whichever comes first; the other copies it
    # (two fetches would put two stampings of it under one cache key).
    one, two = ("first", "second") if recover_first else ("second", "first")
    assert plan[one].action is Action.RECOVER, plan[one].reason
    assert plan[two].twin_of == one, plan[two].reason
    # One worker: a twin listed before the shot it waits for must not wait for itself.
    again = run("apply", manifest, *FAST, "--concurrency", "1")
    assert_clean(again)
    assert again.exit_code == 0, again.output
    # The image billed last time is fetched and copied: not paid for a second time.
    assert fake_server.generation_count == 2
    assert (output / "first.png").read_bytes() == (output / "second.png").read_bytes()


def test_a_shot_renamed_while_its_image_was_billed_but_not_downloaded_is_not_paid_again(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, TWINS)
    fake_server.cut_download_rate = 1.0
    assert_clean(run("apply", manifest, *FAST))
    assert fake_server.generation_count == 2
    output = tmp_path / "output" / "twins"
    entries = {e["id"]: e for e in json.loads((output / "results.json").read_text())["shots"]}
    assert entries["other"]["status"] == "unfetched"

    fake_server.cut_download_rate = 0.0
    manifest.write_text(TWINS.replace("id: other", "id: renamed"), encoding="utf-8")
    plan = {item.id: item for item in make_plan(manifest).shots}
    assert plan["renamed"].action is Action.RECOVER, plan["renamed"].reason
    assert "as shot other" in plan["renamed"].reason
    again = run("apply", manifest, *FAST)
    assert_clean(again)
    assert again.exit_code == 0, again.output
    # first and second are recovered and copied, renamed fetches the image billed as other.
    assert fake_server.generation_count == 2
    with Image.open(output / "renamed.png") as image:
        assert image.size == (1328, 1328)
    document = json.loads((output / "results.json").read_text())
    entries = {e["id"]: e for e in document["shots"]}
    (orphan,) = document["orphans"]
    assert entries["renamed"]["request_id"] == orphan["request_id"]  # the same image, paid once
    assert orphan["id"] == "other"  # kept, as any orphan


def _swapped(manifest: str) -> str:
    """`manifest` with shot `second` listed before `first`."""
    head, shots = manifest.split("shots:\n")
    blocks = ["  - id:" + block for block in shots.split("  - id:")[1:]]
    return head + "shots:\n" + "".join([blocks[2], blocks[1], blocks[0]])


def test_an_offline_provider_has_no_more_shots_in_flight_than_threads_to_draw_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """512 placeholder shots in flight only queued in a 6-thread pool, and a Ctrl-C then had
    hundreds of shots to wait for."""
    in_flight = peak = 0
    draw = PlaceholderProvider.generate

    async def counted(self: PlaceholderProvider, request: ImageRequest, *, label: str) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await draw(self, request, label=label)
        finally:
            in_flight -= 1

    monkeypatch.setattr(PlaceholderProvider, "generate", counted)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    report = apply(write_many_shots(tmp_path, "offline", 60), provider="placeholder")
    assert report.ok
    assert 2 <= peak <= min(32, (os.cpu_count() or 1) + 4)


def test_output_dir_with_a_tilde_is_the_home_folder_and_an_unknown_provider_lists_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`OUTPUT_DIR="~/renders"` (quoted: no shell expanded it) made a folder named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OUTPUT_DIR", "~/renders")
    monkeypatch.chdir(tmp_path)
    report = apply(write_many_shots(tmp_path, "tilde", 1), provider="placeholder")
    assert report.results_path == tmp_path / "home" / "renders" / "tilde" / "results.json"
    response = imgbatch.generate({"prompt": "x"}, provider="placeholder")
    assert Path(response["file"]).is_relative_to(tmp_path / "home" / "renders")
    assert not (tmp_path / "~").exists()
    with pytest.raises(ConfigError, match="choose one of dashscope, placeholder, auto"):
        apply(write_many_shots(tmp_path, "tilde", 1), provider="bogus")


@pytest.mark.parametrize("linked", [".imgbatch", ".imgbatch/cache"])
def test_a_state_folder_that_is_a_link_is_refused_and_nothing_is_written_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linked: str
) -> None:
    """A link committed in place of `.imgbatch/` would have the cache and lock written
    wherever it points."""
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    manifest = write_many_shots(tmp_path, "linked", 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "output" / "linked" / linked
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere, target_is_directory=True)

    result = run("apply", manifest, "--provider", "placeholder")

    assert_clean(result)
    assert result.exit_code == 1, result.output
    assert f"{link} is a symbolic link" in result.output
    assert list(elsewhere.iterdir()) == []
    assert not (tmp_path / "output" / "linked" / "shot-000.png").exists()


def test_a_bounded_run_still_copies_a_twin_whose_image_it_made(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    """The copy is local and free: leaving it for the next run only makes that run longer."""
    manifest = write_manifest(tmp_path, TWINS)
    result = run("apply", manifest, *FAST, "--concurrency", "1", "--max-requests", "1")
    assert_clean(result)
    assert result.exit_code == 3, result.output  # "other" remains
    assert fake_server.generation_count == 1
    output = tmp_path / "output" / "twins"
    entries = {e["id"]: e for e in json.loads((output / "results.json").read_text())["shots"]}
    assert sorted(entries) == ["first", "second"]
    assert entries["second"]["status"] == "cached"
    assert (output / "second.png").read_bytes() == (output / "first.png").read_bytes()


def test_a_provider_object_keys_its_images_under_its_own_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`apply(manifest, provider=PlaceholderProvider())` on a shot list with no `provider:`
    keyed the placeholder's drawings under dashscope's name, so a plan for dashscope then said
    `unchanged` and the real images were never made."""
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    manifest = write_many_shots(tmp_path, "drawn", 2)
    report = apply(manifest, provider=PlaceholderProvider())
    assert report.ok and report.count("generated") == 2
    written = json.loads(report.results_path.read_text(encoding="utf-8"))
    assert {shot["request"]["provider"] for shot in written["shots"]} == {"placeholder"}
    assert written["provider"] == "placeholder"
    real = make_plan(manifest, provider="dashscope")
    assert [item.action for item in real.shots] == [Action.REPLACE, Action.REPLACE]
    assert make_plan(manifest, provider="placeholder").count(Action.UNCHANGED) == 2


class Sketches(PlaceholderProvider):
    """A provider of the caller's own, free like the placeholder, under a name imgbatch does
    not know."""

    name = "sketches"


def test_whether_a_provider_object_is_metered_is_its_own_answer_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary asked a table by the provider's name, the run asked the object: a free
    provider of one's own was paced as free but reported as billed, with a cost line."""
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    report = apply(write_many_shots(tmp_path, "sketched", 2), provider=Sketches())
    assert report.ok and not report.plan.metered
    summary = apply_summary(report)
    assert "2 offline requests" in summary and "Cost:" not in summary
