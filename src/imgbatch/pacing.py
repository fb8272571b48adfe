"""When may the next request start: the rate limit, known or found, and the retry backoff.

Takes the user's `--rps` (or none) and what the service answers; gives `Pacer.wait_turn()`, which
returns when one more request may be sent, and `RetryPolicy.backoff()`, the pause before trying a
shot again. DashScope's quota is per account and per model, shared by every request of the run,
so a 429 slows the whole run, not just the shot that got it.

Requests are spaced evenly (an `aiolimiter.AsyncLimiter` holding one request per 1/rate seconds)
rather than sent in bursts: DashScope's burst protection answers 429 to a sudden ramp even under
the per-minute quota.

With no `--rps`, the rate is found: it doubles every `probe_interval` while nothing is throttled;
on throttling it is set to what the service actually let through in the last window (sent minus
throttled: 429s come back at once, so everything not refused by then was admitted), a little below
it, then creeps up by `creep` per second to follow a quota that grows. `Retry-After` pauses every
request until it has passed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter


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

    def __init__(
        self,
        rps: float | None,
        *,
        clock: Clock | None = None,
        initial_rate: float = 4.0,
        probe_interval: float = 0.25,
        window: float = 1.0,
        margin: float = 0.95,
        creep: float = 0.02,
        unlimited: bool = False,
    ) -> None:
        self.clock = clock or Clock()
        self.unlimited = unlimited
        self.fixed = rps is not None
        self.rate = rps if rps is not None else initial_rate
        self.probe_interval = probe_interval
        self.window = window
        self.margin = margin
        self.creep = creep
        self.throttled_count = 0
        self._found_limit = False
        self._paused_until = 0.0
        self._last_change = self.clock.now()
        self._sent: deque[float] = deque()
        self._refused: deque[float] = deque()
        self._limiter: AsyncLimiter | None = None

    @property
    def discovered(self) -> bool:
        """True once an unknown quota has shown where it lies."""
        return self._found_limit

    async def wait_turn(self) -> None:
        if self.unlimited:
            return
        while True:
            pause = self._paused_until - self.clock.now()
            if pause > 0:
                await self.clock.sleep(pause)
                continue
            limiter = self._current_limiter()
            await limiter.acquire()
            # A rate change or a Retry-After while we waited: queue again under the new terms.
            if limiter is self._limiter and self._paused_until <= self.clock.now():
                self._sent.append(self.clock.now())
                return

    def _current_limiter(self) -> AsyncLimiter:
        if self._limiter is None:
            # One request per 1/rate seconds: even spacing, no bursts.
            self._limiter = AsyncLimiter(1, 1 / self.rate)
        return self._limiter

    def _set_rate(self, rate: float) -> None:
        self.rate = max(0.1, rate)
        self._limiter = None
        self._last_change = self.clock.now()

    def on_success(self) -> None:
        if self.fixed:
            return
        now = self.clock.now()
        elapsed = now - self._last_change
        if not self._found_limit:
            if elapsed >= self.probe_interval:
                self._set_rate(self.rate * 2)
        elif elapsed >= 1.0:
            self._set_rate(self.rate * (1 + self.creep * elapsed))

    def on_throttled(self, retry_after: float | None = None) -> None:
        now = self.clock.now()
        self.throttled_count += 1
        self._refused.append(now)
        if retry_after:
            self._paused_until = max(self._paused_until, now + retry_after)
        if self.fixed:
            # The user's rate is above the quota: hold everyone back for a moment, then go on at
            # the rate asked for (the quota recovers within a second or so).
            self._paused_until = max(self._paused_until, now + 1 / self.rate)
            return
        # Requests sent before the last rate change were sent at the old rate: their refusals
        # say nothing new, so adjust at most once per window.
        if self._found_limit and now - self._last_change < self.window:
            return
        self._found_limit = True
        admitted = self._admitted_rate(now)
        self._set_rate(min(self.rate, admitted) * self.margin)

    def _admitted_rate(self, now: float) -> float:
        horizon = now - self.window
        for times in (self._sent, self._refused):
            while times and times[0] < horizon:
                times.popleft()
        span = max(self.window / 4, now - self._sent[0]) if self._sent else self.window
        admitted = (len(self._sent) - len(self._refused)) / span
        return max(admitted, self.rate / 4)
