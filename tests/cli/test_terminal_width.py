"""What a terminal shows, in a real one: tmux at 80x24, read back with `capture-pane`.

A run with 429s and retries (the fake server's quota is lower than the rate asked) is drawn in
an 80-column terminal: every frame keeps done/total, the elapsed time and the time left whole,
and the secondary counters give way first. `imgbatch generate` shows a spinner with the time
elapsed and what it waits for while its (slow) generation is awaited. Without tmux the tests
are skipped, except in CI (`.ci/run` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FAKE_KEY, REPO

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
if shutil.which("tmux") is None and not IN_CI:
    pytest.skip("tmux is missing (apt-get install tmux)", allow_module_level=True)

SHOTS = 24


@pytest.fixture
def throttling_server() -> Iterator[dict[str, str]]:
    """A fake server (its own process) allowing 4 requests a second, bursts of 2."""
    yield from serve("--latency", "0.4", "--quota-rps", "4", "--quota-burst", "2")


@pytest.fixture
def slow_server() -> Iterator[dict[str, str]]:
    """A fake server whose generations take 3 s."""
    yield from serve("--latency", "3")


def serve(*options: str) -> Iterator[dict[str, str]]:
    script = str(REPO / "tests" / "support" / "fake_dashscope.py")
    server = subprocess.Popen(
        [sys.executable, script, "--api-key", FAKE_KEY, "--image-profile", "tiny", *options],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        urls: dict[str, str] = json.loads(server.stdout.readline())
        yield urls
    finally:
        server.terminate()
        server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()


def tmux(socket: str, *args: str) -> str:
    done = subprocess.run(["tmux", "-L", socket, *args], check=True, capture_output=True, text=True)
    return done.stdout


def run_in_tmux(command: str, tmp_path: Path, server: dict[str, str]) -> list[str]:
    """The screens of an 80x24 terminal running `command` (`imgbatch` is this tree's), read
    every 0.1 s until it prints EXIT=<code>."""
    environment = {
        "HOME": str(tmp_path),
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": server["base_url"],
        "PYTHONPATH": str(REPO / "src"),
        "TERM": "xterm-256color",
        "NO_COLOR": "1",
    }
    exports = " ".join(f"{name}={value}" for name, value in environment.items())
    line = f"cd {tmp_path} && env {exports} {sys.executable} -m imgbatch {command}"
    socket = f"imgbatch-test-{os.getpid()}"
    tmux(
        socket,
        "new-session",
        "-d",
        "-x",
        "80",
        "-y",
        "24",
        "bash",
        "-c",
        line + "; echo EXIT=$?; sleep 30",
    )
    frames: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            screen = tmux(socket, "capture-pane", "-p", "-t", "0")
            frames.append(screen)
            if "EXIT=" in screen:
                break
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], check=False)
    return frames


def test_generate_shows_a_spinner_with_the_time_and_what_it_waits_for(
    slow_server: dict[str, str], tmp_path: Path
) -> None:
    request = '{"prompt": "a red bicycle", "size": "1328*1328", "seed": 7}'
    frames = run_in_tmux(f"generate --request '{request}' --output bike.png", tmp_path, slow_server)
    assert "EXIT=0" in frames[-1], frames[-1]
    waiting = [f for f in frames if "waiting for the service's answer" in f]
    assert waiting, frames[:3]
    seconds = {int(m) for f in waiting for m in re.findall(r"· (\d+) s elapsed", f)}
    assert len(seconds) >= 2, seconds  # it moves while the 3 s generation is awaited
    # The spinner is gone at the end: the last screen has the result line, no spinner line.
    assert "bike.png (generated)" in frames[-1].replace("\n", "")
    assert "elapsed" not in frames[-1]


def test_an_80_column_bar_keeps_count_elapsed_and_eta_whole_through_429s(
    throttling_server: dict[str, str], tmp_path: Path
) -> None:
    lines = ["version: 1", "name: narrow", "defaults:", '  size: "1328*1328"', "shots:"]
    for index in range(SHOTS):
        lines += [f"  - id: shot-{index:02d}", f'    prompt: "a lighthouse, take {index}"']
    (tmp_path / "shots.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    frames = run_in_tmux("apply shots.yaml --rps 20 --concurrency 8", tmp_path, throttling_server)
    final = frames[-1]
    assert "EXIT=0" in final, final
    bars = [
        line
        for frame in frames
        for line in frame.splitlines()
        if re.search(rf"\b\d+/{SHOTS}\b", line) and "ETA" in line
    ]
    assert bars, frames[-3:]
    for line in bars:
        assert len(line) <= 80, line
        assert re.search(
            rf"\b\d+/{SHOTS} \d+\.\d img/s \d+:\d\d:\d\d ETA (\d+:\d\d:\d\d|-:--:--)", line
        ), line
        assert "…" not in line, line  # nothing cut short
    # The run did meet 429s and retries: the bar kept its first counters, the summary has all.
    assert re.search(r"0 failed · \d+ retr(y|ies)", bars[-1]), bars[-1]
    assert re.search(r"Done in .*throttled \(429\)", final.replace("\n", " ")), final
    last_bar = [line for line in final.splitlines() if f"{SHOTS}/{SHOTS}" in line]
    assert last_bar and "ETA 0:00:00" in last_bar[-1], final
