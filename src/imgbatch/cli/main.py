"""The `imgbatch` command: parse flags, call one library function, print, return an exit code.

Exit codes: 0 all shots good; 1 some shots failed or the run stopped; 2 invalid manifest,
options or credentials (for `inspect`: a missing file, a non-PNG or no provenance); 3 apply
stopped at a bound (--max-requests, --max-duration, --max-cost) with shots remaining; 130
interrupted. Known errors print one clean message, never a traceback; an unexpected error prints
one line and the path of a log with the traceback. A Ctrl-C at any moment, start-up included, prints
"interrupted" and exits 130, never a traceback.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    # Nothing has been read or written yet: one line, not the traceback of an import.
    sys.stderr.write("interrupted\n")
    raise SystemExit(130)


# Most of the command's start-up is loading this module (click, then building the commands):
# a Ctrl-C meanwhile ends it cleanly. The handler before is put back at the end of the module.
_handler_before = signal.getsignal(signal.SIGINT)
if _handler_before is None or _handler_before is signal.SIG_IGN:
    _handler_before = None  # not Python's handler, or Ctrl-C ignored (a background job)
else:
    try:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    except ValueError:  # imported outside the main thread
        _handler_before = None

import contextlib  # noqa: E402 - after the handler, on purpose
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, TypeVar  # noqa: E402

import click  # noqa: E402

from imgbatch.errors import ConfigError, ImgbatchError, InspectError, ManifestError  # noqa: E402
from imgbatch.manifest.catalogue import MIN_RPS  # noqa: E402
from imgbatch.pacing.quota import Quota, parse_quota  # noqa: E402
from imgbatch.providers import PROVIDER_CHOICES, is_metered, secrets_for_redaction  # noqa: E402

if TYPE_CHECKING:
    from imgbatch.plan.decide import Plan
    from imgbatch.plan.pricing import CostLimit
    from imgbatch.review.console import Verbosity

# The library is imported inside each command, not here: `--help` and `validate` must not pay for
# the executor, aiohttp, Pillow or a provider's SDK (tests/cli/test_startup.py keeps it so).

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CHANGES = 2  # plan --detailed-exitcode: something to do (Terraform's convention)
EXIT_REMAINING = 3  # apply stopped at a bound; shots remain for the next run
F = TypeVar("F", bound=Callable[..., int])


def error_boundary(command: F) -> F:
    """Turn every error into a message and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            code = command(*args, **kwargs)
        except (ManifestError, ConfigError, InspectError) as exc:
            click.echo(f"error: {exc}", err=True)
            code = EXIT_USAGE
            _summarize_error(str(exc), code)
        except ImgbatchError as exc:
            click.echo(f"error: {exc}", err=True)
            code = EXIT_FAILED
            _summarize_error(str(exc), code)
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing escapes as a traceback
            log = write_crash_log()
            click.echo(f"error: unexpected {type(exc).__name__}; details in {log}", err=True)
            code = EXIT_FAILED
        sys.exit(code)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    """SIGINT ignored for the duration (in the main thread), then handled as it was."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def write_crash_log() -> str:
    import tempfile
    import traceback

    text = traceback.format_exc()
    for secret in secrets_for_redaction(os.environ):
        text = text.replace(secret, "***")
    handle, path = tempfile.mkstemp(prefix="imgbatch-crash-", suffix=".log")
    with os.fdopen(handle, "w", encoding="utf-8") as log:
        log.write(text)
    return path


def _duration_option(value: str | None) -> float | None:
    from imgbatch.run.bounds import parse_duration

    try:
        return parse_duration(value) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _quota_option(value: str | None) -> Quota | None:
    try:
        return parse_quota(value) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _cost_limit_option(value: str | None) -> CostLimit | None:
    if value is None:
        return None  # nothing imported while click parses: start-up stays short
    from imgbatch.plan.pricing import CostLimit

    try:
        return CostLimit.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


manifest_argument = click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
allow_outside_option = click.option(
    "--allow-reference-outside",
    is_flag=True,
    help="Trust this shot list: read local reference images outside its folder tree.",
)


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that refuses nan and inf, which compare false to any bound."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


only_option = click.option(
    "--only",
    metavar="ID_OR_GLOB",
    multiple=True,
    help="Act on the shots with this id, or whose id matches this glob (s01-*, *-noon); "
    "repeatable. Every other shot's entry in results.json is kept as it is, and orphans are "
    "left alone. A pattern that matches no shot is an error.",
)
store_option = click.option(
    "--store",
    metavar="URL",
    default=None,
    help="A shared store of images for every machine, job and account: s3://BUCKET/PREFIX, "
    "oss://BUCKET/PREFIX or a folder (default: IMGBATCH_STORE, else the manifest's "
    "output.store). Each distinct request is paid once across everything sharing it.",
)
store_read_only_option = click.option(
    "--store-read-only",
    is_flag=True,
    help="Restore from the store, but never write it (also IMGBATCH_STORE_READ_ONLY=1): for "
    "untrusted jobs, such as pull requests from forks.",
)


def _shard_option(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise click.BadParameter(f"write K/N with K from 1 to N, such as 1/4; got {value!r}")
    return int(index), int(count)


shard_option = click.option(
    "--shard",
    metavar="K/N",
    default=None,
    callback=lambda _context, _parameter, value: _shard_option(value),
    help="Only the shots whose request key falls in shard K of N (1/4 ... 4/4): stable under "
    "renames and reordering, twins together. Other shots are left as they are.",
)
overwrite_edited_option = click.option(
    "--overwrite-edited",
    is_flag=True,
    help="Put imgbatch's image back over a shot's file edited by hand (default: keep the edit; "
    "when the shot's request changed too, the edited file is moved aside to <id>.edited.png).",
)
provider_option = click.option(
    "--provider",
    type=click.Choice(PROVIDER_CHOICES),
    default=None,
    help="Image provider; auto = dashscope when an API key is configured, else the offline "
    "placeholder (default: the manifest's provider:, else dashscope).",
)


def verbosity_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """`-v` and `-q`, on the group (for every command after it) and on `plan` and `apply`
    (which win over the group's); the last one given wins."""
    function = click.option(
        "-q",
        "--quiet",
        "verbosity",
        flag_value="quiet",
        default=None,
        help="Print only errors and the final summary line.",
    )(function)
    return click.option(
        "-v",
        "--verbose",
        "verbosity",
        flag_value="verbose",
        default=None,
        help="plan: list unchanged shots too; apply: a line per finished shot.",
    )(function)


def _verbosity(given: str | None) -> Verbosity:
    """The command's own -v/-q, else the group's, else normal."""
    from imgbatch.review.console import Verbosity

    chosen = given or click.get_current_context().find_root().obj
    return {"quiet": Verbosity.QUIET, "verbose": Verbosity.VERBOSE}.get(
        chosen or "", Verbosity.NORMAL
    )


PROGRESS_INTERVAL_VARIABLE = "IMGBATCH_PROGRESS_INTERVAL"


def _progress_interval() -> float | None:
    """Seconds between progress lines in a log, from the environment; None: the default."""
    text = os.environ.get(PROGRESS_INTERVAL_VARIABLE)
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"{PROGRESS_INTERVAL_VARIABLE}={text!r} is not a number of seconds above 0"
        )
    return seconds


class _Commands(click.Group):
    """A Ctrl-C says "interrupted" and exits 130 at every moment: while click parses the options
    (click alone would print "Aborted!" and exit 1) and while a command runs (KeyboardInterrupt
    is not an `Exception`, so `error_boundary` lets it through to here)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _interrupt_exits():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _interrupt_exits():
            return super().invoke(ctx)


@contextlib.contextmanager
def _interrupt_exits() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        with _ignoring_interrupts():  # a second Ctrl-C must not cut this message short
            click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imgbatch")
@verbosity_options
@click.pass_context
def main(context: click.Context, verbosity: str | None) -> None:
    """Declarative batch image generation with Qwen Image models on DashScope."""
    context.obj = verbosity


@main.command()
@click.argument(
    "manifests", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@allow_outside_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the verdict and every problem (file, line, shot, field) as one JSON document on "
    "stdout.",
)
@error_boundary
def validate(manifests: tuple[Path, ...], allow_reference_outside: bool, as_json: bool) -> int:
    """Check shot lists against the schema and the model rules (several at once: a pre-commit
    hook passes every changed file)."""
    from imgbatch.manifest.validation import validate, validate_json

    # The manifest's own checks, local references included; a reference URL is not downloaded
    # (only apply and generate fetch one, to key it by its content).
    results = validate(manifests, allow_reference_outside=allow_reference_outside)
    for result in results:
        if result.shots is not None:
            count = result.shots
            line = f"{result.manifest}: valid, {count} shot{'s' if count != 1 else ''}"
            click.echo(line, err=as_json)
        else:
            click.echo(f"error: {result.message}", err=True)
    if as_json:
        click.echo(json.dumps(validate_json(results), ensure_ascii=False))
    return EXIT_OK if all(result.valid for result in results) else EXIT_USAGE


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


@main.command(cls=DetailedExitCommand)
@manifest_argument
@provider_option
@allow_outside_option
@overwrite_edited_option
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 0 when there is nothing to do, 2 when some shot would be created, replaced, "
    "restored or recovered, 1 on any error (invalid manifest or options included).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the plan as one JSON document on stdout."
)
@only_option
@store_option
@verbosity_options
@error_boundary
def plan(
    manifest: Path,
    provider: str | None,
    allow_reference_outside: bool,
    overwrite_edited: bool,
    detailed_exitcode: bool,
    as_json: bool,
    only: tuple[str, ...],
    store: str | None,
    verbosity: str | None,
) -> int:
    """Show the shots apply would change, and why (-v: every shot); nothing is sent or
    downloaded."""
    from imgbatch.review.console import Verbosity, console_for
    from imgbatch.review.report import estimate_line, plan_json, plan_summary, plan_table
    from imgbatch.run.apply import make_plan

    level = _verbosity(verbosity)

    try:
        result = make_plan(
            manifest,
            provider=provider,
            allow_reference_outside=allow_reference_outside,
            overwrite_edited=overwrite_edited,
            only=only,
            store=store,
        )
    except (ManifestError, ConfigError) as exc:
        if not detailed_exitcode:
            raise
        # 2 means "changes pending" here: an invalid shot list is an error like any other.
        click.echo(f"error: {exc}", err=True)
        return EXIT_FAILED
    # With --json, stdout is the document alone; the human text goes to stderr.
    out = console_for(sys.stderr if as_json else sys.stdout)
    table = plan_table(result, verbose=level is Verbosity.VERBOSE)
    if table and level is not Verbosity.QUIET:
        out.print(table)
    out.print(plan_summary(result))
    estimate = estimate_line(result)
    if estimate and level is not Verbosity.QUIET:
        out.print(estimate)
    summarize = bool(os.environ.get("GITHUB_STEP_SUMMARY"))
    document = plan_json(result) if as_json or summarize else {}
    if as_json:
        click.echo(json.dumps(document, ensure_ascii=False))
    if summarize:
        from imgbatch.review.step_summary import plan_markdown

        title = _title("plan", manifest, only)
        _step_summary(plan_markdown(document, title, metered=is_metered(result.provider)))
    if detailed_exitcode and result.has_work:
        return EXIT_CHANGES
    return EXIT_OK


@main.command("expand")
@manifest_argument
@click.option("--json", "as_json", is_flag=True, help='Print {"shots": [...]} as JSON.')
@provider_option
@allow_outside_option
@error_boundary
def expand_command(
    manifest: Path, as_json: bool, provider: str | None, allow_reference_outside: bool
) -> int:
    """Print every shot after vars, matrix, variants and seed: auto, in manifest order."""
    from imgbatch.run.apply import expand_shots

    shots = expand_shots(
        manifest, provider=provider, allow_reference_outside=allow_reference_outside
    )
    if as_json:
        click.echo(json.dumps({"shots": shots}, ensure_ascii=False))
    else:
        import yaml

        text = yaml.safe_dump(
            {"shots": shots}, sort_keys=False, allow_unicode=True, width=1_000_000
        )
        click.echo(text, nl=False)
    return EXIT_OK


@main.command("apply")
@manifest_argument
@provider_option
@click.option(
    "--rps",
    type=FiniteFloatRange(min=MIN_RPS),
    default=None,
    help=f"Requests started per second at most, evenly spaced, at least {MIN_RPS} (default: "
    "the manifest's limits.rps, else as for --quota).",
)
@click.option(
    "--quota",
    metavar="K/P",
    default=None,
    callback=lambda _context, _parameter, value: _quota_option(value),
    help="The account's quota: K requests per period, such as 2/60s, 2/min or 25/s; the first "
    "K may go at once (default: the manifest's limits.quota, else the quota learned by an "
    "earlier run, else found by probing). Wins over --rps.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Requests in flight at most (default: the manifest's limits.concurrency, else 512 for "
    "a service, where the rate decides, and the drawing threads for the placeholder).",
)
@allow_outside_option
@click.option(
    "--no-simplify",
    is_flag=True,
    help="After a 200 without an image, fail the shot instead of asking once more with a "
    "simplified prompt.",
)
@click.option(
    "--frozen",
    is_flag=True,
    help="Send no paid request: exit 1, naming them, if any shot would need one (create or "
    "replace), before sending or writing anything. Restores from the cache still happen.",
)
@overwrite_edited_option
@click.option(
    "--max-requests",
    type=click.IntRange(min=1),
    default=None,
    help="Send at most N requests (retries included), then stop: requests in flight finish, "
    "everything is written, and apply exits 3 if shots remain (run it again to continue).",
)
@click.option(
    "--max-duration",
    metavar="DURATION",
    default=None,
    callback=lambda _context, _parameter, value: _duration_option(value),
    help="Send no request after this long, such as 45s, 90m, 5h or 1h30m (counted from the "
    "start of sending); then as for --max-requests. Leave the requests in flight time to "
    "finish within a CI job's limit.",
)
@click.option(
    "--max-cost",
    metavar="AMOUNT",
    default=None,
    callback=lambda _context, _parameter, value: _cost_limit_option(value),
    help="The most the run may cost, such as 5 or '5 USD' (in the prices' currency): exit 1 "
    "before sending or writing anything if the estimate exceeds it; stop sending before the "
    "images billed could, then as for --max-requests (default: the manifest's "
    "limits.max_cost).",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Remove the files of orphaned shots (in the results, no longer in the manifest) and "
    "their entries; a file changed since imgbatch wrote it is kept. Never the cache.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print what the run did as one JSON document on stdout (the summary goes to stderr).",
)
@only_option
@store_option
@store_read_only_option
@shard_option
@verbosity_options
@error_boundary
def apply_command(
    manifest: Path,
    provider: str | None,
    rps: float | None,
    quota: Quota | None,
    concurrency: int | None,
    allow_reference_outside: bool,
    no_simplify: bool,
    frozen: bool,
    max_requests: int | None,
    max_duration: float | None,
    max_cost: CostLimit | None,
    overwrite_edited: bool,
    prune: bool,
    as_json: bool,
    only: tuple[str, ...],
    store: str | None,
    store_read_only: bool,
    shard: tuple[int, int] | None,
    verbosity: str | None,
) -> int:
    """Generate the shots whose request changed; write images and results.json."""
    from imgbatch.plan.decide import WORK_ACTIONS
    from imgbatch.review.console import Verbosity, console_for
    from imgbatch.review.progress import DEFAULT_INTERVAL, Progress
    from imgbatch.review.report import (
        apply_json,
        apply_summary,
        estimate_line,
        plan_summary,
        quiet_summary,
    )
    from imgbatch.run.apply import ApplyOptions, apply

    level = _verbosity(verbosity)
    quiet = level is Verbosity.QUIET
    progress = Progress(
        sys.stderr, verbosity=level, interval=_progress_interval() or DEFAULT_INTERVAL
    )

    def announce(planned: Plan) -> None:
        # Even with --quiet, a fallback to placeholders is said: it is not what a key would do.
        if not is_metered(planned.provider) and (provider == "auto" or not quiet):
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

    try:
        report = apply(
            manifest,
            ApplyOptions(
                provider=provider,
                rps=rps,
                quota=quota,
                concurrency=concurrency,
                allow_reference_outside=allow_reference_outside,
                simplify=not no_simplify,
                frozen=frozen,
                max_requests=max_requests,
                max_duration=max_duration,
                max_cost=max_cost,
                overwrite_edited=overwrite_edited,
                prune=prune,
                only=only,
                store=store,
                store_read_only=store_read_only,
                shard=shard,
            ),
            listener=progress,
            on_plan=announce,
        )
    finally:
        progress.close()
    summary = apply_summary(report)
    console_for(sys.stderr if as_json else sys.stdout).print(
        quiet_summary(summary) if quiet else summary
    )
    if report.sheet_problem:
        click.echo(f"warning: {report.sheet_problem}", err=True)
    elif report.sheet and not quiet:
        click.echo(f"Contact sheet: {report.sheet}", err=as_json)
    summarize = bool(os.environ.get("GITHUB_STEP_SUMMARY"))
    document = apply_json(report) if as_json or summarize else {}
    if as_json:
        click.echo(json.dumps(document, ensure_ascii=False))
    if summarize:
        from imgbatch.review.step_summary import apply_markdown

        title = _title("apply", manifest, only)
        metered = is_metered(report.plan.provider)
        _step_summary(apply_markdown(document, title, stopped=report.stopped, metered=metered))
    if report.interrupted:
        return EXIT_INTERRUPTED
    if report.bounded and report.remaining:
        return EXIT_REMAINING
    return EXIT_OK if report.ok else EXIT_FAILED


@main.command()
@manifest_argument
@allow_outside_option
@error_boundary
def sheet(manifest: Path, allow_reference_outside: bool) -> int:
    """Draw the contact sheet (index.html in the output folder) from the last results."""
    from imgbatch.review.sheet import write_sheet

    path = write_sheet(manifest, allow_reference_outside=allow_reference_outside)
    click.echo(f"Contact sheet: {path}")
    return EXIT_OK


@main.command("gc")
@click.argument(
    "manifests", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--yes", is_flag=True, help="Delete what is listed (default: only list it).")
@allow_outside_option
@error_boundary
def gc_command(manifests: tuple[Path, ...], yes: bool, allow_reference_outside: bool) -> int:
    """List the cached images, thumbnails and files in the manifests' output folders that no
    results refer to, with their total size; --yes deletes them."""
    from imgbatch.housekeeping.gc import collect_garbage

    collection = collect_garbage(
        manifests, delete=yes, allow_reference_outside=allow_reference_outside
    )
    for item in collection.items:
        click.echo(f"{_shown(item.path)}  {_size_text(item.size)}  {item.kind}")
    count = len(collection.items)
    what = f"{count} file{'s' if count != 1 else ''}, {_size_text(collection.total)}"
    if not count:
        click.echo("Nothing to collect: every file is referred to by the results.")
    elif collection.deleted:
        click.echo(f"Deleted {what}.")
    else:
        click.echo(f"{what} that no results refer to; run again with --yes to delete them.")
    return EXIT_OK


@main.group("store")
def store_group() -> None:
    """The claims in a shared store (--store URL, else IMGBATCH_STORE)."""


@store_group.command("claims")
@store_option
@error_boundary
def store_claims_command(store: str | None) -> int:
    """List the claims held in the store: key, holder, age, and whether it is stale."""
    from imgbatch.housekeeping.store_claims import list_claims

    url, claims = list_claims(store, os.environ)
    for claim in claims:
        state = "stale" if claim.stale else "live"
        paid = f"  paid: request {claim.request_id or 'unknown'}" if claim.image_url else ""
        click.echo(f"{claim.key}  {state}  {claim.age:.0f} s  {claim.holder}{paid}")
    if not claims:
        click.echo(f"No claims in {url}.")
    return EXIT_OK


@store_group.command("unlock")
@click.argument("key")
@store_option
@error_boundary
def store_unlock_command(key: str, store: str | None) -> int:
    """Release the claim on KEY, whoever holds it (for a store without If-Match, such as OSS,
    where a dead process's claim is not taken over on its own)."""
    from imgbatch.housekeeping.store_claims import unlock

    if unlock(store, os.environ, key):
        click.echo(f"Released the claim on {key}.")
        return EXIT_OK
    click.echo(f"No claim on {key}.")
    return EXIT_FAILED


def _size_text(size: int) -> str:
    if size < 1000:
        return f"{size} bytes"
    value, units = size / 1000, ["KB", "MB", "GB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{value:.1f} {units[0]}"


def _shown(path: Path) -> str:
    """`path` relative to the current folder when it is below it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the fields as one JSON object.")
@error_boundary
def inspect(image: Path, as_json: bool) -> int:
    """Print the provenance an imgbatch PNG carries: prompt sent, seed, model, key, request id."""
    from imgbatch.review.provenance import as_json as fields_json
    from imgbatch.review.provenance import as_lines, inspect_image

    fields = inspect_image(image)
    if as_json:
        click.echo(json.dumps(fields_json(fields), ensure_ascii=False))
    else:
        click.echo("\n".join(as_lines(fields)))
    return EXIT_OK


@main.command("mcp")
@provider_option
@allow_outside_option
@error_boundary
def mcp_command(provider: str | None, allow_reference_outside: bool) -> int:
    """Serve generate, validate, plan, apply and inspect to an AI agent over the Model Context
    Protocol on stdin and stdout (needs the extra: pip install 'imgbatch[mcp]')."""
    try:
        from imgbatch.cli.agent_server import ServerSettings, serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "mcp":
            raise
        raise ConfigError(
            "imgbatch mcp needs the MCP SDK, an optional extra: pip install 'imgbatch[mcp]'"
        ) from None
    serve(ServerSettings(provider=provider, allow_reference_outside=allow_reference_outside))
    return EXIT_OK


@main.command("generate")
@click.option(
    "--request",
    "request_text",
    required=True,
    help="The normalized request: JSON, @file.json, or - to read it from stdin.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The image file to write (default: output/ai-image-qwen-image/images/<key>.png).",
)
@click.option(
    "--print-response",
    is_flag=True,
    help="Print the normalized response as one JSON object on stdout.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='As --print-response, and on a failure print {"error": {...}} on stdout instead.',
)
@provider_option
@allow_outside_option
@store_option
@store_read_only_option
@error_boundary
def generate_command(
    request_text: str,
    output: Path | None,
    print_response: bool,
    as_json: bool,
    provider: str | None,
    allow_reference_outside: bool,
    store: str | None,
    store_read_only: bool,
) -> int:
    """Make one image from one request, as the seed skill's helper script does."""
    from imgbatch.run.generate import error_json, generate

    try:
        response = generate(
            _read_request(request_text),
            output=output,
            provider=provider,
            allow_reference_outside=allow_reference_outside,
            store=store,
            store_read_only=store_read_only,
        )
    except ImgbatchError as exc:
        if as_json:
            click.echo(json.dumps(error_json(exc), ensure_ascii=False))
        raise  # the message on stderr and the exit code, as without --json
    where = "from the cache, nothing sent" if response["cached"] else "generated"
    click.echo(f"{response['file']} ({where})", err=True)
    if print_response or as_json:
        click.echo(json.dumps(response, ensure_ascii=False))
    return EXIT_OK


def _title(command: str, manifest: Path, only: tuple[str, ...]) -> str:
    selection = "".join(f" --only {pattern}" for pattern in only)
    return f"imgbatch {command} {manifest}{selection}"


def _summarize_error(message: str, code: int) -> None:
    """In a GitHub Actions job, the error goes to the job's summary too."""
    if not os.environ.get("GITHUB_STEP_SUMMARY"):
        return
    from imgbatch.review.step_summary import error_markdown

    context = click.get_current_context(silent=True)
    command = f"imgbatch {context.info_name}" if context is not None else "imgbatch"
    _step_summary(error_markdown(command, message, code))


def _step_summary(markdown: str) -> None:
    """Append to GitHub's job summary; a failure is a warning, never the run's."""
    from imgbatch.review.step_summary import append

    problem = append(markdown)
    if problem:
        click.echo(f"warning: {problem}", err=True)


def _read_request(text: str) -> Any:
    """`--request` as JSON, `@file.json` or `-` (stdin)."""
    source = "--request"
    if text == "-":
        text, source = sys.stdin.read(), "the request on stdin"
    elif text.startswith("@"):
        path = Path(text[1:])
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the request file {path}: {exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from None


if _handler_before is not None:
    signal.signal(signal.SIGINT, _handler_before)
