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


RunEvent = ResultEntry | Retrying | Notice | Stopping
Listener = Callable[[RunEvent], None]
