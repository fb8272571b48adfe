"""When may the next request start: the rate limit, known or found, and the retry backoff.

Takes the user's `--rps` (or none) and what the service answers; gives `Pacer.wait_turn()`, which
returns when one more request may be sent, and `RetryPolicy.backoff()`, the pause before trying a
shot again. DashScope's quota is per account and per model, shared by every request of the run,
so a 429 slows the whole run, not just the shot that got it.

Requests are spaced evenly by an `aiolimiter.AsyncLimiter` rather than sent in bursts: DashScope's
burst protection answers 429 to a sudden ramp even under the per-minute quota. The limiter's
bucket is two requests deep, so a timer that fires a little late is made up on the next request
instead of lowering the rate, and at most two requests ever start back to back. Waiting requests
queue in order behind one lock, so only one of them waits in the limiter: a change of rate (a new
limiter) or a `Retry-After` applies to the very next request, not only to requests that arrive
after it. The limiter keeps the event loop's time; the rate decisions and pauses use the injected
`Clock` (the same time unless a test fakes it; the pacer's own tests run on a virtual-time loop).

With no `--rps`, the rate is found. 429s come back at once (the gateway refuses before any work is
done), so they are the probe:

* it doubles every `probe_interval` while nothing is refused and requests are queueing for their
  turn (when they are not, the rate is not what limits the run and raising it proves nothing);
* on the first 429 the account's token bucket has just run dry. What was admitted so far came
  from the refill *and* from the burst the account had saved up, so the rate is set to the
  largest quota that explains the 429: the quota whose bucket, holding `burst_seconds` of it and
  full at the first request, runs dry under the requests actually sent; a little below that;
* on a later 429 the bucket is dry again, as it was at the 429 that last set the rate, so what
  was admitted in between (sent minus refused) divided by the time in between is the quota
  itself; the rate is set a little below it. Refusals within `window` of a cut were caused by
  requests sent before it and say nothing new, so the rate is cut at most once per window;
* between 429s it creeps up by `creep` per second to follow a quota that grows.

`Retry-After` pauses every request until it has passed.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

# Enough send times to model the bucket over the ramp (which is short); bounds memory if the
# ramp is never refused.
_HISTORY = 4096
_DRY_MOMENTS = 64
# How many requests deep the limiter's bucket is (see the module docstring).
_SPACING_DEPTH = 2
# The share of its rate a run must actually send before the rate is raised.
_USED_IN_FULL = 0.8


@dataclass(frozen=True)
class Clock:
    """Time as the executor sees it; tests pass a fake one instead of really sleeping."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, and how many tries a shot gets."""

    max_attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    download_attempts: int = 4
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number `attempt` (1-based).

        Half the exponential step is fixed and half random ("equal jitter"): retries of shots
        that failed together spread out, yet none retries immediately.
        """
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        delay = ceiling / 2 + self.rng.uniform(0, ceiling / 2)
        return float(max(delay, retry_after or 0.0))


class Pacer:
    """Admits requests at the known or discovered rate of the account's quota."""

    MIN_RATE = 0.1

    def __init__(
        self,
        rps: float | None,
        *,
        clock: Clock | None = None,
        initial_rate: float = 4.0,
        probe_interval: float = 0.25,
        probe_step: float = 0.25,
        window: float = 0.5,
        margin: float = 0.95,
        creep: float = 0.02,
        creep_requests: int = 10,
        burst_seconds: float = 1.0,
        min_sample: int = 8,
        unlimited: bool = False,
    ) -> None:
        self.clock = clock or Clock()
        self.unlimited = unlimited
        self.fixed = rps is not None
        self.rate = float(rps) if rps is not None else float(initial_rate)
        self.probe_interval = probe_interval
        self.probe_step = probe_step
        self.window = window
        self.margin = margin
        self.creep = creep
        self.creep_requests = creep_requests
        self.burst_seconds = burst_seconds
        self.min_sample = min_sample
        self.sent_count = 0
        self.throttled_count = 0
        # The quota as last measured (before the margin); None until a 429.
        self.estimate: float | None = None
        self._found_limit = False
        self._probing = False
        self._paused_until = -math.inf
        self._limiter: AsyncLimiter | None = None  # made in the running loop, per rate
        self._last_change = self.clock.now()
        self._last_cut = -math.inf
        self._sent_since_change = 0
        self._queued_since_change = False
        self._creep_steps = 0
        self._held = 0.0
        # Moments the account's bucket was dry (each 429): time, requests sent, refused so far.
        self._dry: deque[tuple[float, int, int]] = deque(maxlen=_DRY_MOMENTS)
        self._history: deque[float] = deque(maxlen=_HISTORY)  # send times until the first 429
        self._turn = asyncio.Lock()

    @property
    def discovered(self) -> bool:
        """True once an unknown quota has shown where it lies."""
        return self._found_limit

    @property
    def settled_rate(self) -> float:
        """The rate to pin next time: the rate asked for, else the last measured quota less
        the margin. Not the current rate, which a run may end in the middle of probing above
        the quota, nor a rate merely held for a while, which a saved-up burst can flatter.
        """
        if self.fixed or self.estimate is None:
            return self.rate
        return min(self.rate, self.estimate * self.margin)

    async def wait_turn(self) -> None:
        """Return when one more request may be sent; the caller sends it right away."""
        if self.unlimited:
            return
        queued = self._turn.locked()
        async with self._turn:
            while True:
                pause = self._paused_until - self.clock.now()
                if pause > 0:
                    queued = True
                    await self.clock.sleep(pause)
                    continue
                limiter = await self._current_limiter()
                queued |= not limiter.has_capacity()
                await limiter.acquire()
                # A Retry-After while we waited: wait it out, then take a turn again.
                if self._paused_until <= self.clock.now():
                    break
            now = self.clock.now()
            self.sent_count += 1
            self._sent_since_change += 1
            self._queued_since_change |= queued
            if not self._found_limit:
                self._history.append(now)
            self._adjust_up(now)

    async def _current_limiter(self) -> AsyncLimiter:
        limiter = self._limiter
        if limiter is None:
            limiter = self._limiter = AsyncLimiter(_SPACING_DEPTH, _SPACING_DEPTH / self.rate)
            # A new limiter is empty and would let two requests go at once. The first of a run
            # goes at once and the next a full interval later (two at once at the start would
            # read as a tiny quota to a strict account); a new rate starts as if the bucket
            # were full, so a cut is not followed by two back to back. (Filling an empty
            # limiter does not wait.)
            await limiter.acquire(_SPACING_DEPTH if self.sent_count else _SPACING_DEPTH - 1)
        return limiter

    def _adjust_up(self, now: float) -> None:
        if self.fixed or not self._queued_since_change:
            return
        elapsed = now - self._last_change
        if self._sent_since_change < _USED_IN_FULL * self.rate * elapsed:
            # Requests come slower than the rate allows (a concurrency cap, a slow service): the
            # rate is not what limits the run, and going faster would prove nothing.
            return
        if not self._found_limit or self._probing:
            if elapsed >= self.probe_interval and self._sent_since_change > 2:
                factor = 2.0 if not self._found_limit else 1 + self.probe_step
                self._set_rate(self.rate * factor, now)
        elif elapsed >= 1.0 and self._sent_since_change >= self.creep_requests:
            # Each step since the last cut a little bigger: slow near the quota just found,
            # quicker to catch up if it was found low or has grown.
            self._creep_steps += 1
            # Held for a second and a fair number of requests without a 429: a floor for the
            # quota (a burst saved up since the last 429 hides little over that long).
            self._held = self.rate
            self._set_rate(self.rate * (1 + self.creep * self._creep_steps), now)

    def _set_rate(self, rate: float, now: float) -> None:
        self.rate = max(self.MIN_RATE, rate)
        self._limiter = None
        self._last_change = now
        self._sent_since_change = 0
        self._queued_since_change = False

    def on_throttled(self, retry_after: float | None = None) -> None:
        now = self.clock.now()
        self.throttled_count += 1
        if retry_after:
            self._paused_until = max(self._paused_until, now + retry_after)
        if self.fixed:
            # The user's rate is above the quota: hold everyone back for a moment, then go on at
            # the rate asked for (the quota recovers within a second or so).
            self._paused_until = max(self._paused_until, now + 1 / self.rate)
            return
        if now - self._last_cut >= self.window:
            self._cut(now)
        else:
            # Sent before the cut, so no news about the new rate; but the bucket is dry again,
            # so the next step up waits a full interval from now.
            self._last_change = now
            self._sent_since_change = 0
        self._dry.append((now, self.sent_count, self.throttled_count))

    def _cut(self, now: float) -> None:
        previous = self.estimate
        if not self._found_limit:
            self._found_limit = True
            estimate = self._first_estimate()
            self._history.clear()
            self._probing = True
        else:
            estimate = max(self._admitted_rate(now), self._held)
            # Two estimates in a row that agree: the quota is found; else keep probing.
            self._probing = previous is None or not (previous / 1.1 <= estimate <= previous * 1.1)
        self.estimate = estimate
        self._set_rate(min(self.rate, estimate * self.margin), now)
        self._last_cut = now
        self._creep_steps = 0
        self._held = 0.0

    def _admitted_rate(self, now: float) -> float:
        """The quota as admitted since an earlier 429: the bucket was dry then and is now.

        The latest earlier 429 with enough requests since it to count on; with none, the
        oldest. Too few requests to measure at all: a plain cut.
        """
        chosen: tuple[float, int, int] | None = None
        for moment in reversed(self._dry):
            chosen = moment
            if self._admitted_since(moment) >= self.min_sample and now - moment[0] >= self.window:
                break
        if chosen is None or self._admitted_since(chosen) < self.min_sample:
            return self.rate * 0.75
        return self._admitted_since(chosen) / (now - chosen[0])

    def _admitted_since(self, moment: tuple[float, int, int]) -> int:
        _, sent, refused = moment
        return (self.sent_count - sent) - (self.throttled_count - refused)

    def _first_estimate(self) -> float:
        """The quota that best explains the first 429 with a bucket full at the first request.

        Somewhere between the largest quota whose bucket would have run dry under the requests
        sent (the last one was refused) and the smallest under which all but the last would
        have been admitted.
        """
        sends = list(self._history)
        if len(sends) < 2:
            return self.rate / 2
        high = _largest_dry_quota(sends, self.rate, self.burst_seconds)
        low = _largest_dry_quota(sends[:-1], self.rate, self.burst_seconds)
        if high is None:
            return self.rate / 2  # too few requests for the bucket model to explain the 429
        # Only the first request was admitted: the quota could be anything up to `high`.
        return (high + (low if low is not None else 0.0)) / 2


def _largest_dry_quota(sends: list[float], ceiling: float, burst_seconds: float) -> float | None:
    """The largest quota under `ceiling` whose full bucket refuses one of `sends`, if any."""
    low, high = Pacer.MIN_RATE, max(ceiling, Pacer.MIN_RATE)
    if _runs_dry(sends, high, burst_seconds):
        return high
    if not _runs_dry(sends, low, burst_seconds):
        return None
    for _ in range(40):
        middle = (low + high) / 2
        if _runs_dry(sends, middle, burst_seconds):
            low = middle
        else:
            high = middle
    return low


def _runs_dry(sends: list[float], quota: float, burst_seconds: float) -> bool:
    """Would a token bucket of `quota`/s, full at the first send, refuse one of these sends?"""
    capacity = max(1.0, quota * burst_seconds)
    tokens = capacity
    last = sends[0]
    for sent in sends:
        tokens = min(capacity, tokens + (sent - last) * quota)
        last = sent
        if tokens < 1.0:
            return True
        tokens -= 1.0
    return False
