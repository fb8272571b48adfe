"""What `imgbatch generate` shows while its one request is awaited, so a 16-second generation
never looks like a hang.

Takes the request's phases as they change (`run.executor.Phase` texts, then None when done);
gives, on a terminal, a spinner with the time elapsed and what is awaited (its turn under the
quota, the service's answer, a retry's pause, the download), redrawn in place and gone at the
end; anywhere else (a log, a pipe), one line when the request is sent, when it is answered, and
at each pause; with `Verbosity.QUIET`, nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from rich.text import Text

from imgbatch.review.console import Verbosity, console_for

if TYPE_CHECKING:
    from rich.live import Live

# The executor's phase texts (run.executor.Phase), as a person reads them here.
_SAID = {
    "waiting for its turn": "waiting for its turn under the quota",
    "waiting for the service's answer": "waiting for the service's answer",
    "waiting to retry": "waiting to retry (the service was busy or refused for now)",
    "downloading its image": "downloading the image",
    "writing its image": "writing the image",
}


class Waiting:
    """The listener `generate(on_phase=...)` takes; call `close` at the end (or use `with`)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        service: str = "the service",
        verbosity: Verbosity = Verbosity.NORMAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        self.console = console_for(self.stream)
        self.service = service
        self.verbosity = verbosity
        self.clock = clock
        self.started = clock()
        self.sent_at: float | None = None
        self.phase: str | None = None
        self.live_view = _isatty(self.stream) and self.console.is_interactive
        self._live: Live | None = None

    def __call__(self, phase: str | None) -> None:
        if self.verbosity is Verbosity.QUIET:
            return
        if phase is None:
            self.close()
            return
        previous, self.phase = self.phase, phase
        if phase == "waiting for the service's answer" and self.sent_at is None:
            self.sent_at = self.clock()
        if self.live_view:
            self._draw()
        else:
            self._log(previous, phase)

    def _log(self, previous: str | None, phase: str) -> None:
        elapsed = self.clock() - self.started
        if phase == "waiting for the service's answer":
            line = f"generate: request sent; waiting for {self.service}'s answer"
        elif previous == "waiting for the service's answer" and self.sent_at is not None:
            line = (
                f"generate: answered after {self.clock() - self.sent_at:.1f} s; "
                f"{_SAID.get(phase, phase)}"
            )
        elif phase == "writing its image":
            return  # the final line says where it was written
        else:
            line = f"generate: {_SAID.get(phase, phase)} ({elapsed:.1f} s)"
        self.console.print(Text(line))

    def _draw(self) -> None:
        if self._live is None:
            from rich.live import Live
            from rich.spinner import Spinner

            self._live = Live(
                Spinner("dots", text=self),
                console=self.console,
                refresh_per_second=8,
                transient=True,
            )
            self._live.start()

    def __rich__(self) -> Text:
        """The spinner's text, redrawn a few times a second: what is awaited, and for how long."""
        said = _SAID.get(self.phase or "", self.phase or "starting")
        if self.phase == "waiting for the service's answer":
            said = f"waiting for {self.service}'s answer"
        return Text(f" {said} · {self.clock() - self.started:.0f} s elapsed")

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> Waiting:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False
