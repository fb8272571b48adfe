"""Carry out a plan: restore from the cache, generate what is missing, record each shot.

Takes a `Plan`, a provider, the image cache and a journal; gives a `RunOutcome` with one
`ResultEntry` per shot. Workers pull shots one at a time (memory does not grow with the manifest);
paid requests wait for their model's `Gate`; a 429 sends the shot back to the gate (it uses up no
try, and fails the shot only after `RetryPolicy.throttle_patience` of refusals), other transient
failures are retried with backoff, a 400 fails that
shot only, a 401/403 stops the run: nothing new is sent, requests in flight finish, and the
shots it answered are not run (a refused key says nothing about them). Every image is
downloaded right after it is generated (its URL expires), verified to decode at the reported
size, put in the cache and copied into place before its entry is journaled, so a crash loses only
shots in flight; its URL is journaled before the download (an `unfetched` entry), so that a shot
paid for but not yet downloaded is planned as a `recover` by the next apply, which fetches it
instead of paying again (and, if the URL no longer works, pays again and says so). Every PNG
written carries its provenance (`provenance.py`); the cache holds it as written.

An image is never held whole while it downloads: each piece, as it arrives, has the provenance
spliced in (`Stamper`), is hashed and written to the cache entry's temporary file (on the event
loop: a write to the page cache, no fsync); at most `MAX_DOWNLOADS` download at once, whatever
the requests in flight. It is then decoded once, from that file in small blocks, in a pool of
one thread per core, which both verifies it and gives the contact sheet its thumbnail (the
thumbnail needs every pixel decoded anyway, so the decode is the check); only then is it fsynced
and renamed into the cache, and copied (or reflinked) to the shot's file from the same open
file. The journal is written by a thread of its own, so its fsyncs never block the loop.

A file that cannot be written fails its shot only, naming the path (a paid image stays in the
cache, or its URL in an `unfetched` entry); a full disk, or a journal that cannot be written,
also stops the run like a 401. A restore checks the cache entry first: a damaged one is
discarded, said to the listener as a `Notice`, and the image fetched from its recorded URL or
generated again. A shot the plan marked `move_aside` has its hand-edited file renamed beside it
(`plan.aside_path`) just before the new image is written there, said as a `Notice` and kept in
`RunOutcome.moved_aside`. A shot whose reference URL could not be fetched (`apply` fetches
them before planning) fails unsent, naming the field.

Stopping comes in two steps. `stop` (a first Ctrl-C, a 401, a `Bound` refusing the next request)
sends nothing new: shots not yet sent, and those waiting for their turn or a retry, are *not
run* (`RunOutcome.not_run`: no entry, their previous state stands, an `unfetched` one included);
requests in flight finish. `abandon` (a second Ctrl-C, or the grace time out) also stops waiting
for the service's answers and downloads; what is already received is still verified and
written, and only a paid request really sent is said to be maybe billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from imgbatch.errors import (
    AuthError,
    CacheEntryDamaged,
    NoImageError,
    PermanentError,
    ProviderError,
    RateLimited,
    SharedStoreError,
    StoreWriteError,
    TransientError,
    WrongImageError,
)
from imgbatch.pacing.gate import Clock, Finding, Gate, Pacer, RetryPolicy
from imgbatch.plan.decide import WORK_ACTIONS, Action, Plan, PlannedShot, aside_path
from imgbatch.providers import Provider, Sink
from imgbatch.review.events import FromStore, Listener, Notice, Pacing, Retrying, Stopping
from imgbatch.review.provenance import Provenance, Stamper
from imgbatch.run.bounds import Bound, Tally
from imgbatch.run.entries import (
    abandoned_download,
    failed_entry,
    shot_entry,
    unfetched_entry,
    with_reference_url,
)
from imgbatch.run.sharing import Inherited, Restored, SharedRun
from imgbatch.shots.expand import Shot
from imgbatch.shots.request import GeneratedImage, ImageRequest, simplified
from imgbatch.state.cache import ImageCache, Incoming, verify_image, write_error
from imgbatch.state.results import ResultEntry
from imgbatch.state.store import Record
from imgbatch.state.store.claims import Claim, ClaimInfo

if TYPE_CHECKING:
    from PIL import Image

# Requests in flight when the user sets no cap. The rate is what limits a run; this only has to
# be more than rate x latency (25 requests/s at a 15 s generation is 375 in flight), and stay
# under a default open-files limit of 1024 with a socket per request.
DEFAULT_CONCURRENCY = 512
# Open files each request in flight may hold (its API socket, then its download's) and those
# kept for everything else (the journal, the cache, the interpreter's own).
_FILES_PER_REQUEST = 2
# Downloads at once, whatever the concurrency. While the loop is busy each one holds what aiohttp
# buffers for it (up to about half a MB: measured, peak memory grew 0.57 MB a shot in flight, to
# 368 MB with the default 512), so this cap, not the requests in flight, bounds that memory.
# 64 keeps up with any quota the service grants (a download takes about a second; 25 images a
# second need about 25 at once); a shot waiting for its turn is journaled `unfetched` already.
MAX_DOWNLOADS = 64
_FILES_RESERVED = 64
# Longest Retry-After honoured. A service that asks for more is closed for now: the run stops
# and says when to try again, instead of sleeping for hours.
MAX_RETRY_AFTER_SECONDS = 300.0
# Tries of one shot whose answer was lost (dropped connection, no answer in time): each may
# have been billed, so a shot is not sent again and again on a link that keeps losing answers.
MAX_LOST_ANSWERS = 3
T = TypeVar("T")


class Phase:
    """Where a shot in flight stands; says what an interrupted shot may have cost."""

    WAITING = "waiting for its turn"
    SENDING = "waiting for the service's answer"
    BACKOFF = "waiting to retry"
    DOWNLOADING = "downloading its image"
    WRITING = "writing its image"  # received: verified, cached and put in place, never abandoned


@dataclass
class RunOutcome:
    entries: dict[str, ResultEntry] = field(default_factory=dict)
    # Shots this run did not finish and that changed nothing: why, by shot id.
    not_run: dict[str, str] = field(default_factory=dict)
    # Those of them sent with no answer (now, or on an earlier try): each may have been billed.
    maybe_billed_not_run: set[str] = field(default_factory=set)
    # Shots generated (and billed) whose download has not finished yet.
    downloading: dict[str, ResultEntry] = field(default_factory=dict)
    # Shots started and not finished, by `Phase`.
    in_flight: dict[str, str] = field(default_factory=dict)
    stopped: str | None = None
    # The `Bound.name` that stopped the run, if one did.
    bounded: str | None = None
    requests: int = 0
    # Images the service answered with (billed), and requests whose answer was lost after they
    # were sent (may have been billed). Refusals (429, 4xx, 5xx) and unreachable servers cost
    # nothing.
    billed: int = 0
    maybe_billed: int = 0
    # The same by model, to price them.
    billed_models: Counter[str] = field(default_factory=Counter)
    # The shots whose image the service made (and billed) in this run.
    billed_shots: set[str] = field(default_factory=set)
    # The shots whose image this run restored from the shared store: made, and paid for, by
    # another run (its entry is its maker's, status and all; the run's report says from_store).
    from_store: set[str] = field(default_factory=set)
    maybe_billed_models: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    retries: int = 0
    quotas: list[Finding] = field(default_factory=list)
    # Hand-edited files renamed aside before a new image took their place: shot id -> the new
    # name, relative to the output folder.
    moved_aside: dict[str, str] = field(default_factory=dict)


class _Cut(Exception):
    """A wait or a call the run no longer waits for (it stopped, or abandoned what is in
    flight)."""


class _Next(Enum):
    """What a generated shot's loop does when its turn did not end in a request."""

    AGAIN = "wait for a turn again (or see that the run stopped)"
    DONE = "settled without sending"


@dataclass
class _Tries:
    """One shot's paid requests so far, carried round its loop in `Executor._generate`."""

    shot: Shot
    gate: Gate | None
    # A shared store's claim: taken when the first turn comes (True with no shared store).
    claimed: bool
    # Requests sent (what an entry's `attempts` says), and the failed tries among them that
    # count against `RetryPolicy.max_attempts` (a 429 or an answer without an image does not).
    attempt: int = 0
    failed: int = 0
    # Tries whose answer was lost after sending: each may have been billed.
    lost: int = 0
    # When the service began refusing this shot with 429s (None while it is not).
    refused_since: float | None = None
    # Request ids of the answers without an image.
    imageless: list[str] = field(default_factory=list)
    # What is sent: the shot's request, or its simplified prompt after an answer without image.
    sent: ImageRequest = field(init=False)

    def __post_init__(self) -> None:
        self.sent = self.shot.request

    @property
    def model(self) -> str:
        return self.shot.request.model


class Executor:
    def __init__(
        self,
        provider: Provider,
        cache: ImageCache,
        journal: Callable[[ResultEntry], None],
        *,
        pacer: Pacer,
        concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        listener: Listener | None = None,
        simplify: bool = True,
        frozen: bool = False,
        bounds: Sequence[Bound] = (),
        thumbnail: Callable[[str, Image.Image], object] | None = None,
        shared: SharedRun | None = None,
        downloads: int = MAX_DOWNLOADS,
    ) -> None:
        self.provider = provider
        # A shared store (`--store`): claim before paying, publish what is made (sharing.py).
        self.shared = shared
        # Given each new image once it is decoded to verify it (by key): the contact sheet's
        # thumbnail comes from that one decode.
        self.thumbnail = thumbnail
        # Decodes run here, one per core: the pixels decoded are the one whole copy of an image
        # in memory, so peak memory follows the cores, never the requests in flight (and only
        # these threads' malloc arenas ever hold an image's worth).
        self._decoder = ThreadPoolExecutor(
            os.cpu_count() or 1, thread_name_prefix="imgbatch-decode"
        )
        self._download_slots = asyncio.Semaphore(downloads)  # MAX_DOWNLOADS: why
        # `apply --frozen`: never ask for a new image, even when a restore finds the cache entry
        # damaged; fetching one already paid for is allowed.
        self.frozen = frozen
        # After a 200 without an image, ask once more with a simplified prompt (the seed's rule).
        self.simplify = simplify
        self.cache = cache
        self.journal = journal
        self.pacer = pacer
        self.concurrency = fit_to_open_files(concurrency or DEFAULT_CONCURRENCY)
        self.retry = retry or RetryPolicy()
        self.clock = clock or pacer.clock
        self.listener = listener
        # Asked before each request; the first refusal stops the run.
        self.bounds = tuple(bounds)
        self.stop_requested = asyncio.Event()
        self.abandon_requested = asyncio.Event()
        # Waits for a turn or a retry (cut by `stop`) and the provider's calls (cut by `abandon`).
        self._waits: set[asyncio.Future[Any]] = set()
        self._calls: set[asyncio.Future[Any]] = set()
        self._started = self.clock.now()
        self._pacing: dict[str, Pacing] = {}  # what the listener was last told, by model
        self._answered: Counter[str] = Counter()  # images answered, by model
        self._sending: Counter[str] = Counter()  # requests sent and not answered, by model
        self.outcome = RunOutcome()
        self._aside: frozenset[str] = frozenset()
        self._init_journal_writer()

    def _init_journal_writer(self) -> None:
        # The journal's writer: one thread, so lines keep their order and fsyncs leave the loop.
        self._journal_pool: ThreadPoolExecutor | None = None
        self._journaling: set[asyncio.Future[StoreWriteError | None]] = set()
        self._journal_failure: BaseException | None = None

    def stop(
        self,
        reason: str,
        *,
        bound: str | None = None,
        grace: float | None = None,
        again: str = "Ctrl-C",
    ) -> None:
        """Send nothing new: shots not yet sent, or waiting for their turn or a retry, are not
        run; requests in flight finish. The listener hears of the first stop, and of every one
        given a `grace` (an interrupt, acknowledged even after a bound stopped the run)."""
        first = self.outcome.stopped is None
        if first:
            self.outcome.stopped = reason
            self.outcome.bounded = bound
        self.stop_requested.set()
        for task in tuple(self._waits):
            task.cancel()
        if self.listener and (first or grace is not None):
            self.listener(Stopping(reason, self.in_flight(), self._may_bill(), grace, again=again))

    def abandon(self, again: str = "Ctrl-C") -> None:
        """Stop waiting for requests in flight and downloads too. Images already received are
        still verified and written; a paid request abandoned after it was sent is counted as
        maybe billed."""
        if self.abandon_requested.is_set():
            return
        in_flight = self.in_flight()
        writing = sum(1 for phase in self.outcome.in_flight.values() if phase == Phase.WRITING)
        if not self.stop_requested.is_set():
            self.stop("abandoned")
        self.abandon_requested.set()
        for task in (*self._waits, *self._calls):
            task.cancel()
        if self.listener and in_flight:
            reason = self.outcome.stopped or "abandoned"
            self.listener(
                Stopping(
                    reason,
                    in_flight - writing,
                    self._may_bill(),
                    abandoning=True,
                    writing=writing,
                    again=again,
                )
            )

    def _may_bill(self) -> bool:
        sending = Phase.SENDING in self.outcome.in_flight.values()
        return self.provider.metered and sending

    def in_flight(self) -> int:
        """Shots waiting for the service's answer, downloading or writing their image."""
        busy = (Phase.SENDING, Phase.DOWNLOADING, Phase.WRITING)
        return sum(1 for phase in self.outcome.in_flight.values() if phase in busy)

    async def _unless(self, abandon: bool, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result; `_Cut` if the run stops (a wait) or abandons (a call) first."""
        event = self.abandon_requested if abandon else self.stop_requested
        if event.is_set():
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise _Cut
        task = asyncio.ensure_future(awaitable)
        group = self._calls if abandon else self._waits
        group.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # Cut by stop or abandon, not this worker cancelled from outside.
            if (
                event.is_set()
                and task.cancelled()
                and (current is None or not current.cancelling())
            ):
                raise _Cut from None
            raise
        finally:
            group.discard(task)

    def _refused(self, request: ImageRequest) -> bool:
        """Whether a bound refuses `request` (and so stopped the run)."""
        if not self.bounds:
            return False
        tally = Tally(
            requests=self.outcome.requests,
            elapsed=self.clock.now() - self._started,
            billed=MappingProxyType(self._answered),
            in_flight=MappingProxyType(self._sending),
            maybe_billed=MappingProxyType(self.outcome.maybe_billed_models),
        )
        for bound in self.bounds:
            reason = bound.refuse(request, tally)
            if reason is not None:
                self.stop(reason, bound=bound.name)
                return True
        return False

    async def _turn(self, model: str, gate: Gate | None) -> int:
        """Wait for the model's gate to let one more request go (its ticket; 0 unpaced), and
        tell the listener when the quota it paces at, or where that came from, has changed."""
        if gate is None:
            return 0
        ticket = await self._unless(False, gate.acquire())
        self._tell_pacing(model, gate)
        return ticket

    def _tell_pacing(self, model: str, gate: Gate) -> None:
        if self.listener is None:
            return
        estimator = gate.estimator
        cap = estimator.cap if estimator.cap_confirmed else None
        now = Pacing(model, estimator.window, estimator.source, estimator.probing_up, cap)
        if self._pacing.get(model) != now:
            self._pacing[model] = now
            self.listener(now)

    def _billed(self, shot_id: str, model: str) -> None:
        """The service made (and billed) an image of `model` for the shot."""
        self.outcome.billed += 1
        self.outcome.billed_models[model] += 1
        self.outcome.billed_shots.add(shot_id)

    def _from_store(self, shot_id: str) -> None:
        """The shot's image, about to be recorded, is another run's, restored from the store."""
        self.outcome.from_store.add(shot_id)
        if self.listener:
            self.listener(FromStore(shot_id))

    def _skip(self, shot_id: str, reason: str, *, maybe_billed: bool = False) -> None:
        """`shot_id` is not run: no entry, nothing journaled; its previous state stands.
        `maybe_billed`: it was sent and its answer lost, so the service may have billed it."""
        self.outcome.in_flight.pop(shot_id, None)
        self.outcome.not_run[shot_id] = reason
        if maybe_billed:
            self.outcome.maybe_billed_not_run.add(shot_id)

    async def run(self, plan: Plan) -> RunOutcome:
        work = [item for item in plan.shots if item.action in WORK_ACTIONS]
        if self.shared is not None:
            # Processes sharing a store each take the shots in an order of their own, so that
            # they rarely reach the same shot at once: one makes it, the others restore it.
            random.shuffle(work)
        # Twins last: a twin waits for a shot already taken, which may come later in the list
        # (a recover is the one made wherever it stands), and a worker must never wait for a
        # shot it has yet to take itself.
        pending = iter(sorted(work, key=lambda item: item.twin_of is not None))
        self._aside = frozenset(item.id for item in plan.shots if item.move_aside)
        # The shots whose image a twin (the same request) waits for.
        self._made = {item.twin_of: asyncio.Event() for item in plan.shots if item.twin_of}
        for item in plan.shots:
            if item.action not in WORK_ACTIONS and item.previous is not None:
                # Kept exactly as it was (unchanged, or a drift: the edit is left alone):
                # results.json describes the image imgbatch made, not this run.
                self.outcome.entries[item.id] = with_reference_url(item.previous, item.shot)
        workers = [
            asyncio.create_task(self._worker(plan.output_dir, pending))
            for _ in range(self.concurrency)
        ]
        self._started = self.clock.now()
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            # Also when the run is abandoned: an interrupted run reports its 429s too.
            self.outcome.throttled = self.pacer.throttled_count
            self.outcome.quotas = self.pacer.findings()
            self._decoder.shutdown(wait=True)
            await self._drain_journal()
        return self.outcome

    async def _worker(self, output_dir: Path, pending: Iterator[PlannedShot]) -> None:
        for item in pending:
            if item.twin_of is not None:
                # Taken from `pending` before this shot, so already being made by another worker.
                await self._made[item.twin_of].wait()
            try:
                await self._run_one(output_dir, item)
            finally:
                if item.id in self._made:
                    self._made[item.id].set()

    async def _run_one(self, output_dir: Path, item: PlannedShot) -> None:
        shot = item.shot
        assert shot is not None
        made = self.outcome.entries.get(item.twin_of) if item.twin_of is not None else None
        copyable = made is not None and made.has_image and made.key == shot.request.key
        if self.stop_requested.is_set() and not copyable:
            # An unfetched shot (a recover) keeps its entry too: the URL paid for stays. A twin
            # whose image this run made is still copied: that is local, and free.
            self._skip(item.id, f"not run: {self.outcome.stopped or 'stopped'}")
            return
        reference = shot.request.reference
        if reference is not None and not reference.fetched:
            # Its content, and so its key, is unknown: nothing can be restored or sent.
            reason = reference.problem or "was not fetched"
            message = f"field reference_image: '{reference.source}' {reason}; nothing was sent"
            self._finish(failed_entry(shot, message, None, 0))
            return
        if item.twin_of is not None:
            if made is None or not made.has_image:
                why = made.error if made is not None else "it was not run"
                message = f"the same request as shot {item.twin_of}, which has no image: {why}"
                self._finish(failed_entry(shot, message, None, 0))
                return
            item = replace(item, record=made)
        self.outcome.in_flight[item.id] = Phase.WAITING
        try:
            if item.action is Action.RESTORE:
                await self._restore(output_dir, item)
            elif item.action is Action.RECOVER:
                await self._recover_billed(output_dir, item)
            else:
                await self._generate(output_dir, shot)
        except _Cut:
            # A download abandoned that paid for nothing new (offline, or the image an earlier
            # run paid for, whose URL stays in its unfetched entry).
            self._skip(item.id, "not run: abandoned in flight when interrupted")
        finally:
            if self.shared is not None:
                entry = self.outcome.entries.get(item.id)
                await asyncio.shield(self.shared.finished(shot.request.key, entry))

    def record(self, entry: ResultEntry) -> None:
        """Journal `entry`: lines are appended (each fsynced) in order by one worker thread,
        never on the event loop; a journal that cannot be written stops the run (the entry
        stays in the outcome, for results.json). `run` returns once every line is written."""
        if self._journal_pool is None:
            self._journal_pool = ThreadPoolExecutor(1, thread_name_prefix="imgbatch-journal")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._journal_pool, self._append, entry)
        self._journaling.add(future)
        future.add_done_callback(self._journaled)

    def _append(self, entry: ResultEntry) -> StoreWriteError | None:
        try:
            self.journal(entry)
        except StoreWriteError as exc:
            return exc
        return None

    def _journaled(self, future: asyncio.Future[StoreWriteError | None]) -> None:
        self._journaling.discard(future)
        if future.cancelled():
            return
        if future.exception() is not None:
            self._journal_failure = self._journal_failure or future.exception()
        elif (failure := future.result()) is not None:
            self._stop_for_write(failure)

    async def _drain_journal(self) -> None:
        """Wait for every line on its way to the journal; then no thread writes to it."""
        try:
            while self._journaling:
                await asyncio.wait(tuple(self._journaling))
        finally:
            if self._journal_pool is not None:
                self._journal_pool.shutdown(wait=True)
                self._journal_pool = None
        if self._journal_failure is not None:
            raise self._journal_failure

    def _stop_for_write(self, error: StoreWriteError) -> None:
        if error.disk_full:
            self.stop(f"{error}; paid images already downloaded are kept")
        else:
            self.stop(str(error))

    def _write_failed(
        self,
        shot: Shot,
        error: StoreWriteError,
        attempts: int,
        *,
        kept: str,
        unfetched: GeneratedImage | None = None,
        sent: ImageRequest | None = None,
    ) -> None:
        """One shot's file could not be written: that shot fails (is `unfetched`, with the
        image's URL, when the image is kept nowhere else); a full disk stops the run."""
        if error.disk_full:
            self._stop_for_write(error)
        message = f"{error}; {kept}"
        if unfetched is not None:
            self._finish(unfetched_entry(shot, message, unfetched, attempts, sent=sent))
        else:
            self._finish(failed_entry(shot, message, None, attempts, sent=sent))

    def _finish(self, entry: ResultEntry) -> None:
        self.outcome.in_flight.pop(entry.id, None)
        self.outcome.entries[entry.id] = entry
        self.record(entry)
        if self.listener:
            self.listener(entry)

    async def _restore(self, output_dir: Path, item: PlannedShot) -> None:
        """Copy the cached image into place once checked; a damaged entry is discarded and the
        image fetched from its recorded URL, else generated again."""
        shot, previous, record = item.shot, item.previous, item.record
        assert shot is not None
        key = shot.request.key
        target = output_dir / shot.file
        # What the entry must be: as recorded, else as this run fetched it from the shared store
        # (checked and decoded then: checked by its SHA-256 now, not decoded a second time).
        checked = self.shared.records.get(key) if self.shared and record is None else None
        sha256, length = (record.sha256, record.bytes) if record else (None, None)
        if checked is not None:
            sha256, length = checked.sha256, checked.size
        try:
            # The edit goes aside first, and stays there should the cache entry prove damaged
            # (the image is then fetched or made again, and written in its place all the same).
            await self._move_aside(output_dir, shot)
            digest, size = await asyncio.to_thread(
                self.cache.restore,
                key,
                target,
                sha256=sha256,
                size=length,
                dimensions=shot.request.dimensions,
            )
        except CacheEntryDamaged as damaged:
            await asyncio.to_thread(self.cache.discard, key)
            fetchable = record is not None and record.image_url is not None
            if self.listener:
                then = "fetching it from its URL" if fetchable else "generating it again"
                self.listener(Notice(shot.id, f"{damaged}; discarded it, {then}"))
            if record is not None and await self._fetch_billed(output_dir, shot, record) is None:
                return
            await self._generate(output_dir, shot)
            return
        except StoreWriteError as exc:
            self._write_failed(shot, exc, 0, kept="its image stays in the cache for the next apply")
            return
        if checked is not None:
            self._from_store(shot.id)  # its bytes came from the store, this run
        shared = self.shared.entry_for(shot, digest, size) if self.shared else None
        if shared is not None and not (previous is not None and previous.key == key):
            # Made by another process sharing the store: its maker's provenance, as this shot.
            self._finish(with_reference_url(shared, shot))
            return
        if previous is not None and previous.key == key and previous.has_image:
            # Same request as before: keep its provenance (URL, request id) from the results.
            self._finish(
                replace(
                    with_reference_url(previous, shot),
                    status="cached",
                    file=shot.file,
                    sha256=digest,
                    bytes=size,
                )
            )
            return
        width, height = shot.request.dimensions
        self._finish(shot_entry(shot, "cached", None, width, height, digest, size, attempts=0))

    async def _generate(self, output_dir: Path, shot: Shot) -> None:
        """Make `shot`'s image with paid requests: wait for its turn, send, and handle the
        answer (an image is downloaded and placed; a 429, a transient failure or an answer
        without an image sends it round again; a refusal settles it) until it is settled or the
        run stops."""
        if self.frozen:
            message = "not generated: --frozen sends no paid request"
            self._finish(failed_entry(shot, message, None, 0))
            return
        tries = _Tries(shot, self.pacer.gate(shot.request.model), claimed=self.shared is None)
        while True:
            if self.stop_requested.is_set() or self._refused(tries.sent):
                phase = self.outcome.in_flight.get(shot.id)
                lost = tries.lost
                self._skip(shot.id, self._not_run(phase, lost), maybe_billed=lost > 0)
                return
            turn = await self._turn_to_send(output_dir, tries)
            if turn is _Next.DONE:
                return
            if turn is _Next.AGAIN:
                continue
            ticket = turn
            try:
                image = await self._send(tries)
            except _Cut:
                return self._abandoned_sent(tries, ticket)
            except NoImageError as exc:
                again = self._imageless(tries, ticket, exc)
            except TransientError as exc:
                again = await self._transient(tries, ticket, exc)
            except (AuthError, PermanentError) as exc:
                return self._refused_outright(tries, ticket, exc)
            else:
                return await self._received(output_dir, tries, ticket, image)
            if not again:
                return

    async def _turn_to_send(self, output_dir: Path, tries: _Tries) -> int | _Next:
        """Wait for the shot's turn to be sent: its gate's ticket (0 unpaced) once it may be
        sent; AGAIN when the wait was cut, the run stopped or a bound refused meanwhile (the
        loop says so), or a shared store's claim makes it wait for a turn again; DONE when
        another process settled it (a shared store's claim is taken on the first turn)."""
        self.outcome.in_flight[tries.shot.id] = Phase.WAITING
        try:
            ticket = await self._turn(tries.model, tries.gate)
        except _Cut:
            return _Next.AGAIN
        # Asked again after the wait: a turn may come after the bound (a duration).
        if self.stop_requested.is_set() or self._refused(tries.sent):
            if tries.gate:
                tries.gate.release(ticket)
            return _Next.AGAIN
        if not tries.claimed:
            turn = await self._claim_turn(output_dir, tries.shot, tries.gate, ticket)
            tries.claimed = True
            if turn == "done":
                return _Next.DONE
            if turn == "again":
                return _Next.AGAIN
        return ticket

    async def _send(self, tries: _Tries) -> GeneratedImage:
        """Send the shot's request once (one more attempt, counted as a request in flight for
        the bounds while it waits for its answer): the image, or the provider's error; `_Cut`
        when the run abandons it."""
        shot, model = tries.shot, tries.model
        tries.attempt += 1
        self.outcome.requests += 1
        self._sending[model] += 1
        self.outcome.in_flight[shot.id] = Phase.SENDING
        try:
            return await self._unless(True, self.provider.generate(tries.sent, label=shot.id))
        finally:
            self._sending[model] -= 1

    def _abandoned_sent(self, tries: _Tries, ticket: int) -> None:
        """The run abandoned the request after it was sent: the shot is not run, and on a
        metered provider it may have been billed (if the service went on to make it)."""
        if tries.gate:
            tries.gate.release(ticket)
        if self.provider.metered:
            self._maybe_billed(tries.model)
            reason = "abandoned in flight when interrupted; DashScope may have billed it"
        else:
            reason = "not run: abandoned in flight when interrupted"
        self._skip(tries.shot.id, reason, maybe_billed=self.provider.metered)

    def _imageless(self, tries: _Tries, ticket: int, exc: NoImageError) -> bool:
        """An answer without an image: True to ask once more with a simplified prompt (the
        seed's rule), False when the shot failed (asked again already, or not simplifying)."""
        if tries.gate:
            tries.gate.answered(ticket)  # admitted (and answered), only without an image
        shot = tries.shot
        tries.imageless.append(exc.request_id or "unknown")
        simpler = simplified(tries.sent) if self.simplify and tries.sent is shot.request else None
        if simpler is None:
            message = (
                f"the service answered without an image (request {', '.join(tries.imageless)})"
            )
            if len(tries.imageless) > 1:
                message += ", also when asked again with a simplified prompt"
            self._finish(failed_entry(shot, message, exc, tries.attempt))
            return False
        tries.sent = simpler
        if self.listener:
            self.listener(Retrying(shot.id, tries.attempt, 0.0, exc))
        return True

    async def _transient(self, tries: _Tries, ticket: int, exc: TransientError) -> bool:
        """A 429 or another transient failure: the gate hears of it and a lost answer is
        counted (it may have been billed); True to try again, False when the shot is settled
        (failed, or not run because the service asked for a longer wait than imgbatch
        makes: the run stops)."""
        if isinstance(exc, RateLimited):
            if tries.gate:
                tries.gate.refused(ticket, exc.retry_after, exc.stated_quota)
        elif tries.gate:
            tries.gate.answered(ticket)
        if exc.maybe_billed:
            self._maybe_billed(tries.model)
            tries.lost += 1
        if exc.retry_after is not None and exc.retry_after > MAX_RETRY_AFTER_SECONDS:
            self.stop(
                f"the service asked to wait {exc.retry_after:g} s before the next request "
                f"(Retry-After), longer than imgbatch waits ({MAX_RETRY_AFTER_SECONDS:g} "
                "s); run apply again later"
            )
            self._skip(tries.shot.id, f"not run: {exc}")
            return False
        if isinstance(exc, RateLimited):
            return self._throttled(tries, exc)
        return await self._back_off(tries, exc)

    def _throttled(self, tries: _Tries, exc: RateLimited) -> bool:
        """A 429 is not a failed try: the gate has slowed down, and the shot waits its turn
        again (True), until the service has refused it for `throttle_patience` (it fails)."""
        now = self.clock.now()
        since = tries.refused_since = now if tries.refused_since is None else tries.refused_since
        if now - since >= self.retry.throttle_patience:
            message = (
                f"the service refused it for {now - since:.0f} s ({tries.attempt} tries): {exc}"
            )
            self._finish(failed_entry(tries.shot, message, exc, tries.attempt))
            return False
        self.outcome.retries += 1
        if self.listener:
            self.listener(Retrying(tries.shot.id, tries.attempt, 0.0, exc))
        return True

    async def _back_off(self, tries: _Tries, exc: TransientError) -> bool:
        """A failed try (not a 429): wait the backoff, then True to try again; False when the
        shot failed (out of tries, or too many answers lost)."""
        tries.refused_since = None
        tries.failed += 1
        if tries.failed >= self.retry.max_attempts or tries.lost >= MAX_LOST_ANSWERS:
            message = f"gave up after {tries.attempt} tries: {exc}"
            if tries.lost:
                message += f" ({tries.lost} of them lost their answer and may have been billed)"
            self._finish(failed_entry(tries.shot, message, exc, tries.attempt))
            return False
        delay = self.retry.backoff(tries.failed, exc.retry_after)
        self.outcome.retries += 1
        if self.listener:
            self.listener(Retrying(tries.shot.id, tries.attempt, delay, exc))
        self.outcome.in_flight[tries.shot.id] = Phase.BACKOFF
        with contextlib.suppress(_Cut):  # stopped: the loop says so
            await self._unless(False, self.clock.sleep(delay))
        return True

    def _refused_outright(
        self, tries: _Tries, ticket: int, exc: AuthError | PermanentError
    ) -> None:
        """A 401/403 stops the run (the shot is not run); any other 4xx fails this shot."""
        if tries.gate:
            tries.gate.answered(ticket)
        if isinstance(exc, AuthError):
            self._refused_key(tries.shot.id, exc, tries.lost)
            return
        self._finish(failed_entry(tries.shot, str(exc), exc, tries.attempt))

    async def _received(
        self, output_dir: Path, tries: _Tries, ticket: int, image: GeneratedImage
    ) -> None:
        """The service made the image: keep its URL, then download, verify and place it."""
        if tries.gate:
            tries.gate.answered(ticket, image.stated_quota)
        shot = tries.shot
        await self._answer_kept(shot, image, tries.attempt, tries.sent)
        self.outcome.in_flight[shot.id] = Phase.DOWNLOADING
        await self._keep(output_dir, shot, image, tries.attempt, tries.sent)
        self.outcome.downloading.pop(shot.id, None)

    def _maybe_billed(self, model: str) -> None:
        """A request of `model` was sent and its answer lost: the service may have billed it."""
        self.outcome.maybe_billed += 1
        self.outcome.maybe_billed_models[model] += 1

    async def _answer_kept(
        self, shot: Shot, image: GeneratedImage, attempt: int, sent: ImageRequest
    ) -> None:
        """The service made `shot`'s image: count it, and keep its URL before the download
        (journaled, and in the shared store's claim), so that a run killed while downloading
        leaves the paid image for the next apply, or another process, to fetch instead of
        paying again."""
        self._answered[shot.request.model] += 1
        if not self.provider.metered:
            return
        self._billed(shot.id, shot.request.model)
        # Journaled (queued first; a kill before the line is on disk loses it, download begun
        # or not) so that a run killed while downloading leaves the URL paid for.
        downloading = unfetched_entry(
            shot, "generated; its download had not finished", image, attempt, sent=sent
        )
        self.record(downloading)
        self.outcome.downloading[shot.id] = downloading
        if self.shared is not None:
            await self.shared.answered(shot.request.key, image.image_url, image.request_id)

    async def _claim_turn(self, output_dir: Path, shot: Shot, gate: Any, ticket: int) -> str:
        """With a shared store, as `shot`'s turn to be sent has come: "send" (this process
        holds the key's claim), "done" (settled without paying: another process made it, or
        paid for it before it died), or "again" (claimed after waiting on another process, or
        the paid image's URL failed: wait for a turn again, then pay). A turn not used is given
        back at once, to another shot."""
        found = await self._try_claim(shot)
        if isinstance(found, Claim):
            return "send"
        if gate:
            gate.release(ticket)
        if found is None or await self._settle(output_dir, shot, found):
            return "done"
        return "again"

    async def _try_claim(self, shot: Shot) -> Claim | Record | Inherited | ClaimInfo | None:
        """Claim `shot`'s key in the shared store as its turn to be sent has come (see
        `SharedRun.try_claim`); None when the store failed (the run stops)."""
        assert self.shared is not None
        try:
            return await self.shared.try_claim(shot)
        except SharedStoreError as exc:
            self.stop(f"the shared store failed: {exc}")
            self._skip(shot.id, f"not run: {exc}")
            return None

    async def _settle(
        self, output_dir: Path, shot: Shot, found: Record | Inherited | ClaimInfo | Claim
    ) -> bool:
        """True when `shot` was settled without paying: another process made it (restored), or
        paid for it before it died (fetched from the URL its claim kept). False: this process
        holds the claim now and pays (after waiting on another process's claim, when the
        store's image proved damaged, or when the paid image's URL no longer works)."""
        assert self.shared is not None
        try:
            while not isinstance(found, Claim):
                if isinstance(found, Record):
                    restored = await self.shared.fetch(shot, found)
                    if restored is not None:
                        return await self._place_shared(output_dir, shot, restored)
                    found = await self.shared.try_claim(shot, look=False)
                elif isinstance(found, ClaimInfo):
                    self.outcome.in_flight[shot.id] = Phase.WAITING
                    found = await self._unless(False, self.shared.settle(shot))
                else:
                    image = GeneratedImage(found.image_url, 0, 0, None, found.request_id)
                    billed = unfetched_entry(shot, "paid by a process that stopped", image, 0)
                    return await self._fetch_billed(output_dir, shot, billed) is None
        except SharedStoreError as exc:
            self.stop(f"the shared store failed: {exc}")
            self._skip(shot.id, f"not run: {exc}")
            return True
        return False

    async def _place_shared(self, output_dir: Path, shot: Shot, found: Restored) -> bool:
        """Put the image another process made (checked) in the cache and at the shot's file.
        An image restored in the background is in the cache already, checked by SHA-256 as it
        was read back: not written again (a write is an fsync)."""
        assert self.shared is not None
        key = shot.request.key
        try:
            if not found.cached:
                await asyncio.to_thread(self.cache.put, key, found.data)
            await self._move_aside(output_dir, shot)
            await asyncio.to_thread(self.cache.place, key, output_dir / shot.file, found.data)
        except StoreWriteError as exc:
            self._write_failed(shot, exc, 0, kept="its image stays in the shared store")
            return True
        self._from_store(shot.id)
        entry = self.shared.entry_for(shot, found.record.sha256, found.record.size)
        if entry is None:
            width, height = shot.request.dimensions
            digest, size = found.record.sha256, found.record.size
            entry = shot_entry(shot, "cached", None, width, height, digest, size, attempts=0)
        self._finish(with_reference_url(entry, shot))
        return True

    def _refused_key(self, shot_id: str, error: AuthError, lost: int) -> None:
        """Stop the run: the key is refused. That is the run's stop reason, not this shot's
        outcome: its earlier entry (a real error, or its image) stands, like that of every shot
        the stop leaves."""
        self.stop(f"the service refused the credentials: {error}")
        self._skip(shot_id, self._not_run(None, lost))

    def _not_run(self, phase: str | None, lost: int) -> str:
        """Why a shot stopped before it was sent (again), and what earlier tries may have cost."""
        reason = f"not run: {self.outcome.stopped or 'stopped'}"
        if phase == Phase.BACKOFF:
            reason += ", while waiting to retry"
        if lost:
            tries = "an earlier try" if lost == 1 else f"{lost} earlier tries"
            reason += f" ({tries} lost the answer: may have been billed)"
        return reason

    async def _recover_billed(self, output_dir: Path, item: PlannedShot) -> None:
        """A `recover`: fetch the image an earlier run was billed for; if its URL no longer
        works, say so and make it again (a paid request on a metered provider)."""
        shot, previous = item.shot, item.billed
        assert shot is not None and previous is not None
        failure = await self._fetch_billed(output_dir, shot, previous)
        if failure is None:
            return
        if self.listener:
            cost = "a new, paid request" if self.provider.metered else "a new request"
            self.listener(
                Notice(
                    shot.id,
                    f"the image billed by request {previous.request_id or 'unknown'} could not "
                    f"be fetched from its URL ({failure}); making it again with {cost}",
                )
            )
        await self._generate(output_dir, shot)

    async def _fetch_billed(self, output_dir: Path, shot: Shot, source: ResultEntry) -> str | None:
        """Keep the image at `source.image_url` (billed by an earlier run; it works for about
        24 hours) as this shot's: None when done without a new request (or when it cannot be
        written: the shot fails, its URL kept), else why not."""
        if not source.image_url:
            return "no image URL was recorded"
        width, height = shot.request.dimensions
        seed = shot.request.seed
        image = GeneratedImage(source.image_url, width, height, seed, source.request_id)
        # The text sent is part of what the image is: a simplified request stays one.
        sent = simplified(shot.request) if source.simplified else None
        try:
            # One try: an expired URL stays expired, and a new request is the way out.
            incoming = await self._fetch_verified(shot, image, sent, tries=1)
        except (ProviderError, ValueError) as exc:
            return str(exc)
        except StoreWriteError as exc:
            kept = "its URL is kept: the next apply downloads it instead of paying again"
            self._write_failed(shot, exc, 0, kept=kept, unfetched=image, sent=sent)
            return None
        try:
            await self._place(output_dir, shot, image, incoming, attempts=0, sent=sent)
        finally:
            incoming.close()
        return None

    async def _fetch_verified(
        self, shot: Shot, image: GeneratedImage, sent: ImageRequest | None, *, tries: int
    ) -> Incoming:
        """The image received into a new cache entry (not yet committed: the caller commits or
        closes it), stamped with its provenance as it arrives, then verified to decode at the
        size the request asked for (what the service reports may be wrong); the last failure if
        not. A `PermanentError` (an image over the size cap) is not tried again; nor a
        `WrongImageError` (another format, or another size: the URL would serve it again), nor a
        `StoreWriteError` (the entry cannot be written)."""
        provenance = Provenance(
            shot.id, shot.request, (sent or shot.request).text, image.request_id
        )
        for attempt in range(1, tries + 1):
            # On the loop, as the pieces' writes are: creating a file costs microseconds.
            incoming = self.cache.receive(shot.request.key)
            try:
                await self._download(shot.id, image, provenance, incoming)
                return incoming
            except (TransientError, ValueError) as exc:
                incoming.close()
                if attempt == tries or isinstance(exc, WrongImageError):
                    raise
                await self._unless(True, self.clock.sleep(self.retry.backoff(attempt)))
            except BaseException:
                incoming.close()
                raise
        raise AssertionError("unreachable: tries >= 1")

    async def _download(
        self, shot_id: str, image: GeneratedImage, provenance: Provenance, incoming: Incoming
    ) -> None:
        """Stream the image into `incoming` (provenance spliced in, hashed and written as each
        piece arrives: no image is held whole while it downloads), then decode it once, in a
        worker thread, both to verify it and to make its thumbnail."""
        phase = self.outcome.in_flight
        phase[shot_id] = Phase.DOWNLOADING
        stamper = Stamper(provenance)

        def sink(chunk: bytes) -> None:
            incoming.write(stamper.feed(chunk))  # its pieces, in one system call

        await self._unless(True, self._fetch(image, sink))
        incoming.write(stamper.end())
        phase[shot_id] = Phase.WRITING
        key = provenance.request.key
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._decoder, self._verify, incoming, image, key)

    async def _fetch(self, image: GeneratedImage, sink: Sink) -> None:
        """The provider's fetch into `sink`, once one of the download slots is free (the wait
        is abandoned with the download, and the provider's deadline starts after it)."""
        async with self._download_slots:
            await self.provider.fetch(image, sink)

    def _verify(self, incoming: Incoming, image: GeneratedImage, key: str) -> None:
        """Decode the bytes received once: that checks them, and makes the thumbnail."""
        thumbnail = self.thumbnail
        with incoming.reader() as source:
            verify_image(
                source,
                image.width,
                image.height,
                then=None if thumbnail is None else lambda decoded: thumbnail(key, decoded),
            )

    async def _keep(
        self,
        output_dir: Path,
        shot: Shot,
        image: GeneratedImage,
        attempts: int,
        sent: ImageRequest | None = None,
    ) -> None:
        """Download, verify, cache and place a paid-for image; never regenerate to get it."""
        width, height = shot.request.dimensions
        if (image.width, image.height) != (width, height):
            # Verified at the size asked for: a service that misreports the size does not make
            # a wrong-sized image pass, nor a right one fail.
            image = replace(image, width=width, height=height)
        try:
            incoming = await self._fetch_verified(
                shot, image, sent, tries=self.retry.download_attempts
            )
        except _Cut:
            downloading = self.outcome.downloading.get(shot.id)
            if downloading is None:  # offline: nothing was paid for
                raise
            self._finish(abandoned_download(downloading))
            return
        except StoreWriteError as exc:
            kept = "its URL is kept: the next apply downloads it instead of paying again"
            self._write_failed(shot, exc, attempts, kept=kept, unfetched=image, sent=sent)
            return
        except (ProviderError, ValueError) as failure:
            message = (
                f"generated (request {image.request_id or 'unknown'}) but the image could not be "
                f"downloaded: {failure}"
            )
            error = failure if isinstance(failure, ProviderError) else None
            self._finish(unfetched_entry(shot, message, image, attempts, error, sent=sent))
            return
        try:
            await self._place(output_dir, shot, image, incoming, attempts=attempts, sent=sent)
        finally:
            incoming.close()

    async def _place(
        self,
        output_dir: Path,
        shot: Shot,
        image: GeneratedImage,
        incoming: Incoming,
        *,
        attempts: int,
        sent: ImageRequest | None = None,
    ) -> None:
        """Make the verified, stamped bytes received the cache entry, put them at the shot's
        file, then record the shot. The cache keeps the bytes as written, so that a restore
        puts back the very file (the same SHA-256 as recorded), provenance and all."""
        try:
            await asyncio.to_thread(incoming.commit)
        except StoreWriteError as exc:
            kept = "its URL is kept: the next apply downloads it instead of paying again"
            self._write_failed(shot, exc, attempts, kept=kept, unfetched=image, sent=sent)
            return
        try:
            await self._move_aside(output_dir, shot)
            await asyncio.to_thread(incoming.place, output_dir / shot.file)
        except StoreWriteError as exc:
            kept = "its image is in the cache: the next apply puts it in place without paying"
            self._write_failed(shot, exc, attempts, kept=kept, sent=sent)
            return
        entry = shot_entry(
            shot,
            "generated",
            image,
            image.width,
            image.height,
            incoming.sha256,
            incoming.size,
            attempts=attempts,
            sent=sent,
        )
        if self.shared is not None:
            data = await asyncio.to_thread(incoming.read)  # the bytes as the cache keeps them
            entry = await asyncio.shield(self.shared.made(shot, data, entry))
        self._finish(entry)

    async def _move_aside(self, output_dir: Path, shot: Shot) -> None:
        """Rename the shot's hand-edited file aside, if the plan said so, before it is written
        over; StoreWriteError (naming both paths) when it cannot be renamed."""
        if shot.id not in self._aside or shot.id in self.outcome.moved_aside:
            return
        target = output_dir / shot.file
        try:
            aside = aside_path(target)
            await asyncio.to_thread(target.rename, aside)
        except FileNotFoundError:
            return  # gone since the plan: nothing of the user's to keep
        except OSError as exc:
            # Named by the edited file: the message says it could not be written (moved).
            raise write_error(target, exc) from None
        name = aside.relative_to(output_dir).as_posix()
        self.outcome.moved_aside[shot.id] = name
        if self.listener:
            self.listener(Notice(shot.id, f"{shot.file} was edited by hand: moved aside to {name}"))


def fit_to_open_files(concurrency: int) -> int:
    """`concurrency`, lowered if needed to what the open-files limit allows (raised first as far
    as the hard limit permits): past it, every new socket fails as if the network were down."""
    if sys.platform == "win32":
        return concurrency
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = concurrency * _FILES_PER_REQUEST + _FILES_RESERVED
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return concurrency
    return max(1, min(concurrency, (soft - _FILES_RESERVED) // _FILES_PER_REQUEST))
