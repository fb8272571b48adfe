"""apply against the fake DashScope server with each quota shape, through the real provider.

Takes the fake server's counted window (`quota_window`), cap on work in progress
(`max_in_progress`) and stated quota (the flow-control header), and imgbatch's `apply` with the
quota given, stated, unknown or learned; gives evidence that a given window is used in full and
no faster, that the stated quota is read from the header, that a cap and an unknown window are
found, that what was found is kept (by a fingerprint, never the key) for the next run, and that
429s do not use up a shot's tries. Time scaled down: a window of a second, not a minute. What
depends on timing runs on virtual time (`VirtualServer`: the server in the run's own event loop),
so it is exact and the same on a loaded machine.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from imgbatch.pacing.gate import RetryPolicy
from imgbatch.review.report import apply_summary
from imgbatch.run.apply import ApplyOptions, apply, apply_async
from imgbatch.units.quota import Quota
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import FAKE_KEY, write_many_shots
from tests.support.virtual_time import VirtualServer

FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01)


def options(tmp_path: Path, server: FakeDashScope, **overrides: object) -> ApplyOptions:
    environ = {"DASHSCOPE_API_KEY": FAKE_KEY, "DASHSCOPE_HTTP_BASE_URL": server.base_url}
    settings: dict[str, object] = {
        "retry": FAST_RETRY,
        "environ": environ,
        "home": tmp_path,
        "provider": "dashscope",
        "quota_store": tmp_path / "cache" / "quotas.json",
    }
    settings.update(overrides)
    return ApplyOptions(**settings)  # type: ignore[arg-type]


def test_a_given_window_is_used_in_full_and_no_faster(tmp_path: Path) -> None:
    """On virtual time, the server in the run's own loop: the arrivals are the pacer's own
    timing, exact, whatever else the machine is doing."""
    manifest = write_many_shots(tmp_path, "given", 9)
    server = FakeDashScope(api_key=FAKE_KEY, quota_window=(3, 1.0))
    with VirtualServer(server) as virtual:
        report = virtual.run(apply_async(manifest, options(tmp_path, server, quota=Quota(3, 1.0))))
    assert report.count("generated") == 9
    assert server.status_counts[429] == 0
    # Three at once, three a window later, three more a window after that: the window's margin
    # for the network's jitter (a few hundredths of it), no more.
    arrived = [r.received_at - server.requests[0].received_at for r in server.requests]
    assert max(arrived[:3]) < 0.01
    assert 1.0 <= min(arrived[3:6]) <= max(arrived[3:6]) < 1.1
    assert 2.0 <= min(arrived[6:]) <= max(arrived[6:]) < 2.2
    finding = report.quotas[0].finding
    assert finding.source == "given" and not report.quotas[0].saved


def test_the_quota_stated_in_the_flow_control_header_is_used(tmp_path: Path) -> None:
    manifest = write_many_shots(tmp_path, "stated", 6)
    server = FakeDashScope(api_key=FAKE_KEY, quota_window=(2, 1.0), state_quota=True, latency=0.2)
    with VirtualServer(server) as virtual:
        report = virtual.run(apply_async(manifest, options(tmp_path, server)))
    assert report.count("generated") == 6
    assert server.status_counts[429] <= 1
    finding = report.quotas[0].finding
    assert finding.stated == Quota(2, 1.0)
    assert finding.window == Quota(2, 1.0) and finding.source == "stated"
    assert "2 requests per 1 s (as the service stated it)" in apply_summary(report)


def test_an_unknown_window_is_found_kept_and_where_the_next_run_starts(tmp_path: Path) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = write_many_shots(tmp_path / "first", "first", 12)
    second = write_many_shots(tmp_path / "second", "second", 8)
    server = FakeDashScope(api_key=FAKE_KEY, quota_window=(4, 1.0), latency=0.05)
    with VirtualServer(server) as virtual:
        report = virtual.run(apply_async(first, options(tmp_path, server)))
        assert report.count("generated") == 12
        assert server.status_counts[429] >= 1
        assert report.quotas[0].saved
        summary = apply_summary(report)
        assert "remembered for the next run" in summary
        server.reset()
        virtual.run(asyncio.sleep(1.1))  # the first run's requests leave the window
        again = virtual.run(apply_async(second, options(tmp_path, server)))
    assert again.count("generated") == 8
    assert server.status_counts[429] == 0
    assert again.quotas[0].learned_before
    assert "as learned by an earlier run" in apply_summary(again)
    stored = (tmp_path / "cache" / "quotas.json").read_text(encoding="utf-8")
    assert FAKE_KEY not in stored and FAKE_KEY[3:15] not in stored
    assert any(key.endswith(" qwen-image-max") for key in json.loads(stored))


def test_a_given_quota_overrides_the_learned_one(tmp_path: Path) -> None:
    store = tmp_path / "cache" / "quotas.json"
    with FakeDashScope(api_key=FAKE_KEY) as server:
        account = f"{'0' * 16}@{server.base_url}"
        store.parent.mkdir(parents=True)
        store.write_text(json.dumps({f"{account} qwen-image-max": {"count": 1, "period": 60}}))
        manifest = write_many_shots(tmp_path, "override", 4)
        report = apply(manifest, options(tmp_path, server, quota=Quota(100, 1.0)))
    assert report.count("generated") == 4
    assert report.quotas[0].finding.source == "given"


def test_a_cap_on_work_in_progress_is_found(tmp_path: Path) -> None:
    """Two in progress, each 1.5 s: the gentle opening's third request is refused with two in
    flight (a cap of 2, or 2 per some period); the one request sent alone 3 s on is admitted.
    With generations shorter than 3 s, a cap of 2 and 2 per 3 s then explain all that is seen,
    and an 8-shot run cannot afford the 429 that would tell them apart: either is right."""
    manifest = write_many_shots(tmp_path, "cap", 8)
    server = FakeDashScope(api_key=FAKE_KEY, max_in_progress=2, latency=1.5)
    with VirtualServer(server) as virtual:
        report = virtual.run(apply_async(manifest, options(tmp_path, server)))
    assert report.count("generated") == 8
    assert server.status_counts[429] <= 3
    finding = report.quotas[0].finding
    assert (finding.cap == 2 and finding.cap_confirmed) or finding.window == Quota(2, 3)


def test_429s_do_not_use_up_a_shots_tries(tmp_path: Path) -> None:
    manifest = write_many_shots(tmp_path, "refused", 1)
    with FakeDashScope(api_key=FAKE_KEY) as server:
        server.enqueue_error(429, "Throttling.RateQuota", "Requests rate limit exceeded.", times=5)
        single_try = RetryPolicy(max_attempts=1, base_delay=0.001)
        report = apply(manifest, options(tmp_path, server, quota=Quota(100, 1.0), retry=single_try))
    assert report.count("generated") == 1
    assert server.status_counts == {429: 5, 200: 1}
    assert report.entries[0].attempts == 6


@pytest.mark.parametrize("header", ["not json", '{"user_spec": {"count_limit": "2"}}', "{}"])
def test_a_malformed_flow_control_header_is_ignored(header: str) -> None:
    from imgbatch.providers.dashscope import FLOW_CONTROL_HEADER, _stated_quota

    assert _stated_quota({FLOW_CONTROL_HEADER: header}) is None
    recorded = (
        '{"model":"qwen-image-max","user_id":"...","user_spec":{"default_spec":false,'
        '"count_limit":2,"count_limit_period":60,"burst_factor":0,"burst_timeout":10000}}'
    )
    assert _stated_quota({"X-DashScope-Inner-Flow-Control-Meta": recorded}) == Quota(2, 60)


@pytest.mark.parametrize("stated", [(1, 1e9), (1, 3600.0)])
def test_a_flow_control_header_stating_an_implausible_quota_stalls_nothing(
    tmp_path: Path, stated: tuple[int, float]
) -> None:
    """Issue 18: `count_limit: 1, count_limit_period: 1e9` stopped all progress and was
    remembered, so the next run against a healthy server stalled too."""
    store = tmp_path / "cache" / "quotas.json"
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
        manifest = write_many_shots(tmp_path / run, run, 5)
        server = FakeDashScope(api_key=FAKE_KEY, state_quota=stated, latency=0.05)
        with VirtualServer(server) as virtual:
            # A minute of virtual time: a run that waits on the stated hour fails at once.
            run_in_a_minute = asyncio.wait_for(apply_async(manifest, options(tmp_path, server)), 60)
            report = virtual.run(run_in_a_minute)
        assert report.count("generated") == 5
        finding = report.quotas[0].finding
        assert finding.stated == Quota(*stated)
        assert finding.source != "stated" and finding.window.period < 3600
    remembered = json.loads(store.read_text()) if store.exists() else {}
    assert all(record.get("period", 0) < 3600 for record in remembered.values())


def test_a_stated_quota_a_faster_admission_contradicts_is_not_believed() -> None:
    from imgbatch.pacing.quota import QuotaEstimator

    estimator = QuotaEstimator()
    for send_id, at in enumerate((0.0, 0.55, 1.1)):
        estimator.sent(at, send_id)
    estimator.answered(0, 16.5)
    estimator.answered(1, 17.0)
    estimator.stated(Quota(1, 60))  # two were admitted 0.55 s apart: not one a minute
    assert estimator.source != "stated"
