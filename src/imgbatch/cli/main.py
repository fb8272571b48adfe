"""The `imgbatch` command group; each group of commands is its own module beside it (manifest:
validate, expand; plan_apply: plan, apply; review: sheet, inspect; generate; housekeeping: gc;
agent: mcp), what they share is in common.py. Each command parses flags, calls one library
function, prints, and returns an exit code.

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

import atexit  # noqa: E402 - after the handler, on purpose
import contextlib  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from imgbatch.cli import (  # noqa: E402
    agent,
    generate,
    housekeeping,
    manifest,
    plan_apply,
    quota,
    review,
    store,
)
from imgbatch.cli.common import (  # noqa: E402
    EXIT_CHANGES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REMAINING,
    FiniteFloatRange,
    _ignoring_interrupts,
    error_boundary,
    verbosity_options,
    write_crash_log,
)
from imgbatch.errors import EXIT_FAILED, EXIT_USAGE  # noqa: E402


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
            try:
                return super().invoke(ctx)
            except click.NoSuchOption as exc:
                _safer_suggestion(exc)
                raise

    def main(self, *args: Any, **kwargs: Any) -> Any:
        with _sigterm_stops():
            return super().main(*args, **kwargs)


# Options that delete or overwrite: a close spelling of another option never suggests them.
_DESTRUCTIVE_OPTIONS = frozenset({"--prune", "--yes", "--overwrite-edited", "--force"})
# Options other tools have that imgbatch words differently: what to use instead, by command.
_INSTEAD = {
    ("apply", "--dry-run"): "`imgbatch plan MANIFEST` shows what apply would do, and sends nothing",
    ("apply", "-n"): "`imgbatch plan MANIFEST` shows what apply would do, and sends nothing",
}


def _safer_suggestion(exc: click.NoSuchOption) -> None:
    """A mistyped option is never answered with one that deletes; `apply --dry-run` names
    `plan`."""
    exc.possibilities = [  # type: ignore[misc]
        name for name in exc.possibilities or () if name not in _DESTRUCTIVE_OPTIONS
    ]
    command = exc.ctx.command.name if exc.ctx is not None else None
    instead = _INSTEAD.get((command or "", exc.option_name))
    if instead:
        exc.message = f"No such option: {exc.option_name}; {instead}."  # type: ignore[misc]
        exc.possibilities = []  # type: ignore[misc]


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, `kill`): the same orderly stop as a Ctrl-C, named as such;
    every write is atomic, so what a command was writing is whole or absent."""


_in_command = [0]  # how deep in `_interrupt_exits`: there a SIGTERM unwinds as a Ctrl-C does


def _terminate(signum: int, frame: FrameType | None) -> None:
    if _in_command[0]:
        raise _Terminated
    # In click's own parsing or teardown, which would call it "Aborted!" and exit 1.
    sys.stderr.write("interrupted (SIGTERM)\n")
    raise SystemExit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM stops every command as a Ctrl-C does (apply puts its own handler over this one
    while it sends); a handler the embedding program set is left alone."""
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            yield
            return
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _interrupt_exits() -> Iterator[None]:
    _in_command[0] += 1
    try:
        yield
    except KeyboardInterrupt as exc:
        with _ignoring_interrupts():  # a second Ctrl-C must not cut this message short
            shown = "interrupted (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
            click.echo(shown, err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        _in_command[0] -= 1


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imgbatch", prog_name="imgbatch", message="%(prog)s %(version)s")
@verbosity_options
@click.pass_context
def main(context: click.Context, verbosity: str | None) -> None:
    """Declarative batch image generation with Qwen Image models on DashScope."""
    context.obj = verbosity


# The exit codes and the boundary are named here too (tests, the skill's page read them).
__all__ = [
    "EXIT_CHANGES",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REMAINING",
    "EXIT_USAGE",
    "FiniteFloatRange",
    "error_boundary",
    "main",
    "run",
    "write_crash_log",
]


def run() -> None:
    """The `imgbatch` command as a process (`python -m imgbatch` and the installed script):
    `main`, then out. Once the command is done and nothing else runs, the process ends without
    tearing the interpreter down (freeing every module of aiohttp, the SDK and the rest was a
    seventh of a second of CPU after the last image of an apply); the exit handlers still run.
    An exit code that is not a number, or another thread still running, takes the ordinary way
    out."""
    try:
        main(prog_name="imgbatch")
    except SystemExit as exc:
        code = exc.code
    else:
        code = None
    if code is None:
        code = EXIT_OK
    if not isinstance(code, int) or threading.active_count() > 1:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: Python's own exit says nothing more either
        pass
    os._exit(code)


for command in (
    manifest.validate,
    plan_apply.plan,
    manifest.expand_command,
    plan_apply.apply_command,
    review.sheet,
    review.reroll,
    review.pick,
    housekeeping.gc_command,
    review.inspect,
    agent.mcp_command,
    generate.generate_command,
    quota.quota_group,
    store.store_group,
):
    main.add_command(command)

if _handler_before is not None:
    signal.signal(signal.SIGINT, _handler_before)
