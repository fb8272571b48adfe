"""The contact sheet in a real browser: Debian's Chromium, headless, driven by Playwright.

The page is opened from disk (file://) as a user opens it: every card is there in manifest
order, every thumbnail really loads, the failed shot shows its error, the filters and the search
narrow the grid, the replaced shot shows its old and new image and compares them, and a hostile
prompt runs no script. Playwright's own browser download is never used: Chromium comes from
apt (`.ci/run` installs it). Without Chromium the test is skipped, except in CI, where it runs.

Set IMGBATCH_SHEET_SCREENSHOT=path to keep the screenshot (docs/contact-sheet.png is one).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

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
def browser(scenario: Scenario) -> Iterator[Browser]:
    # After the scenario: Playwright's sync API runs an event loop, and apply makes its own.
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
    ids: list[str] = page.eval_on_selector_all(
        ".card", "cards => cards.filter(c => !c.hidden).map(c => c.dataset.id)"
    )
    return ids


def test_the_contact_sheet_works_in_a_real_browser(
    browser: Browser, scenario: Scenario, tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    watched = Watched(page)
    page.goto(scenario.sheet.as_uri())

    # Every shot, in manifest order, one card each.
    assert page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.id)") == ORDER

    # Every thumbnail loads once scrolled into view, and it is a thumbnail, never the full PNG.
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
    failed.scroll_into_view_if_needed()
    assert "400 DataInspectionFailed" in failed.locator(".error").inner_text()
    assert MODERATION_MESSAGE in failed.locator(".error").inner_text()
    assert failed.locator(".status").inner_text().lower() == "failed"

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

    # The replaced shot shows its previous image beside the new one, and compares them.
    replaced = page.locator(f"#shot-{REPLACED}")
    replaced.scroll_into_view_if_needed()
    assert replaced.locator(".mark").inner_text() == "replaced"
    pair = replaced.locator("img")
    assert pair.count() == 2
    sources = [pair.nth(i).evaluate("img => img.currentSrc") for i in range(2)]
    assert len(set(sources)) == 2
    assert all(pair.nth(i).evaluate("img => img.naturalWidth") > 0 for i in range(2))
    replaced.locator("a.thumb.after").click()
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
    page.screenshot(path=str(tmp_path / "compare.png"))
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

    # A click on any other thumbnail opens its full image.
    page.locator("#shot-s07-phone a.thumb").click()
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
    hostile = page.locator(f"#shot-{HOSTILE}")
    assert hostile.locator(".prompt").inner_text() == HOSTILE_PROMPT
    assert hostile.locator(".negative .value").inner_text() == HOSTILE_NEGATIVE
    assert hostile.locator(".info img, .info script").count() == 0
    assert page.evaluate("() => window.__xss") is None
    assert watched.dialogs == []

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
    context.close()
