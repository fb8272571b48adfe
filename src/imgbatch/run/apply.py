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
import contextvars
import functools
import gc
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from imgbatch.errors import (
    ConfigError,
    StoreError,
    StoreWriteError,
)
from imgbatch.housekeeping.prune import Pruned, prune_orphans
from imgbatch.manifest import Limits, Manifest
from imgbatch.manifest.catalogue import MIN_RPS
from imgbatch.manifest.loader import ManifestSource, read_manifest
from imgbatch.pacing.gate import Clock, Pacer, RetryPolicy
from imgbatch.pacing.learned import Learned, QuotaStore, default_store_path
from imgbatch.plan.decide import WORK_ACTIONS, Action, Plan, PlannedShot
from imgbatch.plan.decide import make_plan as plan_shots
from imgbatch.plan.guards import (
    may_replace_paid,
    refuse_paying_for_store_only,
    refuse_placeholder_over_paid,
    refuse_to_start,
)
from imgbatch.plan.pricing import PriceList, cost, price_list
from imgbatch.providers import Provider, create_provider, resolve_provider_name
from imgbatch.review.events import Listener
from imgbatch.review.outcome import ApplyReport, OutcomeStatus, QuotaNote, ShotOutcome
from imgbatch.review.sheet import Thumbnailer, signed_links, write_thumbnail
from imgbatch.review.sheet import update_after_apply as update_sheet
from imgbatch.run.bounds import Bound, MaxCost, MaxDuration, MaxRequests
from imgbatch.run.entries import abandoned_download
from imgbatch.run.executor import Executor, Phase, RunOutcome
from imgbatch.run.interrupts import Interrupts, interrupt_at_once, signal_handler
from imgbatch.run.picks import fetch_picked, place_picks
from imgbatch.run.sharing import SharedRun, Unsent, open_sharing, planned_with_store
from imgbatch.run.store_only import (
    confirmed,
    drop_local_copies,
    kept_in_store,
    moved_to_store,
    named_store,
    require_store,
    stored_only,
)
from imgbatch.shots.expand import (
    Expansion,
    expand,
    fetch_references,
    references_to_fetch,
    shot_list,
)
from imgbatch.shots.request import KEY_FORMAT_VERSION
from imgbatch.shots.selection import in_shard, select_shots, shard_problem
from imgbatch.state.folder import OutputFolder, owner_of
from imgbatch.state.record import FolderState, Owner
from imgbatch.state.results import FileIdentity, ResultEntry
from imgbatch.units.money import CostLimit
from imgbatch.units.quota import Quota

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
    # Apply into an output folder another manifest owns (its shots are kept apart, untouched).
    force: bool = False
    # A shared store (s3://, oss://, a folder); None: IMGBATCH_STORE, else the manifest's
    # output.store. Read-only restores from it and never writes it (untrusted jobs).
    store: str | None = None
    store_read_only: bool = False
    # (K, N): only the shots whose request key falls in shard K of N (`in_shard`).
    shard: tuple[int, int] | None = None
    # Keep the images in the shared store only: none in the output folder (thumbnails aside),
    # and a shot whose image is in the store only is not fetched again (`run.store_only`).
    no_local_copy: bool = False

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
        if self.shard is not None and (problem := shard_problem(self.shard)) is not None:
            raise ConfigError(f"shard: {problem}")
        if self.max_cost is not None:
            try:
                CostLimit.parse(self.max_cost)
            except ValueError as exc:
                raise ConfigError(f"max_cost: {exc}") from None

    @property
    def local(self) -> bool:
        """Whether the run keeps its images in the output folder (not `no_local_copy`)."""
        return not self.no_local_copy

    def bounds(self) -> tuple[Bound, ...]:
        """What may stop this run before its shots are all done (see `imgbatch.run.bounds`)."""
        found: list[Bound] = []
        if self.max_requests is not None:
            found.append(MaxRequests(self.max_requests))
        if self.max_duration is not None:
            found.append(MaxDuration(self.max_duration))
        return tuple(found)


def provider_name(
    manifest: Manifest,
    override: str | None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> str:
    """The provider to use: the override, else the manifest's, else dashscope; `auto` resolved."""
    name = override or manifest.provider or DEFAULT_PROVIDER
    return resolve_provider_name(name, os.environ if environ is None else environ, home)


def load_and_expand(
    path: ManifestSource,
    provider: str | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    *,
    allow_reference_outside: bool = False,
) -> tuple[Manifest, Expansion]:
    """The manifest read and its shots expanded (the cyclic collector paused meanwhile); the
    manifest without its shots' fields (`Manifest.without_fields`): the expansion has them."""
    with collector_paused():
        manifest = read_manifest(path, allow_reference_outside=allow_reference_outside)
        name = provider_name(manifest, provider, environ, home)
        expansion = expand(manifest, provider=name, environ=environ)
        return manifest.without_fields(), expansion


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
    force: bool = False,
    store: str | None = None,
    no_local_copy: bool = False,
) -> Plan:
    """What `apply` would do for each shot, reading the output folder but changing nothing and
    downloading nothing: see `imgbatch.plan.decide` for what that means for a reference URL.

    Raises `PaidImagesError`, as apply would, when the placeholder provider, not named
    explicitly, would replace images a paid provider made.

    With `only` (shot ids or fnmatch globs), the plan has those shots alone and no orphans.
    Raises `FolderOwnedError`, as apply would, when another manifest owns the output folder
    (unless `force`); `ConfigError` for `no_local_copy` without a store; `StoreOnlyError`, as
    apply would, when it would pay again for images results.json keeps in a store only, one
    this plan does not name.
    """
    environ = os.environ if environ is None else environ
    with collector_paused():
        manifest, expansion = load_and_expand(
            path, provider, environ, home, allow_reference_outside=allow_reference_outside
        )
        if no_local_copy:
            require_store(store, environ, manifest)
        named = named_store(store, environ, manifest)
        selected = _narrowed(expansion, only)
        state = _owned_state(path, manifest, expansion, force=force).mine
        prices = _prices(manifest, expansion, environ)
        planned = _plan(
            selected,
            state,
            overwrite_edited,
            only=bool(only),
            prices=prices,
            local=not no_local_copy,
            store=named,
        )
    refuse_placeholder_over_paid(planned, provider, manifest)
    # With a shared store (--store, IMGBATCH_STORE, output.store): what another run made.
    planned = planned_with_store(planned, store, manifest, environ)
    refuse_paying_for_store_only(planned)
    return planned


def _plan(
    expansion: Expansion,
    state: Mapping[str, ResultEntry],
    overwrite_edited: bool = False,
    *,
    only: bool = False,
    prices: PriceList | None = None,
    local: bool = True,
    store: str | None = None,
) -> Plan:
    output_dir = expansion.output_dir
    plan = plan_shots(
        output_dir,
        expansion.shots,
        state,
        OutputFolder(output_dir).cache,
        provider=expansion.provider,
        overwrite_edited=overwrite_edited,
        local_copies=local,
        store=store,
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
    with interrupt_at_once(), long_lived():
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
    """The phases: prepare (the plan, made before the lock, and the guards), then under the
    lock preflight (the plan stands unless the folder changed meanwhile), execute and settle
    (results.json, prune, the sheet), then the report."""
    prep = await _prepare(path, options or ApplyOptions(), provider, stack)
    started = time.monotonic()
    with OutputFolder(prep.expansion.output_dir).lock():
        with collector_paused():
            planned = _preflight(prep, on_plan)
        plan = planned.plan
        pacing = _pacing(prep, plan, clock)
        interrupts = Interrupts(prep.options.grace_seconds)
        # From the first request until results.json and the sheet are written: a Ctrl-C while
        # they are written waits for them (they are what the run leaves behind).
        with signal_handler(asyncio.get_running_loop(), interrupts):
            outcome, journal = await _execute(prep, plan, pacing.pacer, listener, clock, interrupts)
            if prep.sharing is not None:
                await prep.sharing.close()  # its restores write into the folder: under the lock
            # With a shared store, settling uploads and signs over the network: the collector
            # stays on for what that leaves behind.
            with collector_paused() if prep.sharing is None else contextlib.nullcontext():
                settled = await _settle_run(prep, plan, planned.held, outcome, journal)
    return ApplyReport(
        plan=plan,
        results_path=settled.results,
        shots=settled.shots,
        stopped=outcome.stopped,
        interrupted=interrupts.count > 0,
        requests=outcome.requests,
        billed=outcome.billed,
        maybe_billed=outcome.maybe_billed,
        throttled=outcome.throttled,
        retries=outcome.retries,
        quotas=pacing.remember(outcome),
        elapsed=time.monotonic() - started,
        cost=cost(outcome.billed_models.elements(), prep.prices),
        possible_extra_cost=cost(outcome.maybe_billed_models.elements(), prep.prices),
        sheet=settled.sheet,
        sheet_problem=settled.sheet_problem,
        bounded=outcome.bounded,
        pruned=settled.pruned,
        picked=settled.picked,
        store=prep.sharing.use() if prep.sharing is not None else None,
        plans=planned.plans,
        replanned=planned.replanned,
    )


@dataclass(frozen=True)
class _Planned:
    """A plan, the output folder's state it was made from (`held`), and the folder's `version`
    read just before that state; `plans`: how many plans the run has made (see `_prepare`)."""

    plan: Plan
    held: _Held
    version: tuple[FileIdentity | None, ...]
    plans: int
    # Made again under the lock: another process changed the folder after the first plan.
    replanned: bool = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for a phase that makes objects by the hundred
    thousand (loading, planning, settling a big shot list): none of them is garbage in a cycle,
    and the collector's passes over them all, again and again as they accumulate, were a fifth
    of the CPU of a 100,000-shot no-op apply. Reference counting still frees what is dropped;
    a cycle made meanwhile is collected after, not lost."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if _FREEZING.get():
            gc.freeze()  # see `long_lived`
        gc.enable()


# Within `long_lived`: what a paused phase made is frozen out of the collector's passes.
_FREEZING: contextvars.ContextVar[bool] = contextvars.ContextVar("_FREEZING", default=False)


@contextlib.contextmanager
def long_lived() -> Iterator[None]:
    """For a run: what each `collector_paused` phase made (the manifest, its shots, the state,
    the plan: a million objects for 100,000 shots, kept to the end) is frozen (`gc.freeze`)
    as the phase ends, so that the collector's later passes skip it (those passes were half
    a second of a 100,000-shot no-op apply), and given back to it when the run ends. Nothing
    is lost: reference counting frees all but cycles, which are collected after. Not when
    something else has frozen objects (a caller's own `gc.freeze`, left as it is)."""
    if gc.get_freeze_count() or _FREEZING.get():
        yield
        return
    token = _FREEZING.set(True)
    try:
        yield
    finally:
        _FREEZING.reset(token)
        gc.unfreeze()


@dataclass(frozen=True)
class _Loaded:
    """What preparing reads before anything is fetched or connected to, and every plan of the
    run is made from: the manifest, its shots (every one, and those selected), the environment,
    and the store named (its canonical URL, `named_store`), if any."""

    path: ManifestSource
    options: ApplyOptions
    manifest: Manifest
    everything: Expansion
    expansion: Expansion
    environ: Mapping[str, str]
    store: str | None

    def held(self) -> _Held:
        """The output folder's state, as `_owned_state` gives it."""
        return _owned_state(self.path, self.manifest, self.everything, force=self.options.force)

    def plan(
        self,
        expansion: Expansion,
        state: Mapping[str, ResultEntry],
        *,
        only: bool,
        prices: PriceList | None = None,
    ) -> Plan:
        """The plan of `expansion`'s shots from `state`, as the options and the store say."""
        return _plan(
            expansion,
            state,
            self.options.overwrite_edited,
            only=only,
            prices=prices,
            local=self.options.local,
            store=self.store,
        )


@dataclass(frozen=True)
class _Prepared:
    """What preparing gives: what was loaded, the shots selected (their references fetched,
    `expansion`), the plan made before the lock, and the provider chosen, with its prices."""

    loaded: _Loaded
    expansion: Expansion
    limit: CostLimit | None
    provider: Provider
    prices: PriceList
    planned: _Planned
    # The shared store, if one is named; whether only some shots are acted on (--only, --shard).
    sharing: SharedRun | None = None
    partial: bool = False

    @property
    def path(self) -> ManifestSource:
        return self.loaded.path

    @property
    def options(self) -> ApplyOptions:
        return self.loaded.options

    @property
    def manifest(self) -> Manifest:
        return self.loaded.manifest

    @property
    def everything(self) -> Expansion:
        return self.loaded.everything


async def _prepare(
    path: ManifestSource,
    options: ApplyOptions,
    provider: Provider | str | None,
    stack: contextlib.AsyncExitStack,
) -> _Prepared:
    """Load, expand, fetch the references, make the plan (`_plan_at_version`: the one plan,
    unless the folder changes before the lock) and run the guards, then choose the provider:
    every refusal comes before the lock, so a refused run writes nothing at all (and those that
    can, before anything is fetched or connected to)."""
    options, provider = _named(options, provider)
    environ = os.environ if options.environ is None else options.environ
    manifest, expansion = load_and_expand(
        path,
        options.provider,
        environ,
        options.home,
        allow_reference_outside=options.allow_reference_outside,
    )
    if options.no_local_copy:
        require_store(options.store, environ, manifest)
    # Before anything is fetched or written: a pattern matching no shot is refused.
    everything, expansion = expansion, _narrowed(expansion, options.only)
    only = bool(options.only)
    # Before anything is fetched: a folder another manifest owns (its record's head says).
    OutputFolder(everything.output_dir).claim(
        None, _owner(path, manifest, everything.output_dir), shown=_shown(path), force=options.force
    )
    store = named_store(options.store, environ, manifest)  # its URL as results.json has it
    loaded = _Loaded(path, options, manifest, everything, expansion, environ, store)
    plans = _refuse_before_fetching(loaded)
    # Each reference URL once, keyed by its content, so that the plan knows every key (a
    # frozen run pays nothing for a URL whose content did not change).
    expansion = await fetch_references(expansion)
    if options.shard is not None:
        # By request key, known only now (a reference URL's content is part of it).
        expansion, only = replace(expansion, shots=in_shard(expansion.shots, options.shard)), True
    sharing = await _sharing(stack, loaded, expansion)
    prices = _prices(manifest, expansion, environ)
    plans += 1 if sharing is None else 2  # with a store, `_sharing` made one more
    planned = _plan_at_version(loaded, expansion, only, prices, plans)
    limit = _cost_limit(options, manifest)
    # Before credentials and before the lock: a refused run writes nothing at all.
    _refuse_the_plan(planned.plan, options, manifest, limit)
    # Credentials are checked before anything is written.
    provider = provider or _provider(expansion.provider, options, environ, sharing)
    prices = _prices(manifest, expansion, environ, provider)
    return _Prepared(loaded, expansion, limit, provider, prices, planned, sharing, only)


def _refuse_the_plan(
    plan: Plan,
    options: ApplyOptions,
    manifest: Manifest,
    limit: CostLimit | None,
) -> None:
    """The guards on the one plan: raises the refusal, before credentials and the lock."""
    refuse_placeholder_over_paid(plan, options.provider, manifest)
    refuse_to_start(plan, options.frozen, limit)
    refuse_paying_for_store_only(plan)


def _named(
    options: ApplyOptions, provider: Provider | str | None
) -> tuple[ApplyOptions, Provider | None]:
    """The options naming the provider the run uses, and the provider object given, if any."""
    if isinstance(provider, str):
        # A name, as on the command line; an object is used as it is.
        return replace(options, provider=provider), None
    if provider is not None:
        # An object is chosen by name as surely as --provider is, and its images are keyed
        # under its own name: keys come from the provider actually used.
        return replace(options, provider=provider.name), provider
    return options, None


def _refuse_before_fetching(loaded: _Loaded) -> int:
    """Refuse the placeholder over paid images before any reference is fetched or any store
    connected to, when there is one or the other and the placeholder was not chosen by name;
    gives the plans made for it (0 or 1)."""
    options, expansion = loaded.options, loaded.expansion
    if not may_replace_paid(expansion.provider, options.provider):
        return 0
    if not references_to_fetch(expansion) and loaded.store is None:
        return 0  # the plan that decides refuses it as soon
    early = loaded.plan(expansion, loaded.held().mine, only=bool(options.only))
    refuse_placeholder_over_paid(early, options.provider, loaded.manifest)
    return 1


def _plan_at_version(
    loaded: _Loaded, expansion: Expansion, only: bool, prices: PriceList, plans: int
) -> _Planned:
    """The plan, from the output folder's state as loaded just after its `version` is read (so
    that a change after the read changes the version).

    One plan decides, made before the lock: taking the lock writes into the folder (a refused
    run must write nothing), so the lock cannot come first. Another apply may change the folder
    until the lock is held, so under the lock (`_preflight`) only the version is read again,
    and the plan is made again only if it changed. Two more plans are made, only to refuse or
    to fetch, when they must come before something this plan needs: with the placeholder not
    chosen by name and references to fetch or a store to open, one refuses a placeholder over
    paid images before anything is fetched or connected to (`_refuse_before_fetching`); with a
    store, one says what to fetch from it (`_sharing`: this plan then restores what it
    fetched)."""
    version = OutputFolder(expansion.output_dir).version()
    with collector_paused():
        held = loaded.held()
        plan = loaded.plan(expansion, held.mine, only=only, prices=prices)
    return _Planned(plan, held, version, plans)


def _provider(
    name: str, options: ApplyOptions, environ: Mapping[str, str], sharing: SharedRun | None
) -> Provider:
    """The provider called `name`, its credentials checked; an assembling run (--frozen with a
    shared store) needs none: it sends nothing."""
    try:
        return create_provider(name, environ, options.home)
    except ConfigError:
        if not (options.frozen and sharing is not None):
            raise
        return Unsent(name)


async def _sharing(
    stack: contextlib.AsyncExitStack, loaded: _Loaded, expansion: Expansion
) -> SharedRun | None:
    """The shared store, open until `stack` closes, with what any process made for the shots
    of `expansion` (those selected, their references fetched) to be paid for restored into the
    local cache (so every plan restores them)."""
    options = loaded.options
    sharing = await open_sharing(
        stack,
        options.store,
        options.store_read_only,
        loaded.manifest,
        loaded.environ,
        expansion.output_dir,
    )
    if sharing is not None:
        early = loaded.plan(expansion, loaded.held().mine, only=True)
        await sharing.hydrate(item.shot for item in early.shots if item.shot and item.paid)
    return sharing


def _preflight(prep: _Prepared, on_plan: Callable[[Plan], None] | None) -> _Planned:
    """Under the lock: the folder checked writable; the plan made before the lock, which stands
    unless the folder's version changed since (another process changed it: the plan is made
    again, from the state as it is now); the provider's own prices and metering; then the
    guards again (a plan made again may need refusing)."""
    options = prep.options
    folder = OutputFolder(prep.expansion.output_dir)
    # Before the first request: a folder that cannot be written would waste every image.
    folder.prepare()
    planned = prep.planned
    if folder.version() != planned.version:
        again = _plan_at_version(
            prep.loaded, prep.expansion, prep.partial, prep.prices, planned.plans + 1
        )
        planned = replace(again, replanned=True)
    # The provider object answers for itself (one of the caller's own may be free).
    plan = replace(planned.plan, prices=prep.prices, metered=prep.provider.metered)
    refuse_placeholder_over_paid(plan, options.provider, prep.manifest)
    refuse_to_start(plan, options.frozen, prep.limit)
    refuse_paying_for_store_only(plan)
    if on_plan:
        on_plan(plan)
    return replace(planned, plan=plan)


@dataclass(frozen=True)
class _Pacing:
    """The run's pacer, and where what it learns of the quotas is kept."""

    pacer: Pacer
    store: QuotaStore | None
    account: str | None
    learned: Mapping[str, Learned]

    def remember(self, outcome: RunOutcome) -> tuple[QuotaNote, ...]:
        """Keep what the run found for the next one; say what it knew and kept."""
        saved: list[str] = []
        if self.store is not None and self.account is not None:
            # A head start for next time, not worth failing a run whose shots are done (a
            # failed write of quotas.json is a StoreWriteError, not an OSError).
            with contextlib.suppress(OSError, StoreError):
                saved = self.store.save(self.account, outcome.quotas)
        return tuple(
            QuotaNote(finding, finding.model in self.learned, finding.model in saved)
            for finding in outcome.quotas
        )


def _pacing(prep: _Prepared, plan: Plan, clock: Clock | None) -> _Pacing:
    pace = given_pace(prep.options, prep.manifest.limits)
    given = pace.quota if pace else None
    provider = prep.provider
    models = sorted({item.shot.request.model for item in plan.shots if item.shot})
    account: str | None = getattr(provider, "quota_account", None)
    store = _quota_store(prep.options) if provider.metered and account else None
    learned = store.load(account, models) if store and account and given is None else {}
    paid = Counter(item.shot.request.model for item in plan.shots if item.paid and item.shot)
    pacer = Pacer(
        given=given,
        average=pace.average if pace else False,
        learned={model: (found.window, found.cap) for model, found in learned.items()},
        credit={model: found.credit for model, found in learned.items()},
        unlimited=not provider.metered,
        clock=clock,
        expected=paid,
    )
    return _Pacing(pacer, store, account, learned)


async def _execute(
    prep: _Prepared,
    plan: Plan,
    pacer: Pacer,
    listener: Listener | None,
    clock: Clock | None,
    interrupts: Interrupts,
) -> tuple[RunOutcome, Path]:
    """Carry out the plan; gives what happened and the journal it was recorded in."""
    options, manifest, provider = prep.options, prep.manifest, prep.provider
    output_dir = prep.expansion.output_dir
    folder = OutputFolder(output_dir)
    journal = folder.journal()
    thumbnails = Thumbnailer(output_dir, listener)  # the contact sheet's, made as shots land
    try:
        async with provider:
            executor = Executor(
                provider,
                folder.cache,
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
                thumbnail=functools.partial(write_thumbnail, output_dir),
                bounds=(
                    *options.bounds(),
                    *([MaxCost(prep.limit, prep.prices)] if prep.limit is not None else []),
                ),
                shared=prep.sharing,
            )
            return await interrupts.run(executor, plan), journal.path
    finally:
        journal.close()
        thumbnails.close()


@dataclass(frozen=True)
class _Settled:
    shots: tuple[ShotOutcome, ...]
    pruned: tuple[Pruned, ...]
    results: Path
    sheet: Path | None
    sheet_problem: str | None
    picked: tuple[str, ...] = ()


async def _settle_run(
    prep: _Prepared,
    plan: Plan,
    held: _Held,
    outcome: RunOutcome,
    journal: Path,
) -> _Settled:
    """Each shot's outcome; then results.json, the orphans pruned, and the contact sheet;
    with --no-local-copy, then the local copies of what the store holds are dropped."""
    output_dir = prep.expansion.output_dir
    shots = _settle(plan, outcome, prep.provider.metered)
    shots = kept_in_store(shots, prep.sharing, prep.options.no_local_copy)
    if prep.options.no_local_copy:
        shots = await moved_to_store(prep.sharing, output_dir, shots)
    entries = tuple(shot.entry for shot in shots if shot.entry is not None)
    orphans = [item.previous for item in plan.orphans if item.previous is not None]
    pruned: tuple[Pruned, ...] = ()
    if prep.options.prune:
        in_use = {shot.file for shot in prep.expansion.shots}
        pruned, kept = prune_orphans(output_dir, orphans, in_use)
        orphans = list(kept)
    # The sheet marks what changed: a shot not run changed nothing; one restored from the store
    # was restored (whatever its plan: another run made it meanwhile), not made.
    touched = tuple(
        replace(item, action=Action.UNCHANGED)
        if shot.status == "not_run"
        else replace(item, action=Action.RESTORE, reason=FROM_STORE)
        if shot.status == "from_store"
        else item
        for item, shot in zip(plan.shots, shots, strict=True)
    )
    written, sheet_plan = entries, replace(plan, shots=touched)
    if prep.partial:
        written, orphans, sheet_plan = _with_unselected(
            prep.everything, held.mine, sheet_plan, entries
        )
    owner = _owner(prep.path, prep.manifest, output_dir)
    try:
        results = OutputFolder(output_dir).save(
            written,
            orphans,
            list(held.others.values()),
            _results_meta(prep, owner),
            owner=owner,
            before=held.before,
            now=datetime.now(UTC).isoformat(timespec="seconds"),
        )
    except StoreWriteError as exc:
        raise StoreError(_unwritten_results(exc, outcome, journal)) from None
    picked = await _picks(prep, written)
    shared = prep.sharing.shared if prep.sharing is not None else None
    links = await signed_links(shared, written)
    sheet, sheet_problem = update_sheet(
        output_dir, prep.manifest.name, sheet_plan, written, prep.manifest, links
    )
    # Last, once results.json says where they are: only those the store still holds.
    drop_local_copies(output_dir, await confirmed(prep.sharing, output_dir, stored_only(shots)))
    return _Settled(shots, pruned, results, sheet, sheet_problem, picked)


FROM_STORE = "made by another run sharing the store; restored from it, no request"


async def _picks(prep: _Prepared, entries: Sequence[ResultEntry]) -> tuple[str, ...]:
    """The picked takes written as `<shot>.png`, from the run's `entries`: one kept in the
    store only (`--no-local-copy`) too, fetched from the store first if it is not here."""
    output_dir, picks = prep.expansion.output_dir, prep.manifest.picks
    if prep.sharing is not None and picks:
        await fetch_picked(prep.sharing, output_dir, picks, entries, prep.everything.shots)
    return place_picks(output_dir, picks, entries)


def _results_meta(prep: _Prepared, owner: Owner) -> dict[str, Any]:
    return {
        # Relative, so an output folder can be moved or committed with its manifest.
        "manifest": owner.manifest,
        "provider": prep.provider.name,
        "key_format": KEY_FORMAT_VERSION,
    }


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


@dataclass(frozen=True)
class Pace:
    """The pace the user gave: a quota (K/P) is kept strictly, a rate (--rps) on average."""

    quota: Quota
    average: bool


def given_pace(options: ApplyOptions, limits: Limits) -> Pace | None:
    """The one place the given pace is decided: the options first, then the manifest's limits;
    at each, a quota wins over a rate. None: nothing given (learned, stated or probed)."""
    for quota, rps in ((options.quota, options.rps), (limits.quota, limits.rps)):
        if quota is not None:
            return Pace(quota, average=False)
        if rps is not None:
            return Pace(Quota.per_second(rps), average=True)
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


def _settle(plan: Plan, outcome: RunOutcome, metered: bool) -> tuple[ShotOutcome, ...]:
    """Each planned shot's one final outcome: what every report reads, and results.json's
    entries. A shot not run keeps its previous entry (nothing of it changed), and a new one gets
    none."""
    return tuple(_outcome(item, outcome, metered) for item in plan.shots)


def _outcome(item: PlannedShot, outcome: RunOutcome, metered: bool) -> ShotOutcome:
    found = _final_entry(item, outcome, metered)
    if isinstance(found, _NotRun):
        return ShotOutcome(
            item.id,
            item.action,
            "not_run",
            item.previous,
            why_not_run=found.reason,
            maybe_billed=found.maybe_billed,
        )
    left_alone = item.action in (Action.UNCHANGED, Action.DRIFT)
    status: OutcomeStatus = found.status
    if left_alone:
        status = item.action.value  # type: ignore[assignment]
    elif item.id in outcome.from_store and found.has_image:
        status = "from_store"  # its entry is its maker's: `generated`, by another run
    return ShotOutcome(
        item.id,
        item.action,
        status,
        found,
        billed=item.id in outcome.billed_shots,
        moved_aside=outcome.moved_aside.get(item.id),
    )


@dataclass(frozen=True)
class _NotRun:
    reason: str
    maybe_billed: bool = False  # sent, and its answer lost: the service may have billed it


def _final_entry(item: PlannedShot, outcome: RunOutcome, metered: bool) -> ResultEntry | _NotRun:
    """The shot's entry after the run, or why it was not run."""
    entry = outcome.entries.get(item.id)
    if entry is not None:
        return entry
    reason = outcome.not_run.get(item.id)
    if reason is not None:
        return _NotRun(reason, item.id in outcome.maybe_billed_not_run)
    if item.action not in WORK_ACTIONS and item.previous is not None:
        return item.previous  # cancelled before the run even began: nothing to do for it anyway
    # The run was cancelled outright (a third Ctrl-C, or from Python) with this shot unfinished.
    downloading = outcome.downloading.get(item.id)
    if downloading is not None:
        return abandoned_download(downloading)
    if metered and outcome.in_flight.get(item.id) == Phase.SENDING:
        return _NotRun("abandoned in flight when interrupted; DashScope may have billed it", True)
    return _NotRun(f"not run: {outcome.stopped or 'interrupted'}")


@dataclass(frozen=True)
class _Held:
    """The output folder's state as loaded (`before`), the part that is this manifest's (what
    it plans from), and the rest: another manifest's entries, kept as they are."""

    before: FolderState
    mine: Mapping[str, ResultEntry]
    others: dict[str, ResultEntry]


def _owner(path: ManifestSource, manifest: Manifest, output_dir: Path) -> Owner:
    return owner_of(None if isinstance(path, Mapping) else Path(path), manifest.name, output_dir)


def _shown(path: ManifestSource) -> str:
    return "this manifest" if isinstance(path, Mapping) else str(path)


def _owned_state(
    path: ManifestSource, manifest: Manifest, expansion: Expansion, *, force: bool
) -> _Held:
    """The output folder's state, refused when another manifest owns the folder (unless
    `force`), split into this manifest's part and the others'."""
    folder = OutputFolder(expansion.output_dir)
    owner = _owner(path, manifest, expansion.output_dir)
    # By id: the loaded entries share the shots' strings (the plan holds both whole).
    shots = {shot.id: shot for shot in expansion.shots}
    state = folder.load(shots)
    folder.claim(state, owner, shown=_shown(path), force=force)
    mine, others = state.split(owner, shots)
    return _Held(state, mine, others)
