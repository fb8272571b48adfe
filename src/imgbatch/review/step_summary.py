"""A GitHub Actions job summary: `plan` and `apply` append markdown to `$GITHUB_STEP_SUMMARY`.

Takes the documents `plan --json` and `apply --json` print (`report.plan_json`,
`report.apply_json`), so the summary says exactly what the machine-readable output says and
follows it as actions, statuses and cost fields are added; gives markdown: the counts, the
requests and cost, and a table of the shots that have something to do (plan) or that the run
changed or failed (apply), at most `MAX_ROWS` rows and then "and N more". Text that comes from
users or the service (reasons, errors) is escaped so it cannot break the table or render as
markup.

`append` adds it to the file GitHub names. A summary is a courtesy, never a reason to fail a
run: a missing folder or an unwritable file gives a warning to print instead.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

ENVIRONMENT_VARIABLE = "GITHUB_STEP_SUMMARY"
MAX_ROWS = 50
MAX_CELL = 300  # characters of one reason or error: a table, not a log
# Every character markdown could read as markup: CommonMark lets any ASCII punctuation be
# escaped with a backslash, and GitHub's tables treat `\|` as a literal bar.
_MARKUP = re.compile(r"([\\`*_{}\[\]<>()#+!|~&])")


def plan_markdown(document: Mapping[str, Any], title: str, *, metered: bool = True) -> str:
    """The summary of `plan --json`'s document; `metered`: whether its provider bills."""
    shots: Sequence[Mapping[str, Any]] = document["shots"]
    summary: Mapping[str, Any] = document["summary"]
    counts = Counter(str(shot["action"]) for shot in shots)
    paid = summary.get("paid_requests", 0)
    facts = [
        _counts(counts) or "no shots",
        f"{paid} {'paid' if metered else 'offline'} request{'s' if paid != 1 else ''}",
        f"estimated cost: {_money(summary.get('estimated_cost'), summary.get('currency'))}",
    ]
    rows = [
        (str(shot["id"]), str(shot["action"]), shot.get("reason"))
        for shot in shots
        if shot["action"] != "unchanged"
    ]
    return _section(title, facts, ("shot", "action", "why"), rows)


def apply_markdown(
    document: Mapping[str, Any], title: str, *, stopped: str | None = None, metered: bool = True
) -> str:
    """The summary of `apply --json`'s document, and why the run stopped early, if it did."""
    shots: Sequence[Mapping[str, Any]] = document["shots"]
    summary: Mapping[str, Any] = document["summary"]
    counts = Counter(str(shot["status"]) for shot in shots)
    requests = summary.get("requests", 0)
    currency = summary.get("currency")
    cost = _money(summary.get("cost"), currency)
    if summary.get("possible_extra_cost"):
        # Requests whose answer was lost may have been billed too.
        cost += f" (+{_money(summary['possible_extra_cost'], currency)} possibly)"
    facts = [
        _counts(counts) or "no shots",
        f"{requests} {'' if metered else 'offline '}request{'s' if requests != 1 else ''} sent",
        f"{summary.get('throttled', 0)} throttled (429)",
        f"cost: {cost}",
    ]
    rows = [
        (str(shot["id"]), str(shot["status"]), shot.get("error"))
        for shot in shots
        if shot["status"] != "unchanged"
    ]
    lines = _section(title, facts, ("shot", "status", "error"), rows)
    if stopped:
        lines += f"\nStopped: {_cell(stopped)}\n"
    remaining = summary.get("remaining")
    if remaining:
        left = "1 shot remains" if remaining == 1 else f"{remaining} shots remain"
        lines += f"\n{left}: run again to continue.\n"
    return lines


def error_markdown(command: str, message: str, exit_code: int) -> str:
    """The summary of a command that ended in an error (a `--frozen` refusal, a bad manifest, a
    cost limit): the check CI ran said no, and the job's page should say why."""
    lines = message.splitlines() or [""]
    shown = [f"- {_cell(line)}" for line in lines[:MAX_ROWS]]
    if len(lines) > MAX_ROWS:
        shown.append(f"- and {len(lines) - MAX_ROWS} more lines")
    name = " ".join(command.split()).replace("`", "'")
    return "\n".join([f"### `{name}` failed (exit {exit_code})", "", *shown, ""]) + "\n"


def append(text: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Append `text` to the step summary file, if GitHub named one; a warning if it failed."""
    environ = os.environ if environ is None else environ
    path = environ.get(ENVIRONMENT_VARIABLE)
    if not path:
        return None
    try:
        # Appended, not replaced through a temporary file: the file is GitHub's, and holds the
        # summaries of the job's earlier steps.
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        return f"the job summary was not written to {path} ({exc.strerror or exc})"
    return None


def _section(
    title: str,
    facts: Sequence[str],
    header: tuple[str, str, str],
    rows: Sequence[tuple[str, str, str | None]],
) -> str:
    # The command as a code span: a path's underscores are not emphasis there.
    command = " ".join(title.split()).replace("`", "'")
    lines = [f"### `{command}`", "", " · ".join(facts), ""]
    if rows:
        lines.append(f"| {' | '.join(header)} |")
        lines.append("|---|---|---|")
        for shot_id, what, text in rows[:MAX_ROWS]:
            lines.append(f"| {_cell(shot_id)} | {_cell(what)} | {_cell(text or '')} |")
        if len(rows) > MAX_ROWS:
            lines.extend(["", f"and {len(rows) - MAX_ROWS} more"])
        lines.append("")
    return "\n".join(lines) + "\n"


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{count} {name}" for name, count in counts.items())


def _money(value: Any, currency: Any = None) -> str:
    """A cost as the JSON gives it (null: no price known) with its currency: cents at least,
    and the fractions of a cent a per-image price can have."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "unknown"
    digits = f"{value:.4f}".rstrip("0")
    digits += "0" * max(0, 2 - len(digits.partition(".")[2]))
    return _cell(f"{digits} {currency}" if isinstance(currency, str) else digits)


def _cell(text: str) -> str:
    """`text` on one line, shortened, with every markup character escaped."""
    flat = " ".join(text.split())
    if len(flat) > MAX_CELL:
        flat = flat[: MAX_CELL - 1] + "…"
    return _MARKUP.sub(r"\\\1", flat)
