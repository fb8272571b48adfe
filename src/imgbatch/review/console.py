"""Where the user's text goes: a rich `Console` per stream, colour only where it can be seen.

Takes a text stream (stdout or stderr); gives a `Console` that colours a terminal only, honours
`NO_COLOR` (no colour nor bold, whatever else is set) and `FORCE_COLOR` (colour even in a log;
https://force-color.org), and
prints text as it is: no wrapping (a long error stays one line in a log), no markup (`[x]` in a
prompt or an error is not a style), no guessing of numbers and URLs to highlight. Summaries are
coloured by their words (`2 failed` red, `3 generated` green), so that the library's summaries
stay plain strings and an action or status added later simply appears uncoloured.
"""

from __future__ import annotations

import os
import re
from enum import IntEnum
from typing import TextIO

from rich.console import Console
from rich.highlighter import Highlighter
from rich.text import Text


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """`1 retry`, `2 retries`: a count with its noun in the right number.

    >>> counted(1, "retry", "retries"), counted(0, "request")
    ('1 retry', '0 requests')
    """
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


class Verbosity(IntEnum):
    """`-q`, none, `-v`."""

    QUIET = 0  # errors and the final summary line only
    NORMAL = 1
    VERBOSE = 2  # plan: every shot; apply: a line per finished shot


# Colours of plan actions and shot statuses, wherever they appear. A word not listed is plain.
WORD_STYLES = {
    "create": "green",
    "generated": "green",
    "replace": "yellow",
    "restore": "cyan",
    "cached": "cyan",
    "recover": "cyan",
    "orphan": "magenta",
    "drift": "magenta",
    "failed": "bold red",
}
# Lines that say something went wrong, by how they begin.
_LINE_STYLES = {
    "error:": "bold red",
    "Stopped:": "bold red",
    "warning:": "yellow",
    "failed ": "red",
}
_COUNT = re.compile(r"\b([1-9][0-9]*) ([a-z_]+)\b")


class SummaryHighlighter(Highlighter):
    """Colours `N word` where word is an action or status (never a zero count), and whole lines
    that report an error."""

    def highlight(self, text: Text) -> None:
        plain = text.plain
        offset = 0
        for line in plain.splitlines(keepends=True):
            for lead, line_style in _LINE_STYLES.items():
                if line.startswith(lead):
                    text.stylize(line_style, offset, offset + len(line.rstrip("\n")))
            offset += len(line)
        for match in _COUNT.finditer(plain):
            style = WORD_STYLES.get(match.group(2))
            if style:
                text.stylize(style, match.start(), match.end())


def console_for(stream: TextIO) -> Console:
    """A console writing to `stream`; rich reads FORCE_COLOR and TERM itself."""
    return Console(
        file=stream,
        # rich's own NO_COLOR handling drops colours but keeps bold and dim: NO_COLOR here means
        # no styling escape at all (a live bar still moves the cursor on a terminal). It wins
        # over FORCE_COLOR.
        color_system=None if os.environ.get("NO_COLOR") else "auto",
        soft_wrap=True,
        markup=False,
        emoji=False,
        highlight=True,
        highlighter=SummaryHighlighter(),
    )


def styled(word: str, text: str | None = None) -> Text:
    """`text` (default `word`) in the colour of the action or status `word`."""
    return Text(word if text is None else text, style=WORD_STYLES.get(word, ""))
