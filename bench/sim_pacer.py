"""Drive the real Pacer against a simulated DashScope quota in virtual time (no network).

    python bench/sim_pacer.py            # a grid of quotas, bursts, latencies

Workers mirror the executor: wait_turn, send, a 429 comes back after half a round trip and is
retried with RetryPolicy's backoff, a success comes back after the latency; the account is a
token bucket (rate, burst), full at the start. The event loop's clock is virtual: a sleep jumps
time forward, so a 150-second scenario takes milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from imgbatch.executor import DEFAULT_CONCURRENCY  # noqa: E402
from imgbatch.pacing import Clock, Pacer, RetryPolicy  # noqa: E402
from tests.virtual_time import run_virtual  # noqa: E402


class Bucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class Result:
    wall: float
    ideal: float
    requests: int
    refused: int
    rate: float
    estimate: float | None

    @property
    def ratio(self) -> float:
        return self.ideal / self.wall

    @property
    def share(self) -> float:
        return self.refused / self.requests


async def scenario(
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
) -> Result:
    loop = asyncio.get_running_loop()
    clock = Clock(now=loop.time, sleep=asyncio.sleep)
    pacer = Pacer(rps, clock=clock, **(pacer_options or {}))
    retry = RetryPolicy(rng=random.Random(seed))
    bucket = Bucket(quota, burst)
    pending = iter(range(shots))
    counts = {"requests": 0, "refused": 0}
    start = loop.time()

    async def worker() -> None:
        for _ in pending:
            attempt = 0
            while True:
                attempt += 1
                await pacer.wait_turn()
                counts["requests"] += 1
                await asyncio.sleep(rtt / 2)
                if not bucket.take(loop.time()):
                    counts["refused"] += 1
                    await asyncio.sleep(rtt / 2)
                    pacer.on_throttled(None)
                    await asyncio.sleep(retry.backoff(attempt))
                    continue
                await asyncio.sleep(latency + rtt / 2)
                await asyncio.sleep(download)
                break

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = loop.time() - start
    return Result(
        wall,
        shots / quota + latency,
        counts["requests"],
        counts["refused"],
        pacer.rate,
        pacer.estimate,
    )


def simulate(*args: Any, **kwargs: Any) -> Result:
    return run_virtual(scenario(*args, **kwargs))


GRID = [
    # quota, burst, latency, shots, concurrency (None: imgbatch's default)
    (25, 25, 0.8, 150, None),
    (25, 25, 0.8, 1500, None),
    (25, 1, 0.8, 150, None),
    (25, 5, 0.8, 150, None),
    (25, 50, 0.8, 150, None),
    (25, 25, 15, 1500, None),
    (25, 25, 15, 1500, 64),
    (4, 4, 15, 300, None),
    (2, 2, 15, 200, None),
    (1, 1, 15, 100, None),
    (10, 10, 5, 300, None),
    (100, 100, 0.8, 1000, None),
    (0.5, 1, 15, 60, None),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rtt", type=float, default=0.004)
    args = parser.parse_args()
    print("| quota | burst | latency | shots | conc | wall | ideal/actual | 429s | rate | est |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for quota, burst, latency, shots, cap in GRID:
        concurrency = cap or DEFAULT_CONCURRENCY
        r = simulate(quota, burst, latency, shots, concurrency=concurrency, rtt=args.rtt)
        est = f"{r.estimate:.2f}" if r.estimate is not None else "-"
        print(
            f"| {quota} | {burst} | {latency} | {shots} | {concurrency} | {r.wall:.1f} | "
            f"{r.ratio:.3f} | {r.refused}/{r.requests} ({r.share:.1%}) | {r.rate:.2f} | {est} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
