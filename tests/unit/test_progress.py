"""What a user sees while apply runs and in plan's table, in a log and on a terminal.

Takes: the `imgbatch` command, run in-process (output is not a terminal) or in a child process
whose stdout and stderr are a pseudo-terminal, against the fake DashScope server with slow
generations. Gives: evidence that a log gets a progress line before the first shot finishes and
one at the end; that a terminal gets a rich bar with done/total; that --quiet prints only the
failures and the final line, -v a line per shot; that NO_COLOR leaves no styling escape and
FORCE_COLOR colours a log without turning it into a live bar.
"""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imgbatch.cli.main import main
from imgbatch.errors import RateLimited, TransientError
from imgbatch.review.console import Verbosity, console_for
from imgbatch.review.events import FromStore, Retrying
from imgbatch.review.progress import Progress, bar_counts
from imgbatch.state.results import ResultEntry
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import FAKE_KEY, REPO, write_manifest

# Select Graphic Rendition: colour, bold, dim. Cursor movements of a live bar are not styling.
SGR = re.compile(r"\x1b\[[0-9;]*m")
LATENCY = 1.5  # seconds per generation: several progress intervals
INTERVAL = "0.2"

MANIFEST = """\
version: 1
name: progress
defaults:
  size: "1328*1328"
shots:
  - id: lighthouse
    prompt: "a lighthouse at dawn"
  - id: harbour
    prompt: "a harbour at noon"
"""


@pytest.fixture
def slow_server() -> Iterator[FakeDashScope]:
    with FakeDashScope(api_key=FAKE_KEY, latency=LATENCY, image_profile="tiny") as server:
        yield server


@pytest.fixture
def slow_env(
    slow_server: FakeDashScope, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": slow_server.base_url,
        "IMGBATCH_PROGRESS_INTERVAL": INTERVAL,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    return env


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


# ----- in a log (not a terminal) ------------------------------------------------------------------


def test_a_log_shows_progress_before_the_first_shot_finishes_and_at_the_end(
    slow_env: dict[str, str], tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    result = run("apply", manifest, "--concurrency", "1")
    assert result.exit_code == 0, result.output
    progress = [line for line in lines_of(result.stderr) if line.startswith("[")]
    # Shots go one at a time and each takes LATENCY s: lines come every INTERVAL s meanwhile,
    # whether or not a shot finished since; the first says nothing has finished yet.
    waiting = [line for line in progress if line.startswith("[0/2]")]
    assert len(waiting) >= 3, result.stderr
    assert waiting[0].startswith("[0/2] 0 generated, 0 failed, 0 retries, 0 throttled (429); ")
    assert waiting[0].endswith("waiting for the first shot")
    assert any(line.startswith("[1/2] 1 generated") and "left" in line for line in progress)
    assert progress[-1].startswith("[2/2] 2 generated, 0 failed")
    assert "\r" not in result.stderr and "\x1b" not in result.stderr  # plain lines only


def test_quiet_prints_only_failures_and_the_final_line(
    slow_env: dict[str, str], tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST.replace("at noon", "FORBIDDEN"))
    plan = run("plan", "-q", manifest)
    assert plan.stdout == "Plan: 2 create. 2 paid requests.\n"  # no table
    result = run("apply", manifest, "-q")
    assert result.exit_code == 1
    assert lines_of(result.stderr) == [
        "failed harbour: 400 DataInspectionFailed: Input data may contain inappropriate content."
    ]
    (final,) = lines_of(result.stdout)
    assert final.startswith("Done in ") and "1 generated, 0 cached, 1 failed" in final
    # On the group too; with nothing else to do, the failed shot is tried again.
    result = run("-q", "apply", manifest)
    assert [line.split(":")[0] for line in lines_of(result.stderr)] == ["failed harbour"]
    (final,) = lines_of(result.stdout)
    assert "0 generated, 0 cached, 1 failed, 1 unchanged" in final


def test_verbose_prints_a_line_per_finished_shot(slow_env: dict[str, str], tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    result = run("apply", manifest, "-v")
    assert result.exit_code == 0, result.output
    shots = [line for line in lines_of(result.stderr) if line.startswith("generated ")]
    assert sorted(shots) == [
        "generated harbour  harbour.png",
        "generated lighthouse  lighthouse.png",
    ]
    # Without -v: progress lines, no line per shot.
    manifest.write_text(MANIFEST.replace("dawn", "dusk"), encoding="utf-8")
    result = run("apply", manifest)
    assert result.exit_code == 0, result.output
    assert not [line for line in lines_of(result.stderr) if line.startswith("generated ")]


def test_force_color_colours_a_log_but_draws_no_bar_and_no_color_wins(
    slow_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    monkeypatch.setenv("FORCE_COLOR", "1")
    plan = run("plan", manifest)
    assert SGR.search(plan.stdout), "FORCE_COLOR colours the plan in a log"
    assert SGR.sub("", plan.stdout).splitlines()[1].split() == [
        "lighthouse",
        "create",
        "new",
        "shot",
    ]
    result = run("apply", manifest)
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr, "a log gets plain lines, not a redrawn bar"
    assert any(SGR.sub("", line).startswith("[2/2] ") for line in lines_of(result.stderr))
    assert SGR.search(result.stdout), "the summary is coloured: 2 generated"
    monkeypatch.setenv("NO_COLOR", "1")
    plan = run("plan", "-v", manifest)
    assert "\x1b" not in plan.stdout
    assert plan.stdout.splitlines()[1].split()[:2] == ["lighthouse", "unchanged"]


# ----- on a terminal ------------------------------------------------------------------------------


def run_in_terminal(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run `imgbatch ARGS` with a pseudo-terminal as stdout and stderr; all it wrote."""
    controller, terminal = pty.openpty()
    child_env = {**os.environ, **env, "TERM": "xterm-256color", "COLUMNS": "120"}
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), str(REPO), child_env.get("PYTHONPATH", "")]
    )
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        child_env.pop(name, None)
    child = subprocess.Popen(
        [sys.executable, "-m", "imgbatch", *args],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        cwd=cwd,
        env=child_env,
    )
    os.close(terminal)
    chunks = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                if child.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        child.wait(timeout=30)
    assert child.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_a_terminal_gets_a_live_bar_with_done_and_total(
    slow_env: dict[str, str], tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    output = run_in_terminal(["apply", str(manifest)], slow_env, tmp_path)
    frames = re.split(r"\r|\x1b\[2K", output)
    bars = [SGR.sub("", frame) for frame in frames if "━" in frame]
    assert any(re.search(r"━ 0/2 .*img/s 0:00:0\d ETA", bar) for bar in bars), bars
    assert any(re.search(r"━ 2/2 .*img/s 0:00:0\d ETA .* 0 failed$", b) for b in bars)
    assert "\x1b[?25l" in output  # the cursor is hidden while the bar is drawn, then shown
    assert SGR.search(output), "a terminal gets colour"
    assert "[2/2] 2 generated" not in output  # no log lines on a terminal


def test_no_color_on_a_terminal_leaves_no_styling_escape(
    slow_env: dict[str, str], tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    plan = run_in_terminal(["plan", str(manifest)], slow_env, tmp_path)
    assert SGR.search(plan), "without NO_COLOR, the plan is coloured on a terminal"
    env = {**slow_env, "NO_COLOR": "1"}
    plan = run_in_terminal(["plan", str(manifest)], env, tmp_path)
    assert "\x1b" not in plan
    assert "lighthouse  create     new shot" in plan
    output = run_in_terminal(["apply", str(manifest)], env, tmp_path)
    assert not SGR.search(output), output
    assert re.search(r"━ 2/2 ", output)  # still a bar: NO_COLOR is about colour only


# ----- the display itself -------------------------------------------------------------------------


def entry(shot_id: str, status: str, error: str | None = None) -> ResultEntry:
    return ResultEntry(
        id=shot_id,
        status=status,  # type: ignore[arg-type]  # a status a later version may add
        file=None if error else f"{shot_id}.png",
        key="k",
        width=None,
        height=None,
        seed=None,
        model="qwen-image-max",
        size="1328*1328",
        prompt="p",
        image_url=None,
        request_id=None,
        error=error,
    )


def test_the_plain_line_counts_any_status_429s_and_says_time_left() -> None:
    now = [100.0]
    stream = io.StringIO()
    progress = Progress(stream, clock=lambda: now[0], interval=3600)
    progress.start(4)
    assert progress.status() == (
        "[0/4] 0 generated, 0 failed, 0 retries, 0 throttled (429); 0.0 images/s, 0s elapsed, "
        "waiting for the first shot"
    )
    throttled = RateLimited("Throttling", code="Throttling")
    progress(Retrying("a", 1, 0.0, throttled))
    progress(Retrying("a", 2, 1.0, TransientError("503 busy")))
    now[0] = 110.0
    progress(entry("a", "generated"))
    progress(entry("b", "not_run"))
    assert progress.status() == (
        "[2/4] 1 generated, 1 not_run, 0 failed, 2 retries, 1 throttled (429); 0.1 images/s, "
        "10s elapsed, about 10s left"
    )
    progress(entry("c", "failed", "400 InvalidParameter: bad size"))
    assert stream.getvalue() == "failed c: 400 InvalidParameter: bad size\n"
    progress.close()
    assert stream.getvalue().splitlines()[-1].startswith("[3/4] 1 generated, 1 not_run, 1 failed")


def test_another_runs_image_restored_from_the_store_counts_as_from_store() -> None:
    progress = Progress(io.StringIO(), interval=3600)
    progress.start(2)
    progress(FromStore("a"))
    progress(entry("a", "generated"))  # its maker's entry: generated, by another run
    progress(entry("b", "generated"))
    assert progress.status().startswith("[2/2] 1 generated, 1 from_store, 0 failed")


def test_quiet_shows_no_progress_line_even_at_the_end() -> None:
    stream = io.StringIO()
    with Progress(stream, verbosity=Verbosity.QUIET, interval=0.01) as progress:
        progress.start(1)
        time.sleep(0.1)
        progress(entry("a", "generated"))
    assert stream.getvalue() == ""


def test_an_image_billed_but_not_downloaded_gets_its_own_line_even_when_quiet() -> None:
    stream = io.StringIO()
    with Progress(stream, verbosity=Verbosity.QUIET, interval=3600) as progress:
        progress.start(1)
        progress(entry("a", "unfetched", "generated (request r1) but the download timed out"))
    assert stream.getvalue() == "unfetched a: generated (request r1) but the download timed out\n"


def test_user_text_is_printed_as_it_is_never_as_markup_nor_wrapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # styled output: markup, if parsed, would show
    monkeypatch.delenv("NO_COLOR", raising=False)
    error = "400 InvalidParameter: [bold]size[/bold] :smile: " + "x" * 300
    stream = io.StringIO()
    with Progress(stream, interval=3600) as progress:
        progress.start(1)
        progress(entry("a", "failed", error))
    assert SGR.sub("", stream.getvalue()).splitlines()[0] == f"failed a: {error}"
    # The summaries are strings, coloured by their words only.
    summary = f"Done in 1.0 s: 1 generated, 1 failed.\nStopped: {error}"
    stream = io.StringIO()
    console_for(stream).print(summary)
    assert SGR.search(stream.getvalue())
    assert SGR.sub("", stream.getvalue()) == summary + "\n"


def wait_for_lines(stream: io.StringIO, count: int) -> None:
    """Until `stream` has `count` lines (the ticker thread's), or fail after a minute."""
    deadline = time.monotonic() + 60
    while stream.getvalue().count("\n") < count:
        assert time.monotonic() < deadline, stream.getvalue()
        time.sleep(0.005)


def test_a_log_says_once_that_every_shot_is_done() -> None:
    stream = io.StringIO()
    with Progress(stream, interval=0.01) as progress:
        progress.start(1)
        wait_for_lines(stream, 1)  # a tick before the shot, however late a loaded machine is
        progress(entry("a", "generated"))
        wait_for_lines(stream, 2)
        time.sleep(0.1)  # results being written: ticks go on, the count has not moved
    lines = stream.getvalue().splitlines()
    assert [line[:5] for line in lines].count("[1/1]") == 1
    assert lines[-1].startswith("[1/1] 1 generated, 0 failed")
    assert lines[0].startswith("[0/1] 0 generated")


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_shows_failures_retries_and_429s_once_there_are_any(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "120")
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    stream = TerminalStream()
    with Progress(stream) as progress:
        progress.start(3)
        progress(Retrying("a", 1, 0.0, RateLimited("Throttling", code="Throttling")))
        progress(Retrying("a", 2, 1.0, TransientError("503 busy")))
        progress(entry("a", "generated"))
        progress(entry("b", "failed", "400 InvalidParameter: bad size"))
    frames = re.split(r"\r|\x1b\[2K", stream.getvalue())
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame).strip() for frame in frames]
    # The failure is printed above the bar, which is drawn again below it.
    assert any(f.startswith("failed b: 400 InvalidParameter: bad size\n") for f in frames)
    last = [frame for frame in frames if "━" in frame][-1]
    assert re.search(r"━ 2/3 .* 1 failed · 2 retries · 1 throttled \(429\)$", last), last


def test_one_retry_is_a_retry_and_the_bar_s_counters_fit_what_is_left() -> None:
    progress = Progress(io.StringIO(), clock=lambda: 10.0)
    progress.start(3)
    progress.retries = 1
    assert ", 1 retry, 0 throttled (429);" in progress.status()
    progress.retries = 2
    assert ", 2 retries, 0 throttled (429);" in progress.status()
    progress.close()
    # Failures always; the 429s shorten, then go, then the retries.
    assert bar_counts(2, 1, 3, 40) == (2, ["2 failed", "1 retry", "3 throttled (429)"])
    assert bar_counts(2, 1, 3, 26) == (2, ["2 failed", "1 retry", "3×429"])
    assert bar_counts(2, 1, 3, 20) == (2, ["2 failed", "1 retry"])
    assert bar_counts(2, 1, 3, 5) == (2, ["2 failed"])
