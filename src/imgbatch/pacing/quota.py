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
  request had K others admitted in the P seconds before it, and every refused one had: for each
  K, P lies between the longest span refused and the shortest span admitted, whatever its
  length. The fastest K that fits is enforced at the shortest admitted span; a K no admitted
  span bounds yet is guessed (the period believed before, else the longest round period up to
  twice the span refused): a wrong guess is refused at once, costing a 429 and no time. A 429
  of a request sent before the last 429 came back is of the same overshoot, and changes
  nothing (TCP slows down once per window of losses). The first 429 of the doubling rate is
  fitted as a token bucket full at the start with a second of its rate saved up, or as the
  whole count admitted in a window: the faster windows that fit there are the doubling's own
  pattern, and each tried would be a 429. The whole count wins when it is less than one raise
  (K + 1 per its period) slower than the bucket's rate: a bucket admits that raise (no 429),
  where a window refuses the bucket's rate at once. The bucket's rate refused in turn after it
  admitted a request or more (a bucket refills; a window refuses at once) is read again with two
  seconds of it saved up.
* **One request tells two beliefs apart.** The gentle opening's third refused with two in
  flight is a cap of 2, or 2 per some period: the next request goes alone, with fewer in flight,
  when a window of twice the opening (3 s) would have let it. Admitted, the window is that short
  (the span it was admitted in, which is all one request proves); refused, it is a few a minute.
  (A cap of 2 with generations shorter than the window is not told from that window then: both
  explain all that is seen, and telling them apart costs a 429 either way.)
* **Beliefs are tested, not kept.** While requests wait on the window, a period not narrowed
  down yet is tried shorter (a round period halfway, one request: kept if admitted, dropped if
  refused; a spacing refused so is fitted again, as a window of more than one may explain what
  no spacing does), and a window that held a while without a 429 is tried one higher, again at once
  while raises are admitted. A probe's request not refused within a round trip was admitted
  (its answer is a whole generation away). All of it within the run's budget of 429s
  (`REFUSAL_BUDGET` of the requests the run means to send, `expected`), raises spread over the
  time the run has left (a quota may be raised at any time). A window that held and is refused
  means the quota changed: the count the service just admitted is the count now, and older
  evidence is set aside. A remembered (learned) window is where a run starts and is tested the
  same way; its first count goes no faster than the gentle opening.
* **A budget counted across runs.** A short run's own budget is less than one 429 (16 requests:
  0.8), so it could never test a remembered window upward. The remembered window carries the
  credit its account's runs earned (`credit`: 5% of the requests each sent, less its 429s,
  between 0 and `CREDIT_CAP`), which a run adds to its own budget; `credit_left` is what it
  hands on to the next run. So a series of short runs affords, every few runs, the one probe
  none of them could alone. A probe is started on credit only when its worst case fits (two
  429s for a spacing narrowed: a window admits it until full, and the fit after may be wrong);
  the credit bounds the probes, not the 429s of a quota changed under the run.
* **Cap or rate.** A 429 with n in flight fits a cap of n when no request was ever admitted with
  n or more in flight. If a window fits too, the cap is believed first, tentatively, and raised
  by one per answer of a request sent with it half full (doubling per round trip, as TCP's slow
  start): a cap is confirmed when refused again at the same count, sent no faster than the first
  time (a token bucket refuses at any count, faster); a rate limit shows itself by a 429 with
  fewer in flight than has been admitted before, and the window is fitted then. A cap of more
  than the opening's count, while the rate slowed explains the 429 too, is only noted: waiting
  for fewer in flight would cost a whole generation. A request let go only by a window's period
  narrowed at a fixed count (the window before would have held it back) is the narrowing's
  evidence: a window sends its whole count at once, so narrowing it puts more in flight than
  ever admitted, and its 429 is fitted as a window, not taken for a cap.
* **Nothing fits** (a token bucket's saved-up burst makes early admissions look like a larger
  window): the admissions before the first 429 are set aside; failing that, even spacing at what
  was admitted between the first and last 429.

A stated quota is a hint: enforced until a 429 it does not explain (with no cap to explain
it either), and only while it is plausible (`plausible`) and no request was admitted faster than
it allows (since it was stated: a new statement is a changed quota). A given quota is never
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
# The periods quotas are written in, for a guess and for narrowing one down: a period between two
# of them is found too (by halving), only more slowly.
ROUND_PERIODS: tuple[float, ...] = (0.1, 0.2, 0.25, 0.5, 1, 2, 3, 5, 6, 10, 12, 15, 20, 30, 60)
ROUND_PERIODS += (90, 120, 180, 240, 300, 600, 900, 1200, 1800, 3600)
# The most common quota of a few requests: per minute (RPM). The first guess for a window whose
# period no admitted request has bounded yet.
_MINUTE = 60.0
# A stated or remembered quota outside these is not believed (a flow-control header of 1 request
# per 1e9 s stalled a run forever): no real quota counts over more than an hour, or allows less
# than one request every two minutes (the slowest recorded: two a minute).
PLAUSIBLE_PERIOD = (0.001, 3600.0)
PLAUSIBLE_COUNT = 100_000
PLAUSIBLE_RATE = 1 / 120
# Evidence older than this says nothing about the next request (longer than the longest period).
HISTORY_SECONDS = 2 * PLAUSIBLE_PERIOD[1]
_HISTORY_EVENTS = 8192
# A window is fitted over at most this many of the latest sends, and at most this many a window.
_FIT_EVENTS = 2048
_FIT_COUNT = 256
# Share of requests a run may have refused (its probes' included).
REFUSAL_BUDGET = 0.05
# The most 429s' worth of credit a remembered quota carries over to later runs (see
# docs/apply.md): enough for the worst case of one test upward (a raise: one 429; a spacing
# narrowed, then fitted again: two) with one to spare, and no more, so that a quota remembered
# right and re-tested after a long quiet spell costs at most that many 429s beyond the run's own.
CREDIT_CAP = 3.0
# 429s a run may spend beyond its budget to narrow a period down (finding one costs a few).
_SPARE = 4
# No window is shorter (a span shorter than this is requests sent at once).
_SHORTEST_PERIOD = 0.01
# A remembered window nothing has refused yet is narrowed after holding this long at most.
_HOLD_UNTESTED = 3.0
# Probing a narrowed period stops when the gap left is this small a share of it.
_CLOSE_ENOUGH = 0.08

Source = Literal["given", "stated", "learned", "probed", "probing"]


@dataclass
class _Send:
    at: float
    in_flight: int  # others in flight when it was sent
    refused: bool = False
    answered: bool = False


@dataclass(frozen=True)
class EstimatorSettings:
    """How the estimator probes; the defaults are what bench/README.md's benchmarks ran."""

    opening: Quota = Quota(1, 0.55)  # three requests 0.55 s apart before the rate is raised
    opening_sends: int = 3
    probe_interval: float = 0.25  # the rate doubles this often while nothing is refused
    max_rate: float = 1000.0
    cap_probe_after: float = 900.0  # a confirmed cap is tried one higher after this long

    @property
    def opening_span(self) -> float:
        """From the first request of the gentle opening to its last."""
        return self.opening.period / self.opening.count * (self.opening_sends - 1)


def plausible(quota: Quota) -> bool:
    """Could a service mean it? See `PLAUSIBLE_PERIOD`."""
    low, high = PLAUSIBLE_PERIOD
    return (
        low <= quota.period <= high
        and quota.count <= PLAUSIBLE_COUNT
        and quota.rate >= PLAUSIBLE_RATE
    )


@dataclass
class _Probe:
    """A faster window tried with one request: kept if that one is admitted."""

    before: Quota  # what to go back to when it is refused
    target: Quota  # the faster window
    raising: bool  # the count raised (additive increase), not the period narrowed
    send_id: int | None = None  # the request that tests it, once sent
    refit: bool = False  # refused, the window is fitted again (not the one before kept)


class QuotaEstimator:
    """The account's limits as far as the requests so far show them; see the module docstring.

    Feed it with `sent`, `answered`, `refused` and `stated`; read `window`, `cap`, `source` and
    `probing_up`.
    """

    def __init__(
        self,
        *,
        given: Quota | None = None,
        learned: Quota | None = None,
        learned_cap: int | None = None,
        settings: EstimatorSettings | None = None,
        expected: int | None = None,
        credit: float = 0.0,
    ) -> None:
        self.settings = settings or EstimatorSettings()
        self.given = given
        self.expected = expected  # requests the run means to send, when it knows
        self.source: Source
        self.window: Quota
        if given is not None:
            self.window, self.source = given, "given"
        elif learned is not None and plausible(learned):
            self.window, self.source = learned, "learned"
        else:
            self.window, self.source = self.settings.opening, "probing"
        self._ramping = self.source == "probing"
        # 429s earlier runs of the account saved up (see the module docstring): spent only with
        # the remembered window they came with.
        learning = self.source == "learned"
        self.credit = min(max(credit, 0.0), CREDIT_CAP) if learning else 0.0
        self.cap: int | None = learned_cap if learned_cap and learned_cap <= MAX_CAP else None
        self.cap_confirmed = self.cap is not None
        self._cap_measured: int | None = self.cap
        self.stated_quota: Quota | None = None
        self.refusals = 0
        self._hint_wrong = False
        self._disproved: Quota | None = None  # the hint shown wrong
        self._sends: deque[_Send] = deque(maxlen=_HISTORY_EVENTS)
        self._sent_total = 0
        self._max_admitted_in_flight = -1
        self._ramp_since: float | None = None
        self._cap_since = 0.0
        # Evidence sent before this is set aside: the quota changed since.
        self._epoch = -math.inf
        self._probe: _Probe | None = None
        self._step = 1  # doubles while raises are admitted (1: the last was refused, or none)
        self._held_since: float | None = None  # the window in force, with no 429, since then
        self._proven = False  # a request sent since then was admitted
        self._settling = False  # a changed quota's count is being found
        self._narrowed = False  # a narrower period was tried and admitted
        # The window before a period was narrowed at a count of more than one (see
        # `_narrowing_refused`), until a 429 is fitted.
        self._wider: Quota | None = None
        self._opening_refused = False  # the first 429 came within the gentle opening
        self._hint_from = 0  # the first request sent under the stated or learned window
        self._cap_gap = math.inf  # the gap before the request of the last 429 a cap may explain
        self._refusal_time = 0.0  # the longest a 429 took to come back
        self._answered_429_at = -math.inf  # when the last 429 acted on came back
        self._first_read: Quota | None = None  # the window read from the first 429

    @property
    def found(self) -> bool:
        """True once the window is more than a probe: given, stated, learned or fitted."""
        return self.source != "probing"

    @property
    def pace(self) -> Quota:
        """The window the gate keeps: `window`, except that a remembered window's first count
        goes no faster than the gentle opening until one is admitted after it (remembered too
        fast, its whole count sent at once would be its whole count less the real one in 429s;
        spaced, the first 429 stops the rest)."""
        window, opening = self.window, self.settings.opening
        if self.source == "learned" and not self.refusals and self._sent_total < window.count:
            return Quota(1, min(opening.period / opening.count, window.period / window.count))
        return window

    @property
    def credit_left(self) -> float:
        """The credit handed on to the next run: what this one was given, plus its own budget
        of the requests it sent, less the 429s it had (between 0 and `CREDIT_CAP`)."""
        earned = REFUSAL_BUDGET * self._sent_total - self.refusals
        return min(max(self.credit + earned, 0.0), CREDIT_CAP)

    @property
    def probing_up(self) -> bool:
        """A faster window is being tried (or the rate raised until a 429 says where it ends)."""
        return self._probe is not None or self._ramping

    # ----- events ------------------------------------------------------------------------------

    def sent(self, at: float, in_flight: int, *, waited: bool = True) -> int:
        """A request left at `at` with `in_flight` others under way; gives its id.

        `waited`: it had to wait for its turn (the rate, not the work, is holding the run back).
        """
        self._forget(at)
        if self._held_since is None:
            self._held_since = at
        self._sends.append(_Send(at, in_flight))
        self._sent_total += 1
        if self._probe is not None and self._probe.send_id is None:
            # The one request that tests the faster window: the others wait for its answer.
            self._probe.send_id = self._sent_total - 1
            self.window = self._probe.before
        if self._ramping and self._sent_total >= self.settings.opening_sends:
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
        self._admit_pending(at)  # (before the cap grows: how many were admitted together)
        self._max_admitted_in_flight = max(self._max_admitted_in_flight, send.in_flight)
        if self.cap_confirmed and self._cap_measured is not None:
            # A cap tried one higher and admitted: it has grown.
            self._cap_measured = max(self._cap_measured, send.in_flight + 1)
        if self.cap is not None and not self.cap_confirmed and 2 * (send.in_flight + 1) > self.cap:
            # Slow start: doubling per round trip while nothing is refused, counting only
            # requests sent with the cap half full or more (others say nothing of it).
            self.cap += 1
        if self._held_since is not None and send.at >= self._held_since:
            self._proven, self._settling = True, False
        probe = self._probe
        if probe is not None and probe.send_id == send_id:
            self._accept_probe(probe, send, at)
        elif (
            self.source in ("stated", "learned")
            and send_id >= self._hint_from
            and self._too_slow(send)
        ):
            # Admitted where the hint would have refused it: the run's own evidence outranks it.
            self._hint_wrong, self._disproved = True, self.window
            self._restart_ramp(at)

    def _accept_probe(self, probe: _Probe, send: _Send, at: float) -> None:
        """The request that tests `probe` was admitted."""
        self._probe = None
        # The span it was admitted in: from the request `count` before it (of those admitted).
        count = probe.before.count
        earlier = [s.at for s in self._sends if s is not send and not s.refused and s.at <= send.at]
        span = send.at - earlier[-count] if len(earlier) >= count else math.inf
        if span >= probe.before.period / 1.05:
            # (A little less than the period: sent where the service's window may already
            # have let it, it proves nothing.)
            return
        # Admitted where the window before would have held it back: the faster window is
        # the window now, but a period no shorter than the span it proved. (A raise admitted
        # makes the next one sooner, and a spacing's next step bigger.)
        self._step = min(self._step * 2, max(count, 4)) if probe.raising else 1
        self._narrowed |= not (probe.raising or probe.refit)
        if not (probe.raising or probe.refit) and count > 1:
            self._wider = probe.before
        target = probe.target
        # (Sent when the target let it, the span is the target's period as the gate keeps it.)
        proved = probe.raising or span <= _slack(target.period)
        self.window = target if proved else Quota(count, span)
        if self.source == "learned":
            self.source = "probed"  # the run learned better than it remembered
        self._held_since = at

    def _probe_unrefused(self, at: float) -> bool:
        """The probe's request was not refused by the time a 429 would have come back: it was
        admitted (its answer, a whole generation away, need not be waited for). True when
        the window changed."""
        probe = self._probe
        send = None if probe is None or probe.send_id is None else self._find(probe.send_id)
        if probe is None or send is None or send.refused or at - send.at <= self._refusal_wait():
            return False
        before = self.window
        self._accept_probe(probe, send, at)
        return self.window != before

    def refused(self, send_id: int, at: float) -> None:
        """The request `send_id` was refused with a 429."""
        self.refusals += 1
        if self.refusals == 1:
            self._opening_refused = self._sent_total <= self.settings.opening_sends
        self._ramp_since = None
        proven, since = self._proven, self._held_since
        self._held_since, self._proven = at, False
        send = self._find(send_id)
        if send is None:
            return
        send.refused = True
        self._refusal_time = max(self._refusal_time, at - send.at)
        if self.given is not None:
            # The window is right (or shared with other clients of the account): only a cap
            # can be new.
            if self._cap_fits(send.in_flight):
                self._set_cap(send.in_flight, at, confirm=True)
            return
        probe = self._probe
        if send.at < self._answered_429_at and (probe is None or probe.send_id != send_id):
            # Sent before the last 429 came back: refused by the same overshoot, which that
            # 429 has already slowed down for (as TCP halves once per window of losses).
            return
        self._answered_429_at = at
        self._probe = None
        if probe is not None and probe.send_id == send_id:
            # The faster window was one too far: back to the one that held.
            self._step = 1
            if not probe.refit:
                self.window = probe.before
                return
            self.window = probe.target  # (what the cap or the fit below leaves of it)
        if self.source == "stated" and self._explains(send):
            return  # another client of the account used the window up: the quota is right
        self._admit_pending(at)
        hinted = self.source in ("stated", "learned")
        # (A hint refused is a window too fast, not a cap: it let its whole count go at once.)
        if not hinted and self._cap_refusal(send, at):
            if self.refusals == 1 and not self.cap_confirmed:
                self._probe_window_or_cap()
            return
        if (proven or self._settling or self.source == "learned") and self._changed(send, since):
            return
        self._settling = False
        if hinted:
            self._hint_wrong, self._disproved = True, self.window
        self._ramping = False
        self.window, self.source = self._fit() or self._fallback(), "probed"
        self._wider = None  # (the narrowing's 429 is fitted)
        if self.refusals == 1:
            self._first_read = self.window

    def _changed(self, send: _Send, since: float | None) -> bool:
        """A window that held (since `since`) was refused by `send`: the quota changed (or
        another client shares it). What the service just admitted in one period is the count
        now; what came before is set aside. True when that settled the 429."""
        if self.source not in ("probed", "learned"):
            return False
        window = self.window
        admitted = self._admitted_before(send, window, slack=1.0)
        if admitted >= window.count and since is not None and send.at < since:
            return True  # sent before the window was narrowed to what refuses it
        if not 1 <= admitted < window.count:
            return False
        # (Halved at the first 429: the count just admitted includes what came before.)
        count = admitted if self._settling else min(admitted, max(1, window.count // 2))
        self.window, self.source = Quota(count, window.period), "probed"
        self._epoch = max(self._epoch, send.at - window.period)
        self._settling = True  # until a request under the new count is admitted
        return True

    def _probe_window_or_cap(self) -> None:
        """The first 429 came with as many in flight as were ever admitted plus one: a cap of
        that many, or a window of the count admitted per a period longer than the span refused.
        One request tells them apart: sent when a short window (twice the span, a round period)
        would have let it, with fewer in flight than were refused. Refused, the window is fitted
        again (the gentle opening refused twice: a few a minute)."""
        fitted = self._fit_once()
        admitted = self._times()[1].count(False)
        if fitted is None or fitted.count != admitted or not _shorter(fitted.period, _MINUTE):
            # (Not when a faster window or spacing fits: it is tried first, by `_cap_refusal`.)
            return
        # (The others wait for the probe's answer, which a 429 gives at once.)
        held = Quota(fitted.count, _MINUTE)
        self._probe = _Probe(held, fitted, raising=False, refit=True)
        self.window, self.source = fitted, "probed"
        self._ramping = False

    def stated(self, quota: Quota, *, with_429: bool = False) -> None:
        """The service stated its quota (a hint: enforced until a 429 it does not explain, and
        only while it is plausible and no request was admitted faster than it allows; stated
        with a 429, it explains the 429, and earlier admissions are of a quota since changed)."""
        # (A statement with a 429, or one other than the service stated before, is a changed
        # quota: what was admitted before it says nothing against it. The one shown wrong
        # stays wrong.)
        changed = with_429 or (self.stated_quota is not None and quota != self.stated_quota)
        self.stated_quota = quota
        renewed = changed and quota != self._disproved
        if self.given is not None or (self._hint_wrong and not renewed) or self.window == quota:
            return
        if not plausible(quota) or (not changed and self._contradicted(quota)):
            self._hint_wrong, self._disproved = True, quota
            return
        self.window, self.source = quota, "stated"
        self._ramping = False
        self._probe = None
        self._hint_wrong = False
        self._hint_from = self._sent_total  # (requests sent before it went by another quota)

    @property
    def may_probe(self) -> bool:
        """Could a faster window be tried while requests wait (see `waiting`)?"""
        # (Not a given quota; not the service's own word, which its header changes when the
        # quota does; not while the rate is being raised until a 429 anyway.)
        return self.given is None and not self._ramping and self.source != "stated"

    def waiting(self, now: float) -> bool:
        """Requests are waiting for the window: True when a faster one is to be tried now."""
        return self.may_probe and self._maybe_probe(now)

    # ----- probing up --------------------------------------------------------------------------

    def _maybe_probe(self, at: float) -> bool:
        """Requests wait and no 429 came for a while: try a faster window (see `waiting`)."""
        window = self.window
        if self._probe is not None:
            return self._probe_unrefused(at)
        # A period not narrowed down yet is narrowed as soon as it was admitted once (the
        # requests wait on it); a count is raised after two windows without a 429; both within
        # the run's budget of 429s.
        if not self._proven:
            return False  # a guess not admitted yet: it may be refused itself
        lower = self._period_refused(window.count)
        narrower = _narrower(lower, window.period)
        faster = None if narrower is None else Quota(window.count, narrower)
        raising = faster is None
        # (A spacing narrowed and refused is fitted again: a window of more than one may
        # explain what the spacing cannot.)
        refit = not raising and window.count == 1
        if not self._may_refuse(narrowing=not raising, refit=refit):
            return False
        held = at - (at if self._held_since is None else self._held_since)
        untested = lower == 0 and not self._narrowed
        hold = min(2 * window.period, _HOLD_UNTESTED)
        if raising and self._step > 1:
            hold = 0.0  # the last raise was admitted: the quota grew, and may have grown more
        elif raising:
            hold = max(hold, self._raise_every())
        if (raising or untested) and held < hold:
            # (A remembered window nothing in this run has refused yet is tested too, but
            # after it held for a while.)
            return False
        if faster is None:
            if window.count == 1:
                faster = Quota(1, window.period / (1 + 0.05 * self._step))
            else:
                # (One more: the one request that tries it proves no more than that.)
                faster = Quota(window.count + 1, window.period)
        self._probe = _Probe(window, faster, raising, refit=refit)
        self.window = faster
        self._held_since = at
        return True

    def _raise_every(self) -> float:
        """How often a window that holds is tried one higher: the 429s the run's budget has
        left, spread evenly over the time its requests left take at this window (a quota may
        be raised at any time, late in the run as early)."""
        if self.expected is None:
            return 0.0
        left = self.expected - (self._sent_total - self.refusals)
        tries = REFUSAL_BUDGET * self.expected + self.credit - self.refusals
        return max(left, 0) / self.window.rate / max(tries + 1, 1)

    def _may_refuse(self, *, narrowing: bool, refit: bool = False) -> bool:
        """Would a probe keep the run within its budget: one more 429 within `REFUSAL_BUDGET`
        of the requests it expects to send (of those sent so far when it was not told, with a
        few spare to narrow a period down before many were sent), or its worst case within that
        and the credit earlier runs saved up (`refit`: a spacing narrowed, which a window admits
        until it is full, then refused, and the fit after it refused too: two 429s)?"""
        allowed = REFUSAL_BUDGET * max(self._sent_total, self.expected or 0)
        if self.expected is None and narrowing and not self._narrowed:
            allowed += _SPARE
        if self.refusals + 1 <= allowed:
            return True
        # (The credit is a whole series of runs' saving: a probe is never let overdraw it.)
        return self.refusals + (2 if refit else 1) <= allowed + self.credit

    def _period_refused(self, count: int) -> float:
        """The longest span refused with `count` admitted in it (a window of `count` is longer)."""
        admitted: list[float] = []
        longest = 0.0
        for send in self._evidence():
            if send.refused:
                if len(admitted) >= count:
                    longest = max(longest, send.at - admitted[-count])
            else:
                admitted.append(send.at)
        return longest

    def _too_slow(self, send: _Send) -> bool:
        """Was `send` admitted with a full window of admitted requests before it?"""
        return self._admitted_before(send, self.window) >= self.window.count

    def _contradicted(self, quota: Quota) -> bool:
        """Was any request admitted that `quota` would have refused?"""
        return any(
            self._admitted_before(send, quota) >= quota.count
            for send in self._sends
            if send.answered and not send.refused
        )

    def _admitted_before(self, send: _Send, window: Quota, slack: float = 1.05) -> int:
        # (A little shorter than stated: the network delays each request differently.)
        earliest = send.at - window.period / slack
        # (Sent before it and not refused: a 429 comes back at once, so by the time `send` is
        # answered, those still in flight were admitted.)
        return sum(
            1
            for other in self._sends
            if other is not send and not other.refused and earliest < other.at <= send.at
        )

    def _restart_ramp(self, at: float) -> None:
        """Back to raising the rate until a 429, from the fastest spacing admitted lately."""
        admitted = [s.at for s in self._sends if s.answered and s.at > at - 60.0]
        gaps = [b - a for a, b in zip(admitted, admitted[1:], strict=False) if b > a]
        spacing = min(gaps, default=self.settings.opening.period)
        self.window, self.source = Quota(1, max(spacing, 1e-3)), "probing"
        self._ramping = True
        self._probe = None

    # ----- a 429 -------------------------------------------------------------------------------

    def _cap_refusal(self, send: _Send, at: float) -> bool:
        """Is the 429 a cap on work in progress (kept, or tried)? True when it was taken so."""
        if self.cap_confirmed and self.cap is not None and send.in_flight >= self.cap:
            return True  # sent before the cap was confirmed, with more in flight than it allows
        if not self._cap_fits(send.in_flight) or self._narrowing_refused(send):
            return False
        times, refused = self._times()
        spacing = _spacing_bounds(times, refused)
        # Refused after a shorter gap than any admitted: the rate was raised too far.
        raised = spacing is not None and _shorter(spacing[0], spacing[1])
        previous, gap = self._cap_gap, self._gap_before(send)
        self._cap_gap = gap
        no_faster = gap >= previous / 1.05
        if not raised or (send.in_flight == self._cap_measured and no_faster):
            # Sent at a rate admitted before (only the work in progress had grown), or refused
            # at the same count as the last 429: a cap, confirmed when sent no faster than then.
            # (Faster, it may be the rate: a token bucket refuses at any count.)
            self._set_cap(send.in_flight, at, confirm=no_faster)
            fitted = self._fit_once() if self._ramping and not self.cap_confirmed else None
            if fitted is not None:
                # A cap not confirmed may be the rate as well: the ramp stops at what fits.
                self.window, self.source, self._ramping = fitted, "probed", False
                if send.in_flight > self.settings.opening_sends:
                    # Waiting for fewer in flight would cost a whole generation; the count is
                    # noted, not enforced (the rate slowed explains the 429 too): if it was a
                    # cap, its next 429 comes at the same count and confirms it.
                    self.cap = None
            return True
        if spacing is not None and _SHORTEST_PERIOD <= spacing[1] < math.inf:
            # Too many in progress or too fast: back to the fastest spacing admitted. The count
            # is noted, not enforced: if it was a cap, its next 429 comes at a rate admitted
            # before and at the same count, and confirms it.
            self._cap_measured = send.in_flight
            self.window, self.source = Quota(1, spacing[1]), "probed"
            self._ramping = False
            return True
        self._set_cap(send.in_flight, at, confirm=False)
        return False

    def _narrowing_refused(self, send: _Send) -> bool:
        """Was `send` let go only by a period narrowed at a fixed count (the window before would
        have held it back)? Then more were in flight than ever admitted because the rate was
        raised: a window's whole count goes at once, so narrowing its period sends more
        together. The 429 is the narrowing's, fitted as a window, not taken for a cap (3 per
        3 s remembered on an account of 6 per 3 s: 3 per 0.5 s admitted in the larger window,
        the next refused with 5 others in flight, read as a cap of 5, then halved to 1.5/s)."""
        wider = self._wider
        return wider is not None and self._admitted_before(send, wider) >= wider.count

    def _gap_before(self, send: _Send) -> float:
        """Seconds since the latest request admitted before `send` (inf if none)."""
        before = (s.at for s in reversed(self._sends) if s.at < send.at and not s.refused)
        return send.at - next(before, -math.inf)

    def _fit(self) -> Quota | None:
        """The fastest window that explains every 429 the cap does not, fitted over the latest
        evidence that any window explains (older evidence is of a quota since changed)."""
        while True:
            fitted = self._fit_once()
            if fitted is not None:
                return fitted
            evidence = self._evidence()
            refusals = [send for send in evidence if send.refused]
            if len(evidence) < 4 or len(refusals) < 2:
                return None
            # Set the older half aside, always keeping the latest 429.
            epoch = min(evidence[len(evidence) // 2].at, refusals[-1].at)
            if epoch <= self._epoch:
                return None
            self._epoch = epoch

    def _fit_once(self) -> Quota | None:
        cap = self.cap if self.cap_confirmed else None
        sends = [s for s in self._evidence() if not (cap and s.refused and s.in_flight >= cap)]
        times = [s.at for s in sends]
        refused = [s.refused for s in sends]
        if not any(refused):
            return None
        previous = self.window.period if self.source != "probing" else None
        opening = self.settings.opening_span if self._opening_refused else None
        candidates = _windows(times, refused, previous, opening)
        candidates = self._read_overshoot(times, refused, candidates)
        spacing = _spacing_bounds(times, refused)
        if spacing is not None and _shorter(*spacing):
            longest_refused, shortest_admitted = spacing
            if math.isinf(shortest_admitted):
                candidates.append(Quota(1, longest_refused * 2))
            else:
                # Halfway in log scale: a wrong guess is refused and halves the range.
                period = math.sqrt(max(longest_refused, 1e-3) * shortest_admitted)
                candidates.append(Quota(1, period))
        measured = _dry_to_dry_rate(times, refused)
        if measured is not None and self.cap is None:
            # (With a cap, what was admitted may have been held back by it, not by the rate.)
            candidates.append(Quota.per_second(measured * _MARGIN))
        return max(candidates, key=lambda quota: quota.rate, default=None)

    def _read_overshoot(
        self, times: list[float], refused: list[bool], candidates: list[Quota]
    ) -> list[Quota]:
        """The windows to choose from at the doubling's first 429, and at a second one that
        refused the bucket's rate read from the first; `candidates` otherwise."""
        first = refused.index(True)
        if first <= self.settings.opening_sends:
            return candidates  # (the opening itself refused: a window of a few a minute is)
        if self.source == "probing" and self.refusals == 1:
            # The first 429, the rate doubling: a token bucket, full at the start with a second
            # of its rate saved up, explains it; its rate, evenly spaced, or the whole count
            # admitted in a window. (The faster windows that fit are the doubling's own pattern:
            # each tried would be a 429.)
            bucket = _bucket_rate(times[: first + 1])
            if bucket is None:
                return candidates
            whole = [quota for quota in candidates if quota.count == first]
            rate = bucket * _MARGIN
            if whole and whole[0].rate * (first + 1) / first >= rate:
                # The whole count is less than one raise (K + 1 per the same period) slower: a
                # bucket's rate would be reached by a raise it admits (no 429), while a
                # window's would refuse the bucket's rate at once (a 429).
                return whole
            return [Quota.per_second(rate), *whole]
        second = refused.index(True, first + 1) if True in refused[first + 1 :] else first
        refilled = False in refused[first + 1 : second]
        read = self.window == self._first_read and self.window.count == 1
        if self.refusals == 2 and read and refilled:
            # The bucket's rate read from the first 429 admitted a request or more, then was
            # refused: a bucket (refilling, where a window refuses at once) that had saved up
            # more than a second of its rate. Read again with two seconds saved (a slower
            # rate), not as the doubling's pattern, each window of which is a 429.
            bucket = _bucket_rate(times[: first + 1], burst_seconds=2.0)
            if bucket is not None:
                return [Quota.per_second(bucket * _MARGIN)]
        return candidates

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
        if self._max_admitted_in_flight > MAX_CAP:
            return  # (no cap is fitted past MAX_CAP: more admitted together changes nothing)
        wait = self._refusal_wait()
        # (The latest few hundred: older ones were answered long since.)
        for index in range(len(self._sends) - 1, max(len(self._sends) - 256, 0) - 1, -1):
            send = self._sends[index]
            if not send.refused and not send.answered and now - send.at > wait:
                self._max_admitted_in_flight = max(self._max_admitted_in_flight, send.in_flight)

    def _refusal_wait(self) -> float:
        """How long after a request its 429 would have come back (twice the slowest seen)."""
        return 2 * self._refusal_time + 0.1

    def _evidence(self) -> list[_Send]:
        """The latest sends since the quota last changed, oldest first."""
        sends = [s for s in self._sends if s.at >= self._epoch]
        return sends[-_FIT_EVENTS:]

    def _times(self) -> tuple[list[float], list[bool]]:
        sends = self._evidence()
        return [s.at for s in sends], [s.refused for s in sends]

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


def _windows(
    times: list[float], refused: list[bool], previous: float | None, opening_span: float | None
) -> list[Quota]:
    """Every count K that some period explains (no admitted send had K admitted in the P
    seconds before it, every refused one had), each at the period to enforce: the shortest
    admitted span when one bounds it, else a guess above the longest refused span (the period
    the run believed before when it fits, else the next round period twice as long, else a
    minute when the gentle opening (`opening_span` seconds, None when it was admitted whole) was
    refused and so was a short window tried after it), which a 429 rules out or an admission
    confirms."""
    admitted: list[float] = []
    refusals: list[tuple[float, int]] = []  # when, and how many were admitted before it
    for at, was_refused in zip(times, refused, strict=True):
        if was_refused:
            refusals.append((at, len(admitted)))
        else:
            admitted.append(at)
    most = min(min(count for _, count in refusals), _FIT_COUNT)
    found = []
    for count in range(1, most + 1):
        lower = max(at - admitted[before - count] for at, before in refusals)
        upper = min(
            (b - a for a, b in zip(admitted, admitted[count:], strict=False)), default=math.inf
        )
        if not _shorter(lower, upper) or upper < _SHORTEST_PERIOD:
            # (K + 1 admitted at once says K is too few, whatever the period.)
            continue
        if not math.isinf(upper):
            found.append(Quota(count, upper))
        elif previous is not None and _shorter(lower, previous):
            found.append(Quota(count, previous))
        elif opening_span is None or lower >= _MINUTE:
            found.append(Quota(count, _guess_above(lower)))
        elif lower <= opening_span * 1.05:
            # The gentle opening was refused: twice its span, where a window of a few seconds
            # has let the first request go again, is tried with one request.
            found.append(Quota(count, _round_above(2 * lower)))
        else:
            # The gentle opening was refused and so was the short window tried after it: a
            # few a minute.
            found.append(Quota(count, _MINUTE))
    return found


def _guess_above(lower: float) -> float:
    """A period to try after a span of `lower` seconds was refused: the longest round period
    up to twice as long (a 429 there grows the span that much again, so a few 429s find any
    period; one admitted is narrowed down), else the next round one half as long again."""
    within = [p for p in ROUND_PERIODS if 1.2 * lower < p <= 2 * lower]
    return float(within[-1]) if within else _round_above(1.5 * lower)


def _round_above(period: float) -> float:
    return next((p for p in ROUND_PERIODS if p >= period), period)


def _narrower(lower: float, period: float) -> float | None:
    """A period between the longest span refused and the window's, to try next; None when the
    window's is close enough (a round period with none between, or within a few percent)."""
    if not _shorter(lower * (1 + _CLOSE_ENOUGH), period):
        return None
    between = [p for p in ROUND_PERIODS if lower * 1.02 < p < period / 1.02]
    if between:
        return float(between[len(between) // 2])
    if period in ROUND_PERIODS or lower <= 0:
        return None
    return math.sqrt(lower * period)


def _slack(period: float) -> float:
    """A period as the service may have seen it: the network delays each request differently."""
    return period * 1.05 + 0.05


def _shorter(gap: float, other: float) -> bool:
    """`gap` < `other`, not by a rounding error of the clock."""
    return gap < other * (1 - 1e-6)


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
