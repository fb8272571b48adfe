"""A DashScope account's quota, simulated on virtual time, with workers that act as the executor's.

Takes a quota (a token bucket: requests a second, and the burst it saves up, full at the start),
a latency, a number of shots and the pacer's settings; gives a `SimResult`: the wall time, the
ideal time (shots / quota + latency), the requests sent and refused, and where the pacer's rate
and estimate ended. Each worker waits its turn, sends; a 429 comes back after one round trip
(the gateway refuses before any work) and is retried after `RetryPolicy`'s backoff, a success
after the latency, then the download. Used by the pacer's tests and by `bench/sim_pacer.py`.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from imgbatch.executor import DEFAULT_CONCURRENCY
from imgbatch.pacing import Clock, Pacer, RetryPolicy
from tests.fake_dashscope import TokenBucket
from tests.virtual_time import run_virtual


@dataclass(frozen=True)
class SimResult:
    wall: float
    ideal: float
    requests: int
    refused: int
    rate: float  # where the rate was when the last shot finished
    settled_rate: float  # what the end-of-run summary tells the user to pin
    estimate: float | None
    discovered: bool

    @property
    def ratio(self) -> float:
        """ideal / actual: 1 is a perfect client."""
        return self.ideal / self.wall

    @property
    def share(self) -> float:
        """The share of requests refused with a 429."""
        return self.refused / self.requests


async def run_against_quota(
    quota: float,
    burst: float,
    latency: float,
    shots: int,
    *,
    rps: float | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    rtt: float = 0.004,
    download: float = 0.02,
    seed: int = 1,
    pacer_options: dict[str, Any] | None = None,
) -> SimResult:
    loop = asyncio.get_running_loop()
    pacer = Pacer(rps, clock=Clock(now=loop.time, sleep=asyncio.sleep), **(pacer_options or {}))
    retry = RetryPolicy(rng=random.Random(seed))
    account = TokenBucket(quota, burst, clock=loop.time)
    pending = iter(range(shots))
    requests = refused = 0
    started = loop.time()

    async def worker() -> None:
        nonlocal requests, refused
        for _ in pending:
            attempt = 0
            while True:
                attempt += 1
                await pacer.wait_turn()
                requests += 1
                await asyncio.sleep(rtt / 2)
                if not account.try_take():
                    refused += 1
                    await asyncio.sleep(rtt / 2)
                    pacer.on_throttled(None)
                    await asyncio.sleep(retry.backoff(attempt))
                    continue
                await asyncio.sleep(latency + rtt / 2 + download)
                break

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return SimResult(
        wall=loop.time() - started,
        ideal=shots / quota + latency,
        requests=requests,
        refused=refused,
        rate=pacer.rate,
        settled_rate=pacer.settled_rate,
        estimate=pacer.estimate,
        discovered=pacer.discovered,
    )


def simulate(quota: float, burst: float, latency: float, shots: int, **options: Any) -> SimResult:
    """`run_against_quota` on a fresh virtual-time loop."""
    return run_virtual(run_against_quota(quota, burst, latency, shots, **options))
