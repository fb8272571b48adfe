"""The documentation's pages, their fenced blocks, links and headings, as the docs tests read them.

Takes: README.md, every docs/*.md, bench/README.md and CHANGELOG.md of this checkout.
Gives: `Block`s (page, line, language: the first word of the info string, body with the fence's
indent removed), the links outside fenced blocks, and the anchors GitHub makes for the headings.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tests.support.files import REPO

FENCE = re.compile(r"^( *)```([^\n`]*)\n(.*?)^\1```[ ]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\]\n]|\n(?!\n))*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$", re.MULTILINE)


def pages() -> list[Path]:
    docs = sorted((REPO / "docs").glob("*.md"))
    return [REPO / "README.md", *docs, REPO / "bench" / "README.md", REPO / "CHANGELOG.md"]


def name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    body: str

    @property
    def where(self) -> str:
        return f"{name(self.page)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        indent, info, body = match.groups()
        language = info.split()[0] if info.split() else ""
        if indent:
            body = textwrap.dedent(body)
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, language, body))
    return found


def all_blocks(language: str | None = None) -> list[Block]:
    found = [block for page in pages() for block in blocks(page)]
    return [block for block in found if language is None or block.language == language]


def prose(page: Path) -> str:
    """The page without its fenced blocks (a link or heading inside one is not one)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, heading in HEADING.findall(prose(page)):
        slug = anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found
