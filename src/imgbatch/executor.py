"""Carry out a plan: restore from the cache, generate what is missing, record each shot.

Takes a `Plan`, a provider, the image cache and a journal; gives a `RunOutcome` with one
`ResultEntry` per shot. Workers pull shots one at a time (memory does not grow with the manifest);
paid requests wait for their model's `Gate`; a 429 sends the shot back to the gate (it uses up no
try, and fails the shot only after `RetryPolicy.throttle_patience` of refusals), other transient
failures are retried with backoff, a 400 fails that
shot only, a 401/403 stops the run: nothing new is sent, requests in flight finish. Every image is
downloaded right after it is generated (its URL expires), verified to decode at the reported
size, put in the cache and copied into place before its entry is journaled, so a crash loses only
shots in flight; its URL is journaled before the download, so that a shot paid for but not yet
downloaded is fetched by the next apply (`_recover`) instead of being paid for again. Every PNG
written carries its provenance (`provenance.py`); the cache holds it as written.

A file that cannot be written fails its shot only, naming the path (a paid image stays in the
cache, or its URL in the entry); a full disk, or a journal that cannot be written, also stops the
run like a 401. A restore checks the cache entry first: a damaged one is discarded, said to the
listener as a `Notice`, and the image fetched from its recorded URL or generated again. A shot
whose reference URL could not be fetched (`apply` fetches them before planning) fails unsent,
naming the field.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from imgbatch.errors import (
    AuthError,
    CacheEntryDamaged,
    NoImageError,
    PermanentError,
    ProviderError,
    StoreWriteError,
    TransientError,
)
from imgbatch.expand import Shot
from imgbatch.pacing import Clock, Finding, Pacer, RetryPolicy
from imgbatch.plan import Action, Plan, PlannedShot
from imgbatch.provenance import Provenance, embed
from imgbatch.providers import Provider
from imgbatch.request import GeneratedImage, ImageRequest, simplified
from imgbatch.results import ResultEntry
from imgbatch.store import ImageCache, verify_image

# Requests in flight when the user sets no cap. The rate is what limits a run; this only has to
# be more than rate x latency (25 requests/s at a 15 s generation is 375 in flight), and stay
# under a default open-files limit of 1024 with a socket per request.
DEFAULT_CONCURRENCY = 512
# Open files each request in flight may hold (its API socket, then its download's) and those
# kept for everything else (the journal, the cache, the interpreter's own).
_FILES_PER_REQUEST = 2
_FILES_RESERVED = 64
# Longest Retry-After honoured. A service that asks for more is closed for now: the run stops
# and says when to try again, instead of sleeping for hours.
MAX_RETRY_AFTER_SECONDS = 300.0
# Tries of one shot whose answer was lost (dropped connection, no answer in time): each may
# have been billed, so a shot is not sent again and again on a link that keeps losing answers.
MAX_LOST_ANSWERS = 3


@dataclass(frozen=True)
class Retrying:
    shot_id: str
    attempt: int
    delay: float
    error: ProviderError


class Phase:
    """Where a shot in flight stands; says what an interrupted shot may have cost."""

    WAITING = "waiting for its turn"
    SENDING = "waiting for the service's answer"
    BACKOFF = "waiting to retry"
    DOWNLOADING = "downloading its image"


@dataclass
class RunOutcome:
    entries: dict[str, ResultEntry] = field(default_factory=dict)
    # Shots generated (and billed) whose download has not finished yet.
    downloading: dict[str, ResultEntry] = field(default_factory=dict)
    # Shots started and not finished, by `Phase`.
    in_flight: dict[str, str] = field(default_factory=dict)
    stopped: str | None = None
    requests: int = 0
    # Images the service answered with (billed), and requests whose answer was lost after they
    # were sent (may have been billed). Refusals (429, 4xx, 5xx) and unreachable servers cost
    # nothing.
    billed: int = 0
    maybe_billed: int = 0
    throttled: int = 0
    retries: int = 0
    quotas: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class Notice:
    """Something the user should know about a shot that is not its result (a damaged cache
    entry, discarded)."""

    shot_id: str
    message: str


Listener = Callable[[ResultEntry | Retrying | Notice], None]


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
    ) -> None:
        self.provider = provider
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
        self.stop_requested = asyncio.Event()
        self.outcome = RunOutcome()

    def stop(self, reason: str) -> None:
        """Send nothing new; shots already in flight finish."""
        if self.outcome.stopped is None:
            self.outcome.stopped = reason
        self.stop_requested.set()

    async def run(self, plan: Plan) -> RunOutcome:
        pending = iter(item for item in plan.shots if item.action is not Action.UNCHANGED)
        for item in plan.shots:
            if item.action is Action.UNCHANGED and item.previous is not None:
                # Kept exactly as it was: results.json describes the image, not this run.
                self.outcome.entries[item.id] = _with_reference_url(item.previous, item.shot)
        workers = [
            asyncio.create_task(self._worker(plan.output_dir, pending))
            for _ in range(self.concurrency)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            # Also when the run is abandoned: an interrupted run reports its 429s too.
            self.outcome.throttled = self.pacer.throttled_count
            self.outcome.quotas = self.pacer.findings()
        return self.outcome

    async def _worker(self, output_dir: Path, pending: Iterator[PlannedShot]) -> None:
        for item in pending:
            assert item.shot is not None
            if self.stop_requested.is_set():
                reason = self.outcome.stopped or "stopped"
                self._finish(failed_entry(item.shot, f"not run: {reason}", None, 0), journal=False)
                continue
            reference = item.shot.request.reference
            if reference is not None and not reference.fetched:
                # Its content, and so its key, is unknown: nothing can be restored or sent.
                reason = reference.problem or "was not fetched"
                message = f"field reference_image: '{reference.source}' {reason}; nothing was sent"
                self._finish(failed_entry(item.shot, message, None, 0))
                continue
            self.outcome.in_flight[item.id] = Phase.WAITING
            if item.action is Action.RESTORE:
                await self._restore(output_dir, item)
            elif not await self._recover(output_dir, item.shot, item.previous):
                await self._generate(output_dir, item.shot)

    def record(self, entry: ResultEntry) -> None:
        """Journal `entry`; a journal that cannot be written stops the run (the entry stays in
        the outcome, for results.json)."""
        try:
            self.journal(entry)
        except StoreWriteError as exc:
            self._stop_for_write(exc)

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
        generated: GeneratedImage | None = None,
        sent: ImageRequest | None = None,
    ) -> None:
        """One shot's file could not be written: that shot fails; a full disk stops the run."""
        if error.disk_full:
            self._stop_for_write(error)
        entry = failed_entry(
            shot, f"{error}; {kept}", None, attempts, generated=generated, sent=sent
        )
        self._finish(entry)

    def _finish(self, entry: ResultEntry, *, journal: bool = True) -> None:
        self.outcome.in_flight.pop(entry.id, None)
        self.outcome.entries[entry.id] = entry
        if journal:
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
        try:
            digest, size = await asyncio.to_thread(
                self.cache.restore,
                key,
                target,
                sha256=record.sha256 if record else None,
                size=record.bytes if record else None,
                dimensions=shot.request.dimensions,
            )
        except CacheEntryDamaged as damaged:
            await asyncio.to_thread(self.cache.discard, key)
            fetchable = record is not None and record.image_url is not None
            if self.listener:
                then = "fetching it from its URL" if fetchable else "generating it again"
                self.listener(Notice(shot.id, f"{damaged}; discarded it, {then}"))
            if record is not None and await self._recover(
                output_dir, shot, replace(record, status="failed", key=key)
            ):
                return
            await self._generate(output_dir, shot)
            return
        except StoreWriteError as exc:
            self._write_failed(shot, exc, 0, kept="its image stays in the cache for the next apply")
            return
        if previous is not None and previous.key == key and previous.status != "failed":
            # Same request as before: keep its provenance (URL, request id) from the results.
            self._finish(
                replace(
                    _with_reference_url(previous, shot),
                    status="cached",
                    file=shot.file,
                    sha256=digest,
                    bytes=size,
                )
            )
            return
        width, height = shot.request.dimensions
        self._finish(_entry(shot, "cached", None, width, height, digest, size, attempts=0))

    async def _generate(self, output_dir: Path, shot: Shot) -> None:
        if self.frozen:
            message = "not generated: --frozen sends no paid request"
            self._finish(failed_entry(shot, message, None, 0))
            return
        gate = self.pacer.gate(shot.request.model)
        attempt = tries = lost = 0
        # When the service began refusing this shot with 429s (None while it is not).
        refused_since: float | None = None
        phase = self.outcome.in_flight
        sent = shot.request  # the simplified request, after a 200 without an image
        imageless: list[str] = []  # request ids of the answers without an image
        while True:
            if self.stop_requested.is_set():
                reason = self.outcome.stopped or "stopped"
                self._finish(failed_entry(shot, f"not run: {reason}", None, attempt), journal=False)
                return
            phase[shot.id] = Phase.WAITING
            ticket = await gate.acquire() if gate else 0
            if self.stop_requested.is_set():
                if gate:
                    gate.release(ticket)
                continue
            attempt += 1
            self.outcome.requests += 1
            phase[shot.id] = Phase.SENDING
            try:
                image = await self.provider.generate(sent, label=shot.id)
            except NoImageError as exc:
                if gate:
                    gate.answered(ticket)  # admitted (and answered), only without an image
                imageless.append(exc.request_id or "unknown")
                simpler = simplified(sent) if self.simplify and sent is shot.request else None
                if simpler is None:
                    message = (
                        f"the service answered without an image (request {', '.join(imageless)})"
                    )
                    if len(imageless) > 1:
                        message += ", also when asked again with a simplified prompt"
                    self._finish(failed_entry(shot, message, exc, attempt))
                    return
                sent = simpler
                if self.listener:
                    self.listener(Retrying(shot.id, attempt, 0.0, exc))
                continue
            except TransientError as exc:
                if exc.throttled:
                    if gate:
                        gate.refused(ticket, exc.retry_after, exc.stated_quota)
                elif gate:
                    gate.answered(ticket)
                if exc.maybe_billed:
                    self.outcome.maybe_billed += 1
                    lost += 1
                if exc.retry_after is not None and exc.retry_after > MAX_RETRY_AFTER_SECONDS:
                    self.stop(
                        f"the service asked to wait {exc.retry_after:g} s before the next request "
                        f"(Retry-After), longer than imgbatch waits ({MAX_RETRY_AFTER_SECONDS:g} "
                        "s); run apply again later"
                    )
                    self._finish(failed_entry(shot, f"not run: {exc}", exc, attempt))
                    return
                if exc.throttled:
                    now = self.clock.now()
                    refused_since = now if refused_since is None else refused_since
                    if now - refused_since >= self.retry.throttle_patience:
                        message = (
                            f"the service refused it for {now - refused_since:.0f} s "
                            f"({attempt} tries): {exc}"
                        )
                        self._finish(failed_entry(shot, message, exc, attempt))
                        return
                    # Not a failed try: the gate has slowed down, and this shot waits its turn.
                    self.outcome.retries += 1
                    if self.listener:
                        self.listener(Retrying(shot.id, attempt, 0.0, exc))
                    continue
                refused_since = None
                tries += 1
                if tries >= self.retry.max_attempts or lost >= MAX_LOST_ANSWERS:
                    message = f"gave up after {attempt} tries: {exc}"
                    if lost:
                        message += f" ({lost} of them lost their answer and may have been billed)"
                    self._finish(failed_entry(shot, message, exc, attempt))
                    return
                delay = self.retry.backoff(tries, exc.retry_after)
                self.outcome.retries += 1
                if self.listener:
                    self.listener(Retrying(shot.id, attempt, delay, exc))
                phase[shot.id] = Phase.BACKOFF
                await self.clock.sleep(delay)
                continue
            except (AuthError, PermanentError) as exc:
                if gate:
                    gate.answered(ticket)
                if isinstance(exc, AuthError):
                    self.stop(f"the service refused the credentials: {exc}")
                self._finish(failed_entry(shot, str(exc), exc, attempt))
                return
            if gate:
                gate.answered(ticket, image.stated_quota)
            if self.provider.metered:
                self.outcome.billed += 1
                # Journaled before the download, so that a run killed while downloading leaves
                # the paid image's URL for the next apply to fetch instead of paying again.
                downloading = failed_entry(
                    shot,
                    "generated; its download had not finished",
                    None,
                    attempt,
                    generated=image,
                    sent=sent,
                )
                self.record(downloading)
                self.outcome.downloading[shot.id] = downloading
            phase[shot.id] = Phase.DOWNLOADING
            await self._keep(output_dir, shot, image, attempt, sent)
            self.outcome.downloading.pop(shot.id, None)
            return

    async def _recover(self, output_dir: Path, shot: Shot, previous: ResultEntry | None) -> bool:
        """Keep an image billed by an earlier run that could not download it, if its URL still
        works (about 24 hours): True when the shot is done without a new request."""
        if (
            previous is None
            or previous.status != "failed"
            or not previous.image_url
            or previous.key != shot.request.key
        ):
            return False
        width, height = shot.request.dimensions
        image = GeneratedImage(
            previous.image_url, width, height, shot.request.seed, previous.request_id
        )
        try:
            # One try: an expired URL stays expired, and a new request is the way out.
            data = await self._fetch_verified(image, tries=1)
        except (ProviderError, ValueError):
            return False
        # The text sent is part of what the image is: a simplified request stays one.
        sent = simplified(shot.request) if previous.simplified else None
        await self._place(output_dir, shot, image, data, attempts=0, sent=sent)
        return True

    async def _fetch_verified(self, image: GeneratedImage, *, tries: int) -> bytes:
        """The image's bytes, verified to decode at the size the request asked for (what the
        service reports may be wrong); the last failure if not. A `PermanentError` (an image
        over the size cap) is not tried again."""
        for attempt in range(1, tries + 1):
            try:
                data = await self.provider.fetch(image)
                await asyncio.to_thread(verify_image, data, image.width, image.height)
                return data
            except (TransientError, ValueError):
                if attempt == tries:
                    raise
                await self.clock.sleep(self.retry.backoff(attempt))
        raise AssertionError("unreachable: tries >= 1")

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
            data = await self._fetch_verified(image, tries=self.retry.download_attempts)
        except (ProviderError, ValueError) as failure:
            message = (
                f"generated (request {image.request_id or 'unknown'}) but the image could not be "
                f"downloaded: {failure}"
            )
            error = failure if isinstance(failure, ProviderError) else None
            self._finish(failed_entry(shot, message, error, attempts, generated=image, sent=sent))
            return
        await self._place(output_dir, shot, image, data, attempts=attempts, sent=sent)

    async def _place(
        self,
        output_dir: Path,
        shot: Shot,
        image: GeneratedImage,
        data: bytes,
        *,
        attempts: int,
        sent: ImageRequest | None = None,
    ) -> None:
        """Stamp verified bytes with their provenance, put them in the cache and at the shot's
        file, then record the shot. The cache keeps the bytes as written, so that a restore puts
        back the very file (the same SHA-256 as recorded), provenance and all."""
        key = shot.request.key
        provenance = Provenance(
            shot.id, shot.request, (sent or shot.request).text, image.request_id
        )
        data, digest = await asyncio.to_thread(_stamp, data, provenance)
        try:
            await asyncio.to_thread(self.cache.put, key, data)
        except StoreWriteError as exc:
            kept = "its URL is kept: the next apply downloads it instead of paying again"
            self._write_failed(shot, exc, attempts, kept=kept, generated=image, sent=sent)
            return
        try:
            await asyncio.to_thread(self.cache.place, key, output_dir / shot.file, data)
        except StoreWriteError as exc:
            kept = "its image is in the cache: the next apply puts it in place without paying"
            self._write_failed(shot, exc, attempts, kept=kept, generated=image, sent=sent)
            return
        entry = _entry(
            shot,
            "generated",
            image,
            image.width,
            image.height,
            digest,
            len(data),
            attempts=attempts,
            sent=sent,
        )
        self._finish(entry)


def _stamp(data: bytes, provenance: Provenance) -> tuple[bytes, str]:
    """The bytes to write and their SHA-256 (off the event loop: a few ms for 3.5 MB)."""
    stamped = embed(data, provenance)
    return stamped, hashlib.sha256(stamped).hexdigest()


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


def _entry(
    shot: Shot,
    status: str,
    image: GeneratedImage | None,
    width: int | None,
    height: int | None,
    sha256: str | None,
    size_bytes: int | None,
    *,
    attempts: int,
    sent: ImageRequest | None = None,
) -> ResultEntry:
    request = shot.request
    sent = sent or request
    return ResultEntry(
        id=shot.id,
        status=status,  # type: ignore[arg-type]
        file=shot.file if status != "failed" else None,
        key=request.key,
        width=width,
        height=height,
        seed=request.seed,
        model=request.model,
        size=request.size,
        prompt=request.prompt,
        image_url=image.image_url if image else None,
        request_id=image.request_id if image else None,
        negative_prompt=request.negative_prompt,
        style=request.style,
        sha256=sha256,
        bytes=size_bytes,
        attempts=attempts,
        request=request.canonical(),
        prompt_sent=sent.text,
        simplified=sent is not request,
        reference_url=request.reference.source
        if request.reference is not None and request.reference.is_url
        else None,
    )


def _with_reference_url(entry: ResultEntry, shot: Shot | None) -> ResultEntry:
    """`entry` naming the reference URL the shot has now: the same content moved to another URL
    keeps its image, and the next plan must compare against the new URL."""
    if shot is None:
        return entry
    reference = shot.request.reference
    url = reference.source if reference is not None and reference.is_url else None
    return entry if entry.reference_url == url else replace(entry, reference_url=url)


def failed_entry(
    shot: Shot,
    message: str,
    error: ProviderError | None,
    attempts: int,
    *,
    generated: GeneratedImage | None = None,
    sent: ImageRequest | None = None,
) -> ResultEntry:
    """A failed shot's entry; `generated` is the image it was billed for but could not keep,
    made from `sent` (the simplified request, when it was one)."""
    entry = _entry(shot, "failed", None, None, None, None, None, attempts=attempts, sent=sent)
    # The generation's request id is the one a billing query or a support ticket needs.
    request_id = generated.request_id if generated else None
    return replace(
        entry,
        error=message,
        error_code=error.code if error else None,
        request_id=request_id or (error.request_id if error else None),
        image_url=generated.image_url if generated else None,
    )
