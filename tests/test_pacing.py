"""The rate limit, known or discovered, on virtual time: no test here really sleeps.

Takes the `Pacer`, alone or against a simulated DashScope account (`tests/quota_sim.py`);
gives evidence that a known rate is kept evenly, that a 429 or a Retry-After holds back the whole
run, and that an unknown quota is found and held: close to the ideal time, with few requests
refused.
"""

from __future__ import annotations

import asyncio

import pytest

from imgbatch.pacing import Clock, Pacer
from tests.quota_sim import simulate
from tests.virtual_time import run_virtual


def loop_clock() -> Clock:
    loop = asyncio.get_running_loop()
    return Clock(now=loop.time, sleep=asyncio.sleep)


async def send_times(pacer: Pacer, count: int, workers: int = 8) -> list[float]:
    """When each of `count` requests was let go by workers that all want to go at once."""
    loop = asyncio.get_running_loop()
    times: list[float] = []
    pending = iter(range(count))

    async def worker() -> None:
        for _ in pending:
            await pacer.wait_turn()
            times.append(loop.time())

    await asyncio.gather(*(worker() for _ in range(workers)))
    return times


def most_in_any_second(times: list[float]) -> int:
    # A hair under a second: 11 starts exactly 0.1 s apart span 1.0 s, which is 10 a second.
    return max(sum(1 for t in times if start <= t < start + 0.999) for start in times)


# ----- a known rate ------------------------------------------------------------------------------


def test_a_known_rate_is_kept_evenly_from_the_first_request() -> None:
    async def scenario() -> list[float]:
        return await send_times(Pacer(10, clock=loop_clock()), 51)

    times = run_virtual(scenario())
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert times[-1] - times[0] == pytest.approx(5.0, abs=0.01)  # 51 starts, 0.1 s apart
    assert min(gaps) >= 0.0999  # no burst at the start, when a strict account would refuse it
    assert most_in_any_second(times) <= 10


def test_a_late_turn_is_made_up_on_the_next_so_the_rate_holds() -> None:
    """The event loop wakes a waiter late now and then; the limiter must not lose that time."""

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        pacer = Pacer(10, clock=loop_clock())
        started = loop.time()
        for index in range(50):
            await pacer.wait_turn()
            if index % 2:
                await asyncio.sleep(0.15)  # this caller comes back 0.05 s after its turn
        return loop.time() - started

    # Unrecovered lateness would add 25 x 0.05 s = 1.25 s.
    assert run_virtual(scenario()) == pytest.approx(4.9 + 0.15, abs=0.06)


def test_a_known_rate_is_not_raised_or_lowered_by_what_the_service_says() -> None:
    async def scenario() -> tuple[float, float]:
        clock = loop_clock()
        pacer = Pacer(10, clock=clock)
        await send_times(pacer, 20)
        await asyncio.sleep(1.0)  # idle: the limiter alone would let the next one go at once
        pacer.on_throttled(None)
        throttled_at = clock.now()
        await pacer.wait_turn()
        return pacer.rate, clock.now() - throttled_at

    rate, held_back = run_virtual(scenario())
    assert rate == 10
    # A 429 under a fixed rate holds everyone back one interval, then the rate asked for resumes.
    assert held_back >= 0.1


def test_retry_after_holds_back_every_request_until_it_has_passed() -> None:
    async def scenario() -> list[float]:
        clock = loop_clock()
        pacer = Pacer(100, clock=clock)
        await send_times(pacer, 5)
        pacer.on_throttled(retry_after=30.0)
        paused_at = clock.now()
        return [t - paused_at for t in await send_times(pacer, 10)]

    after_pause = run_virtual(scenario())
    assert min(after_pause) >= 30.0
    assert max(after_pause) < 30.2


def test_the_placeholder_is_not_rate_limited() -> None:
    async def scenario() -> float:
        clock = loop_clock()
        started = clock.now()
        await send_times(Pacer(None, clock=clock, unlimited=True), 1000)
        return clock.now() - started

    assert run_virtual(scenario()) == pytest.approx(0.0, abs=0.001)


# ----- an unknown quota --------------------------------------------------------------------------


def test_with_no_rate_it_doubles_while_requests_queue_and_nothing_is_refused() -> None:
    async def scenario() -> tuple[float, float]:
        clock = loop_clock()
        pacer = Pacer(None, clock=clock, initial_rate=4.0, probe_interval=0.25)
        started = clock.now()
        await send_times(pacer, 200)
        return pacer.rate, clock.now() - started

    rate, elapsed = run_virtual(scenario())
    assert rate >= 4.0 * 2**4  # at least four doublings ...
    assert elapsed < 3.0  # ... within a few seconds, not 200 / 4 = 50


def test_with_no_rate_it_is_not_raised_when_requests_do_not_queue() -> None:
    async def scenario() -> float:
        pacer = Pacer(None, clock=loop_clock(), initial_rate=4.0)
        for _ in range(20):  # one request a second: the rate is not what limits this run
            await pacer.wait_turn()
            await asyncio.sleep(1.0)
        return pacer.rate

    assert run_virtual(scenario()) == 4.0


def test_with_no_rate_it_is_not_raised_when_a_concurrency_cap_is_the_limit() -> None:
    async def scenario() -> float:
        pacer = Pacer(None, clock=loop_clock(), initial_rate=4.0)

        async def capped_worker() -> None:  # two in flight at most, a second each
            for _ in range(20):
                await pacer.wait_turn()
                await asyncio.sleep(1.0)

        await asyncio.gather(capped_worker(), capped_worker())
        return pacer.rate

    # They arrive together and queue, but only 2 a second go: raising 4 would prove nothing.
    assert run_virtual(scenario()) == 4.0


def test_a_late_429_from_before_a_cut_does_not_stop_the_rate_rising_again() -> None:
    async def scenario() -> tuple[float, float]:
        clock = loop_clock()
        pacer = Pacer(None, clock=clock, initial_rate=4.0)
        await send_times(pacer, 60)
        pacer.on_throttled(None)  # the cut
        await asyncio.sleep(0.01)
        pacer.on_throttled(None)  # a request sent before the cut, refused after it
        after_cut = pacer.rate
        await send_times(pacer, 200)  # then nothing refused for a good while
        return after_cut, pacer.rate

    after_cut, later = run_virtual(scenario())
    assert later > after_cut * 1.2


def test_a_429_slows_the_whole_run_at_once() -> None:
    async def scenario() -> tuple[float, float, list[float]]:
        clock = loop_clock()
        pacer = Pacer(None, clock=clock, initial_rate=4.0)
        await send_times(pacer, 100)
        before = pacer.rate
        pacer.on_throttled(None)
        after = pacer.rate
        cut_at = clock.now()
        return before, after, [t - cut_at for t in await send_times(pacer, 10)]

    before, after, times = run_virtual(scenario())
    assert after < before
    assert pacer_discovered_spacing(times) >= 1 / after * 0.99


def pacer_discovered_spacing(times: list[float]) -> float:
    """The spacing of requests after the first (which may ride on the previous rate's turn)."""
    gaps = [later - earlier for earlier, later in zip(times[1:], times[2:], strict=False)]
    return sum(gaps) / len(gaps)


@pytest.mark.parametrize(
    ("quota", "burst", "latency", "shots"),
    [(25, 25, 0.8, 150), (25, 25, 0.8, 1500), (4, 4, 15, 300), (10, 10, 5, 300)],
)
def test_an_unknown_quota_is_found_and_held(
    quota: float, burst: float, latency: float, shots: int
) -> None:
    run = simulate(quota, burst, latency, shots)
    assert run.ratio >= 0.9
    assert run.share <= 0.05
    assert run.discovered
    assert run.estimate == pytest.approx(quota, rel=0.15)
    assert 0.8 * quota <= run.settled_rate <= quota


def test_a_known_quota_is_used_in_full_with_no_429() -> None:
    run = simulate(25, 25, 0.8, 150, rps=25)
    assert run.refused == 0 and run.requests == 150
    assert run.ratio >= 0.95


def test_a_rate_far_above_the_quota_still_finishes_every_shot() -> None:
    """--rps set wrong (4x the quota): slower than right, but every shot is made."""
    run = simulate(10, 10, 0.8, 100, rps=40)
    assert run.requests - run.refused == 100
    assert run.wall < 100  # not stuck in a retry storm
