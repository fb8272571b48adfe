"""What the commands share: exit codes, the one error boundary, options, the step summary.

Takes nothing heavy at import (click and imgbatch's light modules only): `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from imgbatch.errors import EXIT_FAILED, ConfigError, ImgbatchError, ManifestError, without_reprs
from imgbatch.providers import PROVIDER_CHOICES, secrets_for_redaction
from imgbatch.units.quota import Quota, parse_quota
from imgbatch.units.text import printable

if TYPE_CHECKING:
    from imgbatch.review.console import Verbosity
    from imgbatch.units.money import CostLimit

# The library is imported inside each command, not here: `--help` and `validate` must not pay for
# the executor, aiohttp, Pillow or a provider's SDK (tests/cli/test_startup.py keeps it so).

EXIT_OK, EXIT_INTERRUPTED = 0, 130
EXIT_CHANGES = 2  # plan --detailed-exitcode: something to do (Terraform's convention)
EXIT_REMAINING = 3  # apply stopped at a bound; shots remain for the next run
F = TypeVar("F", bound=Callable[..., int])


def error_boundary(command: F) -> F:
    """Turn every error into a message and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            code = command(*args, **kwargs)
        except ImgbatchError as exc:
            code = say_error(exc, kwargs.get("manifest"))
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing escapes as a traceback
            log = write_crash_log()
            click.echo(f"error: unexpected {type(exc).__name__}; details in {log}", err=True)
            code = EXIT_FAILED
        sys.exit(code)

    return wrapper  # type: ignore[return-value]


def say_error(exc: ImgbatchError, named: Path | None, code: int | None = None) -> int:
    """Print `exc` as every command words an error (the manifest named by its file, the API
    key as ***, into the job summary too); gives its exit code, `code` if given (`plan
    --detailed-exitcode` makes every error 1), else the error's own (errors.py says which)."""
    if isinstance(exc, ManifestError) and named is not None and exc.subject == "the manifest":
        # Named by its file, as `validate` names it: every command words it alike.
        exc = ManifestError(exc.problems, subject=str(named))
    # Escaped: a message may quote what another party wrote (a committed results.json's
    # shot id or store URL).
    message = printable(hide_secrets(without_reprs(str(exc))), lines=True)
    click.echo(f"error: {message}", err=True)
    code = exc.exit_code if code is None else code
    _summarize_error(message, code)
    return code


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


def hide_secrets(text: str) -> str:
    """`text` with the configured API key replaced by ***: a message may quote a file's text
    (a shot list that is a link to a `.env`), and it goes to a terminal, a CI log or an agent."""
    for secret in secrets_for_redaction(os.environ):
        text = text.replace(secret, "***")
    return text


def write_crash_log() -> str:
    import tempfile
    import traceback

    text = hide_secrets(traceback.format_exc())
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
    from imgbatch.units.money import CostLimit

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

no_local_copy_option = click.option(
    "--no-local-copy",
    is_flag=True,
    help="Keep the images in the shared store only (a store is needed): none in the output "
    "folder but the contact sheet's thumbnails; the sheet opens full images through links "
    "signed when it is drawn. An image already in the store only is not fetched again.",
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
    help="Only the shots whose request key falls in shard K of N (1/4 ... 4/4): the sorted keys "
    "cut into N equal ranges, stable under renames and reordering, twins together; adding m shots "
    "moves at most m keys into another shard (with --store, nothing is paid again). Other shots "
    "are left as they are.",
)
force_option = click.option(
    "--force",
    is_flag=True,
    help="Use an output folder another manifest owns (same name: or output.dir); each "
    "manifest's shots are kept apart there: neither lists nor prunes the other's.",
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
