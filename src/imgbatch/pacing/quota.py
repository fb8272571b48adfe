"""What the account allows: a quota's shape, how to write it, and how to find it from the answers.

Takes plain numbers: when each request was sent and how many others were in flight then, whether
it was refused (429) or answered, and now and then a quota the service states; gives the
`QuotaEstimator`'s current `window` (at most K requests in any P seconds) and `cap` (requests in
flight at most). No event loop and no clock: the gate in `pacing.py` feeds it and obeys it.

Two shapes of limit, each refused with a 429 that comes back at once (the gateway refuses before
any work is done):

* **A counted window**, K requests per P seconds, which may admit its K at once (DashScope's
  flow-control header states `count_limit` per `count_limit_period`). A token bucket of rate r
  with no burst is the window (1, 1/r). The gate keeps every P-second span to K sends, which
  also satisfies a token bucket of K/P holding K, and a fixed window of K per P.
* **A cap on work in progress**: the (n+1)th request in flight is refused. Found by additive
  increase and a decrease to what the 429 measured (AIMD), not by a gradient of latency: a
  refused request costs no time and the service does not queue, so latency does not rise near
  the cap and gives a gradient nothing to follow; the in-flight count at a 429 *is* the cap.

How a quota is found when nothing is known (no `--quota`/`--rps`, no stated or learned quota):

* **Gentle opening.** Three requests 0.55 s apart (a two-a-minute account refuses only the
  third), then the rate doubles every `probe_interval` while requests wait for their turn and
  nothing is refused.
* **A 429 is explained.** Every window (K, P) that fits what was seen is one where no admitted
  request had K others admitted in the P seconds before it, and every refused one had. For the
  periods quotas are written in (`PERIODS`: a second and a minute) K is then bounded on both
  sides and the largest K that fits is taken; a window of one request (even spacing) may have
  any period between the longest gap refused and the shortest admitted. The fastest window that
  fits is enforced, so a wrong one is refused again and ruled out.
* **Cap or rate.** A 429 with n in flight fits a cap of n when no request was ever admitted with
  n or more in flight. If a window fits too, the cap is believed first, tentatively, and raised
  by one per answer (doubling per round trip, as TCP's slow start): a cap is confirmed when the
  raised cap is refused at the same count; a rate limit shows itself by a 429 with fewer in
  flight than has been admitted before, and the window is fitted then.
* **Nothing fits** (a token bucket's saved-up burst makes early admissions look like a larger
  window): the admissions before the first 429 are set aside; failing that, even spacing at what
  was admitted between the first and last 429.

A stated quota is a hint: it is enforced until a 429 it does not explain (with no cap to explain
it either), then the estimator fits the window as if nothing were stated. A given quota is never
changed by a 429.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from imgbatch.units.quota import Quota

# Halving the rate when nothing else explains the 429s stops at one request a minute.
_SLOWEST_SPACING = 60.0
# A measured rate is kept to a little under itself.
_MARGIN = 0.95
# Requests admitted between two 429s before the rate they were admitted at counts as measured.
_MIN_SAMPLE = 8
# Caps on work in progress are small (Model Studio's example: 1 at once). A 429 with more in
# flight is taken for a rate: a token bucket's saved-up burst, spent, looks like a cap otherwise.
MAX_CAP = 32
# The periods quotas are written in: per second and per minute (RPS, RPM).
PERIODS = (1.0, 60.0)
# Evidence older than this says nothing about the next request (longer than the longest period).
HISTORY_SECONDS = 180.0
_HISTORY_EVENTS = 8192

Source = Literal["given", "stated", "learned", "probed", "probing"]


@dataclass
class _Send:
    at: float
    in_flight: int  # others in flight when it was sent
    refused: bool = False
    answered: bool = False
    answered_at: float | None = None


@dataclass(frozen=True)
class EstimatorSettings:
    """How the estimator probes; the defaults are what bench/README.md's benchmarks ran."""

    opening: Quota = Quota(1, 0.55)  # three requests 0.55 s apart before the rate is raised
    opening_sends: int = 3
    probe_interval: float = 0.25  # the rate doubles this often while nothing is refused
    max_rate: float = 1000.0
    cap_probe_after: float = 900.0  # a confirmed cap is tried one higher after this long


class QuotaEstimator:
    """The account's limits as far as the requests so far show them; see the module docstring.

    Feed it with `sent`, `answered`, `refused` and `stated`; read `window`, `cap` and `source`.
    """

    def __init__(
        self,
        *,
        given: Quota | None = None,
        learned: Quota | None = None,
        learned_cap: int | None = None,
        settings: EstimatorSettings | None = None,
    ) -> None:
        self.settings = settings or EstimatorSettings()
        self.given = given
        self.source: Source
        self.window: Quota
        if given is not None:
            self.window, self.source = given, "given"
        elif learned is not None:
            self.window, self.source = learned, "learned"
        else:
            self.window, self.source = self.settings.opening, "probing"
        self.cap: int | None = learned_cap
        self.cap_confirmed = learned_cap is not None
        self._cap_measured: int | None = learned_cap
        self.stated_quota: Quota | None = None
        self.refusals = 0
        self._hint_wrong = False
        self._sends: deque[_Send] = deque(maxlen=_HISTORY_EVENTS)
        self._sent_total = 0
        self._max_admitted_in_flight = -1
        self._ramp_since: float | None = None
        self._cap_since = 0.0

    @property
    def found(self) -> bool:
        """True once the window is more than a probe: given, stated, learned or fitted."""
        return self.source != "probing"

    # ----- events ------------------------------------------------------------------------------

    def sent(self, at: float, in_flight: int, *, waited: bool = True) -> int:
        """A request left at `at` with `in_flight` others under way; gives its id.

        `waited`: it had to wait for its turn (the rate, not the work, is holding the run back).
        """
        self._forget(at)
        self._sends.append(_Send(at, in_flight))
        self._sent_total += 1
        if (
            self.source == "probing"
            and self.refusals == 0
            and self._sent_total >= self.settings.opening_sends
        ):
            self._ramp(at, waited)
        if (
            self.cap is not None
            and self.cap_confirmed
            and at - self._cap_since >= self.settings.cap_probe_after
        ):
            # Additive increase: a cap that was right costs one 429 every so often.
            self.cap += 1
            self._cap_since = at
        return self._sent_total - 1

    def answered(self, send_id: int, at: float) -> None:
        """The request `send_id` was admitted (answered with anything but a 429)."""
        send = self._find(send_id)
        if send is None:
            return
        send.answered = True
        self._max_admitted_in_flight = max(self._max_admitted_in_flight, send.in_flight)
        if self.cap_confirmed and self._cap_measured is not None:
            # A cap tried one higher and admitted: it has grown.
            self._cap_measured = max(self._cap_measured, send.in_flight + 1)
        if self.cap is not None and not self.cap_confirmed:
            self.cap += 1  # slow start: doubles per round trip while nothing is refused

    def refused(self, send_id: int, at: float) -> None:
        """The request `send_id` was refused with a 429."""
        self.refusals += 1
        self._ramp_since = None
        send = self._find(send_id)
        if send is None:
            return
        send.refused = True
        send.answered_at = at
        hinted = self.source in ("stated", "learned")
        if self.given is not None or (hinted and self._explains(send)):
            # The window is right (or shared with other clients of the account): only a cap
            # can be new.
            if self.given is not None and self._cap_fits(send.in_flight):
                self._set_cap(send.in_flight, at, confirm=True)
            return
        self._admit_pending(at)
        spacing = _spacing_bounds(*self._evidence())
        # Refused after a shorter gap than any admitted: the rate was raised too far.
        raised = spacing is not None and _shorter(spacing[0], spacing[1])
        if self._cap_fits(send.in_flight):
            if not raised or send.in_flight == self._cap_measured:
                # Sent at a rate admitted before (only the work in progress had grown), or at a
                # new rate but with as many in flight as at the last 429: a cap.
                self._set_cap(send.in_flight, at, confirm=True)
                return
            if spacing is not None and not math.isinf(spacing[1]):
                # Too many in progress or too fast: back to the fastest spacing admitted. The
                # count is noted, not enforced: if it was a cap, its next 429 comes at a rate
                # admitted before and at the same count, and confirms it.
                self._cap_measured = send.in_flight
                self.window, self.source = Quota(1, spacing[1]), "probed"
                return
            self._set_cap(send.in_flight, at, confirm=False)
        if hinted:
            self._hint_wrong = True
        self.window, self.source = self._fit() or self._fallback(), "probed"

    def stated(self, quota: Quota) -> None:
        """The service stated its quota (a hint: enforced until a 429 it does not explain)."""
        self.stated_quota = quota
        if self.given is None and not self._hint_wrong and self.window != quota:
            self.window, self.source = quota, "stated"

    # ----- the window that explains the 429s ---------------------------------------------------

    def _fit(self) -> Quota | None:
        """The fastest window that explains every 429 the cap does not; None if none does."""
        cap = self.cap if self.cap_confirmed else None
        sends = [s for s in self._sends if not (cap and s.refused and s.in_flight >= cap)]
        times = [s.at for s in sends]
        refused = [s.refused for s in sends]
        if not any(refused):
            return None
        candidates: list[Quota] = []
        for period in PERIODS:
            low, high = _count_bounds(times, refused, period)
            if high >= 1 and low <= high:
                candidates.append(Quota(high, period))
        spacing = _spacing_bounds(times, refused)
        if spacing is not None:
            longest_refused, shortest_admitted = spacing
            if _shorter(longest_refused, shortest_admitted):
                if math.isinf(shortest_admitted):
                    period = longest_refused * 2
                else:
                    # Halfway in log scale: a wrong guess is refused and halves the range.
                    period = math.sqrt(max(longest_refused, 1e-3) * shortest_admitted)
                candidates.append(Quota(1, period))
        first = refused.index(True)
        if self.source == "probing":
            # The first 429: a token bucket, full at the start with a second of its rate saved
            # up, would explain it too; its rate, evenly spaced.
            bucket = _bucket_rate(times[: first + 1])
            if bucket is not None and first > self.settings.opening_sends:
                # (Not when the opening itself was refused: a window of a few a minute is.)
                candidates.append(Quota.per_second(bucket * _MARGIN))
        measured = _dry_to_dry_rate(times, refused)
        if measured is not None and self.cap is None:
            # (With a cap, what was admitted may have been held back by it, not by the rate.)
            candidates.append(Quota.per_second(measured * _MARGIN))
        return max(candidates, key=lambda quota: quota.rate, default=None)

    def _fallback(self) -> Quota:
        """Half the rate: nothing fits (another client of the account, or a shape not modelled)."""
        spacing = self.window.period / self.window.count
        return Quota(1, min(spacing * 2, max(spacing, _SLOWEST_SPACING)))

    def _explains(self, send: _Send) -> bool:
        """Would the current window have refused `send`, counting what was admitted before it?"""
        window = self.window
        admitted = sum(
            1
            for s in self._sends
            if s is not send and not s.refused and send.at - _slack(window.period) < s.at <= send.at
        )
        return admitted >= window.count

    # ----- the cap ----------------------------------------------------------------------------

    def _cap_fits(self, in_flight: int) -> bool:
        """A cap of `in_flight` explains a 429 unless as many were ever in flight and admitted."""
        return 1 <= in_flight <= MAX_CAP and in_flight > self._max_admitted_in_flight

    def _set_cap(self, measured: int, at: float, *, confirm: bool) -> None:
        # Tentative at first, growing with each answer (a token bucket's saved-up burst can
        # make a rate look like a cap); a second 429 at the same count confirms it, unless
        # the rate was too high as well.
        self.cap_confirmed = confirm and self._cap_measured == measured
        self.cap = self._cap_measured = measured
        self._cap_since = at

    def _admit_pending(self, now: float) -> None:
        """Requests still in flight long after a 429 would have come back were admitted."""
        refusal_time = max(
            (s.answered_at - s.at for s in self._sends if s.refused and s.answered_at),
            default=0.0,
        )
        for send in self._sends:
            if not send.refused and not send.answered and now - send.at > 2 * refusal_time + 0.1:
                self._max_admitted_in_flight = max(self._max_admitted_in_flight, send.in_flight)

    def _evidence(self) -> tuple[list[float], list[bool]]:
        return [s.at for s in self._sends], [s.refused for s in self._sends]

    # ----- housekeeping -----------------------------------------------------------------------

    def _ramp(self, at: float, waited: bool) -> None:
        if not waited:
            return  # the rate is not what holds the run back: raising it proves nothing
        if self._ramp_since is None:
            self._ramp_since = at
        elif at - self._ramp_since >= self.settings.probe_interval:
            rate = min(self.window.rate * 2, self.settings.max_rate)
            self.window = Quota.per_second(rate)
            self._ramp_since = at

    def _find(self, send_id: int) -> _Send | None:
        index = send_id - (self._sent_total - len(self._sends))
        return self._sends[index] if 0 <= index < len(self._sends) else None

    def _forget(self, now: float) -> None:
        # Never the requests still in flight: their answer is still to come.
        while (
            self._sends
            and self._sends[0].at < now - HISTORY_SECONDS
            and (self._sends[0].answered or self._sends[0].refused)
        ):
            self._sends.popleft()


def _slack(period: float) -> float:
    """A period as the service may have seen it: the network delays each request differently."""
    return period * 1.05 + 0.05


def _shorter(gap: float, other: float) -> bool:
    """`gap` < `other`, not by a rounding error of the clock."""
    return gap < other * (1 - 1e-6)


def _count_bounds(times: list[float], refused: list[bool], period: float) -> tuple[int, int]:
    """For windows of `period`: the least K that admits every admitted send and the most K
    that refuses every refused one (each counts the admitted sends before it in the period)."""
    low, high = 1, 1 << 30
    admitted_times: deque[float] = deque()
    for at, was_refused in zip(times, refused, strict=True):
        while admitted_times and admitted_times[0] <= at - period:
            admitted_times.popleft()
        if was_refused:
            high = min(high, len(admitted_times))
        else:
            low = max(low, len(admitted_times) + 1)
            admitted_times.append(at)
    return low, high


def _spacing_bounds(times: list[float], refused: list[bool]) -> tuple[float, float] | None:
    """For windows of one request: the longest gap after an admitted send that was refused, and
    the shortest gap between admitted sends; None if a refused send had none admitted before."""
    last: float | None = None
    longest_refused, shortest_admitted = 0.0, math.inf
    for at, was_refused in zip(times, refused, strict=True):
        if was_refused:
            if last is None:
                return None
            longest_refused = max(longest_refused, at - last)
        else:
            if last is not None:
                shortest_admitted = min(shortest_admitted, at - last)
            last = at
    return longest_refused, shortest_admitted


def _dry_to_dry_rate(times: list[float], refused: list[bool]) -> float | None:
    """What was admitted between the last 429 and the latest earlier one with enough admitted
    since it, over the time between: a token bucket was dry at both, so this is its rate."""
    refusals = [index for index, was in enumerate(refused) if was]
    last = refusals[-1]
    admitted = 0
    for index in range(last - 1, -1, -1):
        if not refused[index]:
            admitted += 1
        elif admitted >= _MIN_SAMPLE and times[last] - times[index] > 0:
            return admitted / (times[last] - times[index])
    return None


def _bucket_rate(sends: list[float], burst_seconds: float = 1.0) -> float | None:
    """The rate of a token bucket (holding `burst_seconds` of it, full at the first send) that
    best explains the last of `sends` being refused and the others admitted."""
    if len(sends) < 3:
        return None
    ceiling = 2 * len(sends) / max(sends[-1] - sends[0], 1e-3)
    high = _largest_dry_rate(sends, ceiling, burst_seconds)
    if high is None:
        return None
    low = _largest_dry_rate(sends[:-1], ceiling, burst_seconds)
    return (high + (low or 0.0)) / 2


def _largest_dry_rate(sends: list[float], ceiling: float, burst_seconds: float) -> float | None:
    """The largest rate under `ceiling` whose full bucket refuses one of `sends`, if any."""
    low, high = 1e-3, ceiling
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


def _runs_dry(sends: list[float], rate: float, burst_seconds: float) -> bool:
    """Would a token bucket of `rate`/s, full at the first send, refuse one of these sends?"""
    capacity = max(1.0, rate * burst_seconds)
    tokens, last = capacity, sends[0]
    for sent in sends:
        tokens = min(capacity, tokens + (sent - last) * rate)
        last = sent
        if tokens < 1.0:
            return True
        tokens -= 1.0
    return False
