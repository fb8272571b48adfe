"""The contact sheet as files: index.html, the cards' data file, the thumbnails, and when they
are drawn.

The browser test (test_sheet_browser.py) checks the page as a user sees it; these check the
page's markup and the data behind it, without a browser.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from imgbatch.cli.main import main
from imgbatch.providers.placeholder import PlaceholderProvider
from imgbatch.review import sheet as sheet_module
from imgbatch.review.sheet import render_sheet
from imgbatch.review.sheet_data import data_path, read_data
from imgbatch.run.apply import ApplyOptions, apply, load_and_expand
from imgbatch.shots.request import GeneratedImage, ImageRequest
from imgbatch.state.folder import OutputFolder
from imgbatch.state.last_run import thumb_path
from imgbatch.state.results import ResultEntry
from tests.support.sheet_scenario import (
    ADDED,
    FAILED,
    HOSTILE,
    HOSTILE_NEGATIVE,
    HOSTILE_PROMPT,
    ORDER,
    REPLACED,
    ModeratedPlaceholder,
    Scenario,
    make_scenario,
)


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    return make_scenario(tmp_path)


def page(scenario: Scenario) -> str:
    return scenario.sheet.read_text(encoding="utf-8")


def cards(output_dir: Path) -> dict[str, dict[str, Any]]:
    return {card["id"]: card for card in read_data(output_dir)}


def card(scenario: Scenario, shot_id: str) -> dict[str, Any]:
    return cards(scenario.output_dir)[shot_id]


def test_every_shot_has_a_card_in_manifest_order(scenario: Scenario) -> None:
    assert scenario.second.sheet == scenario.sheet
    assert scenario.second.sheet_problem is None
    assert [entry["id"] for entry in read_data(scenario.output_dir)] == ORDER


def test_the_page_is_small_whatever_the_batch(scenario: Scenario) -> None:
    # No card is in the page: its size does not grow with the shots.
    text = page(scenario)
    assert all(shot_id not in text for shot_id in ORDER)
    assert len(text.encode()) < 60_000
    assert '<script src=".imgbatch/sheet-data.js"></script>' in text


def test_user_text_is_data_never_markup(scenario: Scenario) -> None:
    hostile = card(scenario, HOSTILE)
    assert hostile["prompt"] == HOSTILE_PROMPT
    assert hostile["negative"] == HOSTILE_NEGATIVE
    data = data_path(scenario.output_dir).read_text(encoding="utf-8")
    # A `<` never appears raw in the data script: no text can close or open a tag in it.
    assert "<" not in data
    text = page(scenario)
    # Two scripts on the page: the data file and the sheet's own.
    assert text.count("<script") == 2


def test_the_page_runs_only_its_own_script_and_fetches_nothing_from_a_network(
    scenario: Scenario,
) -> None:
    text = page(scenario)
    script = re.search(r"<script>(.*?)</script>", text, re.S)
    assert script
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text)
    # Its own inline script, and scripts from its own place (the data file beside it).
    assert policy and f"script-src 'sha256-{digest}' 'self';" in policy.group(1)
    assert "default-src 'none'" in policy.group(1)
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<link" not in text


def test_the_card_shows_what_was_asked_and_what_happened(scenario: Scenario) -> None:
    helmet = card(scenario, "s03-helmet")
    assert (helmet["size"], helmet["seed"], helmet["model"]) == ("1328×1328", 7, "qwen-image-max")
    # The style is appended to the prompt: what was added to it is shown.
    assert helmet["sent"] == "prompt + Style: studio photography, softbox lighting"
    assert helmet["sent_label"] == "sent"
    assert helmet["negative"] == "blurry, low quality, watermark"
    assert helmet["provider"] == "placeholder"  # the page marks its drawing as a placeholder
    failed = card(scenario, FAILED)
    assert failed["status"] == "failed"
    assert failed["error_code"] == "400 DataInspectionFailed"
    assert failed["error_message"] == "Input data may contain inappropriate content."
    assert failed["file"] is None and failed["thumb"] is None


def test_the_last_run_s_changes_are_marked(scenario: Scenario) -> None:
    assert changed_ids(scenario) == [FAILED, REPLACED, ADDED]
    assert card(scenario, REPLACED)["change"] == "replaced"
    assert card(scenario, ADDED)["change"] == "new"
    assert card(scenario, FAILED)["change"] == "retried"
    assert card(scenario, "s01-dawn-road")["change"] is None


def test_a_replaced_shot_shows_its_previous_image_from_the_cache(scenario: Scenario) -> None:
    previous = next(e for e in scenario.first.entries if e.id == REPLACED)
    current = next(e for e in scenario.second.entries if e.id == REPLACED)
    assert previous.key != current.key
    replaced = card(scenario, REPLACED)
    cached = OutputFolder(scenario.output_dir).cache.path(previous.key)
    assert cached.is_file()
    assert replaced["prev_file"] == f".imgbatch/cache/{previous.key[:2]}/{previous.key}.png"
    assert replaced["prev_thumb"] == f".imgbatch/thumbs/{previous.key[:2]}/{previous.key}.webp"
    assert replaced["thumb"] == f".imgbatch/thumbs/{current.key[:2]}/{current.key}.webp"
    assert replaced["file"] == f"{REPLACED}.png"
    assert (
        replaced["prev_prompt"] == "close-up of a hand pulling a water bottle from a carbon frame"
    )


def test_thumbnails_are_small_lazy_and_made_once_per_image(scenario: Scenario) -> None:
    drawn = cards(scenario.output_dir).values()
    sources = [c[name] for c in drawn for name in ("thumb", "prev_thumb") if c[name]]
    assert len(sources) == 9
    assert all(src.startswith(".imgbatch/thumbs/") and src.endswith(".webp") for src in sources)
    stats = {}
    for src in sources:
        path = scenario.output_dir / src
        with Image.open(path) as image:
            assert image.format == "WEBP"
            assert max(image.size) <= 320
        assert path.stat().st_size < 40_000
        stats[src] = path.stat().st_mtime_ns

    result = CliRunner().invoke(main, ["sheet", str(scenario.manifest)])

    assert result.exit_code == 0, result.output
    assert {src: (scenario.output_dir / src).stat().st_mtime_ns for src in stats} == stats


def changed_ids(scenario: Scenario) -> list[str]:
    return [c["id"] for c in read_data(scenario.output_dir) if c["change"]]


def test_the_marks_show_the_last_apply_that_changed_a_shot(scenario: Scenario) -> None:
    manifest = scenario.manifest
    options = ApplyOptions(environ={}, home=manifest.parent)
    # The failed shot is tried again: the marks move to it alone.
    apply(manifest, options, provider=ModeratedPlaceholder())
    assert changed_ids(scenario) == [FAILED]

    manifest.write_text(
        manifest.read_text(encoding="utf-8").replace("a FORBIDDEN sign", "a closed sign"),
        encoding="utf-8",
    )
    apply(manifest, options, provider=ModeratedPlaceholder())
    drawn = page(scenario)
    assert changed_ids(scenario) == [FAILED]
    assert card(scenario, FAILED)["status"] == "generated"
    inode = scenario.sheet.stat().st_ino

    again = apply(manifest, options, provider=ModeratedPlaceholder())

    assert not again.plan.has_changes
    assert again.sheet == scenario.sheet
    assert scenario.sheet.stat().st_ino == inode  # not even rewritten
    assert page(scenario) == drawn

    # Shots moved or removed, nothing made: drawn again, the last change still marked.
    text = manifest.read_text(encoding="utf-8")
    s01 = text[text.index("  - id: s01-dawn-road") : text.index("  - id: s02-dusk-portrait")]
    s09 = text[text.index("  - id: s09-podium") :]
    manifest.write_text(text.replace(s01, "").replace(s09, "") + s01, encoding="utf-8")

    moved = apply(manifest, options, provider=ModeratedPlaceholder())

    assert not [item for item in moved.plan.shots if item.action != "unchanged"]
    ids = [c["id"] for c in read_data(scenario.output_dir)]
    assert ids == [*ORDER[1:-1], "s01-dawn-road"]
    assert changed_ids(scenario) == [FAILED]


def test_a_sheet_that_cannot_be_drawn_warns_and_never_fails_the_run(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sheet_module, "render_sheet", broken)
    manifest = scenario.manifest
    manifest.write_text(
        manifest.read_text(encoding="utf-8").replace("at noon", "at midnight"), encoding="utf-8"
    )
    report = apply(
        manifest, ApplyOptions(environ={}, home=manifest.parent), provider=ModeratedPlaceholder()
    )
    assert report.count("generated") == 1
    assert report.sheet is None
    assert report.sheet_problem and "No space left on device" in report.sheet_problem
    assert str(scenario.sheet) in report.sheet_problem

    manifest.write_text(
        manifest.read_text(encoding="utf-8").replace("at midnight", "at dawn"), encoding="utf-8"
    )
    result = CliRunner().invoke(
        main,
        ["apply", str(manifest), "--provider", "placeholder"],
        env={"HOME": str(manifest.parent)},
    )
    # The command's own placeholder has no moderation: every shot is made, and the run is good.
    assert result.exit_code == 0, result.output
    assert "warning: the contact sheet" in result.output
    assert "No space left on device" in result.output


def test_imgbatch_sheet_draws_the_page_again_with_the_last_run_s_marks(
    scenario: Scenario,
) -> None:
    before = page(scenario)
    scenario.sheet.unlink()

    result = CliRunner().invoke(main, ["sheet", str(scenario.manifest)])

    assert result.exit_code == 0, result.output
    assert f"Contact sheet: {scenario.sheet}" in result.output
    assert page(scenario) == before


def test_imgbatch_sheet_shows_shots_not_applied_yet_as_pending(scenario: Scenario) -> None:
    manifest = scenario.manifest
    manifest.write_text(
        manifest.read_text(encoding="utf-8")
        + '  - id: s10-later\n    prompt: "a shot added after the last apply"\n',
        encoding="utf-8",
    )

    result = CliRunner().invoke(main, ["sheet", str(manifest)])

    assert result.exit_code == 0, result.output
    later = card(scenario, "s10-later")
    assert later["status"] == "pending" and later["prompt"] is None


def test_imgbatch_sheet_before_any_apply_says_so_and_writes_nothing(tmp_path: Path) -> None:
    manifest = tmp_path / "shots.yaml"
    manifest.write_text(
        'version: 1\nname: fresh\nshots:\n  - id: a\n    prompt: "a red bicycle"\n',
        encoding="utf-8",
    )

    result = CliRunner().invoke(main, ["sheet", str(manifest)])

    assert result.exit_code == 1
    assert "no results in" in result.output and "imgbatch apply" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "output").exists()


def test_a_simplified_prompt_is_shown_as_what_was_sent_and_a_lost_image_breaks_nothing(
    tmp_path: Path,
) -> None:
    prompt = "a red bicycle. It leans on a wall in the rain"
    entry = ResultEntry(
        id="s01",
        status="generated",
        file="s01.png",
        key="ab" * 32,
        width=1664,
        height=928,
        seed=None,
        model="qwen-image-max",
        size="1664*928",
        prompt=prompt,
        image_url=None,
        request_id="req-1",
        request={"text": prompt + "\nStyle: watercolour"},
        prompt_sent="a red bicycle.",
        simplified=True,
    )

    path = render_sheet(
        tmp_path, title="t", order=["s01"], entries={"s01": entry}, changes={}, finished_at=None
    )

    assert path == tmp_path / "index.html"
    shot = cards(tmp_path)["s01"]
    assert (shot["sent_label"], shot["sent"]) == ("simplified", "a red bicycle.")
    assert shot["seed"] is None  # the page says "no seed"
    assert shot["file"] == "s01.png" and shot["thumb"] is None  # the image is gone: no preview


def test_the_page_holds_no_run_time_so_the_same_shots_draw_the_same_page(tmp_path: Path) -> None:
    entry = ResultEntry(
        id="s01", status="failed", file=None, key="ab" * 32, width=None, height=None, seed=None,
        model="qwen-image-max", size="1664*928", prompt="a red bicycle", image_url=None,
        request_id=None, error="400 DataInspectionFailed: no",
    )  # fmt: skip
    pages = []
    for folder, finished in (("a", "2026-12-06 10:00 UTC"), ("b", "2026-12-07 11:30 UTC")):
        (tmp_path / folder).mkdir()
        page = render_sheet(
            tmp_path / folder,
            title="t",
            order=["s01"],
            entries={"s01": entry},
            changes={},
            finished_at=finished,
        )
        pages.append(page.read_bytes())
        # The time of the last apply is this machine's: in the data file, in the folder's state.
        assert finished in data_path(tmp_path / folder).read_text(encoding="utf-8")
    assert pages[0] == pages[1]


def test_a_shot_billed_but_not_downloaded_has_its_own_status_and_filter(tmp_path: Path) -> None:
    made = ResultEntry(
        id="s01",
        status="unfetched",
        file=None,
        key="cd" * 32,
        width=None,
        height=None,
        seed=7,
        model="qwen-image-max",
        size="1664*928",
        prompt="a red bicycle",
        image_url="https://dashscope-result.example.invalid/1.png?Expires=1",
        request_id="req-1",
        error="generated (request req-1) but the image could not be downloaded: timed out",
        request={"text": "a red bicycle"},
    )

    path = render_sheet(
        tmp_path, title="t", order=["s01"], entries={"s01": made}, changes={}, finished_at=None
    )

    text = path.read_text(encoding="utf-8")
    shot = cards(tmp_path)["s01"]
    assert shot["status"] == "unfetched"
    assert shot["error_message"] and "could not be downloaded: timed out" in shot["error_message"]
    assert 'data-filter="unfetched"' in text
    assert shot["file"] is None


class WaitsForAThumbnail(PlaceholderProvider):
    """Holds the last shot until the first shot's thumbnail exists (or gives up after 10 s)."""

    def __init__(self, thumb: Path) -> None:
        super().__init__()
        self.thumb = thumb
        self.seen_during_run = False

    async def generate(self, request: ImageRequest, *, label: str) -> GeneratedImage:
        if label == "c":
            for _ in range(1000):
                if self.thumb.is_file():
                    self.seen_during_run = True
                    break
                await asyncio.sleep(0.01)
        return await super().generate(request, label=label)


def test_thumbnails_are_made_while_the_run_goes_on_and_the_listener_still_hears_all(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "shots.yaml"
    shots = "".join(f'  - id: {name}\n    prompt: "shot {name}"\n' for name in "abc")
    manifest.write_text(
        f'version: 1\nname: bg\ndefaults:\n  size: "1328*1328"\nshots:\n{shots}', encoding="utf-8"
    )
    first = load_and_expand(manifest, "placeholder", environ={})[1].shots[0]
    output_dir = tmp_path / "output" / "bg"
    provider = WaitsForAThumbnail(thumb_path(output_dir, first.request.key))
    heard: list[object] = []

    report = apply(
        manifest,
        ApplyOptions(provider="placeholder", environ={}, home=tmp_path, concurrency=1),
        provider=provider,
        listener=heard.append,
    )

    assert report.count("generated") == 3
    assert provider.seen_during_run
    assert [event.id for event in heard if isinstance(event, ResultEntry)] == ["a", "b", "c"]


def _failed(error: str, **provider: object) -> ResultEntry:
    return ResultEntry(
        id="s01",
        status="failed",
        file=None,
        key="ef" * 32,
        width=None,
        height=None,
        seed=7,
        model="qwen-image-max",
        size="1664*928",
        prompt="a red bicycle",
        image_url=None,
        request_id="req-9",
        error=error,
        request={"text": "a red bicycle"},
        **provider,  # type: ignore[arg-type]
    )


def test_a_failed_card_shows_the_status_and_words_the_entry_holds_never_parsed(
    tmp_path: Path,
) -> None:
    refused = "the service refused it for 300 s (40 tries): 429 Throttling: Too many requests."
    entries = {
        # The run's own words around the service's: the badge still has the status, as data.
        "s01": _failed(refused, error_code="Throttling", error_status=429),
        # Text that only looks like "<status> <code>: ..." is shown as it is, whole.
        "s02": _failed("500 Lookalike: not the service's words", error_code="Lookalike"),
    }
    path = render_sheet(
        tmp_path, title="t", order=["s01", "s02"], entries=entries, changes={}, finished_at=None
    )
    assert path == tmp_path / "index.html"
    shown = cards(tmp_path)
    assert shown["s01"]["error_code"] == "429 Throttling"
    assert shown["s01"]["error_message"] == refused
    lookalike = shown["s02"]
    assert lookalike["error_code"] == "Lookalike"
    assert lookalike["error_message"] == "500 Lookalike: not the service's words"


def test_a_big_sheet_is_written_in_a_few_write_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sheet's page and data are built in memory and written whole: a 10,000-shot sheet
    was once written in 540,000 `write` calls. 3,000 shots here, counted at the system call."""
    entries = {}
    for index in range(3000):
        shot_id = f"shot-{index:05d}"
        entries[shot_id] = ResultEntry(
            id=shot_id, status="generated", file=f"{shot_id}.png",
            key=hashlib.sha256(shot_id.encode()).hexdigest(), width=1328, height=1328,
            seed=index, model="qwen-image-max", size="1328*1328",
            prompt=f"a lighthouse at night, take {index}", image_url=None, request_id=None,
        )  # fmt: skip
    writes: list[int] = []
    real_write = sheet_module.os.write

    def counted(fd: int, data: Any) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(sheet_module.os, "write", counted)
    page = render_sheet(
        tmp_path, title="t", order=list(entries), entries=entries, changes={}, finished_at=None
    )
    assert page.is_file() and len(read_data(tmp_path)) == 3000
    assert 1 <= len(writes) <= 12, len(writes)
