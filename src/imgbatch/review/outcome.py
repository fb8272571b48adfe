"""What an apply did, as data: the report every front end reads (summary, `--json`, step summary).

Takes what the run gives back (its plan, each shot's `ShotOutcome`, counts, quotas); gives an
`ApplyReport`. Nothing here runs anything: `imgbatch.run.apply` settles each shot once and fills
it in, and every report reads the same outcomes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imgbatch.housekeeping.prune import Pruned
from imgbatch.pacing.gate import Finding
from imgbatch.plan.decide import Action, Plan
from imgbatch.state.results import ResultEntry
from imgbatch.units.money import Cost


@dataclass(frozen=True)
class StoreUse:
    """What a run did with a shared store (never a credential or a signed URL): the requests it
    sent it by operation, the images restored from it and published to it, what was wrong
    with records found damaged (shot id, message), and the local copies `--no-local-copy`
    kept because a `gc --store` was at work (the next apply drops them)."""

    url: str
    read_only: bool
    requests: Mapping[str, int]
    restored: int
    published: int
    notices: tuple[tuple[str, str], ...] = ()
    kept_local: int = 0

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


@dataclass(frozen=True)
class QuotaNote:
    """What a run knew of one model's quota: how it began and what it ended with."""

    finding: Finding
    learned_before: bool  # the run started from a quota an earlier run learned
    saved: bool  # what this run found is kept for the next one


# What became of a shot: generated, cached, failed or unfetched (its entry, made by this run);
# from_store (its image restored from a shared store: made, and paid for, by another run; its
# entry is its maker's, `generated` in results.json); unchanged or drift (left alone, its entry
# as it was); not_run (stopped before it).
OutcomeStatus = Literal[
    "generated", "cached", "from_store", "failed", "unfetched", "unchanged", "drift", "not_run"
]


@dataclass(frozen=True, slots=True)
class ShotOutcome:
    """One shot's final outcome after an apply, decided once when the run settles."""

    id: str
    action: Action  # what the plan decided for it
    status: OutcomeStatus
    # Its results.json entry after the run: one this run made, or the one it had (a shot left
    # alone or not run keeps it; a new shot not run has none).
    entry: ResultEntry | None
    why_not_run: str | None = None
    # The service made (and billed) an image for it in this run; or was sent it and the answer
    # was lost, so may have (for a shot not run: nothing of it changed).
    billed: bool = False
    maybe_billed: bool = False
    # Where its hand-edited file was renamed aside before the new image took its place.
    moved_aside: str | None = None

    @property
    def file(self) -> str | None:
        return self.entry.file if self.entry else None

    @property
    def error(self) -> str | None:
        """Why it failed, or why it was not run."""
        if self.why_not_run is not None:
            return self.why_not_run
        return self.entry.error if self.entry else None

    @property
    def error_code(self) -> str | None:
        return self.entry.error_code if self.entry and self.status != "not_run" else None

    @property
    def error_status(self) -> int | None:
        return self.entry.error_status if self.entry and self.status != "not_run" else None

    @property
    def request_id(self) -> str | None:
        return self.entry.request_id if self.entry and self.status != "not_run" else None


@dataclass(frozen=True, repr=False)
class ApplyReport:
    plan: Plan
    results_path: Path
    # Each shot's outcome, in manifest order (the selected shots, under --only).
    shots: tuple[ShotOutcome, ...]
    stopped: str | None
    interrupted: bool
    requests: int
    # Images the service made (billed), and requests sent whose answer was lost (may have been).
    billed: int
    maybe_billed: int
    throttled: int
    retries: int
    quotas: tuple[QuotaNote, ...]
    elapsed: float
    # The images billed at their price, and what the requests whose answer was lost may add.
    cost: Cost = Cost(None, None)
    possible_extra_cost: Cost = Cost(None, None)
    # The contact sheet (index.html), or why it could not be drawn: a warning, never a failure.
    sheet: Path | None = None
    sheet_problem: str | None = None
    # The bound that stopped the run (`Bound.name`: max_requests, max_duration), if one did.
    bounded: str | None = None
    # With `prune`: each orphan, and whether its file and entry are gone.
    pruned: tuple[Pruned, ...] = ()
    # Chosen takes (`pick:`) copied to <shot>.png by this run: the file names.
    picked: tuple[str, ...] = ()
    # With a shared store (--store): what the run did with it.
    store: StoreUse | None = None
    # Plans made: 1, and 1 more when another process changed the output folder between the
    # plan and the lock (`replanned`: made again under the lock), or one was needed before the
    # references were fetched or a store opened, or to know what to fetch from a store.
    plans: int = 1
    replanned: bool = False

    @property
    def entries(self) -> tuple[ResultEntry, ...]:
        """results.json's shot entries: a shot this run did not run keeps its previous entry,
        or has none if it never had one."""
        return tuple(shot.entry for shot in self.shots if shot.entry is not None)

    @property
    def not_run(self) -> Mapping[str, str]:
        """Shots with something to do that this run did not do (stopped or interrupted first),
        and why: nothing of theirs changed, and the next apply does them."""
        return {shot.id: shot.why_not_run for shot in self.shots if shot.why_not_run is not None}

    @property
    def maybe_billed_not_run(self) -> frozenset[str]:
        """Those of them that were sent and never answered (now, or on an earlier try): each may
        have been billed, so they are not said to have sent nothing."""
        return frozenset(
            shot.id for shot in self.shots if shot.status == "not_run" and shot.maybe_billed
        )

    @property
    def moved_aside(self) -> Mapping[str, str]:
        """Hand-edited files renamed aside before a new image took their place: shot id -> new
        name (relative to the output folder)."""
        return {shot.id: shot.moved_aside for shot in self.shots if shot.moved_aside}

    def count(self, status: OutcomeStatus) -> int:
        """Shots this run made `status` (generated, cached: restored from the cache,
        from_store: restored from a shared store, made by another run, failed, unfetched: billed
        but not downloaded), or left `unchanged`, `drift`, `not_run`."""
        return sum(1 for shot in self.shots if shot.status == status)

    @property
    def unchanged(self) -> int:
        return self.count("unchanged")

    @property
    def remaining(self) -> int:
        """Shots left for the next apply because this one stopped before them."""
        return len(self.not_run)

    @property
    def ok(self) -> bool:
        return self.stopped is None and self.count("failed") == self.count("unfetched") == 0

    def __repr__(self) -> str:
        # Short, whatever the run's size: asyncio.run formats the finished task, result and all,
        # when it puts back the SIGINT handler (an enum's error message quotes the old handler),
        # and a dataclass repr of 100,000 shots cost seconds and hundreds of megabytes there.
        return (
            f"<ApplyReport {len(self.shots)} shots, {self.requests} requests, "
            f"stopped={self.stopped!r}, results={str(self.results_path)!r}>"
        )
