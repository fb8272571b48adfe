"""Crash safety, the output-folder lock and Ctrl-C, with real processes against the fake server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import FAKE_KEY, write_many_shots
from tests.fake_dashscope import FakeDashScope

SHOTS = 16


@pytest.fixture
def slow_server() -> Iterator[FakeDashScope]:
    with FakeDashScope(api_key=FAKE_KEY, latency=0.4) as server:
        yield server


def _manifest(directory: Path) -> Path:
    return write_many_shots(directory, "crash", SHOTS)


def _start_apply(manifest: Path, server: FakeDashScope, *extra: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": server.base_url,
        "HOME": str(manifest.parent),
    }
    env.pop("OUTPUT_DIR", None)
    command = [sys.executable, "-m", "imgbatch", "apply", str(manifest), "--concurrency", "2"]
    return subprocess.Popen(
        [*command, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _journal_lines(output: Path) -> list[dict[str, object]]:
    path = output / ".imgbatch" / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _finished(lines: list[dict[str, object]]) -> list[dict[str, object]]:
    """Journal lines of shots whose image is in place (not those still downloading)."""
    return [entry for entry in lines if entry["status"] == "generated"]


def _wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the subprocess")


def test_kill_9_loses_only_shots_in_flight(tmp_path: Path, slow_server: FakeDashScope) -> None:
    manifest = _manifest(tmp_path)
    output = tmp_path / "output" / "crash"
    process = _start_apply(manifest, slow_server)
    _wait_for(lambda: len(_finished(_journal_lines(output))) >= 4)
    process.kill()
    process.communicate(timeout=10)

    lines = _journal_lines(output)
    journaled = _finished(lines)
    # A shot whose latest line says it was generated but still downloading.
    latest = {str(entry["id"]): entry for entry in lines}
    downloading = [e for e in latest.values() if e["status"] == "unfetched"]
    assert all(entry["image_url"] for entry in downloading)
    assert not (output / "results.json").exists()
    for entry in journaled:
        # Every journaled shot's image is whole: in place and in the cache.
        with Image.open(output / str(entry["file"])) as image:
            image.load()
            assert image.size == (1328, 1328)
        key = str(entry["key"])
        assert (output / ".imgbatch" / "cache" / key[:2] / f"{key}.png").is_file()

    rerun = _start_apply(manifest, slow_server)
    stdout, stderr = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, stderr
    results = json.loads((output / "results.json").read_text())
    statuses = {shot["id"]: shot["status"] for shot in results["shots"]}
    assert len(statuses) == SHOTS
    assert set(statuses.values()) <= {"generated", "cached"}
    # Journaled shots are not paid again: their images are in place, so their entries are kept
    # as journaled (same request id); one killed while downloading is fetched from its URL, so
    # it keeps the request id it was billed under.
    request_ids = {shot["id"]: shot["request_id"] for shot in results["shots"]}
    assert all(statuses[str(entry["id"])] == "generated" for entry in journaled)
    assert all(request_ids[str(entry["id"])] == entry["request_id"] for entry in journaled)
    assert all(request_ids[str(entry["id"])] == entry["request_id"] for entry in downloading)
    # At most the two requests in flight at the kill were paid for and lost.
    assert slow_server.successes <= SHOTS + 2
    assert not list(output.rglob("*.tmp")), "stale temporary files were left behind"


def test_second_apply_on_same_folder_is_refused(tmp_path: Path, slow_server: FakeDashScope) -> None:
    manifest = _manifest(tmp_path)
    output = tmp_path / "output" / "crash"
    first = _start_apply(manifest, slow_server)
    _wait_for(lambda: len(_journal_lines(output)) >= 1)
    second = _start_apply(manifest, slow_server)
    _, second_err = second.communicate(timeout=30)
    first_out, first_err = first.communicate(timeout=60)

    assert second.returncode == 1
    assert "another imgbatch apply is writing to" in second_err
    assert "Traceback" not in second_err
    assert first.returncode == 0, first_err
    results = json.loads((output / "results.json").read_text())
    assert results["summary"]["generated"] == SHOTS
    assert slow_server.successes == SHOTS


def test_ctrl_c_stops_sending_and_writes_results(
    tmp_path: Path, slow_server: FakeDashScope
) -> None:
    manifest = _manifest(tmp_path)
    output = tmp_path / "output" / "crash"
    process = _start_apply(manifest, slow_server)
    _wait_for(lambda: len(_finished(_journal_lines(output))) >= 2)
    process.send_signal(signal.SIGINT)
    sent_at_interrupt = slow_server.generation_count
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    results = json.loads((output / "results.json").read_text())
    statuses = [shot["status"] for shot in results["shots"]]
    assert statuses.count("generated") >= 2
    assert any("interrupted" in str(shot["error"]) for shot in results["shots"])
    # Requests already in flight may finish; nothing new starts after the interrupt.
    assert slow_server.generation_count <= sent_at_interrupt + 2
    assert statuses.count("generated") == slow_server.successes


def test_second_ctrl_c_abandons_requests_in_flight(
    tmp_path: Path, slow_server: FakeDashScope
) -> None:
    manifest = _manifest(tmp_path)
    output = tmp_path / "output" / "crash"
    process = _start_apply(manifest, slow_server)
    # A request surely in flight: received by the server, with most of its latency still to go.
    _wait_for(lambda: len(_finished(_journal_lines(output))) >= 1 and slow_server.in_flight >= 1)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 130, stderr
    results = json.loads((output / "results.json").read_text())
    assert len(results["shots"]) == SHOTS
    errors = [str(shot["error"]) for shot in results["shots"] if shot["status"] == "failed"]
    assert any(error.startswith("abandoned in flight") for error in errors)
    assert not (output / ".imgbatch" / "journal.jsonl").exists()
