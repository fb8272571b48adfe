"""The contact sheet's cards as compact data files beside the page, whatever the batch size.

Takes the cards `sheet` builds (one dict per shot) and what the shot list says about each shot
(`ShotInfo`: the variants it is a take of, its matrix values, whether it is the picked take, the
id a reroll of it names); gives `sheet-data.js` in the folder's state, a script that sets
`window.contactSheet` to `{"fields": [...], "strings": [...], "rows": [[...], ...]}`: one array
per card, its cells in `fields` order, repeated texts (sizes, models, negative prompts, statuses)
as numbers into `strings`, the first 2,000 cards in it and the others in parts
(`sheet-data-N.js`) the page loads after its first cards are drawn. The page draws only the
cards in view, so 100,000 shots make a page of a few kilobytes that shows its first cards as
fast as 200 do. Scripts, not JSON files, so that they load from `file://`, where a page may not
fetch files; each written in one write, atomically, before the page that names them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from imgbatch.manifest import Manifest
from imgbatch.state.cache import atomic_write
from imgbatch.state.folder import OutputFolder

DATA_FILE = "sheet-data.js"
PART_FILE = "sheet-data-{number}.js"
GLOBAL = "contactSheet"
# Cards in the first part (drawn at once) and in each later part (loaded after it).
FIRST_ROWS = 2_000
PART_ROWS = 10_000
# A card's cells, in order. Those in _INTERNED are numbers into `strings`.
FIELDS = (
    "id status change reason prompt sent sent_label negative size seed model provider style"
    " error_code error_message request_id attempts key file thumb tw th prev_file prev_thumb"
    " prev_prompt prev_w prev_h base variant values picked reroll reroll_note"
).split()
_INTERNED = frozenset(
    "status change sent_label negative size model provider style error_code".split()
)


@dataclass(frozen=True, slots=True)
class ShotInfo:
    """What the shot list says about one shot, for grouping and for the marks' commands."""

    base: str | None = None  # the id its variants share (poster for poster-2)
    variant: int | None = None
    values: Mapping[str, Any] | None = None  # its matrix combination
    picked: bool = False
    reroll: str | None = None  # the id `imgbatch reroll` takes for it; None: it cannot
    reroll_note: str | None = None  # what a reroll does, or why there is none


def shot_infos(manifest: Manifest) -> dict[str, ShotInfo]:
    """Each shot's `ShotInfo`, by id."""
    # How many shots each written one made, for those a matrix or variants made (a count for
    # every shot of a 100,000-shot list was the peak of a no-op apply's memory).
    takes: dict[int, int] = {}
    for spec in manifest.shots:
        if spec.values or spec.base_id is not None:
            takes[spec.index] = takes.get(spec.index, 0) + 1
    picked = set(manifest.picks.values())
    infos = {}
    for spec in manifest.shots:
        reroll: str | None = spec.id
        note = None
        if spec.values:
            reroll = None
            note = (
                f"one of {takes[spec.index]} matrix combinations sharing a seed: "
                "edit that shot's seed in the YAML"
            )
        elif spec.base_id is not None:
            reroll = spec.base_id
            note = f"rerolls all {takes[spec.index]} takes of {spec.base_id}"
        infos[spec.id] = ShotInfo(
            spec.base_id,
            spec.variant,
            dict(spec.values) or None,
            spec.id in picked,
            reroll,
            note,
        )
    return infos


def data_path(output_dir: Path) -> Path:
    return OutputFolder(output_dir).state_dir / DATA_FILE


def page_url(output_dir: Path) -> str:
    """The data file as the page names it (relative to the output folder)."""
    return data_path(output_dir).relative_to(output_dir).as_posix()


def write_data(
    output_dir: Path,
    cards: Sequence[Mapping[str, Any]],
    infos: Mapping[str, ShotInfo],
    meta: Mapping[str, Any],
    thumbs: str,
) -> None:
    """Write the data file. `meta` goes in as it is: the page's title, the shot list's path for
    the commands, and the page's digest (a page that finds another drawing's data says so).
    `thumbs` is a thumbnail's URL with `{k2}` and `{key}` for its key: a card whose thumbnail
    and image are where they usually are (`<id>.png`) says 1 instead of repeating the path."""
    strings: dict[str, int] = {}
    rows = [_row(card, infos.get(card["id"]), strings, thumbs) for card in cards]
    # The first part is small, so the first cards are drawn at once whatever the batch size;
    # the page loads the others one after another, after it.
    parts = [rows[:FIRST_ROWS]] + [
        rows[start : start + PART_ROWS] for start in range(FIRST_ROWS, len(rows), PART_ROWS)
    ]
    document = {
        "version": 1,
        **meta,
        "thumbs": thumbs,
        "total": len(rows),
        "parts": len(parts),
        "fields": FIELDS,
        "strings": list(strings),
        "rows": parts[0],
    }
    atomic_write(data_path(output_dir), _script(f"window.{GLOBAL}=", document))
    for number, part in enumerate(parts[1:], start=1):
        chunk = {"page": meta.get("page"), "rows": part}
        atomic_write(part_path(output_dir, number), _script(f"{GLOBAL}Part({number},", chunk, ")"))
    stale = len(parts)
    while part_path(output_dir, stale).exists():  # a larger batch's parts, drawn before
        part_path(output_dir, stale).unlink()
        stale += 1


def part_path(output_dir: Path, number: int) -> Path:
    return OutputFolder(output_dir).state_dir / PART_FILE.format(number=number)


def _script(head: str, document: Mapping[str, Any], tail: str = "") -> bytes:
    """A script that hands `document` over as a JSON string: browsers read JSON several times
    faster than the same object written as a script literal."""
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    literal = json.dumps(text, ensure_ascii=False)
    # Inside a script a string literal stays one whatever a prompt says; no `<` can end a tag.
    literal = literal.replace("<", "\\u003c").replace("\u2028", "\\u2028")
    literal = literal.replace("\u2029", "\\u2029")
    return f"{head}JSON.parse({literal}){tail};\n".encode()


def _row(
    card: Mapping[str, Any], info: ShotInfo | None, strings: dict[str, int], thumbs: str
) -> list[Any]:
    info = info or ShotInfo(reroll=str(card["id"]))
    key = card.get("key") or ""
    image = card.get("image") or {}
    previous = card.get("previous") or {}
    change = card.get("change") or {}
    text = card.get("text")
    sent = f"prompt + {card['text_extra']}" if card.get("text_extra") else text
    cells: dict[str, Any] = {
        "id": card["id"],
        "status": card["status"],
        "change": change.get("label"),
        "reason": change.get("reason"),
        "prompt": card.get("prompt"),
        "sent": sent,
        "sent_label": ("simplified" if card.get("simplified") else "sent") if text else None,
        "negative": card.get("negative_prompt"),
        "size": card.get("size"),
        "seed": card.get("seed"),
        "model": card.get("model"),
        "provider": card.get("provider"),
        "style": card.get("style"),
        "error_code": card.get("error_code"),
        "error_message": card.get("error_message"),
        "request_id": card.get("request_id"),
        "attempts": card.get("attempts"),
        "key": card.get("key"),
        "file": 1 if image.get("href") == quote(f"{card['id']}.png") else image.get("href"),
        "thumb": 1
        if image.get("thumb") and image["thumb"] == _thumb(thumbs, key)
        else image.get("thumb"),
        "tw": image.get("width"),
        "th": image.get("height"),
        "prev_file": previous.get("href"),
        "prev_thumb": previous.get("thumb"),
        "prev_prompt": previous.get("prompt"),
        "prev_w": previous.get("width"),
        "prev_h": previous.get("height"),
        "base": info.base,
        "variant": info.variant,
        "values": info.values,
        "picked": 1 if info.picked else 0,
        "reroll": info.reroll,
        "reroll_note": info.reroll_note,
    }
    row = []
    for name in FIELDS:
        value = cells[name]
        if name in _INTERNED and isinstance(value, str):
            value = strings.setdefault(value, len(strings))
        row.append(value)
    # Trailing empty cells are left out: most shots have no error, change or variants.
    while row and row[-1] is None:
        row.pop()
    return row


def _read_script(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    start = text.index("JSON.parse(") + len("JSON.parse(")
    literal, _ = json.JSONDecoder().raw_decode(text, start)
    return json.loads(literal)


def _thumb(template: str, key: str) -> str:
    return template.replace("{k2}", key[:2]).replace("{key}", key)


def read_data(output_dir: Path) -> list[dict[str, Any]]:
    """The cards as dicts, read back from the data file (for tests and tools; the page reads
    it itself), the short forms written out."""
    document = _read_script(data_path(output_dir))
    rows = list(document["rows"])
    for number in range(1, document["parts"]):
        rows.extend(_read_script(part_path(output_dir, number))["rows"])
    fields, strings = document["fields"], document["strings"]
    cards = []
    for row in rows:
        card = dict.fromkeys(fields)
        for name, value in zip(fields, row, strict=False):
            interned = name in _INTERNED and isinstance(value, int)
            card[name] = strings[value] if interned else value
        if card["file"] == 1:
            card["file"] = quote(f"{card['id']}.png")
        if card["thumb"] == 1:
            card["thumb"] = _thumb(document["thumbs"], str(card["key"]))
        cards.append(card)
    return cards
