"""What the user reads: the plan table, the end-of-run summary, the JSON documents.

Takes plans and run reports; gives text for a terminal (live progress is
`imgbatch.review.progress`). Nothing here decides anything, so the same library calls can be
rendered differently by another front end.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rich.text import Text

from imgbatch.plan.decide import WORK_ACTIONS, Action, Plan, PlannedShot
from imgbatch.review.console import WORD_STYLES, counted
from imgbatch.shots.request import changed_fields
from imgbatch.units.money import Cost, as_json, format_money
from imgbatch.units.text import printable

if TYPE_CHECKING:
    from imgbatch.review.outcome import ApplyReport


def plan_table(plan: Plan, *, verbose: bool = False) -> Text:
    """One row per shot with something to do (and per orphan), then one line counting the
    unchanged shots, as Terraform does; `verbose` lists the unchanged shots too. Coloured by
    action (`imgbatch.review.console`); `.plain` is the text without colour."""
    rows = [
        item
        for item in (*plan.shots, *plan.orphans)
        if verbose or item.action is not Action.UNCHANGED
    ]
    hidden = 0 if verbose else plan.count(Action.UNCHANGED)
    table = Text()
    if rows:
        # Escaped: an orphan's id and a reason may be what a committed results.json says.
        ids = {item.id: printable(item.id) for item in rows}
        width = max([len("shot"), *(len(shown) for shown in ids.values())])
        table.append(f"{'shot'.ljust(width)}  {'action':<9}  why", style="bold")
        for item in rows:
            table.append(f"\n{ids[item.id].ljust(width)}  ")
            table.append(f"{item.action.value:<9}", style=WORD_STYLES.get(item.action.value, ""))
            table.append(f"  {printable(item.reason)}")
    if hidden:
        noun = "shot" if hidden == 1 else "shots"
        lead = "\n" if rows else ""
        table.append(f"{lead}{hidden} unchanged {noun} not listed (plan -v lists them)", "dim")
    return table


def plan_summary(plan: Plan) -> str:
    counts = ", ".join(
        f"{plan.count(action)} {action.value}" for action in Action if plan.count(action)
    )
    counts = counts or "no shot in this run"  # an empty shard (--shard K/N)
    paid = plan.paid_requests
    kind = "paid" if plan.metered else "offline"
    return f"Plan: {counts}. {paid} {kind} request{'s' if paid != 1 else ''}."


def estimate_line(plan: Plan) -> str | None:
    """The plan's estimated cost and where its prices come from; None when it sends no paid
    request (nothing to estimate)."""
    if not plan.paid_requests or not plan.metered or plan.prices is None:
        return None
    return f"Estimated cost: {_priced(plan.estimated_cost, plan)}."


def _priced(money: Cost, plan: Plan) -> str:
    """An amount and where its prices come from; an unknown one says what is missing."""
    source = plan.prices.source if plan.prices else "no prices"
    if money.amount is None:
        return (
            f"unknown, no price for {', '.join(money.unpriced)} ({source}; give one under "
            "pricing: in the manifest)"
        )
    return f"{format_money(money)} ({source})"


def plan_json(plan: Plan) -> dict[str, Any]:
    """`plan --json`: each shot (orphans last) with what it is expected to cost, the counts and
    the estimate; a cost is null where a price is unknown, `currency` null where nothing is
    priced (the offline placeholder)."""
    shots = [
        {
            "id": item.id,
            "action": item.action.value,
            "reason": item.reason,
            "changed": _changed(item),
            "cost": as_json(plan.cost_of(item)),
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
            Action.RECOVER,
            Action.DRIFT,
            Action.ORPHAN,
        )
    }
    summary["paid_requests"] = plan.paid_requests
    estimate = plan.estimated_cost
    summary["estimated_cost"] = as_json(estimate)
    summary["currency"] = estimate.currency
    return {"shots": shots, "summary": summary}


def _changed(item: PlannedShot) -> list[str] | None:
    """The request fields a replace changes; None for every other action."""
    if item.action is not Action.REPLACE or item.previous is None or item.shot is None:
        return None
    return changed_fields(dict(item.previous.request), item.shot.request.canonical())


def apply_json(report: ApplyReport) -> dict[str, Any]:
    """`apply --json`: what the run did to each shot, in manifest order (`unchanged` for a shot
    it left alone, `drift` for one whose hand-edited file it kept, `not_run` with why for one it
    stopped before, else its entry's status; `moved_aside`: where an edited file went before a
    new image took its place), the counts, whether a bound stopped it and how many shots
    remain, and where results.json is."""
    shots = [
        {
            "id": shot.id,
            "status": shot.status,
            # A shot not run: its file (if it has one from before) is still there, untouched.
            "file": shot.file,
            "error": shot.error,
            "error_code": shot.error_code,
            "request_id": shot.request_id,
            "moved_aside": shot.moved_aside,
        }
        for shot in report.shots
        # Left alone with no entry to show (a drift that never had one): not listed.
        if shot.entry is not None or shot.status == "not_run"
    ]
    summary = {
        "generated": report.count("generated"),
        "cached": report.count("cached"),
        "from_store": report.count("from_store"),
        "failed": report.count("failed"),
        "unfetched": report.count("unfetched"),
        "not_run": report.count("not_run"),
        "unchanged": report.unchanged,
        "drift": report.count("drift"),
        "requests": report.requests,
        "billed": report.billed,
        "throttled": report.throttled,
        "retries": report.retries,
        "cost": as_json(report.cost),
        "possible_extra_cost": as_json(report.possible_extra_cost),
        "currency": report.cost.currency,
        "interrupted": report.interrupted,
        "bounded": report.bounded,
        "remaining": report.remaining,
    }
    pruned = [
        {"id": item.id, "file": item.file, "removed": item.removed, "reason": item.reason}
        for item in report.pruned
    ]
    document: dict[str, Any] = {
        "shots": shots,
        "summary": summary,
        "pruned": pruned,
        "results": str(report.results_path),
    }
    if report.store is not None:
        document["store"] = store_json(report)
    return document


def store_json(report: ApplyReport) -> dict[str, Any]:
    """A run's use of its shared store: the requests it sent it, by operation and per image."""
    use = report.store
    assert use is not None
    images = max(1, sum(1 for item in report.plan.shots if item.action in WORK_ACTIONS))
    return {
        "url": use.url,
        "read_only": use.read_only,
        "requests": dict(sorted(use.requests.items())),
        "requests_per_image": round(use.total_requests / images, 2),
        "restored": use.restored,
        "published": use.published,
        "damaged": [{"id": shot_id, "message": message} for shot_id, message in use.notices],
        "kept_local": use.kept_local,
    }


def store_line(report: ApplyReport) -> str | None:
    """`Store s3://...: N requests (...), R restored, P published.`, with a store."""
    use = report.store
    if use is None:
        return None
    ops = ", ".join(f"{count} {op}" for op, count in sorted(use.requests.items()))
    mode = " (read-only)" if use.read_only else ""
    line = (
        f"Store {use.url}{mode}: {use.total_requests} request"
        f"{'s' if use.total_requests != 1 else ''}{f' ({ops})' if ops else ''}, "
        f"{use.restored} image{'s' if use.restored != 1 else ''} restored, "
        f"{use.published} published."
    )
    if use.kept_local:
        copies = "copy" if use.kept_local == 1 else "copies"
        line += (
            f" {use.kept_local} local {copies} kept: a gc of the store is at work, or may be "
            "(gc/ in the store); the next apply drops them."
        )
    return "\n".join([line, *(f"  {shot_id}: {message}" for shot_id, message in use.notices)])


def apply_summary(report: ApplyReport, *, quiet: bool = False) -> str:
    """The end-of-run summary. `quiet` (`apply --quiet`): its first line (counts, requests,
    429s) and, if the run stopped, why and how many shots it left (a bounded CI job's log needs
    that)."""
    head = _counts_line(report)
    stopped = _stop_lines(report)
    if quiet:
        return "\n".join([head, *stopped])
    lines = [head]
    if report.plan.metered:
        lines.append(cost_line(report))
    shared = store_line(report)
    if shared:
        lines.append(shared)
    lines.extend(
        f"Edited by hand, moved aside: {shot_id} -> {name}"
        for shot_id, name in report.moved_aside.items()
    )
    lines.extend(quota_lines(report))
    lines.extend(prune_lines(report))
    lines.extend(stopped)
    lines.append(f"Results: {shown_path(report.results_path)}")
    return "\n".join(lines)


def quiet_summary(report: ApplyReport) -> str:
    """`apply --quiet`'s summary: see `apply_summary`."""
    return apply_summary(report, quiet=True)


def _counts_line(report: ApplyReport) -> str:
    parts = [
        f"{report.count('generated')} generated",
        f"{report.count('cached')} cached",
        f"{report.count('failed')} failed",
        f"{report.unchanged} unchanged",
    ]
    from_store = report.count("from_store")
    if from_store or report.store is not None:
        # Made, and paid for, by another run sharing the store: not this run's.
        parts.insert(2, f"{from_store} from the store")
    unfetched = report.count("unfetched")
    if unfetched:
        parts.insert(3, f"{unfetched} billed but not downloaded (the next apply fetches them)")
    drift = report.count("drift")
    if drift:
        parts.append(f"{drift} edited by hand and kept (--overwrite-edited puts them back)")
    if report.count("not_run"):
        parts.append(f"{report.count('not_run')} not run")
    if not report.plan.metered:
        sent = f"{report.requests} offline request{'s' if report.requests != 1 else ''}"
    else:
        # Only images are billed: refusals, errors and unreachable servers cost nothing.
        sent = (
            f"{report.requests} request{'s' if report.requests != 1 else ''} sent, "
            f"{report.billed} image{'s' if report.billed != 1 else ''} billed"
        )
        if report.maybe_billed:
            sent += f" (+{report.maybe_billed} whose answer was lost, maybe billed)"
    return (
        f"Done in {report.elapsed:.1f} s: {', '.join(parts)}; {sent}, "
        f"{counted(report.retries, 'retry', 'retries')}, "
        f"{report.throttled} throttled (429)."
    )


def _stop_lines(report: ApplyReport) -> list[str]:
    """Why the run stopped, and the shots it left for the next apply."""
    lines = [f"Stopped: {report.stopped}"] if report.stopped else []
    if report.remaining:
        count = report.remaining
        if report.bounded:
            lines.append(
                f"{count} shot{'s' if count != 1 else ''} remain{'s' if count == 1 else ''}; "
                "run again to continue."
            )
        else:
            lines.extend(_not_run_lines(report))
    return lines


def _not_run_lines(report: ApplyReport) -> list[str]:
    """Shots never sent apart from those sent and abandoned (or whose earlier try lost its
    answer): saying of those that nothing was sent would hide what may have been billed."""
    sent = [shot_id for shot_id in report.not_run if shot_id in report.maybe_billed_not_run]
    lines = []
    untouched = len(report.not_run) - len(sent)
    if untouched:
        lines.append(
            f"{untouched} shot{'s' if untouched != 1 else ''} not run: nothing of theirs was "
            "sent or changed, and the next apply makes them."
        )
    if sent:
        one = len(sent) == 1
        lines.append(
            f"{len(sent)} shot{'' if one else 's'} sent and not answered ({', '.join(sent)}): "
            f"DashScope may have billed {'it' if one else 'them'}; nothing of "
            f"{'its' if one else 'theirs'} changed, and the next apply sends "
            f"{'it' if one else 'them'} again."
        )
    return lines


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path as the user reads it: `output/x/results.json`, never `manifests/../output/...`.

    >>> shown_path("manifests/../output/cyclist-spot/results.json")
    'output/cyclist-spot/results.json'
    """
    return os.path.normpath(path)


def cost_line(report: ApplyReport) -> str:
    """What the run cost: the images billed, and what lost answers may add; a run that billed
    nothing says so, without the price list it did not need."""
    if not report.billed and not report.maybe_billed:
        return "Cost: nothing billed."
    line = f"Cost: {_priced(report.cost, report.plan)}"
    if report.maybe_billed:
        extra = format_money(report.possible_extra_cost)
        line += (
            f"; up to {extra} more if the {report.maybe_billed} request"
            f"{'s' if report.maybe_billed != 1 else ''} whose answer was lost were billed"
        )
    return line + "."


def prune_lines(report: ApplyReport) -> list[str]:
    """What `--prune` did: the orphans that left the results, and the files it kept, and why."""
    if not report.pruned:
        return []
    removed = [item for item in report.pruned if item.removed]
    kept = [item for item in report.pruned if not item.removed]
    lines = []
    if removed:
        files = [item.file for item in removed if item.file and item.reason == "removed"]
        text = f"Pruned {len(removed)} orphaned shot{'s' if len(removed) != 1 else ''}"
        text += f" from the results; removed {', '.join(files)}" if files else " from the results"
        lines.append(text + ".")
    lines.extend(
        f"Kept orphan {item.id} ({item.file}): {item.reason}; delete it yourself and the next "
        "--prune drops its entry."
        if item.file
        else f"Kept orphan {item.id}: {item.reason}."
        for item in kept
    )
    return lines


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
                limits.append(f"{counted(window.count, 'request')} per {window.period:g} s")
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
