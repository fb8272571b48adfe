"""The account's limits estimated from plain numbers: no event loop, no clock, no sleeping.

Takes `QuotaEstimator` fed with sends (time, others in flight), answers and 429s, as a gate
would feed it; gives evidence that each quota shape is recognised from what it admits and
refuses (a counted window, even spacing, a cap on work in progress, a token bucket's burst), that
a stated quota is used until a 429 shows it wrong, that a given one is never changed, and that
quotas are written and read the way the CLI and the manifest take them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imgbatch.errors import ManifestError
from imgbatch.manifest import load_manifest
from imgbatch.pacing.quota import QuotaEstimator
from imgbatch.units.quota import Quota, parse_quota


class Account:
    """Drives an estimator the way the gate does: sends when it is allowed, answers at once."""

    def __init__(self, estimator: QuotaEstimator) -> None:
        self.estimator = estimator
        self.in_flight: dict[int, float] = {}  # send id -> when its answer comes

    def send(self, at: float, *, refused: bool, latency: float = 16.5) -> int:
        for send_id, done in list(self.in_flight.items()):
            if done <= at:
                self.estimator.answered(send_id, done)
                del self.in_flight[send_id]
        send_id = self.estimator.sent(at, len(self.in_flight))
        if refused:
            self.estimator.refused(send_id, at + 0.004)
        else:
            self.in_flight[send_id] = at + latency
        return send_id


# ----- writing a quota ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("2/60s", 2, 60.0),
        ("2/min", 2, 60.0),
        ("25/s", 25, 1.0),
        ("10/1m", 10, 60.0),
        (" 3 / 0.5s ", 3, 0.5),
        ("100/hour", 100, 3600.0),
        ("2/60", 2, 60.0),
        ("5/2 minutes", 5, 120.0),
    ],
)
def test_a_quota_is_read_as_k_requests_per_period(text: str, count: int, period: float) -> None:
    assert parse_quota(text) == Quota(count, period)


@pytest.mark.parametrize("text", ["0/60s", "2/0s", "2/60x", "2/", "/s", "two a minute", "2-60s"])
def test_a_quota_not_written_k_over_p_is_refused_with_the_forms_that_work(text: str) -> None:
    with pytest.raises(ValueError, match=r"2/60s"):
        parse_quota(text)


def test_a_rate_a_second_is_a_window_of_one_evenly_spaced() -> None:
    assert Quota.per_second(4) == Quota(1, 0.25)
    assert Quota(2, 60).rate == pytest.approx(1 / 30)
    assert str(Quota(2, 60)) == "2/60s"


# ----- nothing known: the opening ----------------------------------------------------------------


def test_with_nothing_known_it_opens_with_one_request_then_spaced_ones_not_a_burst() -> None:
    estimator = QuotaEstimator()
    assert estimator.window == Quota(1, 0.55)  # one request, the next 0.55 s later
    assert estimator.cap is None
    assert not estimator.found


def test_the_rate_doubles_while_requests_wait_and_nothing_is_refused() -> None:
    estimator = QuotaEstimator()
    t = 0.0
    for _ in range(40):
        estimator.sent(t, 0, waited=True)
        t += estimator.window.period / estimator.window.count
    assert estimator.window.rate >= 2 / 0.55 * 2**4


def test_the_rate_is_not_raised_while_requests_do_not_wait_for_it() -> None:
    estimator = QuotaEstimator()
    for second in range(40):
        estimator.sent(float(second), 0, waited=False)
    assert estimator.window == Quota(1, 0.55)


# ----- a counted window --------------------------------------------------------------------------


def test_two_a_minute_is_recognised_from_the_third_request_being_refused_at_once() -> None:
    """Refused at 1.1 s with two admitted since 0: a second-long window would have admitted it
    (one admitted in the last second), and even spacing would have admitted the second request
    at the same gap, so only a window of two per minute explains it."""
    estimator = QuotaEstimator()
    account = Account(estimator)
    account.send(0.0, refused=False)
    account.send(0.55, refused=False)
    account.send(1.1, refused=True)
    # Not told apart from a cap of 2 yet: the cap is believed first, the window kept.
    assert estimator.cap == 2
    account.send(16.6, refused=True)  # one in flight, fewer than were admitted before: a rate
    assert estimator.window == Quota(2, 60.0)
    assert estimator.source == "probed"


def test_ten_a_minute_is_recognised_once_the_shorter_periods_are_refused() -> None:
    """Ten admitted in 2 s, then refused: every period longer than the span refused fits, and
    round periods a fifth longer each are tried (a wrong one is refused at once, costing no
    time) until one is admitted: a minute, here."""
    estimator = QuotaEstimator()
    account = Account(estimator)
    first = [0.0, 0.55, 1.1, 1.4, 1.6, 1.75, 1.85, 1.9, 1.95, 2.0]
    for at in first:
        account.send(at, refused=False, latency=0.5)
    account.send(2.6, refused=True, latency=0.5)  # none in flight: not a cap
    tried, now = [], 2.604
    for _ in range(12):
        window = estimator.window
        tried.append(window.period)
        at = first[-window.count] + window.period if window.count <= 10 else 2.6 + window.period
        if window.count == 10 and window.period >= 60:
            break
        # (Never before the last 429 came back: the gate's clock goes forward.)
        at = max(at, now)
        account.send(at, refused=True, latency=0.5)
        now = at + 0.004
    assert estimator.window == Quota(10, 60.0)
    assert len(tried) <= 10  # 429s that cost no time: each tried before the minute had passed


def test_even_spacing_is_narrowed_between_the_gap_refused_and_the_gap_admitted() -> None:
    """A token bucket of 2 a second without a burst: 0.55 s gaps admitted, 0.275 s refused."""
    estimator = QuotaEstimator()
    account = Account(estimator)
    for at in (0.0, 0.55, 1.1, 1.65):
        account.send(at, refused=False, latency=0.1)
    account.send(1.925, refused=True, latency=0.1)
    window = estimator.window
    assert window.count == 1
    assert 0.275 < window.period <= 0.55


# ----- a cap on work in progress -----------------------------------------------------------------


def test_a_cap_is_found_from_the_count_in_flight_and_confirmed_at_the_same_count() -> None:
    estimator = QuotaEstimator()
    account = Account(estimator)
    account.send(0.0, refused=False)
    account.send(0.55, refused=True)  # one in flight
    assert estimator.cap == 1 and not estimator.cap_confirmed
    account.send(16.6, refused=False)  # the first answered: the tentative cap grew
    assert estimator.cap == 2
    account.send(17.2, refused=True)  # refused with one in flight again: it is a cap of 1
    assert estimator.cap == 1 and estimator.cap_confirmed


def test_a_429_with_fewer_in_flight_than_were_admitted_is_not_blamed_on_a_cap() -> None:
    estimator = QuotaEstimator()
    account = Account(estimator)
    for at in (0.0, 0.55, 1.1, 1.65):
        account.send(at, refused=False, latency=2.0)
    # Admitted with 3 others in flight; refused with 3 in flight (the first has been answered).
    account.send(2.2, refused=True, latency=2.0)
    assert estimator.cap is None


def test_a_confirmed_cap_is_tried_one_higher_now_and_then() -> None:
    estimator = QuotaEstimator(learned_cap=3)
    estimator.sent(0.0, 0)
    estimator.sent(1000.0, 2)
    assert estimator.cap == 4


# ----- a token bucket with a saved-up burst -------------------------------------------------------


def test_a_token_buckets_burst_is_not_read_as_a_window_of_everything_sent() -> None:
    """25 a second holding 25: the ramp got 60 through in 2 s before the first 429. A window of
    60 a minute fits too, but the fastest explanation is taken (a wrong one is refused again)."""
    estimator = QuotaEstimator()
    t, gap = 0.0, 0.55
    for index in range(60):
        estimator.sent(t, 0)
        estimator.answered(index, t + 0.1)
        t += gap
        gap = max(gap * 0.8, 0.01)
    refused = estimator.sent(t, 0)
    estimator.refused(refused, t + 0.004)
    assert estimator.window.rate > 10  # not 60 a minute


def test_between_two_429s_of_a_dry_bucket_what_was_admitted_is_the_rate() -> None:
    estimator = QuotaEstimator()
    t = 0.0
    send_id = 0
    for index in range(200):
        refused = index in (100, 199)
        send_id = estimator.sent(t, 0)
        if refused:
            estimator.refused(send_id, t + 0.004)
        else:
            estimator.answered(send_id, t + 0.1)
        t += 0.04  # 25 a second
    # 98 admitted between the two 429s, 3.96 s apart: about 24.7 a second, less the margin.
    assert estimator.window.rate == pytest.approx(98 / 3.96 * 0.95, rel=0.05)


# ----- a stated or a given quota -----------------------------------------------------------------


def test_a_stated_quota_is_used_at_once() -> None:
    estimator = QuotaEstimator()
    estimator.stated(Quota(2, 60))
    assert estimator.window == Quota(2, 60) and estimator.source == "stated"


def test_a_stated_quota_shown_wrong_by_a_429_is_dropped_for_what_the_429s_say() -> None:
    estimator = QuotaEstimator()
    account = Account(estimator)
    estimator.stated(Quota(10, 1))  # says 10 a second
    for at in (0.0, 0.1, 0.2):
        account.send(at, refused=False, latency=0.01)
    account.send(0.3, refused=True, latency=0.01)  # refused with 3 in the last second
    assert estimator.source == "probed"
    assert estimator.window.rate < 10
    estimator.stated(Quota(10, 1))  # said again: no longer believed
    assert estimator.source == "probed"


def test_a_429_the_stated_quota_explains_keeps_it() -> None:
    """Another client of the same account used the window up: the quota is still right."""
    estimator = QuotaEstimator()
    account = Account(estimator)
    estimator.stated(Quota(2, 60))
    account.send(0.0, refused=False, latency=0.01)
    account.send(0.1, refused=False, latency=0.01)
    account.send(0.2, refused=True, latency=0.01)
    assert estimator.window == Quota(2, 60) and estimator.source == "stated"


def test_a_given_quota_is_never_changed_by_429s_or_statements() -> None:
    estimator = QuotaEstimator(given=Quota(25, 1))
    account = Account(estimator)
    for index in range(5):
        account.send(index * 0.01, refused=True, latency=0.01)
    estimator.stated(Quota(2, 60))
    assert estimator.window == Quota(25, 1) and estimator.source == "given"


def test_a_learned_quota_is_where_the_run_starts() -> None:
    estimator = QuotaEstimator(learned=Quota(2, 60), learned_cap=4)
    assert estimator.window == Quota(2, 60) and estimator.source == "learned"
    assert estimator.cap == 4 and estimator.found


# ----- in the manifest ---------------------------------------------------------------------------


def test_limits_quota_in_the_manifest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "shots.yaml"
    path.write_text("version: 1\nlimits:\n  quota: 2/min\nshots:\n  - id: a\n    prompt: x\n")
    assert load_manifest(path).limits.quota == Quota(2, 60)


def test_a_limits_quota_not_written_k_over_p_is_a_manifest_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "shots.yaml"
    path.write_text("version: 1\nlimits:\n  quota: 2 a minute\nshots:\n  - id: a\n    prompt: x\n")
    with pytest.raises(ManifestError, match=r"shots.yaml:3:\d+: .*limits.quota"):
        load_manifest(path)


# ----- beliefs tested, not kept (issue 20, the pacer's rows) -------------------------------------


def test_the_gentle_openings_429_is_followed_by_one_request_where_a_short_window_resets() -> None:
    """2 admitted, the third refused: a cap of 2, 2 a minute or 2 per 3 s. One request, sent
    when a 3-second window has let the first go again, tells them apart (it was 2 a minute)."""
    estimator = QuotaEstimator()
    account = Account(estimator)
    account.send(0.0, refused=False, latency=2.0)
    account.send(0.55, refused=False, latency=2.0)
    account.send(1.1, refused=True, latency=2.0)
    assert estimator.window == Quota(2, 3)
    account.send(3.05, refused=False, latency=2.0)  # admitted: 2 per 3 s, not a minute
    assert estimator.waiting(3.4) or estimator.window == Quota(2, 3)
    assert estimator.window == Quota(2, 3) and estimator.refusals == 1


def test_the_openings_probe_refused_means_a_few_a_minute() -> None:
    estimator = QuotaEstimator()
    account = Account(estimator)
    account.send(0.0, refused=False, latency=2.0)
    account.send(0.55, refused=False, latency=2.0)
    account.send(1.1, refused=True, latency=2.0)
    account.send(3.05, refused=True, latency=2.0)
    assert estimator.window == Quota(2, 60)


def test_a_probe_proves_the_span_it_was_admitted_in_not_its_target() -> None:
    """3 per 60 s remembered, tried at 3 per 0.5 s by a request sent 4.7 s after the third
    latest: admitted, it shows 3 in 4.7 s at most, not 3 in 0.5 s."""
    estimator = QuotaEstimator(learned=Quota(3, 5))
    account = Account(estimator)
    for at in (0.0, 0.55, 1.1):
        account.send(at, refused=False, latency=2.0)
    estimator.window = Quota(3, 5)
    account.send(5.1, refused=False, latency=2.0)
    account.send(5.2, refused=False, latency=2.0)
    assert estimator.waiting(5.3)  # narrowing 5 s down: tried with one request
    target = estimator.window
    assert target.period < 3
    account.send(5.8, refused=False, latency=2.0)  # 3 admitted in 5.8 - 1.1 = 4.7 s
    estimator.waiting(6.1)  # not refused by now: admitted
    assert estimator.window.count == 3
    assert estimator.window.period == pytest.approx(4.7, abs=0.01)


def test_a_429_at_the_same_count_but_sent_faster_does_not_confirm_a_cap() -> None:
    """A token bucket refuses at any count: nine in flight refused twice, the second sent far
    faster than the first, is the rate, not a cap of nine."""
    estimator = QuotaEstimator()
    t = 0.0
    for index in range(9):
        estimator.sent(t, index)
        t += 0.069
    refused = estimator.sent(t, 9)
    estimator.refused(refused, t + 0.004)
    estimator.answered(0, t + 0.02)
    estimator.sent(t + 0.05, 8)
    again = estimator.sent(t + 0.06, 9)  # 0.01 s after the last admitted, not 0.069
    estimator.refused(again, t + 0.064)
    assert not estimator.cap_confirmed


def test_the_first_429_of_the_doubling_rate_is_a_token_buckets_rate_not_its_pattern() -> None:
    """4 a second holding 4, the rate doubling: 9 admitted in 2.4 s, the tenth refused. The
    windows the doubling itself fits (3 per 0.28 s) would each be a 429; the bucket's rate is
    about 4 a second, and a cap of nine is not enforced (waiting for fewer in flight would cost
    a whole generation)."""
    estimator = QuotaEstimator()
    times = [0.0, 0.5516, 1.103, 1.655, 1.931, 2.07, 2.208, 2.2776, 2.347]
    for index, at in enumerate(times):
        estimator.sent(at, index)
    refused = estimator.sent(2.4165, 9)
    estimator.refused(refused, 2.4205)
    assert 3.3 < estimator.window.rate < 4.2
    assert estimator.cap is None


def test_429s_of_requests_sent_before_the_first_came_back_slow_down_once() -> None:
    """A bucket of 100 a second passed at 900 a second (bench: 100/s burst 100 with a faster
    ramp): the requests already on their way when the first 429 came back are refused too,
    by the same overshoot. Each used to be taken as a new 429 under the rate just fitted, and
    halved it again: 12 429s took 100 a second down to 1.66 a second. As TCP's congestion
    control halves once per window of losses, they change nothing."""
    estimator = QuotaEstimator()
    times = [0.0, 0.5516, 1.103] + [1.2 + index / 900 for index in range(150)]
    for index, at in enumerate(times):
        estimator.sent(at, min(index, 40))
    first = estimator.sent(1.37, 40)
    estimator.refused(first, 1.374)
    fitted = estimator.window
    assert fitted.rate > 50
    for offset in (0.001, 0.002, 0.003):  # sent before 1.374, refused after it
        late = estimator.sent(1.37 + offset, 40)
        estimator.refused(late, 1.374 + offset)
    assert estimator.window == fitted
    assert estimator.refusals == 4  # (each still counts against the run's budget of 429s)


def test_a_new_statement_is_believed_over_what_the_old_quota_admitted() -> None:
    """6 per 3 s stated, then 2 per 3 s: the requests admitted at 6 per 3 s before it do not
    show the new statement wrong."""
    estimator = QuotaEstimator()
    account = Account(estimator)
    estimator.stated(Quota(6, 3))
    for index in range(6):
        account.send(index * 0.1, refused=False, latency=0.01)
    estimator.stated(Quota(2, 3))
    assert estimator.window == Quota(2, 3) and estimator.source == "stated"
    account.send(3.1, refused=False, latency=0.01)
    assert estimator.window == Quota(2, 3) and estimator.source == "stated"


def test_the_budget_of_429s_is_a_share_of_the_requests_the_run_means_to_send() -> None:
    """Told 30 requests are coming, a run that spent one 429 tries nothing that may cost a
    second (2 of 31 is over 5%); told 100, it narrows a period down at once."""
    for expected, narrows in ((30, False), (100, True)):
        estimator = QuotaEstimator(learned=Quota(3, 5), expected=expected)
        account = Account(estimator)
        for at in (0.0, 0.55, 1.1):
            account.send(at, refused=False, latency=2.0)
        account.send(1.6, refused=True, latency=2.0)
        estimator.window, estimator.source = Quota(3, 5), "probed"
        for at in (5.1, 5.2, 5.3):
            account.send(at, refused=False, latency=2.0)
        for send_id in list(account.in_flight):
            estimator.answered(send_id, 7.4)
        assert estimator.waiting(7.5) is narrows


# ----- a budget of 429s counted across runs -------------------------------------------------------


@pytest.mark.parametrize(("credit", "tries"), [(0.0, False), (0.8, False), (1.2, True)])
def test_a_remembered_spacing_is_narrowed_on_credit_only_when_its_worst_case_fits(
    credit: float, tries: bool
) -> None:
    """16 requests (a budget of 0.8) from a remembered 3.15/s: narrowing a spacing may cost two
    429s (a window admits it until full, then the fit after may be wrong), so 0.8 of credit
    (1.6 in all) does not start it and 1.2 (2.0) does."""
    estimator = QuotaEstimator(learned=Quota(1, 0.318), expected=16, credit=credit)
    account = Account(estimator)
    for index in range(4):
        account.send(index * 0.32, refused=False, latency=0.0)
    assert estimator.waiting(1.3) is tries
    assert estimator.window == (Quota(1, 0.2) if tries else Quota(1, 0.318))


def test_the_credit_handed_on_is_what_was_given_plus_earned_less_429s() -> None:
    estimator = QuotaEstimator(learned=Quota(3, 3), expected=20, credit=1.0)
    account = Account(estimator)
    for index in range(19):
        account.send(index * 1.1, refused=False, latency=2.0)
    account.send(21.0, refused=True, latency=2.0)
    assert estimator.credit_left == pytest.approx(1.0 + 0.05 * 20 - 1)
    assert QuotaEstimator(learned=Quota(3, 3), credit=99).credit == 3.0  # (CREDIT_CAP)
    # Spent only with the remembered window it came with: nothing remembered, or a quota given.
    assert QuotaEstimator(credit=2.0).credit == 0.0
    assert QuotaEstimator(given=Quota(3, 3), learned=Quota(3, 3), credit=2.0).credit == 0.0
