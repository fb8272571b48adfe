"""A DashScope account's quota, simulated on virtual time, driving the real `apply_async`.

Takes an account (`Account`: a counted window of K requests per P seconds, a token bucket, a
cap on requests in progress, any of them together, and whether answers state the window in a
flow-control header), a latency, a number of shots and imgbatch's options; gives a `SimResult`:
the wall time, the ideal time (the first window's burst at once, then the quota's rate, plus one
latency; for a cap, each slot's share of shots one latency after another), the requests sent
and refused, and what the run found. The provider (`SimProvider`) is the only fake: the manifest,
plan, executor, gate, estimator, journal and results are imgbatch's own. It is
tests/support/fake_provider.py's, with the account's limits in front of it. A 429 comes back after
one round trip (the gateway refuses before any work); a success after the latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

from imgbatch.errors import RateLimited
from imgbatch.pacing.gate import Clock
from imgbatch.run.apply import ApplyOptions, ApplyReport, apply_async
from imgbatch.shots.request import GeneratedImage, ImageRequest
from imgbatch.units.quota import Quota
from tests.support.fake_dashscope import TokenBucket
from tests.support.fake_provider import FakeProvider
from tests.support.virtual_time import run_virtual


class CountedWindow:
    """At most `count` requests admitted in any `period` seconds (a sliding count)."""

    def __init__(self, count: int, period: float, clock: Callable[[], float]) -> None:
        self.count, self.period, self._clock = count, period, clock
        self._admitted: deque[float] = deque()

    def try_take(self) -> bool:
        now = self._clock()
        while self._admitted and self._admitted[0] <= now - self.period:
            self._admitted.popleft()
        if len(self._admitted) >= self.count:
            return False
        self._admitted.append(now)
        return True


@dataclass(frozen=True)
class Account:
    """The quota shapes of one simulated account; None: no such limit."""

    window: tuple[int, float] | None = None  # K requests per P seconds
    bucket: tuple[float, float] | None = None  # rate a second, burst (full at the start)
    max_in_progress: int | None = None
    states: bool = False  # answers carry the window in the flow-control header

    def ideal(self, shots: int, latency: float) -> float:
        """The physical limit: each limit's best, the slowest of them."""
        times = [latency]
        if self.window is not None:
            count, period = self.window
            times.append(max(0, math.ceil(shots / count) - 1) * period + latency)
        if self.bucket is not None:
            rate, burst = self.bucket
            times.append(max(0.0, shots - burst) / rate + latency)
        if self.max_in_progress is not None:
            times.append(math.ceil(shots / self.max_in_progress) * latency)
        return max(times)

    @property
    def stated(self) -> Quota | None:
        return Quota(*self.window) if self.states and self.window else None

    def describe(self) -> str:
        parts = []
        if self.window:
            parts.append(f"{self.window[0]} per {self.window[1]:g} s")
        if self.bucket:
            parts.append(f"bucket {self.bucket[0]:g}/s burst {self.bucket[1]:g}")
        if self.max_in_progress:
            parts.append(f"{self.max_in_progress} in progress")
        return ", ".join(parts)


class SimProvider(FakeProvider):
    """The fake provider behind a simulated account, on the running loop's clock.

    A request every limit admits takes a round trip and the latency; one refused comes back
    after a round trip as the gateway's 429, and takes nothing from the other limits.
    """

    quota_account = "sim-account@sim"

    def __init__(self, account: Account, latency: float, rtt: float, download: float) -> None:
        super().__init__(latency=latency, download=download, stated_quota=account.stated)
        loop = asyncio.get_running_loop()
        self.account = account
        self.rtt = rtt
        self._limits: list[CountedWindow | TokenBucket] = []
        if account.window:
            self._limits.append(CountedWindow(*account.window, clock=loop.time))
        if account.bucket:
            self._limits.append(TokenBucket(*account.bucket, clock=loop.time))
        self.requests = self.refused = 0

    def describe_credentials(self) -> str:
        return "simulated"

    async def generate(self, request: ImageRequest, *, label: str) -> GeneratedImage:
        self.requests += 1
        await asyncio.sleep(self.rtt / 2)
        cap = self.account.max_in_progress
        # Every limit must admit it; a refused request takes nothing from the others.
        admitted = (cap is None or self.in_flight < cap) and all(
            limit.try_take() for limit in self._limits
        )
        if not admitted:
            self.refused += 1
            await asyncio.sleep(self.rtt / 2)
            raise RateLimited(
                "Requests rate limit exceeded",
                code="Throttling.RateQuota",
                stated_quota=self.account.stated,
            )
        image = await super().generate(request, label=label)  # in flight for the latency
        await asyncio.sleep(self.rtt / 2)
        return image


@dataclass(frozen=True)
class SimResult:
    wall: float
    ideal: float
    requests: int
    refused: int
    report: ApplyReport = field(repr=False)

    @property
    def ratio(self) -> float:
        """ideal / actual: 1 is a perfect client."""
        return self.ideal / self.wall

    @property
    def share(self) -> float:
        """The share of requests refused with a 429."""
        return self.refused / self.requests if self.requests else 0.0

    @property
    def found(self) -> str:
        parts = []
        for note in self.report.quotas:
            finding = note.finding
            parts.append(f"{finding.window} ({finding.source})")
            if finding.cap is not None:
                parts.append(f"cap {finding.cap}{'' if finding.cap_confirmed else '?'}")
        return ", ".join(parts)


def write_manifest(folder: Path, shots: int) -> Path:
    lines = ["version: 1", "name: sim", "defaults:", "  size: 1328*1328", "shots:"]
    lines += [f"  - id: s{index:05d}\n    prompt: picture {index}" for index in range(shots)]
    path = folder / "sim.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def run_against(
    account: Account,
    latency: float,
    shots: int,
    folder: Path,
    *,
    options: ApplyOptions | None = None,
    rtt: float = 0.004,
    download: float = 0.02,
) -> SimResult:
    loop = asyncio.get_running_loop()
    provider = SimProvider(account, latency, rtt, download)
    options = replace(
        options or ApplyOptions(),
        provider="dashscope",
        environ={"OUTPUT_DIR": str(folder / "out")},
        home=folder,
        quota_store=(options.quota_store if options else None) or folder / "quotas.json",
    )
    manifest = write_manifest(folder, shots)
    started = loop.time()
    clock = Clock(now=loop.time, sleep=asyncio.sleep)
    report = await apply_async(manifest, options, provider=provider, clock=clock)
    return SimResult(
        wall=loop.time() - started,
        ideal=account.ideal(shots, latency),
        requests=provider.requests,
        refused=provider.refused,
        report=report,
    )


def simulate(account: Account, latency: float, shots: int, **options: Any) -> SimResult:
    """`run_against` on a fresh virtual-time loop, in a temporary folder of its own.

    Writes are not flushed to the disk (`os.fsync` does nothing): the simulation is about pacing,
    and a thousand-shot run would otherwise spend its seconds waiting for the disk.
    """
    folder = options.pop("folder", None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("os.fsync", lambda descriptor: None))
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="imgbatch-sim-"))
        Path(folder).mkdir(parents=True, exist_ok=True)
        return run_virtual(run_against(account, latency, shots, Path(folder), **options))
