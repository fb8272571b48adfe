"""The library's front door: plan and apply a manifest from Python.

Takes a manifest (a path, or a dict already parsed) and options; gives a `Plan` (what would
happen) or an `ApplyReport` (what happened, with the path of results.json). The CLI is a thin
shell over these two functions, and a pipeline can call them directly:

    >>> from imgbatch import apply
    >>> report = apply("manifests/matrix.yaml", provider="placeholder")
    >>> [entry.file for entry in report.entries if entry.has_image][:2]
    ['s03-front-dawn.png', 's03-front-noon.png']
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import filelock

from imgbatch.errors import (
    ConfigError,
    LockedError,
    StoreError,
    StoreWriteError,
)
from imgbatch.housekeeping.prune import Pruned, prune_orphans
from imgbatch.manifest import Manifest, load_manifest, manifest_from_data
from imgbatch.manifest.catalogue import MIN_RPS
from imgbatch.pacing.gate import Clock, Finding, Pacer, RetryPolicy
from imgbatch.pacing.learned import QuotaStore, default_store_path
from imgbatch.pacing.quota import Quota
from imgbatch.plan.decide import WORK_ACTIONS, Action, Plan, PlannedShot
from imgbatch.plan.decide import make_plan as plan_shots
from imgbatch.plan.guards import may_replace_paid, refuse_placeholder_over_paid, refuse_to_start
from imgbatch.plan.pricing import Cost, CostLimit, MaxCost, PriceList, cost, price_list
from imgbatch.providers import Provider, create_provider, resolve_provider_name
from imgbatch.review.sheet import Thumbnailer
from imgbatch.review.sheet import update_after_apply as update_sheet
from imgbatch.run.bounds import Bound, MaxDuration, MaxRequests
from imgbatch.run.entries import abandoned_download
from imgbatch.run.executor import Executor, Listener, Phase, RunOutcome
from imgbatch.run.interrupts import Interrupts, interrupt_at_once, signal_handler
from imgbatch.run.sharing import StoreUse, Unsent, open_sharing, planned_with_store
from imgbatch.shots.expand import Expansion, expand, fetch_references, shot_list
from imgbatch.shots.request import KEY_FORMAT_VERSION
from imgbatch.shots.selection import in_shard, select_shots
from imgbatch.state.cache import STATE_DIR, ImageCache, check_writable, remove_stale_temporaries
from imgbatch.state.results import Journal, ResultEntry, load_state, write_results

DEFAULT_PROVIDER = "dashscope"


@dataclass(frozen=True)
class ApplyOptions:
    """How to run; None means: from the manifest, else imgbatch's default."""

    provider: str | None = None
    rps: float | None = None
    # K requests per P seconds; wins over rps. Either overrides a learned quota.
    quota: Quota | None = None
    concurrency: int | None = None
    # Where learned quotas are kept; None: the user's cache directory. False: not at all.
    quota_store: Path | None | bool = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    environ: Mapping[str, str] | None = None
    home: Path | None = None
    # After Ctrl-C, how long requests in flight may take before they are abandoned.
    grace_seconds: float = 30.0
    # A trust decision: local reference images may lie outside the manifest's folder tree.
    allow_reference_outside: bool = False
    # After a 200 without an image, ask once more with a simplified prompt (the seed's rule),
    # unless this or the manifest's `simplify: false` turns it off.
    simplify: bool = True
    # Send no paid request: refuse (FrozenError) when a shot needs one; restores still happen.
    frozen: bool = False
    # Stop sending after this many requests (retries included), or this many seconds after
    # sending began: requests in flight finish, the shots not run are left for the next apply.
    max_requests: int | None = None
    max_duration: float | None = None
    # The most the run may cost (5, "5 USD", a CostLimit); wins over the manifest's max_cost.
    max_cost: CostLimit | Decimal | float | str | None = None
    # Put imgbatch's image back over a file edited by hand, instead of keeping the edit.
    overwrite_edited: bool = False
    # Remove the orphaned shots' files (as imgbatch wrote them) and their results entries.
    prune: bool = False
    # Act on these shots only (ids or fnmatch globs); every other shot's entry is kept as it is.
    only: tuple[str, ...] = ()
    # A shared store (s3://, oss://, a folder); None: IMGBATCH_STORE, else the manifest's
    # output.store. Read-only restores from it and never writes it (untrusted jobs).
    store: str | None = None
    store_read_only: bool = False
    # (K, N): only the shots whose request key falls in shard K of N (sharding.py).
    shard: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.only, str):  # only="s01" means one pattern, not three letters
            object.__setattr__(self, "only", (self.only,))
        if self.only and self.prune:
            raise ConfigError(
                "--prune removes orphans, which --only leaves alone: use one or the other"
            )
        # The same bounds as --rps and limits.rps: a NaN rate would send nothing, forever.
        if self.rps is not None and not (math.isfinite(self.rps) and self.rps >= MIN_RPS):
            raise ConfigError(
                f"rps must be a finite number of at least {MIN_RPS:g}, got {self.rps}"
            )
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ConfigError(f"max_requests must be at least 1, got {self.max_requests}")
        if self.max_duration is not None and not (
            math.isfinite(self.max_duration) and self.max_duration > 0
        ):
            raise ConfigError(
                f"max_duration must be a finite number of seconds above 0, got {self.max_duration}"
            )
        if self.max_cost is not None:
            try:
                CostLimit.parse(self.max_cost)
            except ValueError as exc:
                raise ConfigError(f"max_cost: {exc}") from None

    def bounds(self) -> tuple[Bound, ...]:
        """What may stop this run before its shots are all done (see `imgbatch.run.bounds`)."""
        found: list[Bound] = []
        if self.max_requests is not None:
            found.append(MaxRequests(self.max_requests))
        if self.max_duration is not None:
            found.append(MaxDuration(self.max_duration))
        return tuple(found)


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
    # The bound that stopped the run (`Bound.name`: max_requests, max_duration), if one did.
    bounded: str | None = None
    # Hand-edited files renamed aside before a new image took their place: shot id -> new name
    # (relative to the output folder).
    moved_aside: Mapping[str, str] = field(default_factory=dict)
    # With `prune`: each orphan, and whether its file and entry are gone.
    pruned: tuple[Pruned, ...] = ()
    # With a shared store: its URL, the requests sent to it by operation, the images restored
    # from it and published to it, and what was wrong with records found damaged.
    store: StoreUse | None = None

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


def provider_name(
    manifest: Manifest,
    override: str | None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> str:
    """The provider to use: the override, else the manifest's, else dashscope; `auto` resolved."""
    name = override or manifest.provider or DEFAULT_PROVIDER
    return resolve_provider_name(name, os.environ if environ is None else environ, home)


ManifestSource = str | Path | Mapping[str, Any]
"""A manifest file's path, or a manifest already parsed into a dict (relative paths in it are
taken from the current folder)."""


def read_manifest(source: ManifestSource, *, allow_reference_outside: bool = False) -> Manifest:
    if isinstance(source, Mapping):
        return manifest_from_data(
            dict(source),
            display="manifest",
            base_dir=Path.cwd(),
            allow_reference_outside=allow_reference_outside,
        )
    return load_manifest(source, allow_reference_outside=allow_reference_outside)


def load_and_expand(
    path: ManifestSource,
    provider: str | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    *,
    allow_reference_outside: bool = False,
) -> tuple[Manifest, Expansion]:
    manifest = read_manifest(path, allow_reference_outside=allow_reference_outside)
    name = provider_name(manifest, provider, environ, home)
    return manifest, expand(manifest, provider=name, environ=environ)


def expand_shots(
    path: ManifestSource,
    *,
    provider: str | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    allow_reference_outside: bool = False,
) -> list[dict[str, Any]]:
    """Every shot the manifest makes, after vars, matrix, variants and `seed: auto`; see
    `imgbatch.shots.expand.shot_list`. Reads nothing but the manifest and its local references."""
    manifest = read_manifest(path, allow_reference_outside=allow_reference_outside)
    name = provider_name(manifest, provider, environ, home)
    return shot_list(manifest, provider=name, environ=environ)


def make_plan(
    path: ManifestSource,
    *,
    provider: str | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    allow_reference_outside: bool = False,
    overwrite_edited: bool = False,
    only: Sequence[str] = (),
    store: str | None = None,
) -> Plan:
    """What `apply` would do for each shot, reading the output folder but changing nothing and
    downloading nothing: see `imgbatch.plan.decide` for what that means for a reference URL.

    Raises `PaidImagesError`, as apply would, when the placeholder provider, not named
    explicitly, would replace images a paid provider made.

    With `only` (shot ids or fnmatch globs), the plan has those shots alone and no orphans.
    """
    environ = os.environ if environ is None else environ
    manifest, expansion = load_and_expand(
        path, provider, environ, home, allow_reference_outside=allow_reference_outside
    )
    selected = _narrowed(expansion, only)
    state = load_state(expansion.output_dir)
    prices = _prices(manifest, expansion, environ)
    planned = _plan(selected, state, overwrite_edited, only=bool(only), prices=prices)
    refuse_placeholder_over_paid(planned, provider, manifest)
    # With a shared store (--store, IMGBATCH_STORE, output.store): what another run made.
    return planned_with_store(planned, store, manifest, environ)


def _plan(
    expansion: Expansion,
    state: Mapping[str, ResultEntry],
    overwrite_edited: bool = False,
    *,
    only: bool = False,
    prices: PriceList | None = None,
) -> Plan:
    output_dir = expansion.output_dir
    plan = plan_shots(
        output_dir,
        expansion.shots,
        state,
        ImageCache(output_dir),
        provider=expansion.provider,
        overwrite_edited=overwrite_edited,
    )
    # Under --only the shots left out are not orphans: nothing is said or done about orphans.
    return replace(plan, orphans=() if only else plan.orphans, prices=prices)


def _prices(
    manifest: Manifest,
    expansion: Expansion,
    environ: Mapping[str, str],
    provider: Provider | None = None,
) -> PriceList:
    """The prices of the endpoint the run calls: the provider's, else the one the environment
    names (DASHSCOPE_HTTP_BASE_URL, else the SDK's default, Beijing)."""
    if provider is None:
        base_url = environ.get("DASHSCOPE_HTTP_BASE_URL") or None
        return price_list(expansion.provider, base_url, manifest.pricing)
    # A provider object from Python: only its own endpoint says where it bills.
    base_url = getattr(provider, "base_url", None)
    return price_list(provider.name, base_url, manifest.pricing, metered=provider.metered)


def _cost_limit(options: ApplyOptions, manifest: Manifest) -> CostLimit | None:
    if options.max_cost is not None:
        return CostLimit.parse(options.max_cost)
    return manifest.limits.max_cost


def _narrowed(expansion: Expansion, only: Sequence[str]) -> Expansion:
    """The expansion with the shots `only` selects (ConfigError for a pattern matching none)."""
    if not only:
        return expansion
    return replace(expansion, shots=select_shots(expansion.shots, only))


def apply(
    path: ManifestSource,
    options: ApplyOptions | None = None,
    *,
    provider: Provider | str | None = None,
    listener: Listener | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> ApplyReport:
    """Generate what changed and write results.json; see `apply_async`."""
    return asyncio.run(
        apply_async(path, options, provider=provider, listener=listener, on_plan=on_plan)
    )


async def apply_async(
    path: ManifestSource,
    options: ApplyOptions | None = None,
    *,
    provider: Provider | str | None = None,
    listener: Listener | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    clock: Clock | None = None,
) -> ApplyReport:
    """Plan, then make every shot that needs it, under one lock on the output folder.

    `on_plan` sees the plan before anything is sent; `listener` sees every finished shot and
    every retry as it happens, and a `Stopping` when the run stops sending.

    Ctrl-C (in the main thread): before anything is sent, KeyboardInterrupt at once; once the
    run is sending, see `Interrupts` (the report says `interrupted`).
    """
    with interrupt_at_once():
        async with contextlib.AsyncExitStack() as stack:  # a shared store, open for the run
            return await _apply(stack, path, options, provider, listener, on_plan, clock)


async def _apply(
    stack: contextlib.AsyncExitStack,
    path: ManifestSource,
    options: ApplyOptions | None,
    provider: Provider | str | None,
    listener: Listener | None,
    on_plan: Callable[[Plan], None] | None,
    clock: Clock | None,
) -> ApplyReport:
    options = options or ApplyOptions()
    if isinstance(provider, str):
        # A name, as on the command line; an object is used as it is.
        options, provider = replace(options, provider=provider), None
    environ = os.environ if options.environ is None else options.environ
    manifest, expansion = load_and_expand(
        path,
        options.provider,
        environ,
        options.home,
        allow_reference_outside=options.allow_reference_outside,
    )
    # Before anything is fetched or written: a pattern matching no shot is refused.
    everything, expansion = expansion, _narrowed(expansion, options.only)
    only = bool(options.only)
    if may_replace_paid(expansion.provider, options.provider):
        # Before anything is fetched, before credentials and before the lock: a refused run
        # connects to nothing and writes nothing at all.
        state = load_state(expansion.output_dir)
        early = _plan(expansion, state, options.overwrite_edited, only=only)
        refuse_placeholder_over_paid(early, options.provider, manifest)
    # Each reference URL once, keyed by its content, so that the plan below knows every key
    # (a frozen run pays nothing for a URL whose content did not change).
    expansion = await fetch_references(expansion)
    output_dir = expansion.output_dir
    if options.shard is not None:
        # By request key, known only now (a reference URL's content is part of it).
        expansion, only = replace(expansion, shots=in_shard(expansion.shots, options.shard)), True
    sharing = await open_sharing(
        stack, options.store, options.store_read_only, manifest, environ, output_dir
    )
    if sharing is not None:
        # Before any plan: what any process made is restored like a locally cached image.
        early = _plan(expansion, load_state(output_dir), options.overwrite_edited, only=only)
        await sharing.hydrate(item.shot for item in early.shots if item.shot and item.paid)
    limit = _cost_limit(options, manifest)
    if options.frozen or limit is not None:
        # Before credentials and before the lock: a refused run writes nothing at all.
        state = load_state(output_dir)
        prices = _prices(manifest, expansion, environ)
        early = _plan(expansion, state, options.overwrite_edited, only=only, prices=prices)
        refuse_to_start(early, options.frozen, limit)
    # Credentials are checked before anything is written.
    try:
        provider = provider or create_provider(expansion.provider, environ, options.home)
    except ConfigError:
        if not (options.frozen and sharing is not None):
            raise
        provider = Unsent(expansion.provider)  # assembling from the store: no key needed
    prices = _prices(manifest, expansion, environ, provider)
    started = time.monotonic()
    with exclusive_output(output_dir):
        cache = ImageCache(output_dir)
        # Before the first request: a folder that cannot be written would waste every image.
        check_writable(output_dir)
        check_writable(output_dir / STATE_DIR)
        if cache.root.exists():
            check_writable(cache.root)
        remove_stale_temporaries(output_dir)
        state = load_state(output_dir)
        plan = _plan(expansion, state, options.overwrite_edited, only=only, prices=prices)
        # Again: another run may have changed the folder meanwhile.
        refuse_placeholder_over_paid(plan, options.provider, manifest)
        refuse_to_start(plan, options.frozen, limit)
        if on_plan:
            on_plan(plan)
        given = _given_quota(options, manifest)
        models = sorted({item.shot.request.model for item in plan.shots if item.shot})
        account: str | None = getattr(provider, "quota_account", None)
        store = _quota_store(options) if provider.metered and account else None
        learned = store.load(account, models) if store and account and given is None else {}
        pacer = Pacer(
            given=given,
            # A rate (--rps, limits.rps) is kept on average; a quota K/P strictly.
            average=options.quota is None
            and (options.rps or manifest.limits.rps) is not None
            and manifest.limits.quota is None,
            learned={model: (found.window, found.cap) for model, found in learned.items()},
            unlimited=not provider.metered,
            clock=clock,
        )
        journal = Journal(output_dir)
        thumbnails = Thumbnailer(output_dir, listener)  # the contact sheet's, made as shots land
        interrupts = Interrupts(options.grace_seconds)
        # From the first request until results.json and the sheet are written: a Ctrl-C while
        # they are written waits for them (they are what the run leaves behind).
        with signal_handler(asyncio.get_running_loop(), interrupts):
            try:
                async with provider:
                    executor = Executor(
                        provider,
                        cache,
                        journal.record,
                        pacer=pacer,
                        concurrency=options.concurrency
                        or manifest.limits.concurrency
                        or _local_concurrency(provider),
                        retry=options.retry,
                        clock=clock,
                        listener=thumbnails,
                        simplify=options.simplify and manifest.simplify,
                        frozen=options.frozen,
                        bounds=(
                            *options.bounds(),
                            *([MaxCost(limit, prices)] if limit is not None else []),
                        ),
                        shared=sharing,
                    )
                    outcome = await interrupts.run(executor, plan)
            finally:
                journal.close()
                thumbnails.close()
            entries, not_run = _settle(plan, outcome, provider.metered)
            orphans = [item.previous for item in plan.orphans if item.previous is not None]
            pruned: tuple[Pruned, ...] = ()
            if options.prune:
                in_use = {shot.file for shot in expansion.shots}
                pruned, kept = prune_orphans(output_dir, orphans, in_use)
                orphans = list(kept)
            # The sheet marks what changed: a shot not run changed nothing.
            touched = tuple(
                replace(item, action=Action.UNCHANGED) if item.id in not_run else item
                for item in plan.shots
            )
            written, sheet_plan = entries, replace(plan, shots=touched)
            if only:
                written, orphans, sheet_plan = _with_unselected(
                    everything, state, sheet_plan, entries
                )
            meta = {
                # Relative, so an output folder can be moved or committed with its manifest.
                "manifest": None
                if isinstance(path, Mapping)
                else os.path.relpath(Path(path).resolve(), output_dir.resolve()),
                "provider": provider.name,
                "key_format": KEY_FORMAT_VERSION,
            }
            try:
                results = write_results(
                    output_dir,
                    written,
                    orphans,
                    meta,
                    updated_at=datetime.now(UTC).isoformat(timespec="seconds"),
                )
            except StoreWriteError as exc:
                raise StoreError(_unwritten_results(exc, outcome, journal.path)) from None
            sheet, sheet_problem = update_sheet(output_dir, manifest.name, sheet_plan, written)
    saved: list[str] = []
    if store is not None and account is not None:
        with contextlib.suppress(OSError):  # a head start for next time, not worth failing for
            saved = store.save(account, outcome.quotas)
    quotas = tuple(
        QuotaNote(finding, finding.model in learned, finding.model in saved)
        for finding in outcome.quotas
    )
    return ApplyReport(
        plan=plan,
        results_path=results,
        entries=entries,
        stopped=outcome.stopped,
        interrupted=interrupts.count > 0,
        requests=outcome.requests,
        billed=outcome.billed,
        maybe_billed=outcome.maybe_billed,
        throttled=outcome.throttled,
        retries=outcome.retries,
        quotas=quotas,
        elapsed=time.monotonic() - started,
        cost=cost(outcome.billed_models.elements(), prices),
        possible_extra_cost=cost(outcome.maybe_billed_models.elements(), prices),
        sheet=sheet,
        sheet_problem=sheet_problem,
        not_run=not_run,
        bounded=outcome.bounded,
        moved_aside=dict(outcome.moved_aside),
        pruned=pruned,
        store=sharing.use() if sharing is not None else None,
    )


def _with_unselected(
    everything: Expansion,
    state: Mapping[str, ResultEntry],
    plan: Plan,
    entries: Sequence[ResultEntry],
) -> tuple[tuple[ResultEntry, ...], list[ResultEntry], Plan]:
    """Under --only: the results entries (the run's for the shots it acted on, every other
    shot's as it was, in manifest order), the orphans as they were, and the plan the contact
    sheet is drawn from (every shot, those left out as unchanged)."""
    acted = {entry.id: entry for entry in entries}
    planned = {item.id: item for item in plan.shots}
    ids = {shot.id for shot in everything.shots}
    written = []
    for shot in everything.shots:
        entry = acted.get(shot.id) or state.get(shot.id)
        if entry is not None:
            written.append(entry)
    orphans = [entry for shot_id, entry in state.items() if shot_id not in ids]
    shots = tuple(
        planned.get(shot.id)
        or PlannedShot(shot.id, Action.UNCHANGED, "not selected", shot, state.get(shot.id))
        for shot in everything.shots
    )
    return tuple(written), orphans, replace(plan, shots=shots)


def _local_concurrency(provider: Provider) -> int | None:
    """A provider that works on this machine (the placeholder draws in threads) gets as many
    shots in flight as asyncio's default thread pool has threads: more would only queue, and a
    Ctrl-C would then have hundreds of shots "in flight" to wait for. None: the executor's
    default, for a service whose work in progress is elsewhere."""
    return None if provider.metered else min(32, (os.cpu_count() or 1) + 4)


def _given_quota(options: ApplyOptions, manifest: Manifest) -> Quota | None:
    """The quota the user gave: options first, then the manifest; a quota wins over a rate."""
    if options.quota is not None:
        return options.quota
    if options.rps is not None:
        return Quota.per_second(options.rps)
    if manifest.limits.quota is not None:
        return manifest.limits.quota
    if manifest.limits.rps is not None:
        return Quota.per_second(manifest.limits.rps)
    return None


def _quota_store(options: ApplyOptions) -> QuotaStore | None:
    if options.quota_store is False:
        return None
    if isinstance(options.quota_store, Path):
        return QuotaStore(options.quota_store)
    return QuotaStore(default_store_path())


def _unwritten_results(error: StoreWriteError, outcome: RunOutcome, journal: Path) -> str:
    """What to tell the user when results.json cannot be written at the end of a run."""
    lines = [
        f"{error}; the shots this run finished are in {journal} (unless the disk was already "
        "full), and the next apply picks them up"
    ]
    if outcome.stopped:
        lines.insert(0, f"the run stopped: {outcome.stopped}")
    return "\n".join(lines)


def _settle(
    plan: Plan, outcome: RunOutcome, metered: bool
) -> tuple[tuple[ResultEntry, ...], dict[str, str]]:
    """results.json's shot entries, and the shots not run with why. A shot not run keeps its
    previous entry (nothing of it changed), and a new one gets none."""
    entries: list[ResultEntry] = []
    not_run: dict[str, str] = {}
    for item in plan.shots:
        found = _final_entry(item, outcome, metered)
        if isinstance(found, str):
            not_run[item.id] = found
            if item.previous is not None:
                entries.append(item.previous)
        else:
            entries.append(found)
    return tuple(entries), not_run


def _final_entry(item: PlannedShot, outcome: RunOutcome, metered: bool) -> ResultEntry | str:
    """The shot's entry after the run, or why it was not run."""
    entry = outcome.entries.get(item.id)
    if entry is not None:
        return entry
    reason = outcome.not_run.get(item.id)
    if reason is not None:
        return reason
    if item.action not in WORK_ACTIONS and item.previous is not None:
        return item.previous  # cancelled before the run even began: nothing to do for it anyway
    # The run was cancelled outright (a third Ctrl-C, or from Python) with this shot unfinished.
    downloading = outcome.downloading.get(item.id)
    if downloading is not None:
        return abandoned_download(downloading)
    if metered and outcome.in_flight.get(item.id) == Phase.SENDING:
        return "abandoned in flight when interrupted; DashScope may have billed it"
    return f"not run: {outcome.stopped or 'interrupted'}"


@contextlib.contextmanager
def exclusive_output(output_dir: Path) -> Iterator[None]:
    """One apply (or generate) per output folder at a time; the second is refused, never
    interleaved."""
    for folder in (output_dir / STATE_DIR, output_dir / STATE_DIR / "cache"):
        if folder.is_symlink():
            # A shot list can come from a pull request: a link committed in place of the state
            # folder would have imgbatch write its cache and lock wherever the link points.
            raise StoreError(
                f"{folder} is a symbolic link; imgbatch keeps its state only in a real folder "
                "(replace the link by a folder); nothing was sent or written"
            )
    try:
        (output_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the output folder {output_dir}: {exc}") from None
    path = output_dir / STATE_DIR / "lock"
    lock = filelock.FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LockedError(
            f"another imgbatch apply is writing to {output_dir}; wait for it to finish "
            "(the lock is released when that process exits, even if it crashed)"
        ) from None
    except OSError as exc:
        # A folder or a symbolic link in its place (filelock never follows a link).
        raise StoreError(
            f"cannot take the lock {path} ({exc.strerror or exc}); move it aside and run apply "
            "again"
        ) from None
    try:
        yield
    finally:
        lock.release()
