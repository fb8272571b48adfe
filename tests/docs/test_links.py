"""Every relative link in the docs leads to a file that exists, and every anchor to a heading.

Takes: the links outside fenced blocks of README.md, docs/*.md, bench/README.md and CHANGELOG.md
(tests/docs/pages.py). Gives: a failure naming the page and the link for a relative link whose
file is missing, or whose `#anchor` is not a heading of the page it names (GitHub's anchors).
Links to other sites are not fetched: tests reach no real host.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.docs.pages import anchor, anchors, links, name, pages


@pytest.mark.parametrize("page", pages(), ids=name)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (file.suffix != ".md" or fragment not in anchors(file)):
            broken.append(f"{target}: no heading #{fragment} in {file.name}")
    assert not broken, f"{name(page)}: {broken}"


def test_anchors_are_githubs() -> None:
    assert anchor("What it costs: prices and `--max-cost`") == "what-it-costs-prices-and---max-cost"
    assert anchor("Saying more in fewer lines: vars, matrix, variants, seed: auto") == (
        "saying-more-in-fewer-lines-vars-matrix-variants-seed-auto"
    )
    assert anchor("`limits.max_cost`") == "limitsmax_cost"
