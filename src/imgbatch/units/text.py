"""Text another party wrote, made safe to print on a terminal.

Takes text (a shot id or URL from a committed results.json, a claim's holder, a message that
quotes them); gives it with each control character shown escaped (`\\x1b`): an escape sequence
printed as it is sets the terminal's title or clipboard, or hides a line.
"""

from __future__ import annotations


def printable(text: str, *, lines: bool = False) -> str:
    """`text` with each control character (ESC, BEL, a line break...) shown escaped, as
    `\\x1b`; `lines`: a line break and a tab are kept (a message of several lines)."""
    if text.isprintable():
        return text
    kept = "\n\t" if lines else ""
    return "".join(c if c.isprintable() or c in kept else ascii(c)[1:-1] for c in text)
