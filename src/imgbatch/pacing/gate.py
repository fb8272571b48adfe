"""When may the next request start: the gate that keeps a run within the account's quota.

Takes a `QuotaEstimator` per model (what the quota is: given, stated, learned or being found, see
`quota.py`) and what each request's answer was; gives `Gate.acquire()`, which returns when one
more request may be sent, and `RetryPolicy`, how long a shot keeps trying. DashScope's quota is
per account and per model, shared by every request of the run, so a 429 slows every request of
that model, not just the shot that got it.

A gate admits a request when (a) fewer than K requests were sent in the window's last P seconds
(a sliding count: every P-second span holds at most K sends, so the first K may go at once, and
a fixed window or a token bucket of K/P holding K is kept too; `aiolimiter`'s leaky bucket would
let up to 2K - 1 through in one period, which a counted window refuses), (b) fewer requests than
the estimator's cap are in flight, and (c) no `Retry-After` is running. A rate asked for with
`--rps` is a spacing, not a window, and that is what `aiolimiter` does well: an `AsyncLimiter`
two requests deep spaces the requests evenly and makes up a turn the event loop woke up late
for on the next one. Waiting requests queue in order behind one lock, so a cut applies to the
very next request. Everything runs on the event loop's clock: one time source, virtual in the
simulations.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

from imgbatch.pacing.quota import EstimatorSettings, QuotaEstimator, Source
from imgbatch.units.quota import Quota

# Sends further back than this are never the K-th most recent of a window worth keeping.
_MAX_LOG = 100_000
# How many requests deep the --rps spacing limiter is: one late turn is made up on the next, and
# never more than two requests start back to back.
_SPACING_DEPTH = 2
# How often a gate waiting on its window asks the estimator whether to try a faster one.
_PROBE_POLL = 0.25


def loop_time() -> float:
    """The running event loop's clock (time.monotonic outside one): the clock `asyncio.sleep`,
    `asyncio.timeout` and aiolimiter keep, so a wait and the time it is measured on never
    disagree, and a loop on virtual time (the tests') moves all of them together."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


@dataclass(frozen=True)
class Clock:
    """Sleeping as the executor's retries see it; tests pass a fake one instead of sleeping."""

    now: Callable[[], float] = loop_time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, how many tries a shot gets, and how long 429s may last.

    A 429 does not use up a try: it says "not now", not "this request is wrong". A shot fails on
    429s only when the service has refused it for `throttle_patience` seconds without a break.
    """

    max_attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    download_attempts: int = 4
    throttle_patience: float = 600.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number `attempt` (1-based).

        Half the exponential step is fixed and half random ("equal jitter"): retries of shots
        that failed together spread out, yet none retries immediately.
        """
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        delay = ceiling / 2 + self.rng.uniform(0, ceiling / 2)
        return float(max(delay, retry_after or 0.0))


def _margin(quota: Quota) -> float:
    """The period a counted window is kept to: a little longer than stated, for the network's
    jitter between our clock and the service's (a window of one is a spacing, kept exactly)."""
    if quota.count == 1:
        return quota.period + min(0.001 * quota.period + 0.001, 0.01 * quota.period)
    return quota.period + min(0.01 * quota.period + 0.02, 0.1 * quota.period)


class Gate:
    """Admits requests of one model within the estimator's window and cap."""

    def __init__(
        self, estimator: QuotaEstimator, clock: Clock | None = None, *, average: bool = False
    ) -> None:
        self.estimator = estimator
        self.clock = clock or Clock()
        # A rate asked for with --rps is kept on average: a turn the event loop woke up late
        # for is made up on the next (never closer than half an interval). A window is kept
        # strictly: the service counts every span.
        self.average = average
        self.in_flight = 0
        self.sent = 0
        self.throttled = 0
        self._log: deque[tuple[int, float]] = deque(maxlen=_MAX_LOG)  # (ticket, sent at)
        self._paused_until = -math.inf
        self._spacing: AsyncLimiter | None = None  # made in the running loop, on first use
        self._turn = asyncio.Lock()
        self._changed = asyncio.Event()

    async def acquire(self) -> int:
        """Return when one more request may be sent (the caller sends it at once): its ticket."""
        waited = self._turn.locked()
        async with self._turn:
            while True:
                now = self.clock.now()
                paused, window_delay = self._paused_until - now, self._window_delay(now)
                delay = max(paused, window_delay)
                cap = self.estimator.cap
                if delay <= 0 and (cap is None or self.in_flight < cap):
                    if not self._spaced:
                        break
                    spacing = await self._spacing_limiter()
                    waited |= not spacing.has_capacity()
                    await spacing.acquire()
                    now = self.clock.now()
                    if self._paused_until <= now:  # no Retry-After came while it waited
                        break
                    continue
                waited = True
                # Held back by the window (not a Retry-After): the estimator may try a faster
                # one, now or while the wait lasts, so it is woken now and then to ask.
                on_window = window_delay > 0 and paused < window_delay
                if on_window and self.estimator.waiting(now):
                    continue  # a faster window to try at once
                polled = on_window and self.estimator.may_probe
                await self._wait_for_change(min(delay, _PROBE_POLL) if polled else delay)
            ticket = self.estimator.sent(now, self.in_flight, waited=waited)
            self._log.append((ticket, now))
            self.in_flight += 1
            self.sent += 1
            return ticket

    async def _wait_for_change(self, delay: float) -> None:
        """Until `delay` has passed on the clock or an answer may have changed the limits."""
        self._changed.clear()
        changed = asyncio.ensure_future(self._changed.wait())
        if delay <= 0:
            await changed
            return
        timer = asyncio.ensure_future(self.clock.sleep(delay))
        try:
            await asyncio.wait({changed, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            timer.cancel()

    def release(self, ticket: int) -> None:
        """The request was not sent after all (the run is stopping)."""
        self.in_flight -= 1
        self._forget(ticket)
        self._changed.set()

    def answered(self, ticket: int, stated: Quota | None = None) -> None:
        """The request was admitted: answered, or failed for another reason than a 429."""
        self.in_flight -= 1
        self.estimator.answered(ticket, self.clock.now())
        if stated is not None:
            self.estimator.stated(stated)
        self._changed.set()

    def refused(
        self, ticket: int, retry_after: float | None = None, stated: Quota | None = None
    ) -> None:
        """The request was refused with a 429: it took nothing from the window."""
        self.in_flight -= 1
        self.throttled += 1
        now = self.clock.now()
        self._forget(ticket)
        if stated is not None:
            self.estimator.stated(stated, with_429=True)
        self.estimator.refused(ticket, now)
        # Nobody goes again for one interval of the window as it now stands: the refused request
        # took nothing from the window, and without a pause the next would go at once into the
        # same refusal. Under a given quota (someone else uses it too) this is all that changes.
        window = self.estimator.window
        pause = retry_after or window.period / window.count
        self._paused_until = max(self._paused_until, now + pause)
        self._changed.set()

    def _forget(self, ticket: int) -> None:
        # Newest first: the ticket answered at once by a 429 is near the end.
        for index in range(len(self._log) - 1, -1, -1):
            if self._log[index][0] == ticket:
                del self._log[index]
                return

    @property
    def _spaced(self) -> bool:
        return self.average and self.estimator.source == "given"

    async def _spacing_limiter(self) -> AsyncLimiter:
        if self._spacing is None:
            window = self.estimator.window
            interval = window.period / window.count
            self._spacing = AsyncLimiter(_SPACING_DEPTH, _SPACING_DEPTH * interval)
            # Empty, it would let two go at once: the first goes now, the next an interval on.
            await self._spacing.acquire(_SPACING_DEPTH - 1)
        return self._spacing

    def _window_delay(self, now: float) -> float:
        window = self.estimator.pace
        if self._spaced:
            return 0.0
        period = _margin(window)
        if len(self._log) < window.count:
            return 0.0
        kth_latest = self._log[-window.count][1]
        return kth_latest + period - now


@dataclass(frozen=True)
class Finding:
    """What a run knows of one model's quota at its end."""

    model: str
    window: Quota
    source: Source
    cap: int | None
    cap_confirmed: bool
    stated: Quota | None
    refused: int
    # 429s' worth of probing the next run of the account may spend beyond its own budget
    # (`QuotaEstimator.credit_left`).
    credit: float = 0.0


class Pacer:
    """One gate per model, each with its own estimator; `unlimited` for a free provider."""

    def __init__(
        self,
        *,
        given: Quota | None = None,
        average: bool = False,
        learned: Mapping[str, tuple[Quota | None, int | None]] | None = None,
        unlimited: bool = False,
        settings: EstimatorSettings | None = None,
        clock: Clock | None = None,
        expected: Mapping[str, int] | None = None,
        credit: Mapping[str, float] | None = None,
    ) -> None:
        self.clock = clock or Clock()
        # Requests the run means to send, by model: a run's budget of 429s is a share of them.
        self.expected = dict(expected or {})
        self.given = given
        self.average = average and given is not None and given.count == 1
        self.learned = dict(learned or {})
        # 429s earlier runs saved up, by model, spent only with the learned window.
        self.credit = dict(credit or {})
        self.unlimited = unlimited
        self.settings = settings
        self._gates: dict[str, Gate] = {}

    def gate(self, model: str) -> Gate | None:
        """The gate for `model`; None when nothing needs pacing (the placeholder)."""
        if self.unlimited:
            return None
        gate = self._gates.get(model)
        if gate is None:
            window, cap = self.learned.get(model, (None, None))
            estimator = QuotaEstimator(
                given=self.given,
                learned=window,
                learned_cap=cap,
                settings=self.settings,
                expected=self.expected.get(model),
                credit=self.credit.get(model, 0.0),
            )
            gate = self._gates[model] = Gate(estimator, self.clock, average=self.average)
        return gate

    @property
    def throttled_count(self) -> int:
        return sum(gate.throttled for gate in self._gates.values())

    def findings(self) -> list[Finding]:
        return [
            Finding(
                model,
                gate.estimator.window,
                gate.estimator.source,
                gate.estimator.cap,
                gate.estimator.cap_confirmed,
                gate.estimator.stated_quota,
                gate.throttled,
                gate.estimator.credit_left,
            )
            for model, gate in self._gates.items()
        ]
