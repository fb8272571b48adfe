"""Live progress of an apply, on stderr, in the form the stream can show.

Takes the shots to do (`start`), then every event the executor reports (`__call__`: a finished
shot's `ResultEntry`, a `Retrying`, a `Notice`, a `Stopping`); gives what the user sees while a
run goes on:

- on a terminal, a rich bar: done/total, images per second, time elapsed and left, failures,
  retries and 429s, redrawn a few times a second (its spinner turns while a 16 s generation is
  awaited, so a long wait never looks like a hang);
- anywhere else (a CI log, a pipe), one plain line every `interval` seconds from the moment the
  first shot starts, whether or not a shot finished since, and one at the end;
- always, a line for each failed shot, and the moment the run stops sending (a Ctrl-C, a
  bound: what is in flight and how long it may take) or abandons what is in flight; with
  `Verbosity.VERBOSE`, a line for each finished shot;
  with `Verbosity.QUIET`, nothing but those (the caller prints the final line).

Counts are by status as the entries name them, so a status added later is counted and shown
without a change here. Events come from the run's event loop and the plain lines from a timer
thread: one lock keeps the counts and the output in order.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from rich.text import Text

from imgbatch.errors import NoImageError, RateLimited
from imgbatch.review.console import Verbosity, console_for, counted, styled
from imgbatch.review.events import (
    FromStore,
    Notice,
    Pacing,
    Retrying,
    RunEvent,
    RunStatuses,
    Stopping,
)
from imgbatch.state.results import ResultEntry

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as Bar
    from rich.progress import TaskID

# Seconds between two plain progress lines in a log: often enough that a run visibly moves, rare
# enough that a 14-hour run's log stays readable (10,000 lines).
DEFAULT_INTERVAL = 5.0
# Statuses shown in the plain line even at zero (so "0 failed" can be read as good news), first
# and last; any other status is shown between them once it occurs.
_ALWAYS_SHOWN = ("generated", "failed")
# Statuses of a finished shot that has no image (failed, or not sent, or paid and not fetched):
# not counted in images per second. Any other status, even one added later, brought an image.
_NO_IMAGE = frozenset({"failed", "not_run", "unfetched"})


class Progress:
    """The listener of an apply that draws its progress; use as a context manager, or call
    `start` and `close`."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        verbosity: Verbosity = Verbosity.NORMAL,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        self.console = console_for(self.stream)
        self.verbosity = verbosity
        self.interval = interval
        self.clock = clock
        # A live bar needs a real terminal: FORCE_COLOR asks for colour in a log, not for cursor
        # movements; TERM=dumb and TTY_INTERACTIVE=0 (rich's is_interactive) rule it out too.
        self.live = _isatty(self.stream) and self.console.is_interactive
        self.total = 0
        self.statuses: Counter[str] = Counter()
        self._statuses = RunStatuses()  # a shot restored from the store is `from_store`
        self.retries = self.throttled = 0
        self.pacing: dict[str, str] = {}  # by model: the quota in force and where it came from
        self.started: float | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ticker: threading.Thread | None = None
        self._printed: int | None = None  # shots done when the last plain line was printed
        self._bar: Bar | None = None
        self._task: TaskID | None = None

    @property
    def done(self) -> int:
        return sum(self.statuses.values())

    def start(self, total: int) -> None:
        """The run begins with `total` shots to do; from now on progress is shown."""
        self.total = total
        self.started = self.clock()
        if total == 0 or self.verbosity is Verbosity.QUIET:
            return
        if self.live:
            self._bar, self._task = _make_bar(self.console, total)
            self._update_bar()
            self._bar.start()
        else:
            self._ticker = threading.Thread(
                target=self._tick, name="imgbatch-progress", daemon=True
            )
            self._ticker.start()

    def __call__(self, event: RunEvent) -> None:
        with self._lock:
            if isinstance(event, ResultEntry):
                self._finished(event)
            elif isinstance(event, Retrying):
                self._retrying(event)
            elif isinstance(event, Notice):
                self._say(Text(f"note {event.shot_id}: {event.message}", style="yellow"))
            elif isinstance(event, Pacing):
                self.pacing[event.model] = pacing_text(event)
                if self.verbosity is Verbosity.VERBOSE:
                    self._say(Text(f"{event.model}: {self.pacing[event.model]}", style="dim"))
            elif isinstance(event, FromStore):
                self._statuses.finished(event)
            elif isinstance(event, Stopping):
                # Said at once and at every verbosity: the user is waiting for an answer.
                self._say(Text(stopping_line(event), style="yellow"), always=True)
            self._update_bar()

    def _finished(self, entry: ResultEntry) -> None:
        # Another run's image, restored from the store: as the run's report counts it.
        status = self._statuses.finished(entry) or entry.status
        self.statuses[status] += 1
        if entry.status in ("failed", "unfetched"):
            # Errors are shown at every verbosity: --quiet means "only what went wrong". An
            # image billed but not downloaded is one too (its URL is kept for the next apply).
            failure = f"{entry.status} {entry.id}: {entry.error}"
            self._say(Text(failure, style="red"), always=True)
        elif self.verbosity is Verbosity.VERBOSE:
            line = styled(status, f"{status:<9}")
            line.append(f" {entry.id}")
            if entry.file:
                line.append(f"  {entry.file}", style="dim")
            self._say(line)

    def _retrying(self, event: Retrying) -> None:
        if isinstance(event.error, NoImageError):
            # The seed's rule: never quietly; say which request gave no image.
            self._say(
                Text(
                    f"{event.shot_id}: the service answered without an image (request "
                    f"{event.error.request_id or 'unknown'}); asking once more with a "
                    "simplified prompt",
                    style="yellow",
                )
            )
            return
        self.retries += 1
        if isinstance(event.error, RateLimited):
            self.throttled += 1

    def _say(self, text: Text, *, always: bool = False) -> None:
        if always or self.verbosity is not Verbosity.QUIET:
            self.console.print(text)

    def status(self) -> str:
        """The plain progress line: `[45/150] 43 generated, 2 failed, 3 retries, ...`."""
        now = self.clock()
        elapsed = max(now - (self.started if self.started is not None else now), 0.0)
        done = self.done
        others = sorted(name for name in self.statuses if name not in _ALWAYS_SHOWN)
        names = ("generated", *(name for name in others if self.statuses[name]), "failed")
        counts = [f"{self.statuses[name]} {name}" for name in names]
        text = (
            f"[{done}/{self.total}] {', '.join(counts)}, "
            f"{counted(self.retries, 'retry', 'retries')}, "
            f"{self.throttled} throttled (429); {self._rate(elapsed):.1f} images/s, "
            f"{_duration(elapsed)} elapsed"
        )
        if self.pacing:
            # A slow run explains itself: the quota in force and where it came from.
            text += "; " + "; ".join(self.pacing.values())
        if done == 0:
            return text + ", waiting for the first shot"
        if done < self.total:
            return text + f", about {_duration(elapsed / done * (self.total - done))} left"
        return text

    def _rate(self, elapsed: float) -> float:
        images = sum(count for name, count in self.statuses.items() if name not in _NO_IMAGE)
        return images / elapsed if elapsed > 0 else 0.0

    def _tick(self) -> None:
        while not self._stopped.wait(self.interval):
            with self._lock:
                # Once every shot is done, one line says so; results are written meanwhile.
                if self._printed != self.total:
                    self._print_status()

    def _print_status(self) -> None:
        self.console.print(self.status())
        self._printed = self.done

    def _update_bar(self) -> None:
        if self._bar is None or self._task is None:
            return
        elapsed = self.clock() - (self.started or self.clock())
        rate = f"{self._rate(elapsed):.1f} img/s"
        # done/total, elapsed and left are always whole: the counters after them take what the
        # line has left (an 80-column terminal), the secondary ones giving way first.
        room = self.console.width - _fixed_width(self.total, rate)
        failed, fits = bar_counts(self.statuses["failed"], self.retries, self.throttled, room)
        text = " · ".join(fits)
        if failed and fits and fits[0].endswith("failed"):
            text = f"[bold red]{fits[0]}[/]" + text[len(fits[0]) :]  # markup: never user text
        self._bar.update(self._task, completed=self.done, rate=rate, counts=text)

    def close(self) -> None:
        """Stop drawing; in a log, a last line with the final counts (unless the last line
        already had them)."""
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
            with self._lock:
                if self._printed != self.done:
                    self._print_status()
        if self._bar is not None:
            self._update_bar()
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def bar_counts(failed: int, retries: int, throttled: int, room: int) -> tuple[int, list[str]]:
    """The bar's counters in at most `room` columns: failures always, then retries, then 429s
    once there are any; the 429s are shortened, then left out, then the retries (the final
    summary line has them all).

    >>> bar_counts(1, 1, 1, 80)
    (1, ['1 failed', '1 retry', '1 throttled (429)'])
    >>> bar_counts(1, 1, 1, 26)
    (1, ['1 failed', '1 retry', '1×429'])
    >>> bar_counts(0, 3, 2, 12)
    (0, ['0 failed'])
    """
    chosen = [f"{failed} failed"]
    if retries:
        chosen.append(counted(retries, "retry", "retries"))
    if throttled:
        chosen.append(f"{throttled} throttled (429)")
        if _width(chosen) > room:
            chosen[-1] = f"{throttled}×429"
    while len(chosen) > 1 and _width(chosen) > room:
        chosen.pop()
    return failed, chosen


def _width(parts: list[str]) -> int:
    return sum(len(part) for part in parts) + 3 * (len(parts) - 1)


def _fixed_width(total: int, rate: str) -> int:
    """Columns the bar uses before its counters: spinner, bar, done/total, rate, elapsed,
    "ETA", left, and the spaces between them."""
    digits = len(str(total))
    return 1 + _BAR_WIDTH + (2 * digits + 1) + len(rate) + 7 + 3 + 7 + 7


_BAR_WIDTH = 12


def _make_bar(console: Console, total: int) -> tuple[Bar, TaskID]:
    # Imported here: only a run on a terminal draws a bar.
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    bar = Bar(
        SpinnerColumn(),
        BarColumn(bar_width=_BAR_WIDTH),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        # Elapsed time moves while a long generation is awaited: a wait, visibly, not a hang.
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[counts]}", markup=True),
        console=console,
        # Output written by anything else while the bar is drawn goes above it, not through it.
        redirect_stdout=False,
        redirect_stderr=True,
    )
    task = bar.add_task("apply", total=total, rate="", counts="")
    return bar, task


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):  # closed, or not a real file
        return False


def _duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m: short enough for a progress line."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


_PACING_SOURCES = {
    "given": "as given",
    "stated": "as the service states it",
    "learned": "as an earlier run found it",
    "probed": "found from 429s",
    "probing": "finding it",
}


def pacing_text(event: Pacing) -> str:
    """`pacing at 3 per 60 s, found from 429s; probing up`."""
    window = event.window
    if window.count == 1 and window.period < 1:
        quota = f"{1 / window.period:.3g} a second"
    else:
        quota = f"{window.count} per {window.period:g} s"
    if event.cap is not None:
        quota += f", {event.cap} in progress"
    text = f"pacing at {quota}, {_PACING_SOURCES.get(event.source, event.source)}"
    return text + ("; probing up" if event.probing_up else "")


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
