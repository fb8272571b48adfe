"""The contact sheet in a real browser: Debian's Chromium, headless, driven by Playwright.

The page is opened from disk (file://) as a user opens it: every card is there in manifest
order, every thumbnail really loads, the failed shot shows its error, the filters and the search
narrow the grid, the replaced shot shows its old and new image and compares them, and a hostile
prompt runs no script. At 200 shots the dense grid shows dozens a screen and keeps only those in
view in the page; the viewer shows what was asked beside the image; the URL keeps the view;
marking cards builds the reroll and pick commands, and end to end, running them and applying
pays for the marked shots only. Playwright's own browser download is never used: Chromium comes
from apt (`.ci/run` installs it). Without Chromium the test is skipped, except in CI.

Set IMGBATCH_SHEET_SCREENSHOT=path (the 9-shot sheet) or IMGBATCH_DENSE_SCREENSHOT=path (the
200-shot dense grid, docs/review-sheet.png) to keep a screenshot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qs

import pytest

from imgbatch.providers.placeholder import PlaceholderProvider
from imgbatch.review import sheet_data
from imgbatch.run.apply import ApplyOptions, apply
from tests.conftest import FAKE_KEY, REPO
from tests.support.fake_dashscope import FakeDashScope
from tests.support.sheet_scenario import (
    ADDED,
    FAILED,
    HOSTILE,
    HOSTILE_NEGATIVE,
    HOSTILE_PROMPT,
    MODERATION_MESSAGE,
    ORDER,
    REPLACED,
    Scenario,
    make_scenario,
)

CHROMIUM = Path("/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

if not IN_CI:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to "
            "run the contact sheet's browser test (in CI it is installed and the test must run)",
            allow_module_level=True,
        )
    pytest.importorskip(
        "playwright", reason="playwright is in the test extra: pip install -e '.[test]'"
    )

from playwright.sync_api import Browser, Dialog, Page, sync_playwright  # noqa: E402

pytestmark = pytest.mark.slow  # a real browser


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    return make_scenario(tmp_path)


@pytest.fixture
def browser() -> Iterator[Browser]:
    # Ask for it after the fixtures that apply (scenario, many): Playwright's sync API runs an
    # event loop, and apply makes its own.
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


class Watched:
    """A page with everything it said or asked recorded."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("dialog", self._on_dialog)
        page.on(
            "console", lambda message: message.type == "error" and self.errors.append(message.text)
        )
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("request", lambda request: self.requests.append(request.url))

    def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def visible_ids(page: Page) -> list[str]:
    """The ids of the tiles drawn (every shown shot, when they all fit on the screen)."""
    ids: list[str] = page.eval_on_selector_all(".tile", "tiles => tiles.map(t => t.dataset.id)")
    return ids


def new_page(browser: Browser) -> tuple[Page, Watched]:
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = context.new_page()
    return page, Watched(page)


def test_the_contact_sheet_works_in_a_real_browser(
    scenario: Scenario, browser: Browser, tmp_path: Path
) -> None:
    page, watched = new_page(browser)
    page.goto(scenario.sheet.as_uri())

    # Every shot, in manifest order, one tile each.
    assert visible_ids(page) == ORDER
    # When the last apply finished, from the data file (the page itself holds no run's time).
    assert page.inner_text("#finished").startswith("· last apply 20")

    # Every thumbnail loads, and it is a thumbnail, never the full PNG.
    page.click("#view")  # the detailed cards: the replaced shot shows before and after
    thumbs = page.locator(".grid img")
    assert thumbs.count() == 9  # 9 shots: one failed without an image, one replaced with two
    for index in range(thumbs.count()):
        thumb = thumbs.nth(index)
        thumb.scroll_into_view_if_needed()
        thumb.evaluate("img => img.decode().catch(() => null)")
        state = thumb.evaluate(
            "img => ({complete: img.complete, width: img.naturalWidth,"
            " src: img.currentSrc, loading: img.loading})"
        )
        assert state["complete"] and state["width"] > 0, state
        assert state["loading"] == "lazy"
        assert "/.imgbatch/thumbs/" in state["src"] and state["src"].endswith(".webp"), state
        assert 0 < state["width"] <= 320

    # The failed shot shows its error: code and message.
    failed = page.locator(f"#shot-{FAILED}")
    assert "400 DataInspectionFailed" in failed.locator(".error").inner_text()
    assert MODERATION_MESSAGE in failed.locator(".error").inner_text()
    assert failed.locator(".status").inner_text().lower() == "failed"
    assert "no image: failed" in failed.locator(".blank").inner_text()
    # Placeholder drawings say so on the card; the failed shot has no drawing.
    assert page.locator("#shot-s01-dawn-road .badge.placeholder").count() == 1
    assert failed.locator(".badge.placeholder").count() == 0
    page.click("#view")

    # Filters and the search narrow the grid.
    page.click("[data-filter=failed]")
    assert visible_ids(page) == [FAILED]
    assert "1 of 9 shots" in page.inner_text("#shown")
    page.click("[data-filter=all]")
    assert visible_ids(page) == ORDER
    page.check("#changed-only")
    assert visible_ids(page) == [FAILED, REPLACED, ADDED]
    page.uncheck("#changed-only")
    page.fill("#search", "HELMET")
    assert visible_ids(page) == ["s03-helmet"]
    page.fill("#search", "s07")
    assert visible_ids(page) == ["s07-phone"]
    page.fill("#search", "softbox")  # the style: in the text sent, not in the prompt
    assert visible_ids(page) == ["s03-helmet"]
    page.fill("#search", "no such shot anywhere")
    assert visible_ids(page) == []
    assert page.is_visible("#empty")
    page.fill("#search", "")
    assert visible_ids(page) == ORDER

    # The replaced shot opens on its previous image beside the new one, and compares them.
    replaced = page.locator(f"#shot-{REPLACED}")
    assert replaced.locator(".badge.change").inner_text() == "replaced"
    replaced.click()
    assert page.is_visible("#viewer")
    page.wait_for_function(
        "() => ['v-before', 'v-after'].every(id => {"
        " const img = document.getElementById(id); return img.complete && img.naturalWidth > 0; })"
    )
    before_src = page.eval_on_selector("#v-before", "img => img.currentSrc")
    after_src = page.eval_on_selector("#v-after", "img => img.currentSrc")
    assert "/.imgbatch/cache/" in before_src and before_src.endswith(".png")
    assert after_src.endswith(f"/{REPLACED}.png")
    assert page.eval_on_selector("#v-after", "img => img.naturalWidth") == 1472  # the full image
    assert page.get_attribute(".stage", "data-mode") == "side"
    assert "previous prompt" in page.inner_text("#v-details")
    page.click(".modes [data-mode=slider]")
    page.fill("#v-slider", "30")
    assert "inset(0px 0px 0px 30%)" in page.eval_on_selector(
        ".v-after", "f => getComputedStyle(f).clipPath"
    )
    page.click(".modes [data-mode=toggle]")
    shown_before = page.eval_on_selector(".v-after", "f => getComputedStyle(f).visibility")
    page.keyboard.press("t")
    shown_after = page.eval_on_selector(".v-after", "f => getComputedStyle(f).visibility")
    assert {shown_before, shown_after} == {"visible", "hidden"}
    page.keyboard.press("Escape")
    assert not page.is_visible("#viewer")

    # A click on any other tile opens its full image; arrows step through the shown shots.
    page.locator("#shot-s07-phone").click()
    page.wait_for_function(
        "() => { const img = document.getElementById('v-after');"
        " return img.complete && img.naturalWidth > 0; }"
    )
    assert page.eval_on_selector("#v-after", "img => img.naturalWidth") == 928
    assert page.get_attribute(".stage", "data-mode") == "single"
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#v-title") == "s08-finish"
    page.keyboard.press("Escape")

    # The hostile prompt is shown as text and runs nothing.
    page.click("#view")
    hostile = page.locator(f"#shot-{HOSTILE}")
    assert hostile.locator(".prompt").inner_text() == HOSTILE_PROMPT
    assert hostile.locator(".negative .value").inner_text() == HOSTILE_NEGATIVE
    assert hostile.locator(".info img, .info script").count() == 0
    assert page.evaluate("() => window.__xss") is None
    assert watched.dialogs == []
    page.click("#view")

    # Nothing but files beside the page; nothing refused or broken.
    assert all(url.startswith("file://") for url in watched.requests), watched.requests
    assert watched.errors == []

    page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
    shot = tmp_path / "contact-sheet.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 0
    keep = os.environ.get("IMGBATCH_SHEET_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    page.context.close()


# --- hundreds of shots -------------------------------------------------------------------------

MANY = 200


def many_shots_list(directory: Path, provider: str = "placeholder") -> Path:
    """A 200-shot list: 188 plain shots, a matrix of 6 and a shot with 6 variants."""
    lines = [
        "version: 1",
        "name: many",
        f"provider: {provider}",
        "defaults:",
        '  size: "1328*1328"',
        "  seed: auto",
        "limits:",
        "  rps: 500",
        "shots:",
        '  - id: "helmet-{angle}-{light}"',
        '    prompt: "a cycling helmet, {angle} view, {light} light"',
        "    matrix:",
        "      angle: [front, side, top]",
        "      light: [dawn, noon]",
        "  - id: poster",
        '    prompt: "a minimalist poster of a cyclist"',
        "    variants: 6",
    ]
    for index in range(MANY - 12):
        lines += [f"  - id: shot-{index:03d}", f'    prompt: "a lighthouse at night, take {index}"']
    path = directory / "shots.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 200 shots applied once, for the tests that only look (none changes the folder)."""
    tmp_path = tmp_path_factory.mktemp("many")
    manifest = many_shots_list(tmp_path)
    options = ApplyOptions(environ={}, home=tmp_path)
    # Small parts, so that these tests see the page load its data part by part.
    with (
        mock.patch.object(sheet_data, "FIRST_ROWS", 50),
        mock.patch.object(sheet_data, "PART_ROWS", 60),
    ):
        report = apply(manifest, options, provider=PlaceholderProvider())
    assert report.count("generated") == MANY
    state = manifest.parent / "output" / "many" / ".imgbatch"
    assert sorted(p.name for p in state.glob("sheet-data*.js")) == [
        "sheet-data-1.js",
        "sheet-data-2.js",
        "sheet-data-3.js",
        "sheet-data.js",
    ]
    return manifest


def goto(page: Page, url: str) -> None:
    """Open the page and wait until every part of its data is loaded."""
    page.goto(url)
    page.wait_for_selector(".tile")
    page.wait_for_function(
        "() => !document.getElementById('shown').textContent.includes('loading')"
    )


def in_view(page: Page) -> list[str]:
    """Tiles wholly inside the window (below the sticky header)."""
    ids: list[str] = page.evaluate(
        """() => {
          const header = document.querySelector('.top').getBoundingClientRect().bottom;
          return Array.from(document.querySelectorAll('.tile')).filter(t => {
            const r = t.getBoundingClientRect();
            return r.top >= header && r.bottom <= innerHeight;
          }).map(t => t.dataset.id);
        }"""
    )
    return ids


def test_the_dense_grid_shows_dozens_of_shots_a_screen_and_only_those_in_view(
    many: Path, browser: Browser, tmp_path: Path
) -> None:
    sheet = many.parent / "output" / "many" / "index.html"
    assert sheet.stat().st_size < 60_000  # the page does not grow with the shots
    page, watched = new_page(browser)
    goto(page, sheet.as_uri())
    seen = in_view(page)
    assert len(seen) >= 32, len(seen)
    assert seen[:3] == ["helmet-front-dawn", "helmet-front-noon", "helmet-side-dawn"]
    drawn = page.locator(".tile").count()
    assert drawn < MANY  # the rest are drawn as they scroll into view
    keep = os.environ.get("IMGBATCH_DENSE_SCREENSHOT")
    if keep:
        page.screenshot(path=keep)

    # The keyboard reaches every shot: End goes to the last, which is drawn and in view.
    page.focus("#grid")
    page.keyboard.press("ArrowRight")  # the first shot
    page.keyboard.press("ArrowDown")  # the one below it
    columns = page.evaluate("document.querySelector('.row').children.length")
    assert page.locator(".tile.current").get_attribute("data-id") == seen[columns]
    page.keyboard.press("End")
    assert page.locator(".tile.current").get_attribute("data-id") == f"shot-{MANY - 13:03d}"
    assert f"shot-{MANY - 13:03d}" in in_view(page)
    page.keyboard.press("Home")
    assert page.locator(".tile.current").get_attribute("data-id") == "helmet-front-dawn"
    page.keyboard.press("ArrowRight")
    assert page.locator(".tile.current").get_attribute("data-id") == "helmet-front-noon"

    # The detailed cards are a key away, and back.
    page.keyboard.press("v")
    assert page.locator(".tile .info").count() > 0
    assert len(in_view(page)) < len(seen)
    page.keyboard.press("v")
    assert page.locator(".tile .info").count() == 0

    # A shot's takes side by side: one row headed by the shot.
    page.select_option("#group", "takes")
    heads = page.eval_on_selector_all(".row.head .group", "hs => hs.map(h => h.textContent)")
    assert "poster" in heads
    poster_row = page.evaluate(
        """() => {
          const head = Array.from(document.querySelectorAll('.row.head'))
            .find(h => h.querySelector('.group').textContent === 'poster');
          return Array.from(head.nextElementSibling.querySelectorAll('.tile'))
            .map(t => t.dataset.id);
        }"""
    )
    assert poster_row == [f"poster-{n}" for n in range(1, 7)]
    # Grouped by a matrix variable.
    page.select_option("#group", "var:light")
    heads = page.eval_on_selector_all(".row.head .group", "hs => hs.map(h => h.textContent)")
    assert heads[:2] == ["light = dawn", "light = noon"]
    assert watched.errors == []


def test_the_viewer_shows_prompt_seed_size_and_status_beside_the_image(
    many: Path, browser: Browser
) -> None:
    page, watched = new_page(browser)
    goto(page, (many.parent / "output" / "many" / "index.html").as_uri())
    page.locator("#shot-shot-002").click()
    page.wait_for_function("() => document.getElementById('v-after').naturalWidth > 0")
    details = dict(
        zip(
            page.eval_on_selector_all("#v-details dt", "ds => ds.map(d => d.textContent)"),
            page.eval_on_selector_all("#v-details dd", "ds => ds.map(d => d.textContent)"),
            strict=True,
        )
    )
    assert details["prompt"] == "a lighthouse at night, take 2"
    assert details["size"] == "1328×1328"
    assert details["status"] == "generated"
    assert details["seed"].isdigit()
    assert details["provider"].startswith("placeholder: an offline drawing")
    assert page.get_attribute("#v-open", "href") == "shot-002.png"
    # The viewer's place is in the URL: a reload opens it again.
    assert parse_qs(page.evaluate("location.hash.slice(1)")) == {"open": ["shot-002"]}
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#v-title") == "shot-003"
    assert watched.errors == []


def test_filters_search_grouping_and_view_live_in_the_url(many: Path, browser: Browser) -> None:
    page, _ = new_page(browser)
    goto(page, (many.parent / "output" / "many" / "index.html").as_uri())
    page.fill("#search", "helmet noon")
    page.select_option("#group", "var:angle")
    page.click("#view")
    shown = visible_ids(page)
    assert shown == ["helmet-front-noon", "helmet-side-noon", "helmet-top-noon"]
    url = page.url
    assert parse_qs(url.split("#", 1)[1]) == {
        "q": ["helmet noon"],
        "group": ["var:angle"],
        "view": ["cards"],
    }

    # The same link in another window shows the same view.
    other, watched = new_page(browser)
    goto(other, url)
    assert visible_ids(other) == shown
    assert other.input_value("#search") == "helmet noon"
    assert other.input_value("#group") == "var:angle"
    assert other.get_attribute("body", "data-view") == "cards"
    assert watched.errors == []


def test_marking_cards_builds_the_reroll_and_pick_commands(many: Path, browser: Browser) -> None:
    page, watched = new_page(browser)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    goto(page, (many.parent / "output" / "many" / "index.html").as_uri())
    assert page.is_hidden("#commands")

    page.locator("#shot-shot-005").click()  # the viewer: R marks the shot it shows
    page.keyboard.press("r")
    assert page.get_attribute("#v-reroll", "aria-pressed") == "true"
    page.keyboard.press("Escape")
    page.fill("#search", "poster")
    page.keyboard.press("Enter")  # to the first match
    page.keyboard.press("ArrowRight")
    page.keyboard.press("r")  # a take: its shot is rerolled, all six takes
    page.keyboard.press("ArrowRight")
    page.keyboard.press("p")  # and poster-3 is picked
    page.fill("#search", "helmet-top-dawn")
    page.keyboard.press("Enter")  # the match is the current tile: its buttons show
    page.click("#shot-helmet-top-dawn [data-act=reroll]")
    # A matrix combination cannot be rerolled alone: the page says why, and marks nothing.
    assert "matrix combinations sharing a seed" in page.inner_text("#shown")

    manifest = str(many)
    expected = f"imgbatch reroll {manifest} poster shot-005\nimgbatch pick {manifest} poster-3"
    assert page.inner_text("#command") == expected
    assert page.inner_text("#marked-count") == "3"
    page.click("#copy")
    page.wait_for_function("() => document.getElementById('copy').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == expected
    with page.expect_download() as caught:
        page.click("#download")
    script = Path(caught.value.path()).read_text(encoding="utf-8")
    assert script.startswith("#!/bin/sh\n") and script.endswith(f"\n{expected}\n")

    # The marks are in the URL too: a reload keeps them; "Marked" shows only them.
    page.fill("#search", "")
    page.reload()
    page.wait_for_function(
        "() => !document.getElementById('shown').textContent.includes('loading')"
    )
    assert page.inner_text("#command") == expected
    page.check("#marked-only")
    assert visible_ids(page) == [*(f"poster-{n}" for n in range(1, 7)), "shot-005"]
    page.click("#clear-marks")
    assert page.is_hidden("#commands")
    assert watched.errors == []


def test_mark_in_the_page_run_the_command_apply_and_only_those_shots_are_paid(
    browser: Browser, tmp_path: Path
) -> None:
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        manifest = many_shots_list(tmp_path, provider="dashscope")
        env = {
            **os.environ,
            "HOME": str(tmp_path),
            "DASHSCOPE_API_KEY": FAKE_KEY,
            "DASHSCOPE_HTTP_BASE_URL": server.base_url,
            "PYTHONPATH": str(REPO / "src"),
        }
        env.pop("OUTPUT_DIR", None)

        def shell(command: str) -> subprocess.CompletedProcess[str]:
            # `imgbatch` as the user has it: the package of this tree.
            script = f'imgbatch() {{ "{sys.executable}" -m imgbatch "$@"; }}\n{command}\n'
            return subprocess.run(
                ["bash", "-e", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True
            )

        done = shell(f"imgbatch apply {manifest.name} -q")
        assert done.returncode == 0, done.stderr
        assert server.successes == MANY
        server.reset()

        page, watched = new_page(browser)
        goto(page, (tmp_path / "output" / "many" / "index.html").as_uri())
        for shot_id in ("shot-010", "shot-150"):
            page.fill("#search", shot_id)
            page.keyboard.press("Enter")
            page.keyboard.press("r")
        page.fill("#search", "poster-2")
        page.keyboard.press("Enter")
        page.keyboard.press("p")
        command = page.inner_text("#command")
        assert command == (
            f"imgbatch reroll {manifest.name} shot-010 shot-150\n"
            f"imgbatch pick {manifest.name} poster-2"
        )
        assert watched.errors == []

        done = shell(command)
        assert done.returncode == 0, done.stderr
        done = shell(f"imgbatch apply {manifest.name}")
        assert done.returncode == 0, done.stderr
        # Two shots paid for, and only those two.
        assert server.successes == 2
        sent = sorted(
            r.body["input"]["messages"][0]["content"][0]["text"]
            for r in server.requests
            if isinstance(r.body, dict)
        )
        assert sent == ["a lighthouse at night, take 10", "a lighthouse at night, take 150"]
        out = tmp_path / "output" / "many"
        assert (out / "poster.png").read_bytes() == (out / "poster-2.png").read_bytes()


@pytest.fixture
def stored_sheet(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> Iterator[tuple[Path, str]]:
    """A sheet applied with --no-local-copy against moto's S3 server (kept running): the
    output folder and the server's endpoint."""
    from tests.support.files import write_many_shots
    from tests.support.object_servers import BUCKET, moto_server, s3_environ

    manifest = write_many_shots(tmp_path, "stored", 2)
    with moto_server() as endpoint:
        environ = {**api_env, **s3_environ(endpoint), "IMGBATCH_STORE": f"s3://{BUCKET}/sheet"}
        options = ApplyOptions(
            environ=environ,
            home=Path(api_env["HOME"]),
            rps=1000.0,
            quota_store=False,
            no_local_copy=True,
        )
        assert apply(manifest, options).ok
        yield tmp_path / "output" / "stored", endpoint


def test_full_images_kept_in_a_store_only_open_through_their_signed_links(
    stored_sheet: tuple[Path, str], browser: Browser
) -> None:
    output, endpoint = stored_sheet
    assert not list(output.rglob("*.png"))
    page, watched = new_page(browser)
    page.goto((output / "index.html").as_uri())
    assert "full images: links valid until" in page.inner_text("header")
    page.locator(".tile").first.click()
    page.wait_for_function(
        "() => { const img = document.getElementById('v-after');"
        " return img.complete && img.naturalWidth > 0; }"
    )
    src = page.eval_on_selector("#v-after", "img => img.currentSrc")
    assert src.startswith(endpoint) and "X-Amz-Signature=" in src
    assert page.eval_on_selector("#v-after", "img => img.naturalWidth") == 1328
    assert watched.errors == []  # no load refused by the page's policy
