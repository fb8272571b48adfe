"""A 5xx storm: every shot still completes, and each is paid for exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgbatch.pacing.gate import RetryPolicy
from imgbatch.run.apply import ApplyOptions, apply
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import FAKE_KEY, write_many_shots

pytestmark = pytest.mark.slow  # a storm of server errors over many shots


def test_thirty_percent_server_errors_complete_every_shot_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shots = 40
    manifest = write_many_shots(tmp_path, "storm", shots)
    with FakeDashScope(api_key=FAKE_KEY, error_rate=0.3, seed=3) as server:
        environ = {
            "DASHSCOPE_API_KEY": FAKE_KEY,
            "DASHSCOPE_HTTP_BASE_URL": server.base_url,
            "HOME": str(tmp_path),
        }
        retry = RetryPolicy(max_attempts=12, base_delay=0.001, max_delay=0.005)
        report = apply(manifest, ApplyOptions(environ=environ, retry=retry, rps=500))
        assert report.ok, [entry.error for entry in report.entries if entry.error]
        assert report.count("generated") == shots
        assert server.status_counts[500] > 0
        assert report.retries == server.status_counts[500]
        # Only successful generations are billed: one per shot, none twice.
        assert server.successes == shots
        assert len(server.downloads) == shots
