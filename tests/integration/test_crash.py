"""Crash safety, the output-folder lock and Ctrl-C, with real processes against the fake server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from click.testing import CliRunner
from PIL import Image

from imgbatch.cli.main import FiniteFloatRange
from imgbatch.cli.main import main as cli_main
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import FAKE_KEY, write_many_shots

pytestmark = pytest.mark.slow  # real processes killed and interrupted, chains of runs

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


class StderrLines:
    """A subprocess's stderr read line by line as it comes."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stderr is not None
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.append(line.rstrip("\n"))

    def has(self, start: str) -> bool:
        return any(line.startswith(start) for line in list(self.lines))

    @property
    def text(self) -> str:
        self._thread.join(timeout=30)
        return "\n".join(self.lines)


def test_first_ctrl_c_is_acknowledged_at_once_and_shots_never_sent_are_not_run(
    tmp_path: Path,
) -> None:
    with FakeDashScope(api_key=FAKE_KEY, latency=3.0, image_profile="tiny") as server:
        manifest = _manifest(tmp_path)
        output = tmp_path / "output" / "crash"
        process = _start_apply(manifest, server, "--json")
        stderr = StderrLines(process)
        # Two requests surely in flight: received by the server, most of their 3 s to go.
        _wait_for(lambda: server.in_flight >= 2)
        process.send_signal(signal.SIGINT)
        _wait_for(lambda: stderr.has("Interrupted (Ctrl-C)"))
        # Said while the requests are still in flight, not once they are done.
        answered_by_then = server.successes
        assert process.stdout is not None
        with process.stdout:
            stdout = process.stdout.read()  # stderr is the reader's alone
        process.wait(timeout=60)
        text = stderr.text

    assert answered_by_then == 0
    assert process.returncode == 130, text
    assert "Traceback" not in text
    assert (
        "Interrupted (Ctrl-C): sending nothing new; waiting up to 30 s for the 2 requests in "
        "flight to finish; DashScope bills those it answers with an image. Ctrl-C again to "
        "abandon them." in text
    )
    # The two in flight finished; the 14 never sent are not run, and results.json has no
    # entry for them (they never had one): no failure recorded, nothing said of billing.
    results = json.loads((output / "results.json").read_text())
    assert [shot["status"] for shot in results["shots"]] == ["generated", "generated"]
    assert server.generation_count == 2 == server.successes
    document = json.loads(stdout)
    not_run = [shot for shot in document["shots"] if shot["status"] == "not_run"]
    assert len(not_run) == SHOTS - 2
    assert {shot["error"] for shot in not_run} == {"not run: interrupted (Ctrl-C)"}
    assert document["summary"]["not_run"] == SHOTS - 2
    assert document["summary"]["interrupted"] is True
    assert f"{SHOTS - 2} shots not run: nothing of theirs was sent or changed" in text


def test_second_ctrl_c_abandons_requests_in_flight(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    output = tmp_path / "output" / "crash"
    # A latency long enough that what is in flight stays in flight while the first Ctrl-C is
    # handled, however loaded the machine.
    with FakeDashScope(api_key=FAKE_KEY, latency=2.0) as server:
        process = _start_apply(manifest, server, "--json")
        lines = StderrLines(process)
        # A request surely in flight: sent after the first two finished, its 2 s still to go.
        _wait_for(lambda: len(_finished(_journal_lines(output))) >= 2 and server.in_flight >= 1)
        process.send_signal(signal.SIGINT)
        # The second Ctrl-C once the first is handled (two signals before it count as one).
        _wait_for(lambda: lines.has("Interrupted (Ctrl-C)"))
        process.send_signal(signal.SIGINT)
        assert process.stdout is not None
        with process.stdout:
            stdout = process.stdout.read()  # stderr is the reader's alone
        process.wait(timeout=30)
        stderr = lines.text

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Abandoning the " in stderr
    document = json.loads(stdout)
    not_run = [shot for shot in document["shots"] if shot["status"] == "not_run"]
    # Only what was really sent (and abandoned) may have been billed; the rest was never sent.
    billed = [shot for shot in not_run if "may have billed it" in shot["error"]]
    assert 1 <= len(billed) <= 2
    assert all(shot["error"].startswith("abandoned in flight") for shot in billed)
    never_sent = [shot for shot in not_run if shot not in billed]
    assert never_sent
    assert {shot["error"] for shot in never_sent} == {"not run: interrupted (Ctrl-C)"}
    # results.json has entries only for what changed: no failures for shots not run.
    results = json.loads((output / "results.json").read_text())
    assert len(results["shots"]) == SHOTS - len(not_run)
    assert all(shot["status"] == "generated" or shot["image_url"] for shot in results["shots"])
    assert not (output / ".imgbatch" / "journal.jsonl").exists()


def test_ctrl_c_at_any_moment_never_prints_a_traceback(tmp_path: Path) -> None:
    """Start-up, plan, the lock, the run, writing results: one line and 130 each time."""
    manifest = write_many_shots(tmp_path, "anytime", 400)
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("OUTPUT_DIR", None)
    env.pop("DASHSCOPE_API_KEY", None)
    # Signalled from the moment the command's code runs (imgbatch.cli.main and its imports, then the
    # command): before that, the interpreter and the package's own import are Python's start.
    launcher = (
        "import runpy, sys, imgbatch; sys.stderr.write('launched\\n'); sys.stderr.flush(); "
        "sys.argv = ['imgbatch', *sys.argv[1:]]; runpy.run_module('imgbatch', run_name='__main__')"
    )
    outcomes = []
    for delay in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2):
        shutil.rmtree(tmp_path / "output", ignore_errors=True)  # every run has all to do
        command = [sys.executable, "-c", launcher, "apply", str(manifest)]
        process = subprocess.Popen(
            [*command, "--provider", "placeholder", "--concurrency", "4"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        assert process.stderr.readline() == "launched\n"
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        outcomes.append((delay, process.returncode, stderr))
    for delay, code, stderr in outcomes:
        assert "Traceback" not in stderr, (delay, stderr)
        assert code == 130, (delay, code, stderr)


def test_a_chain_of_bounded_runs_makes_each_shot_once(tmp_path: Path) -> None:
    """A long list run as a chain of bounded jobs: each exits 3 while shots remain, and over
    the chain the server makes each image exactly once."""
    shots = 24
    manifest = write_many_shots(tmp_path, "chain", shots)
    output = tmp_path / "output" / "chain"
    with FakeDashScope(api_key=FAKE_KEY, latency=0.3, image_profile="tiny") as server:
        server.enqueue_error(500, "InternalError", "busy")  # a retry costs a request, not an image
        codes = []
        bounds = [("--max-duration", "1s")] + [("--max-requests", "5")] * 12
        for flag, value in bounds:
            process = _start_apply(manifest, server, flag, value, "--json")
            stdout, stderr = process.communicate(timeout=60)
            codes.append(process.returncode)
            assert "Traceback" not in stderr
            summary = json.loads(stdout)["summary"]
            if process.returncode == 0:
                assert summary["remaining"] == 0
                break
            assert process.returncode == 3, stderr
            assert summary["bounded"] == flag.removeprefix("--").replace("-", "_")
            assert f"{summary['remaining']} shots remain; run again to continue." in stderr
        made = Counter(_take(request.body) for request in server.requests if request.status == 200)

    assert codes[-1] == 0 and set(codes[:-1]) == {3} and len(codes) >= 4
    assert made == Counter({index: 1 for index in range(shots)})
    results = json.loads((output / "results.json").read_text())
    assert [shot["status"] for shot in results["shots"]] == ["generated"] * shots


def _take(body: object) -> int:
    """Which shot of `write_many_shots` a generation request is for."""
    found = re.search(r"take (\d+)", json.dumps(body))
    assert found is not None
    return int(found.group(1))


def test_ctrl_c_while_the_options_are_parsed_is_130_not_click_s_abort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Click would print "Aborted!" and exit 1: the moment the load test above can hit."""

    def interrupted(*args: object, **kwargs: object) -> float:
        raise KeyboardInterrupt

    monkeypatch.setattr(FiniteFloatRange, "convert", interrupted)
    result = CliRunner().invoke(cli_main, ["apply", "shots.yaml", "--rps", "2"])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output
    assert "Aborted" not in result.output
