"""The contact sheet at any batch size: page and data file sizes, writes, and time to first cards.

    python bench/sheet.py                   # 200, 10,000 and 100,000 shots
    python bench/sheet.py --shots 1000      # one size
    python bench/sheet.py --no-browser      # without opening the page in Chromium
    python bench/sheet.py --quick           # 200 and 2,000 shots (CI runs this)

For each size, the sheet of that many generated shots (made-up results entries with realistic
prompts, keys and request ids; thumbnails taken as made, since this measures the page, not
Pillow) is drawn as `apply` draws it, and the bench prints: the time to draw it, the size of
index.html and of the cards' data (its parts together), the number of `write` calls it took,
and, opened from file:// in Debian's Chromium (headless), the time until the first cards are
drawn, how many cards the document holds then (only those in view: the rest are drawn as they
scroll in), and the time until every part of the data is loaded (search and filters see all).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from imgbatch.review import sheet as sheet_module  # noqa: E402
from imgbatch.review.sheet_data import data_path  # noqa: E402
from imgbatch.state.results import ResultEntry  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


def entries(count: int) -> dict[str, ResultEntry]:
    made = {}
    for index in range(count):
        shot_id = f"shot-{index:06d}"
        key = hashlib.sha256(shot_id.encode()).hexdigest()
        prompt = f"a lighthouse on a cliff at night, storm clouds, take {index}, cinematic light"
        made[shot_id] = ResultEntry(
            id=shot_id,
            status="generated",
            file=f"{shot_id}.png",
            key=key,
            width=1328,
            height=1328,
            seed=index,
            model="qwen-image-max",
            size="1328*1328",
            prompt=prompt,
            image_url=None,
            request_id=f"req-{key[:32]}",
            request={"text": prompt, "provider": "dashscope"},
        )
    return made


def data_size(folder: Path) -> int:
    """Bytes of the cards' data: the first part and the others."""
    parts = data_path(folder).parent.glob("sheet-data*.js")
    return sum(part.stat().st_size for part in parts)


def draw(folder: Path, count: int) -> tuple[float, int]:
    """Seconds to draw the sheet, and the write calls it took."""
    by_id = entries(count)
    writes = 0
    real_write = os.write

    def counted(fd: int, data: bytes) -> int:  # type: ignore[type-arg]
        nonlocal writes
        writes += 1
        return real_write(fd, data)

    with (
        mock.patch.object(sheet_module, "make_thumbnails", lambda _, sources: set(sources)),
        mock.patch("os.write", counted),
    ):
        started = time.perf_counter()
        sheet_module.render_sheet(
            folder,
            title=f"bench-{count}",
            order=list(by_id),
            entries=by_id,
            changes={},
            finished_at=None,
        )
        seconds = time.perf_counter() - started
    return seconds, writes


def open_in_chromium(page: Path) -> tuple[float, int, float]:
    """Milliseconds from navigation to the first cards drawn, the cards in the document then,
    and milliseconds until all of the data is loaded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        tab = browser.new_page(viewport={"width": 1360, "height": 900})
        tab.goto(page.as_uri(), wait_until="commit")
        tab.wait_for_selector(".tile")
        # The page's own clock: from navigation to its first cards drawn.
        elapsed: float = tab.evaluate(
            "performance.getEntriesByName('imgbatch-first-cards')[0].startTime"
        )
        tiles: int = tab.evaluate("document.querySelectorAll('.tile').length")
        # And every part of the data loaded (the search and filters see all shots).
        tab.wait_for_function(
            "() => !document.getElementById('shown').textContent.includes('loading')",
            timeout=120_000,
        )
        loaded: float = tab.evaluate("performance.now()")
        browser.close()
    return elapsed, tiles, loaded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", type=int, action="append")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--quick", action="store_true", help="200 and 2,000 shots")
    args = parser.parse_args()
    sizes = args.shots or ([200, 2_000] if args.quick else [200, 10_000, 100_000])
    browser = not args.no_browser and CHROMIUM.exists()
    print(f"{'shots':>8} {'draw s':>7} {'index.html':>11} {'data file':>10} {'writes':>7}", end="")
    print(f" {'first cards ms':>15} {'cards in page':>14} {'all loaded ms':>14}" if browser else "")
    for count in sizes:
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(temporary)
            seconds, writes = draw(folder, count)
            page = folder / "index.html"
            line = (
                f"{count:>8,} {seconds:>7.2f} {page.stat().st_size / 1024:>9.1f}KB "
                f"{data_size(folder) / 1e6:>8.1f}MB {writes:>7}"
            )
            if browser:
                milliseconds, tiles, loaded = open_in_chromium(page)
                line += f" {milliseconds:>15.0f} {tiles:>14} {loaded:>14.0f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
