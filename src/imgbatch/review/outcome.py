"""What an apply did, as data: the report every front end reads (summary, `--json`, step summary).

Takes what the run gives back (its plan, results entries, counts, quotas); gives an
`ApplyReport`. Nothing here runs anything: `imgbatch.run.apply` fills it in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imgbatch.housekeeping.prune import Pruned
from imgbatch.pacing.gate import Finding
from imgbatch.plan.decide import WORK_ACTIONS, Action, Plan
from imgbatch.state.results import ResultEntry
from imgbatch.units.money import Cost


@dataclass(frozen=True)
class QuotaNote:
    """What a run knew of one model's quota: how it began and what it ended with."""

    finding: Finding
    learned_before: bool  # the run started from a quota an earlier run learned
    saved: bool  # what this run found is kept for the next one


@dataclass(frozen=True)
class ApplyReport:
    plan: Plan
    results_path: Path
    # results.json's shot entries: a shot this run did not run keeps its previous entry, or
    # has none if it never had one.
    entries: tuple[ResultEntry, ...]
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
    # Shots with something to do that this run did not do (stopped or interrupted first), and
    # why: nothing of theirs changed, and the next apply does them.
    not_run: Mapping[str, str] = field(default_factory=dict)
    # Those of them that were sent and never answered (now, or on an earlier try): each may
    # have been billed, so they are not said to have sent nothing.
    maybe_billed_not_run: frozenset[str] = frozenset()
    # The bound that stopped the run (`Bound.name`: max_requests, max_duration), if one did.
    bounded: str | None = None
    # Hand-edited files renamed aside before a new image took their place: shot id -> new name
    # (relative to the output folder).
    moved_aside: Mapping[str, str] = field(default_factory=dict)
    # With `prune`: each orphan, and whether its file and entry are gone.
    pruned: tuple[Pruned, ...] = ()
    # Chosen takes (`pick:`) copied to <shot>.png by this run: the file names.
    picked: tuple[str, ...] = ()

    def count(self, status: str) -> int:
        """Shots this run made `status` (generated, cached: restored from the cache, failed,
        unfetched: billed but not downloaded); a shot it left alone (unchanged, or edited by
        hand and kept) or did not run keeps its entry, whatever its status, and is not counted
        here."""
        acted = {
            item.id
            for item in self.plan.shots
            if item.action in WORK_ACTIONS and item.id not in self.not_run
        }
        return sum(1 for entry in self.entries if entry.status == status and entry.id in acted)

    @property
    def unchanged(self) -> int:
        return self.plan.count(Action.UNCHANGED)

    @property
    def remaining(self) -> int:
        """Shots left for the next apply because this one stopped before them."""
        return len(self.not_run)

    @property
    def ok(self) -> bool:
        return self.stopped is None and self.count("failed") == self.count("unfetched") == 0
