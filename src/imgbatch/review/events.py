"""What a run says as it goes, for whoever shows it: a shot finished, a retry, a notice, a stop.

The executor emits these to a `Listener` (the progress display, the contact sheet's
thumbnailer, a program's own callback); they are plain data, so nothing that listens needs the
executor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imgbatch.errors import ProviderError
from imgbatch.state.results import ResultEntry
from imgbatch.units.quota import Quota


@dataclass(frozen=True)
class Retrying:
    shot_id: str
    attempt: int
    delay: float
    error: ProviderError


@dataclass(frozen=True)
class Notice:
    """Something the user should know about a shot that is not its result (a damaged cache
    entry, discarded)."""

    shot_id: str
    message: str


@dataclass(frozen=True)
class Stopping:
    """The run sends nothing new: why, and what is still in flight. `grace`: how long it is
    waited for before being abandoned (None: until it finishes); `abandoning`: it is being
    abandoned now."""

    reason: str
    in_flight: int
    # Some of them are paid requests still awaiting the service's answer, which it may bill;
    # a download of an image already billed (a recover) is not.
    metered: bool
    grace: float | None = None
    abandoning: bool = False
    # Images received and being written: abandoning does not drop them.
    writing: int = 0
    # What abandons the requests in flight sooner: the interrupt again.
    again: str = "Ctrl-C"


@dataclass(frozen=True)
class Pacing:
    """The quota a model's requests are paced at changed, or where it came from: `source` is
    given, stated, learned, probed (found from 429s) or probing; `probing_up`: a faster window is
    being tried."""

    model: str
    window: Quota
    source: str
    probing_up: bool
    cap: int | None  # requests in progress at most, once confirmed


@dataclass(frozen=True)
class FromStore:
    """The shot's result, which comes next, is an image restored from the shared store: made,
    and paid for, by another run (its entry is its maker's, `generated`)."""

    shot_id: str


RunEvent = ResultEntry | Retrying | Notice | Stopping | Pacing | FromStore
Listener = Callable[[RunEvent], None]


class RunStatuses:
    """Each finished shot's status as the run reports it (its summary, `--json`, the progress
    of the CLI and of the MCP server alike): a shot announced by `FromStore` is `from_store`
    (its entry is its maker's, `generated`), any other its entry's status. Takes the run's
    events in the order they come; gives the status of each shot an event finishes."""

    def __init__(self) -> None:
        self._from_store: set[str] = set()

    def finished(self, event: RunEvent) -> str | None:
        """The status of the shot `event` finishes (a `ResultEntry`); None for any other."""
        if isinstance(event, FromStore):
            self._from_store.add(event.shot_id)
            return None
        if isinstance(event, ResultEntry):
            return "from_store" if event.id in self._from_store else event.status
        return None
