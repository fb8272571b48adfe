"""Stopping early, honestly: Ctrl-C in two steps and bounded runs, through the library.

Takes: small manifests and fake providers that send SIGINT to this very process at chosen
moments (the apply runs in pytest's main thread, so its loop handlers see them), or hang, or
move a fake clock. Gives: evidence that shots never sent keep their previous state, that only a
paid request really in flight is said to be maybe billed, that images received are written even
when the rest is abandoned, that the first Ctrl-C is acknowledged at once, and that
`max_requests` / `max_duration` stop sending and leave the rest to the next apply.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgbatch.errors import ConfigError, TransientError
from imgbatch.pacing.gate import Clock, RetryPolicy
from imgbatch.plan.decide import Action
from imgbatch.review.events import RunEvent, Stopping
from imgbatch.review.progress import stopping_line
from imgbatch.review.report import apply_json, apply_summary, quiet_summary
from imgbatch.run.apply import ApplyOptions, ApplyReport, apply, apply_async, make_plan
from imgbatch.run.bounds import format_duration, parse_duration
from tests.support.fake_provider import FakeProvider
from tests.support.files import write_many_shots

SIZE = (1328, 1328)


class Offline(FakeProvider):
    name = "placeholder"
    metered = False


def interrupt(times: int = 1) -> Callable[[], Any]:
    async def hook() -> None:
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)

    return hook


async def hang() -> None:
    await asyncio.Event().wait()


def options(tmp_path: Path, **overrides: Any) -> ApplyOptions:
    settings: dict[str, Any] = {
        "retry": RetryPolicy(base_delay=0.001, max_delay=0.01),
        "environ": {},
        "home": tmp_path,
        "rps": 1000.0,
        "concurrency": 1,
        "quota_store": False,
        **overrides,
    }
    return ApplyOptions(**settings)


def results(report: ApplyReport) -> dict[str, dict[str, Any]]:
    document = json.loads(report.results_path.read_text(encoding="utf-8"))
    return {entry["id"]: entry for entry in document["shots"]}


def result_lines(report: ApplyReport) -> dict[str, str]:
    """Each shot's line in results.json, as written."""
    lines = report.results_path.read_text(encoding="utf-8").splitlines()
    return {
        json.loads(line.strip().removesuffix(","))["id"]: line
        for line in lines
        if line.startswith("    {")
    }


def shot(index: int) -> str:
    return f"shot-{index:03d}"


# ----- Ctrl-C -------------------------------------------------------------------------------------


def test_shots_never_sent_keep_their_previous_entry_and_new_ones_get_none(
    tmp_path: Path,
) -> None:
    manifest = write_many_shots(tmp_path, "kept", 4)
    first = apply(manifest, options(tmp_path), provider=FakeProvider())
    assert first.ok
    before = result_lines(first)
    # Every prompt changes (each shot is a replace) and a fifth shot is new.
    text = manifest.read_text(encoding="utf-8").replace("a lighthouse", "a windmill")
    manifest.write_text(text + '  - id: shot-004\n    prompt: "a barn"\n', encoding="utf-8")

    # Ctrl-C while shot-001 is in flight: it finishes, nothing new is sent.
    provider = FakeProvider(on_generate={shot(1): interrupt()})
    report = apply(manifest, options(tmp_path), provider=provider)

    assert report.interrupted
    assert provider.labels == [shot(0), shot(1)]
    after = result_lines(report)
    assert results(report)[shot(1)]["request_id"] == provider.request_ids[shot(1)]
    assert after[shot(1)] != before[shot(1)]
    # Never sent: their lines are exactly as they were, and the new shot has none.
    assert after[shot(2)] == before[shot(2)]
    assert after[shot(3)] == before[shot(3)]
    assert shot(4) not in after
    assert dict(report.not_run) == {
        shot(2): "not run: interrupted (Ctrl-C)",
        shot(3): "not run: interrupted (Ctrl-C)",
        shot(4): "not run: interrupted (Ctrl-C)",
    }
    assert report.count("failed") == 0 and report.count("generated") == 2
    assert report.remaining == 3 and report.bounded is None
    assert report.maybe_billed == 0
    # The next plan still sees them as to do.
    actions = {item.id: item.action for item in make_plan(manifest).shots}
    assert actions == {
        shot(0): Action.UNCHANGED,
        shot(1): Action.UNCHANGED,
        shot(2): Action.REPLACE,
        shot(3): Action.REPLACE,
        shot(4): Action.CREATE,
    }


def test_a_second_ctrl_c_abandons_what_is_in_flight_and_writes_what_was_received(
    tmp_path: Path,
) -> None:
    manifest = write_many_shots(tmp_path, "abandon", 4)
    downloading = asyncio.Event()

    async def hang_downloading() -> None:
        downloading.set()
        await hang()

    async def interrupt_twice_once_downloading() -> None:
        await downloading.wait()
        await interrupt(times=2)()

    provider = FakeProvider(
        on_generate={shot(0): hang},  # sent, never answered
        on_fetch={shot(1): hang_downloading, shot(2): interrupt_twice_once_downloading},
    )
    events: list[RunEvent] = []
    report = apply(
        manifest, options(tmp_path, concurrency=3), provider=provider, listener=events.append
    )

    assert report.interrupted
    entries = results(report)
    # Received before the second Ctrl-C: verified, cached and written, not thrown away.
    assert entries[shot(2)]["status"] == "generated"
    with Image.open(manifest.parent / "output" / "abandon" / entries[shot(2)]["file"]) as image:
        assert image.size == SIZE
    # Billed, not downloaded: its URL is kept for the next apply.
    assert entries[shot(1)]["image_url"] == provider.urls[shot(1)]
    request = provider.request_ids[shot(1)]
    assert entries[shot(1)]["error"] == (
        f"abandoned in flight while downloading its image (request {request}); the next "
        "apply fetches it before paying again"
    )
    # Sent and abandoned: no entry, and the only shot said to be maybe billed.
    assert shot(0) not in entries and shot(3) not in entries
    assert report.not_run[shot(0)] == (
        "abandoned in flight when interrupted; DashScope may have billed it"
    )
    assert report.not_run[shot(3)] == "not run: interrupted (Ctrl-C)"
    assert report.maybe_billed == 1
    # Said at once, in order: stopping (with what is in flight), then abandoning.
    stops = [event for event in events if isinstance(event, Stopping)]
    assert stops == [
        Stopping("interrupted (Ctrl-C)", 3, True, grace=30.0),
        Stopping("interrupted (Ctrl-C)", 2, True, abandoning=True, writing=1),
    ]

    # The next apply fetches the paid image and pays only for the two never answered.
    again = FakeProvider()
    final = apply(manifest, options(tmp_path), provider=again)
    assert final.ok
    assert sorted(again.labels) == [shot(0), shot(3)]
    assert sorted(again.fetched_labels) == [shot(0), shot(1), shot(3)]


def test_an_offline_run_abandoned_says_nothing_of_billing(tmp_path: Path) -> None:
    manifest = write_many_shots(tmp_path, "offline", 3)

    drawing = asyncio.Event()

    async def hang_drawing() -> None:
        drawing.set()
        await hang()

    async def interrupt_twice() -> None:
        await drawing.wait()  # shot-000 is drawing
        await interrupt(times=2)()

    provider = Offline(on_generate={shot(0): hang_drawing, shot(1): interrupt_twice})
    report = apply(manifest, options(tmp_path, concurrency=2), provider=provider)

    assert report.interrupted
    assert results(report)[shot(1)]["status"] == "generated"
    assert report.not_run == {
        shot(0): "not run: abandoned in flight when interrupted",
        shot(2): "not run: interrupted (Ctrl-C)",
    }
    assert report.maybe_billed == 0


def test_ctrl_c_during_a_recover_says_nothing_of_billing(tmp_path: Path) -> None:
    manifest = write_many_shots(tmp_path, "recover", 2)

    async def unreachable() -> None:
        raise TransientError("image host unreachable")

    first = apply(
        manifest,
        options(tmp_path),
        provider=FakeProvider(on_fetch={shot(0): unreachable, shot(1): unreachable}),
    )
    assert first.count("unfetched") == 2
    assert {item.action for item in make_plan(manifest).shots} == {Action.RECOVER}

    # Ctrl-C while the paid image is downloaded again: no request is in flight, nothing can be
    # billed, and the acknowledgement must not say otherwise.
    events: list[RunEvent] = []
    provider = FakeProvider(on_fetch={shot(0): interrupt()})
    report = apply(manifest, options(tmp_path), provider=provider, listener=events.append)

    assert report.interrupted and provider.generated == []
    stops = [event for event in events if isinstance(event, Stopping)]
    assert len(stops) == 1
    assert "bill" not in stopping_line(stops[0]), stopping_line(stops[0])
    assert results(report)[shot(1)]["status"] == "unfetched"  # not run: its URL is kept


def test_the_summary_never_says_a_shot_abandoned_in_flight_was_not_sent(tmp_path: Path) -> None:
    manifest = write_many_shots(tmp_path, "told", 4)

    waiting = asyncio.Event()

    async def hang_waiting() -> None:
        waiting.set()
        await hang()

    async def interrupt_twice() -> None:
        await waiting.wait()  # shot-000 is sent and waiting for its answer
        await interrupt(times=2)()

    provider = FakeProvider(on_generate={shot(0): hang_waiting, shot(1): interrupt_twice})
    report = apply(manifest, options(tmp_path, concurrency=2), provider=provider)

    assert report.interrupted and report.maybe_billed == 1
    assert report.count("generated") == 1 and report.remaining == 3
    summary = apply_summary(report)
    # shot-002 and shot-003 were never sent; shot-000 was, and may be billed.
    assert "2 shots not run: nothing of theirs was sent or changed" in summary, summary
    assert f"1 shot sent and not answered ({shot(0)}): DashScope may have billed it" in summary
    assert "3 shots not run" not in summary, summary
    assert "DashScope may have billed it" in quiet_summary(report)  # -q keeps it too


def test_a_hand_edit_is_moved_aside_before_an_image_billed_under_another_id_is_recovered(
    tmp_path: Path,
) -> None:
    manifest = write_many_shots(tmp_path, "aside", 2)

    async def unreachable() -> None:
        raise TransientError("image host unreachable")

    unreachable_second = FakeProvider(on_fetch={shot(1): unreachable})
    first = apply(manifest, options(tmp_path), provider=unreachable_second)
    assert results(first)[shot(1)]["status"] == "unfetched"
    edited = tmp_path / "output" / "aside" / f"{shot(0)}.png"
    edited.write_bytes(edited.read_bytes() + b"retouched")
    # shot-000 now asks for the very image billed as shot-001's, and shot-001 is gone.
    text = manifest.read_text(encoding="utf-8")
    text = text.replace("take 0", "take 1").split(f"  - id: {shot(1)}")[0]
    manifest.write_text(text, encoding="utf-8")
    (item,) = make_plan(manifest).shots
    assert item.action is Action.RECOVER and item.move_aside, item.reason

    provider = FakeProvider()
    report = apply(manifest, options(tmp_path), provider=provider)

    assert report.ok and provider.generated == []
    assert (edited.parent / f"{shot(0)}.edited.png").read_bytes().endswith(b"retouched")


# ----- bounds -------------------------------------------------------------------------------------


def test_max_requests_stops_sending_and_a_chain_of_runs_makes_each_shot_once(
    tmp_path: Path,
) -> None:
    manifest = write_many_shots(tmp_path, "chain", 10)
    provider = FakeProvider()
    bounded = options(tmp_path, concurrency=3, max_requests=4)

    reports = [apply(manifest, bounded, provider=provider) for _ in range(3)]

    assert [report.requests for report in reports] == [4, 4, 2]
    assert [report.remaining for report in reports] == [6, 2, 0]
    assert [report.bounded for report in reports] == ["max_requests", "max_requests", None]
    assert reports[0].stopped == "reached --max-requests 4"
    assert set(reports[0].not_run.values()) == {"not run: reached --max-requests 4"}
    # Each shot was asked for exactly once over the chain, and all are done.
    assert sorted(provider.labels) == [shot(index) for index in range(10)]
    assert reports[-1].ok
    # Said in the summary, even with --quiet: a CI job's log must tell why it exits 3.
    assert "Stopped: reached --max-requests 4" in apply_summary(reports[0])
    assert "Stopped: reached --max-requests 4" in quiet_summary(reports[0])
    assert "6 shots remain; run again to continue." in quiet_summary(reports[0])
    json_summary = apply_json(reports[0])["summary"]
    assert (json_summary["bounded"], json_summary["remaining"]) == ("max_requests", 6)
    assert {entry["status"] for entry in results(reports[-1]).values()} == {"generated"}
    assert len(results(reports[-1])) == 10


def test_max_duration_stops_sending_once_the_time_is_up(tmp_path: Path) -> None:
    manifest = write_many_shots(tmp_path, "timed", 6)
    now = [1000.0]

    async def sleep(delay: float) -> None:
        now[0] += max(delay, 0.0)
        await asyncio.sleep(0)

    async def ten_seconds() -> None:
        now[0] += 10.0

    provider = FakeProvider(on_generate={shot(index): ten_seconds for index in range(6)})
    report = asyncio.run(
        apply_async(
            manifest,
            options(tmp_path, max_duration=25.0),
            provider=provider,
            clock=Clock(now=lambda: now[0], sleep=sleep),
        )
    )

    # Sent at 0, 10 and 20 s; at 30 s the bound says stop.
    assert provider.labels == [shot(0), shot(1), shot(2)]
    assert report.bounded == "max_duration"
    assert report.remaining == 3
    assert report.not_run[shot(3)] == "not run: reached --max-duration 25s"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45.0), ("90m", 5400.0), ("5h", 18000.0), ("1h30m", 5400.0), ("1.5s", 1.5)],
)
def test_durations_read_with_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["5", "", "h", "5 hours", "-1h", "0s", "1d"])
def test_a_duration_without_a_known_unit_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_requests": 0}, "max_requests must be at least 1"),
        ({"max_duration": 0.0}, "max_duration must be a finite number of seconds above 0"),
        ({"max_duration": float("nan")}, "max_duration must be a finite number"),
    ],
)
def test_bounds_from_python_are_checked(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ApplyOptions(**overrides)
