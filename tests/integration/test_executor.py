"""Retries, downloads and backoff: the executor against the fake server and against fake providers.

Takes: a one-shot manifest, the fake DashScope server with scripted faults, and fake providers for
what the server cannot script (a download that fails every time, or only once).
Gives: evidence that transient failures are retried (and counted), permanent ones are not, a paid
image is re-downloaded rather than regenerated, and that nothing here really sleeps: retries use
a policy with millisecond delays or an injected `Clock` that only records the delays asked for.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgbatch.errors import TransientError
from imgbatch.pacing.gate import Clock, Pacer, RetryPolicy
from imgbatch.plan.decide import Action
from imgbatch.providers import Sink
from imgbatch.review.events import Notice
from imgbatch.run.apply import ApplyOptions, ApplyReport, _settle, apply, apply_async, make_plan
from imgbatch.run.executor import Executor
from imgbatch.shots.request import GeneratedImage
from imgbatch.state.folder import STATE_DIR, OutputFolder
from tests.support.fake_dashscope import FakeDashScope
from tests.support.fake_provider import FakeProvider
from tests.support.files import write_manifest, write_many_shots

FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01)
SHOT = "only"
SHOT_FILE = "only.png"
SIZE = (1328, 1328)
MANIFEST = """\
version: 1
name: retry-test
shots:
  - id: only
    prompt: a red bicycle leaning on a white wall
    size: "1328*1328"
    seed: 7
"""


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path, MANIFEST)


def out_dir(manifest: Path) -> Path:
    return manifest.parent / "output" / "retry-test"


def options(api_env: dict[str, str], **overrides: Any) -> ApplyOptions:
    settings: dict[str, Any] = {
        "retry": FAST_RETRY,
        "environ": api_env,
        "home": Path(api_env["HOME"]),
        "rps": 1000.0,
        "concurrency": 1,
        **overrides,
    }
    return ApplyOptions(**settings)


def only_entry(report: ApplyReport) -> dict[str, Any]:
    """The shot's entry as written to results.json (not just as held in memory)."""
    document = json.loads(report.results_path.read_text(encoding="utf-8"))
    (entry,) = document["shots"]
    assert entry["id"] == SHOT
    return dict(entry)


def assert_generated(report: ApplyReport, manifest: Path) -> dict[str, Any]:
    entry = only_entry(report)
    assert entry["status"] == "generated", entry["error"]
    with Image.open(out_dir(manifest) / entry["file"]) as image:
        image.load()
        assert image.size == SIZE
    return entry


def assert_nothing_written(manifest: Path) -> None:
    """No image at the shot's path, nothing in the cache, no temporary file left behind."""
    folder = out_dir(manifest)
    assert not (folder / f"{SHOT}.png").exists()
    assert not list((folder / STATE_DIR / "cache").rglob("*.png"))
    written = sorted(p.name for p in folder.iterdir() if p.name != STATE_DIR)
    assert written == ["index.html", "results.json"]  # index.html: the contact sheet


class RecordingClock:
    """A fake clock: sleeping records the delay and moves time forward, at once."""

    def __init__(self) -> None:
        self.time = 1000.0
        self.delays: list[float] = []

    def now(self) -> float:
        return self.time

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.time += max(delay, 0.0)
        await asyncio.sleep(0)

    def clock(self) -> Clock:
        return Clock(now=self.now, sleep=self.sleep)


# ----- retries against the fake server ------------------------------------------------------------


def test_429_then_success_is_retried_and_counted_as_throttled(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    fake_server.enqueue_error(429, "Throttling.RateQuota", "Requests rate limit exceeded.")
    report = apply(manifest, options(api_env))
    assert report.ok
    assert fake_server.generation_count == 2
    assert fake_server.status_counts == {429: 1, 200: 1}
    assert report.throttled == 1
    assert report.retries == 1
    assert report.requests == 2
    # One image billed, the 429 free: the shot's outcome says so as data.
    (shot,) = report.shots
    assert (shot.status, shot.billed, shot.maybe_billed) == ("generated", True, False)
    entry = assert_generated(report, manifest)
    assert entry["attempts"] == 2
    assert entry["error"] is None


def test_two_500s_then_success(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    fake_server.enqueue_error(500, "InternalError", "An internal error has occurred.", times=2)
    report = apply(manifest, options(api_env))
    assert report.ok
    assert fake_server.status_counts == {500: 2, 200: 1}
    assert report.throttled == 0  # a 500 is not throttling
    assert report.retries == 2
    assert assert_generated(report, manifest)["attempts"] == 3


def test_408_is_retried(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    fake_server.enqueue_error(408, "RequestTimeOut", "Request timed out.")
    report = apply(manifest, options(api_env))
    assert report.ok
    assert fake_server.generation_count == 2
    assert_generated(report, manifest)


def test_retry_after_is_honoured_without_really_sleeping(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    retry_after = 30.0
    fake_server.enqueue_error(
        429, "Throttling.RateQuota", "Requests rate limit exceeded.", retry_after=retry_after
    )
    fake = RecordingClock()
    started = time.monotonic()
    report = asyncio.run(apply_async(manifest, options(api_env), clock=fake.clock()))
    # The 30 s were slept on the fake clock only (really sleeping them would take all 30).
    assert time.monotonic() - started < retry_after
    assert report.ok
    assert fake_server.generation_count == 2
    assert report.throttled == 1
    assert max(fake.delays) >= retry_after
    # The retry was sent only once the fake clock had passed the Retry-After.
    assert fake.time - 1000.0 >= retry_after
    assert_generated(report, manifest)


def test_gives_up_after_max_attempts_with_the_error_in_results(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01)
    fake_server.enqueue_error(500, "InternalError", "An internal error has occurred.", times=5)
    report = apply(manifest, options(api_env, retry=policy))
    assert not report.ok
    assert fake_server.generation_count == 3
    assert report.retries == 2
    entry = only_entry(report)
    assert entry["status"] == "failed"
    assert entry["file"] is None
    assert entry["error"] == (
        "gave up after 3 tries: 500 InternalError: An internal error has occurred."
    )
    assert entry["error_code"] == "InternalError"
    assert entry["attempts"] == 3
    assert_nothing_written(manifest)


def test_a_400_is_not_retried(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    fake_server.enqueue_error(400, "InvalidParameter", "Bad size.")
    report = apply(manifest, options(api_env))
    assert fake_server.generation_count == 1
    assert report.retries == 0
    entry = only_entry(report)
    assert entry["status"] == "failed"
    assert entry["error"] == "400 InvalidParameter: Bad size."


def test_dropped_connections_are_retried_and_the_shot_completes(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    # Each drop reaches imgbatch (the SDK's own re-send, a second image paid for one answer
    # lost, is refused), which counts it as maybe billed and retries with backoff.
    fake_server.enqueue_disconnect(times=2)
    report = apply(manifest, options(api_env))
    assert report.ok
    assert fake_server.status_counts == {None: 2, 200: 1}
    assert (report.requests, report.retries, report.maybe_billed) == (3, 2, 2)
    assert assert_generated(report, manifest)["attempts"] == 3


def test_a_single_dropped_connection_is_one_request_sent_and_counted(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    fake_server.enqueue_disconnect(times=1)
    report = apply(manifest, options(api_env))
    assert report.ok
    assert fake_server.status_counts == {None: 1, 200: 1}
    assert (report.requests, report.maybe_billed) == (2, 1)
    assert_generated(report, manifest)


# ----- downloads ----------------------------------------------------------------------------------


def test_corrupt_download_is_downloaded_again_never_regenerated(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    # The fake serves this image truncated every time: every download attempt is verified and
    # refused, and the paid generation is not repeated to get a better copy.
    fake_server.corrupt_next_image()
    report = apply(manifest, options(api_env))
    assert fake_server.generation_count == 1
    assert len(fake_server.downloads) == FAST_RETRY.download_attempts >= 2
    assert len({d.path for d in fake_server.downloads}) == 1  # the same URL each time
    entry = only_entry(report)
    assert entry["status"] == "unfetched"  # billed, and its URL kept
    assert "but the image could not be downloaded" in entry["error"]
    assert "not a whole image" in entry["error"]
    assert entry["image_url"].startswith(fake_server.image_base_url)
    assert_nothing_written(manifest)

    # The next apply fetches the URL once more (still cut short), says so, and only then pays
    # for one new request; this time the image is whole.
    notices: list[Notice] = []
    report = apply(
        manifest,
        options(api_env),
        listener=lambda event: notices.append(event) if isinstance(event, Notice) else None,
    )
    assert report.ok
    assert report.plan.shots[0].action is Action.RECOVER
    assert fake_server.generation_count == 2
    assert [notice.message.split(" could not be fetched")[0] for notice in notices] == [
        f"the image billed by request {entry['request_id']}"
    ]
    assert notices[0].message.endswith("; making it again with a new, paid request")
    assert_generated(report, manifest)


def test_image_of_another_size_than_requested_fails_the_shot_and_writes_no_file(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    # The service reports the size of what it made; the image must be the size asked for.
    fake_server.small_image_next()
    report = apply(manifest, options(api_env))
    assert not report.ok
    assert fake_server.generation_count == 1
    # Downloaded once: the same URL serves the same wrong image again (it is not damage).
    assert len(fake_server.downloads_when_done(1)) == 1
    entry = only_entry(report)
    assert entry["status"] == "unfetched"
    assert entry["file"] is None
    width, height = SIZE
    assert f"downloaded image is 64*64, not the {width}*{height} asked for" in entry["error"]
    assert_nothing_written(manifest)


def test_misreported_size_does_not_fail_an_image_of_the_requested_size(
    api_env: dict[str, str], fake_server: FakeDashScope, manifest: Path
) -> None:
    fake_server.wrong_size_next()  # usage says half the size; the image is right
    report = apply(manifest, options(api_env))
    assert report.ok
    entry = only_entry(report)
    assert (entry["width"], entry["height"]) == SIZE
    assert_generated(report, manifest)


# ----- downloads, with a fake provider ------------------------------------------------------------


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow  # 300 shots in real time
def test_with_no_cap_the_requests_in_flight_follow_rate_times_latency(tmp_path: Path) -> None:
    manifest = write_many_shots(tmp_path, "wide", 300)
    provider = FakeProvider(latency=0.5)
    options = ApplyOptions(retry=FAST_RETRY, environ={}, home=tmp_path, rps=400.0)

    report = apply(manifest, options, provider=provider)

    assert report.count("generated") == 300
    # 400 requests/s x 0.5 s = 200 in flight at the peak; a fixed pool of 64 would cap it.
    assert provider.most_in_flight >= 150


@pytest.fixture
def offline(tmp_path: Path) -> Iterator[ApplyOptions]:
    yield ApplyOptions(retry=FAST_RETRY, environ={}, home=tmp_path, rps=1000.0, concurrency=1)


def test_a_download_corrupt_once_is_fetched_again_and_kept(
    manifest: Path, offline: ApplyOptions
) -> None:
    good = png(SIZE)
    provider = FakeProvider([good[: len(good) // 2], good])
    report = apply(manifest, offline, provider=provider)
    assert report.ok
    assert len(provider.generated) == 1
    assert len(provider.fetched) == 2
    assert provider.fetched[0] == provider.fetched[1]  # the same image, fetched twice
    entry = assert_generated(report, manifest)
    written = (out_dir(manifest) / entry["file"]).read_bytes()
    # The good download, byte for byte, behind its provenance chunks (spliced in after IHDR).
    assert written.startswith(good[:33]) and written.endswith(good[33:])
    assert entry["request_id"] == "req-run-1"


def test_an_expired_image_url_fails_the_shot_as_generated_but_not_downloaded(
    manifest: Path, offline: ApplyOptions
) -> None:
    expired = TransientError("image download answered HTTP 404", status=404)
    provider = FakeProvider([expired])
    fake = RecordingClock()
    report = asyncio.run(apply_async(manifest, offline, provider=provider, clock=fake.clock()))
    assert not report.ok
    assert len(provider.generated) == 1  # never regenerated just to download it
    assert len(provider.fetched) == FAST_RETRY.download_attempts
    # Backoff between download attempts, on the injected clock.
    assert len(fake.delays) >= FAST_RETRY.download_attempts - 1
    entry = only_entry(report)
    assert entry["status"] == "unfetched"
    assert entry["error"] == (
        "generated (request req-run-1) but the image could not be downloaded: "
        "404: image download answered HTTP 404"
    )
    assert entry["image_url"] == provider.fetched[0].image_url
    assert_nothing_written(manifest)


def test_a_generated_but_undownloadable_shot_keeps_its_request_id(
    manifest: Path, offline: ApplyOptions
) -> None:
    provider = FakeProvider([TransientError("image download answered HTTP 404", status=404)])
    report = apply(manifest, offline, provider=provider)
    assert only_entry(report)["request_id"] == "req-run-1"


def test_the_next_apply_keeps_an_image_billed_but_not_downloaded_without_paying_again(
    manifest: Path, offline: ApplyOptions
) -> None:
    unreachable = FakeProvider([TransientError("image download failed (ClientOSError)")])
    first = only_entry(apply(manifest, offline, provider=unreachable))
    assert first["status"] == "unfetched" and first["image_url"]
    plan = make_plan(manifest, provider="dashscope", environ={}, home=offline.home)
    assert [(item.action, item.reason) for item in plan.shots] == [
        (
            Action.RECOVER,
            "billed last time but not downloaded: its URL is fetched (if it no longer works, "
            "one paid request)",
        )
    ]
    assert plan.paid_requests == 0

    back = FakeProvider([png(SIZE)], tag="second")
    second = only_entry(apply(manifest, offline, provider=back))

    assert back.generated == []  # not paid for again
    assert [image.image_url for image in back.fetched] == [first["image_url"]]
    assert second["status"] == "generated"
    assert second["request_id"] == first["request_id"] == "req-run-1"
    assert second["image_url"] == first["image_url"]
    with Image.open(out_dir(manifest) / SHOT_FILE) as image:
        assert image.size == SIZE


def test_a_results_file_of_the_previous_version_still_recovers_its_billed_image(
    manifest: Path, offline: ApplyOptions
) -> None:
    """Before `unfetched`, a billed image not downloaded was a `failed` entry with its URL."""
    unreachable = FakeProvider([TransientError("image download failed (ClientOSError)")])
    first = only_entry(apply(manifest, offline, provider=unreachable))
    results = out_dir(manifest) / "results.json"
    document = json.loads(results.read_text(encoding="utf-8"))
    document["shots"][0]["status"] = "failed"
    del document["summary"]["unfetched"]
    results.write_text(json.dumps(document, indent=2), encoding="utf-8")

    plan = make_plan(manifest, provider="dashscope", environ={}, home=offline.home)
    assert [item.action for item in plan.shots] == [Action.RECOVER]

    back = FakeProvider([png(SIZE)], tag="second")
    second = only_entry(apply(manifest, offline, provider=back))
    assert back.generated == []
    assert [image.image_url for image in back.fetched] == [first["image_url"]]
    assert second["status"] == "generated"


def test_an_expired_url_from_last_time_is_tried_once_then_the_shot_is_generated_again(
    manifest: Path, offline: ApplyOptions
) -> None:
    unreachable = FakeProvider([TransientError("image download failed (ClientOSError)")])
    first = only_entry(apply(manifest, offline, provider=unreachable))

    expired = TransientError("image download answered HTTP 403", status=403)
    again = FakeProvider([expired, png(SIZE)], tag="second")
    second = only_entry(apply(manifest, offline, provider=again))

    assert len(again.generated) == 1
    new_url = "https://bucket.example.invalid/second-1.png?Signature=x&shot=only"
    # The old URL once (no retries: expired stays expired), then the new image.
    assert [image.image_url for image in again.fetched] == [first["image_url"], new_url]
    assert second["status"] == "generated" and second["attempts"] == 1
    assert second["image_url"] == new_url


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs, in imgbatch or anywhere."""


class KilledWhileDownloading(FakeProvider):
    async def fetch(self, image: GeneratedImage, sink: Sink) -> None:
        raise Killed


def test_a_run_killed_while_downloading_leaves_the_paid_image_to_the_next_apply(
    manifest: Path, offline: ApplyOptions
) -> None:
    with pytest.raises(Killed):
        apply(manifest, offline, provider=KilledWhileDownloading([]))
    assert not (out_dir(manifest) / "results.json").exists()

    back = FakeProvider([png(SIZE)], tag="second")
    entry = only_entry(apply(manifest, offline, provider=back))

    assert back.generated == []
    assert [image.image_url for image in back.fetched] == [
        "https://bucket.example.invalid/run-1.png?Signature=x&shot=only"
    ]
    assert entry["status"] == "generated" and entry["request_id"] == "req-run-1"


class InterruptedWhileDownloading(FakeProvider):
    """Ctrl-C arrives during the download, which then hangs until abandoned."""

    async def fetch(self, image: GeneratedImage, sink: Sink) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.Event().wait()
        raise AssertionError("abandoned downloads never finish")


def test_a_download_abandoned_at_ctrl_c_keeps_the_url_for_the_next_apply(
    manifest: Path, offline: ApplyOptions
) -> None:
    quick_grace = replace(offline, grace_seconds=0.2)
    report = apply(manifest, quick_grace, provider=InterruptedWhileDownloading([]))

    assert report.interrupted
    entry = only_entry(report)
    assert entry["status"] == "unfetched"
    assert entry["error"] == (
        "abandoned in flight while downloading its image (request req-run-1); the next apply "
        "fetches it before paying again"
    )
    assert entry["image_url"] == "https://bucket.example.invalid/run-1.png?Signature=x&shot=only"

    back = FakeProvider([png(SIZE)], tag="second")
    assert only_entry(apply(manifest, offline, provider=back))["request_id"] == "req-run-1"
    assert back.generated == []


def test_a_recover_abandoned_at_ctrl_c_keeps_the_url_paid_for(
    manifest: Path, offline: ApplyOptions
) -> None:
    unreachable = FakeProvider([TransientError("image download failed (ClientOSError)")])
    first = only_entry(apply(manifest, offline, provider=unreachable))

    quick_grace = replace(offline, grace_seconds=0.2)
    report = apply(manifest, quick_grace, provider=InterruptedWhileDownloading([], tag="second"))

    assert report.interrupted
    assert report.plan.shots[0].action is Action.RECOVER
    entry = only_entry(report)
    assert (entry["status"], entry["image_url"]) == ("unfetched", first["image_url"])


def test_a_recover_not_run_when_the_run_stops_keeps_the_url_paid_for(
    manifest: Path, offline: ApplyOptions
) -> None:
    unreachable = FakeProvider([TransientError("image download failed (ClientOSError)")])
    first = only_entry(apply(manifest, offline, provider=unreachable))
    plan = make_plan(manifest, provider="dashscope", environ={}, home=offline.home)
    back = FakeProvider([png(SIZE)], tag="second")
    executor = Executor(
        back, OutputFolder(out_dir(manifest)).cache, lambda entry: None, pacer=Pacer(unlimited=True)
    )
    executor.stop("the run's time is up")

    outcome = asyncio.run(executor.run(plan))

    assert back.fetched == [] and back.generated == []
    assert outcome.not_run == {SHOT: "not run: the run's time is up"}
    # Not run: results.json keeps its entry as it was, the URL paid for included.
    (shot,) = _settle(plan, outcome, metered=True)
    assert shot.entry is not None
    assert (shot.entry.status, shot.entry.image_url) == ("unfetched", first["image_url"])
    assert shot.status == "not_run" and shot.why_not_run == outcome.not_run[SHOT]
    assert not shot.maybe_billed and not shot.billed  # never sent


# ----- RetryPolicy.backoff ------------------------------------------------------------------------


def test_backoff_is_equal_jitter_within_bounds() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=8.0, rng=random.Random(1234))
    for attempt in range(1, 12):
        ceiling = min(8.0, 0.5 * 2 ** (attempt - 1))
        delays = [policy.backoff(attempt) for _ in range(400)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), attempt
        # Jitter spreads them over the upper half of the step.
        assert min(delays) < ceiling * 0.6
        assert max(delays) > ceiling * 0.9
    assert max(policy.backoff(60) for _ in range(100)) <= 8.0  # capped, no overflow


def test_backoff_never_below_retry_after() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=60.0, rng=random.Random(7))
    assert policy.backoff(1, retry_after=30.0) == 30.0
    assert policy.backoff(3, retry_after=120.0) == 120.0  # above max_delay: the server wins
    for attempt in range(1, 8):
        ceiling = min(60.0, 2.0 ** (attempt - 1))
        delay = policy.backoff(attempt, retry_after=0.25)
        assert max(0.25, ceiling / 2) <= delay <= max(0.25, ceiling)
    assert 0.5 <= policy.backoff(1, retry_after=0.0) <= 1.0


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    first = RetryPolicy(rng=random.Random(42))
    second = RetryPolicy(rng=random.Random(42))
    assert [first.backoff(n) for n in range(1, 7)] == [second.backoff(n) for n in range(1, 7)]


# ----- downloads at once -------------------------------------------------------------------------


def test_downloads_wait_for_one_of_a_few_slots_whatever_the_requests_in_flight(
    tmp_path: Path,
) -> None:
    # Each download holds aiohttp's buffers while the loop is busy: the slots, not the requests
    # in flight, bound that memory (executor.MAX_DOWNLOADS).
    manifest = write_many_shots(tmp_path, "slots", 12)
    plan = make_plan(manifest, provider="dashscope", environ={}, home=tmp_path)
    release, holding = asyncio.Event(), []

    async def hold() -> None:
        holding.append(1)
        await release.wait()
        holding.pop()

    provider = FakeProvider(on_fetch={shot.id: hold for shot in plan.shots})
    cache = OutputFolder(manifest.parent / "output" / "slots").cache
    executor = Executor(
        provider,
        cache,
        lambda entry: None,
        pacer=Pacer(unlimited=True),
        concurrency=12,
        downloads=3,
    )

    async def scenario() -> dict[str, Any]:
        run = asyncio.create_task(executor.run(plan))
        while len(provider.generated) < 12:  # every shot answered, so every one may download
            await asyncio.sleep(0)
        for _ in range(100):  # turns of the loop, not time: each shot's chance to start one
            await asyncio.sleep(0)
        held = {"downloading": len(holding), "started": len(provider.fetched)}
        release.set()
        outcome = await run
        return {**held, "generated": sorted(e.status for e in outcome.entries.values())}

    seen = asyncio.run(scenario())

    assert seen == {"downloading": 3, "started": 3, "generated": ["generated"] * 12}
