"""What the user reads: the plan table, live progress, the end-of-run summary.

Takes plans, result entries and run reports; gives text for a terminal. Nothing here decides
anything, so the same library calls can be rendered differently by another front end.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

import click

from imgbatch.errors import NoImageError
from imgbatch.executor import Notice, Retrying, RunEvent, Stopping
from imgbatch.plan import Action, Plan, PlannedShot
from imgbatch.providers import is_metered
from imgbatch.request import changed_fields

if TYPE_CHECKING:
    from imgbatch.api import ApplyReport

_ACTION_STYLE = {
    Action.CREATE: "green",
    Action.REPLACE: "yellow",
    Action.UNCHANGED: None,
    Action.RESTORE: "cyan",
    Action.ORPHAN: "magenta",
}


def plan_table(plan: Plan) -> str:
    rows = [(item.id, item.action, item.reason) for item in (*plan.shots, *plan.orphans)]
    width = max([len("shot"), *(len(shot_id) for shot_id, _, _ in rows)])
    lines = [f"{'shot'.ljust(width)}  {'action':<9}  why"]
    for shot_id, action, reason in rows:
        label = click.style(f"{action.value:<9}", fg=_ACTION_STYLE[action])
        lines.append(f"{shot_id.ljust(width)}  {label}  {reason}")
    return "\n".join(lines)


def plan_summary(plan: Plan) -> str:
    counts = ", ".join(
        f"{plan.count(action)} {action.value}" for action in Action if plan.count(action)
    )
    paid = plan.paid_requests
    kind = "paid" if is_metered(plan.provider) else "offline"
    return f"Plan: {counts}. {paid} {kind} request{'s' if paid != 1 else ''}."


def plan_json(plan: Plan) -> dict[str, Any]:
    """`plan --json`: each shot (orphans last) and the counts. No price table yet, so `cost`
    and `estimated_cost` are null."""
    shots = [
        {
            "id": item.id,
            "action": item.action.value,
            "reason": item.reason,
            "changed": _changed(item),
            "cost": None,
        }
        for item in (*plan.shots, *plan.orphans)
    ]
    summary: dict[str, Any] = {
        action.value: plan.count(action)
        for action in (
            Action.CREATE,
            Action.REPLACE,
            Action.UNCHANGED,
            Action.RESTORE,
            Action.ORPHAN,
        )
    }
    summary["paid_requests"] = plan.paid_requests
    summary["estimated_cost"] = None
    return {"shots": shots, "summary": summary}


def _changed(item: PlannedShot) -> list[str] | None:
    """The request fields a replace changes; None for every other action."""
    if item.action is not Action.REPLACE or item.previous is None or item.shot is None:
        return None
    return changed_fields(dict(item.previous.request), item.shot.request.canonical())


def apply_json(report: ApplyReport) -> dict[str, Any]:
    """`apply --json`: what the run did to each shot, in manifest order (`unchanged` for a shot
    it left alone, `not_run` with why for one it stopped before, else its entry's status), the
    counts, whether a bound stopped it and how many shots remain, and where results.json is."""
    unchanged = {item.id for item in report.plan.shots if item.action is Action.UNCHANGED}
    by_id = {entry.id: entry for entry in report.entries}
    shots: list[dict[str, Any]] = []
    for item in report.plan.shots:
        entry = by_id.get(item.id)
        reason = report.not_run.get(item.id)
        if reason is not None:
            # Its file (if it has one from before) is still there, untouched.
            shots.append(
                {
                    "id": item.id,
                    "status": "not_run",
                    "file": entry.file if entry else None,
                    "error": reason,
                    "error_code": None,
                    "request_id": None,
                }
            )
            continue
        assert entry is not None  # every shot the run did not skip has an entry
        shots.append(
            {
                "id": entry.id,
                "status": "unchanged" if entry.id in unchanged else entry.status,
                "file": entry.file,
                "error": entry.error,
                "error_code": entry.error_code,
                "request_id": entry.request_id,
            }
        )
    summary = {
        "generated": report.count("generated"),
        "cached": report.count("cached"),
        "failed": report.count("failed"),
        "not_run": len(report.not_run),
        "unchanged": report.unchanged,
        "requests": report.requests,
        "billed": report.billed,
        "throttled": report.throttled,
        "retries": report.retries,
        "cost": None,
        "interrupted": report.interrupted,
        "bounded": report.bounded,
        "remaining": report.remaining,
    }
    return {"shots": shots, "summary": summary, "results": str(report.results_path)}


class Progress:
    """Live done/total, failures and rate on stderr: one rewritten line on a terminal, a line
    every few seconds in CI logs."""

    def __init__(self, total: int, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.interval = interval if not self.interactive else 0.1
        self.started = time.monotonic()
        self.last_shown = 0.0
        self.done = self.failed = self.generated = self.retries = 0

    def __call__(self, event: RunEvent) -> None:
        if isinstance(event, Retrying):
            if isinstance(event.error, NoImageError):
                # The seed's rule: never quietly; say which request gave no image.
                self._line(
                    f"{event.shot_id}: the service answered without an image (request "
                    f"{event.error.request_id or 'unknown'}); asking once more with a "
                    "simplified prompt",
                    permanent=True,
                )
                return
            self.retries += 1
            return
        if isinstance(event, Notice):
            self._line(f"note {event.shot_id}: {event.message}", permanent=True)
            return
        if isinstance(event, Stopping):
            self._line(stopping_line(event), permanent=True)
            return
        self.done += 1
        if event.status == "failed":
            self.failed += 1
            self._line(f"failed {event.id}: {event.error}", permanent=True)
        elif event.status == "generated":
            self.generated += 1
        now = time.monotonic()
        if now - self.last_shown >= self.interval or self.done == self.total:
            self.last_shown = now
            self._line(self.status(now), permanent=not self.interactive)

    def status(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        return (
            f"[{self.done}/{self.total}] {self.generated} generated, {self.failed} failed, "
            f"{self.retries} retries, {self.generated / elapsed:.1f} images/s"
        )

    def _line(self, text: str, *, permanent: bool) -> None:
        if self.interactive:
            self.stream.write("\r\033[K" + text + ("\n" if permanent else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive and self.done:
            self.stream.write("\n")
            self.stream.flush()


def stopping_line(event: Stopping) -> str:
    """The moment a run stops sending, or abandons what is in flight, said at once."""
    count = event.in_flight
    requests = f"{count} request{'s' if count != 1 else ''} in flight"
    billing = "; DashScope bills those it answers with an image" if event.metered else ""
    if event.abandoning:
        text = f"Abandoning the {requests}{billing}."
        if event.writing:
            images = f"{event.writing} image{'s' if event.writing != 1 else ''}"
            text += (
                f" Writing the {images} already received; {event.again} again to stop without them."
            )
        return text
    text = f"{event.reason[:1].upper()}{event.reason[1:]}: sending nothing new"
    if not count:
        return text + "."
    if event.grace is None:
        return f"{text}; waiting for the {requests} to finish."
    return (
        f"{text}; waiting up to {event.grace:g} s for the {requests} to finish{billing}. "
        f"{event.again} again to abandon them."
    )


def apply_summary(report: ApplyReport) -> str:
    parts = [
        f"{report.count('generated')} generated",
        f"{report.count('cached')} cached",
        f"{report.count('failed')} failed",
        f"{report.unchanged} unchanged",
    ]
    if report.not_run:
        parts.append(f"{len(report.not_run)} not run")
    if not is_metered(report.plan.provider):
        sent = f"{report.requests} offline request{'s' if report.requests != 1 else ''}"
    else:
        # Only images are billed: refusals, errors and unreachable servers cost nothing.
        sent = (
            f"{report.requests} request{'s' if report.requests != 1 else ''} sent, "
            f"{report.billed} image{'s' if report.billed != 1 else ''} billed"
        )
        if report.maybe_billed:
            sent += f" (+{report.maybe_billed} whose answer was lost, maybe billed)"
    lines = [
        f"Done in {report.elapsed:.1f} s: {', '.join(parts)}; {sent}, {report.retries} retries, "
        f"{report.throttled} throttled (429)."
    ]
    lines.extend(quota_lines(report))
    if report.stopped:
        lines.append(f"Stopped: {report.stopped}")
    if report.remaining:
        count = report.remaining
        if report.bounded:
            lines.append(
                f"{count} shot{'s' if count != 1 else ''} remain{'s' if count == 1 else ''}; "
                "run again to continue."
            )
        else:
            lines.append(
                f"{count} shot{'s' if count != 1 else ''} not run: nothing of theirs was sent or "
                "changed, and the next apply makes them."
            )
    lines.append(f"Results: {report.results_path}")
    return "\n".join(lines)


def quota_lines(report: ApplyReport) -> list[str]:
    """What the run knew of each model's quota, where it came from, and whether it is kept."""
    lines = []
    for note in report.quotas:
        finding = note.finding
        limits = []
        if finding.source != "probing":
            window = finding.window
            if window.count == 1 and window.period < 1:
                limits.append(f"{1 / window.period:.3g} requests a second, evenly spaced")
            else:
                limits.append(f"{window.count} requests per {window.period:g} s")
        if finding.cap is not None and finding.cap_confirmed:
            limits.append(f"{finding.cap} in progress at once")
        if not limits:
            continue
        where = {
            "given": "as given",
            "stated": "as the service stated it",
            "learned": "as learned by an earlier run",
            "probed": "found from the 429s",
            "probing": "found from the 429s",
        }[finding.source]
        if finding.source == "learned" or (note.learned_before and finding.source == "probing"):
            where = "as learned by an earlier run"
        text = f"Quota for {finding.model}: {' and '.join(limits)} ({where})"
        if note.saved:
            text += "; remembered for the next run (--quota overrides it)"
        lines.append(text + ".")
    return lines
