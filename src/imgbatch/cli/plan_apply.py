"""`imgbatch plan` and `imgbatch apply`: what would change, then make it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from imgbatch.cli.common import (
    EXIT_CHANGES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REMAINING,
    FiniteFloatRange,
    _cost_limit_option,
    _duration_option,
    _progress_interval,
    _quota_option,
    _step_summary,
    _title,
    _verbosity,
    allow_outside_option,
    error_boundary,
    force_option,
    manifest_argument,
    no_local_copy_option,
    only_option,
    overwrite_edited_option,
    provider_option,
    say_error,
    shard_option,
    store_option,
    store_read_only_option,
    verbosity_options,
)
from imgbatch.errors import EXIT_FAILED, ConfigError, ImgbatchError
from imgbatch.manifest.catalogue import MIN_RPS

if TYPE_CHECKING:
    from imgbatch.plan.decide import Plan
    from imgbatch.review.console import Verbosity
    from imgbatch.review.outcome import ApplyReport
    from imgbatch.review.progress import Progress

F = TypeVar("F", bound=Callable[..., Any])


class DetailedExitCommand(click.Command):
    """With `--detailed-exitcode`, exit code 2 means "something to do", so a bad option exits 1
    (an error), as Terraform's does."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        detailed = "--detailed-exitcode" in args  # before parsing: the parser consumes `args`
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if detailed:
                raise _UsageErrorExit1(exc.format_message(), exc.ctx) from None
            raise


class _UsageErrorExit1(click.UsageError):
    exit_code = EXIT_FAILED


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator for several options, as if stacked in this order above a command (so
    listed in this order by --help)."""

    def decorate(function: F) -> F:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return decorate


# What a plan is made from: plan and apply take these alike (the names of `make_plan`'s
# keyword arguments and of `ApplyOptions`'s fields), so plan shows what apply would do.
planning_options = _options(
    manifest_argument,
    provider_option,
    allow_outside_option,
    overwrite_edited_option,
    only_option,
    force_option,
    store_option,
    no_local_copy_option,
)


@click.command(cls=DetailedExitCommand)
@planning_options
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 0 when there is nothing to do, 2 when some shot would be created, replaced, "
    "restored or recovered, 1 on any error (invalid manifest or options included).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the plan as one JSON document on stdout."
)
@verbosity_options
@error_boundary
def plan(
    manifest: Path, detailed_exitcode: bool, as_json: bool, verbosity: str | None, **options: Any
) -> int:
    """Show the shots apply would change, and why (-v: every shot); nothing is sent or
    downloaded."""
    from imgbatch.run.apply import make_plan

    level = _verbosity(verbosity)
    try:
        result = make_plan(manifest, **options)
    except ImgbatchError as exc:
        if not detailed_exitcode or exc.exit_code != EXIT_CHANGES:
            raise
        # 2 means "changes pending" here: an invalid shot list is an error like any other.
        return say_error(exc, manifest, EXIT_FAILED)
    _show_plan(result, level, as_json)
    _plan_documents(result, _title("plan", manifest, options["only"]), as_json)
    if detailed_exitcode and result.has_work:
        return EXIT_CHANGES
    return EXIT_OK


def _show_plan(result: Plan, level: Verbosity, as_json: bool) -> None:
    """The plan for a person: its table (-v: every shot; none with -q), summary and estimate,
    on stdout, or on stderr with --json (stdout is then the document alone)."""
    from imgbatch.review.console import Verbosity, console_for
    from imgbatch.review.report import estimate_line, plan_summary, plan_table

    out = console_for(sys.stderr if as_json else sys.stdout)
    _note_missing_key(out, result)
    table = plan_table(result, verbose=level is Verbosity.VERBOSE)
    if table and level is not Verbosity.QUIET:
        out.print(table)
    out.print(plan_summary(result))
    estimate = estimate_line(result)
    if estimate and level is not Verbosity.QUIET:
        out.print(estimate)


def _note_missing_key(out: Any, result: Plan) -> None:
    """First, not after a paid plan that looks ready: apply would stop at the key."""
    if result.provider != "dashscope" or not result.has_work:
        return
    from imgbatch.providers.dashscope_credentials import resolve_api_key

    try:
        resolve_api_key(os.environ)
    except ConfigError as exc:
        out.print(f"Note: apply would stop before sending anything: {exc}")


def _say_files(report: Any, *, quiet: bool, as_json: bool) -> None:
    """After apply's summary: the contact sheet (or why it was not drawn), the picked takes."""
    from imgbatch.review.report import shown_path

    if report.sheet_problem:
        click.echo(f"warning: {report.sheet_problem}", err=True)
    elif report.sheet and not quiet:
        click.echo(f"Contact sheet: {shown_path(report.sheet)}", err=as_json)
    if report.picked and not quiet:
        click.echo(f"Picked takes written: {', '.join(report.picked)}", err=as_json)


def _plan_documents(result: Plan, title: str, as_json: bool) -> None:
    """`plan --json`'s document on stdout, and the CI step summary when there is one."""
    from imgbatch.review.report import plan_json

    summarize = bool(os.environ.get("GITHUB_STEP_SUMMARY"))
    document = plan_json(result) if as_json or summarize else {}
    if as_json:
        click.echo(json.dumps(document, ensure_ascii=False))
    if summarize:
        from imgbatch.review.step_summary import plan_markdown

        _step_summary(plan_markdown(document, title, metered=result.metered))


# How fast apply sends: ApplyOptions' rps, quota and concurrency.
pacing_options = _options(
    click.option(
        "--rps",
        type=FiniteFloatRange(min=MIN_RPS),
        default=None,
        help=f"Requests started per second at most, evenly spaced, at least {MIN_RPS} "
        "(default: the manifest's limits.rps, else as for --quota).",
    ),
    click.option(
        "--quota",
        metavar="K/P",
        default=None,
        callback=lambda _context, _parameter, value: _quota_option(value),
        help="The account's quota: K requests per period, such as 2/60s, 2/min or 25/s; the "
        "first K may go at once (default: the manifest's limits.quota, else the quota learned "
        "by an earlier run, else found by probing). Wins over --rps.",
    ),
    click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=None,
        help="Requests in flight at most (default: the manifest's limits.concurrency, else 512 "
        "for a service, where the rate decides, and the drawing threads for the placeholder).",
    ),
)
# When apply stops sending: ApplyOptions' max_requests, max_duration and max_cost.
bound_options = _options(
    click.option(
        "--max-requests",
        type=click.IntRange(min=1),
        default=None,
        help="Send at most N requests (retries included), then stop: requests in flight "
        "finish, everything is written, and apply exits 3 if shots remain (run it again to "
        "continue).",
    ),
    click.option(
        "--max-duration",
        metavar="DURATION",
        default=None,
        callback=lambda _context, _parameter, value: _duration_option(value),
        help="Send no request after this long, such as 45s, 90m, 5h or 1h30m (counted from the "
        "start of sending); then as for --max-requests. Leave the requests in flight time to "
        "finish within a CI job's limit.",
    ),
    click.option(
        "--max-cost",
        metavar="AMOUNT",
        default=None,
        callback=lambda _context, _parameter, value: _cost_limit_option(value),
        help="The most the run may cost, such as 5 or '5 USD' (in the prices' currency): exit "
        "1 before sending or writing anything if the estimate exceeds it; stop sending before "
        "the images billed could, then as for --max-requests (default: the manifest's "
        "limits.max_cost).",
    ),
)
# What else apply does, or may not do: ApplyOptions' simplify, frozen, prune, store_read_only
# and shard.
run_options = _options(
    click.option(
        "--no-simplify",
        "simplify",
        is_flag=True,
        flag_value=False,
        default=True,
        help="After a 200 without an image, fail the shot instead of asking once more with a "
        "simplified prompt.",
    ),
    click.option(
        "--frozen",
        is_flag=True,
        help="Send no paid request: exit 1, naming them, if any shot would need one (create or "
        "replace), before sending or writing anything. Restores from the cache still happen.",
    ),
    click.option(
        "--prune",
        is_flag=True,
        help="Remove the files of orphaned shots (in the results, no longer in the manifest) "
        "and their entries; a file changed since imgbatch wrote it is kept. Never the cache.",
    ),
    store_read_only_option,
    shard_option,
)


@click.command("apply")
@planning_options
@pacing_options
@bound_options
@run_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print what the run did as one JSON document on stdout (the summary goes to stderr).",
)
@verbosity_options
@error_boundary
def apply_command(manifest: Path, as_json: bool, verbosity: str | None, **options: Any) -> int:
    """Generate the shots whose request changed; write images and results.json."""
    from imgbatch.review.console import Verbosity, console_for
    from imgbatch.review.report import apply_summary, quiet_summary

    level = _verbosity(verbosity)
    quiet = level is Verbosity.QUIET
    report = _run_apply(manifest, options, level)
    if report.replanned and level is Verbosity.VERBOSE:
        click.echo(
            "note: another process changed the output folder between the plan and the lock; "
            "planned again under the lock",
            err=True,
        )
    console_for(sys.stderr if as_json else sys.stdout).print(
        quiet_summary(report) if quiet else apply_summary(report)
    )
    _say_files(report, quiet=quiet, as_json=as_json)
    _apply_documents(report, _title("apply", manifest, options["only"]), as_json)
    if report.interrupted:
        return EXIT_INTERRUPTED
    if report.bounded and report.remaining:
        return EXIT_REMAINING
    return EXIT_OK if report.ok else EXIT_FAILED


def _run_apply(manifest: Path, options: dict[str, Any], level: Verbosity) -> ApplyReport:
    """Apply `manifest` with `options` (every option is an `ApplyOptions` field by name),
    with the run's progress on stderr: the plan announced once it is made, then the shots."""
    from imgbatch.review.progress import DEFAULT_INTERVAL, Progress
    from imgbatch.run.apply import ApplyOptions, apply

    progress = Progress(
        sys.stderr, verbosity=level, interval=_progress_interval() or DEFAULT_INTERVAL
    )
    try:
        return apply(
            manifest,
            ApplyOptions(**options),
            listener=progress,
            on_plan=partial(_announce, progress, options["provider"], level),
        )
    finally:
        progress.close()


def _announce(progress: Progress, provider: str | None, level: Verbosity, planned: Plan) -> None:
    """Before apply sends anything: the placeholder said if it is used, the plan's summary and
    estimate (not with -q), and the progress started with the shots to work on."""
    from imgbatch.plan.decide import WORK_ACTIONS
    from imgbatch.review.console import Verbosity
    from imgbatch.review.report import estimate_line, plan_summary

    quiet = level is Verbosity.QUIET
    # Even with --quiet, a fallback to placeholders is said: it is not what a key would do.
    if not planned.metered and (provider == "auto" or not quiet):
        # With --provider auto the fallback must never be silent: say why.
        lead = (
            "No DashScope API key is configured, so --provider auto uses"
            if provider == "auto"
            else "Using"
        )
        click.echo(
            f"{lead} the offline placeholder provider: labelled stand-in images, no API "
            "calls, no cost.",
            err=True,
        )
    if not quiet:
        click.echo(plan_summary(planned), err=True)
        estimate = estimate_line(planned)
        if estimate:
            click.echo(estimate, err=True)
    # A drift (an edit kept) is left alone like an unchanged shot: no event will come.
    progress.start(sum(1 for item in planned.shots if item.action in WORK_ACTIONS))


def _apply_documents(report: ApplyReport, title: str, as_json: bool) -> None:
    """`apply --json`'s document on stdout, and the CI step summary when there is one."""
    from imgbatch.review.report import apply_json

    summarize = bool(os.environ.get("GITHUB_STEP_SUMMARY"))
    document = apply_json(report) if as_json or summarize else {}
    if as_json:
        click.echo(json.dumps(document, ensure_ascii=False))
    if summarize:
        from imgbatch.review.step_summary import apply_markdown

        metered = report.plan.metered
        _step_summary(apply_markdown(document, title, stopped=report.stopped, metered=metered))
