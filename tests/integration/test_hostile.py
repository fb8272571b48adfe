"""Hostile service and hard stops: real-sized images over bad links, answers that never come,
a service that echoes the key, requests that never reached it, signals.

Takes: the fake DashScope server with scripted faults (real-sized images, in chunks, where the
download is the point), and `imgbatch apply` through the library or as a real process.
Gives: evidence, case by case, of the exit or outcome, the message, what was sent (the server's
own records), and that nothing paid for was lost. Each case is one of issue 7's defects, and
fails without its fix. (Hostile manifests and hostile output folders have their own files.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgbatch.errors import ConfigError
from imgbatch.pacing.gate import RetryPolicy
from imgbatch.providers.dashscope import ApiKey, DashScopeProvider
from imgbatch.review.report import apply_summary
from imgbatch.run.apply import ApplyOptions, ApplyReport, apply
from tests.support import hostile_images
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import FAKE_KEY, write_manifest, write_many_shots
from tests.support.virtual_time import VirtualServer

FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01)
SIZE = (1328, 1328)
MANIFEST = """\
version: 1
name: hostile
shots:
  - id: only
    prompt: a lighthouse on a cliff at night, long exposure
    size: "1328*1328"
    seed: 3
"""
MANIFEST_TWO = """\
version: 1
name: hostile
defaults:
  size: "1328*1328"
limits:
  concurrency: 1
shots:
  - id: first
    prompt: a lighthouse on a cliff at night, long exposure
  - id: second
    prompt: a harbour at dawn, fishing boats
"""


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path, MANIFEST)


def output(manifest: Path) -> Path:
    return manifest.parent / "output" / "hostile"


def run_apply(manifest: Path, server: Any, tmp_path: Path, **provider_options: Any) -> ApplyReport:
    environ = {
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": server.base_url,
        "HOME": str(tmp_path),
    }
    provider = DashScopeProvider(ApiKey(FAKE_KEY, "the test"), environ=environ, **provider_options)
    return apply(
        manifest,
        ApplyOptions(provider="dashscope", rps=1000, retry=FAST_RETRY, environ=environ),
        provider=provider,
    )


@contextlib.contextmanager
def on_virtual_time(server: FakeDashScope) -> Iterator[VirtualServer]:
    """`server` serving in a virtual-time loop that `apply` (its asyncio.run) runs in too: the
    deadlines, backoffs and the server's delays are exact, and take no real time."""
    with VirtualServer(server) as virtual, pytest.MonkeyPatch.context() as patch:
        patch.setattr(asyncio, "run", virtual.run)
        yield virtual


def only(report: ApplyReport) -> Any:
    (entry,) = report.entries
    return entry


def assert_whole_image(manifest: Path, minimum_bytes: int = 0) -> Path:
    path = output(manifest) / "only.png"
    assert path.stat().st_size >= minimum_bytes
    with Image.open(path) as image:
        image.load()  # raises on a truncated file
        assert image.size == SIZE
    return path


# ----- real-sized images over real links ----------------------------------------------------------


@dataclass(frozen=True)
class DownloadCase:
    name: str
    server: dict[str, Any]
    fault: str | None = None  # a FakeDashScope method scripting the next image's download


DOWNLOADS_THAT_SUCCEED = [
    # A 3.7 MB image arrives in 57 chunks: reading "what is buffered" truncated it.
    DownloadCase("real size in many chunks", {}),
    DownloadCase("throttled link", {"chunk_size": 16 * 1024, "chunk_delay": 0.002}),
    DownloadCase("no Content-Length (chunked encoding)", {"send_content_length": False}),
    DownloadCase("redirected image URL", {"redirect_images": True}),
    # Cut once mid-body: the download is tried again, the generation is not.
    DownloadCase("body cut short once", {}, fault="cut_next_download"),
]


@pytest.mark.parametrize("case", DOWNLOADS_THAT_SUCCEED, ids=lambda case: case.name)
def test_real_sized_images_arrive_whole(case: DownloadCase, manifest: Path, tmp_path: Path) -> None:
    with FakeDashScope(api_key=FAKE_KEY, image_profile="real", **case.server) as server:
        if case.fault:
            getattr(server, case.fault)()
        report = run_apply(manifest, server, tmp_path)
        downloads = [d.status for d in server.downloads]
        generations = server.generation_count
    assert report.ok, only(report).error
    assert generations == 1
    path = assert_whole_image(manifest, minimum_bytes=3 * 1024 * 1024)
    assert only(report).bytes == path.stat().st_size
    if case.fault == "cut_next_download":
        assert downloads == [None, 200]
    elif case.server.get("redirect_images"):
        assert downloads == [302, 200]
    else:
        assert downloads == [200]


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "undeclared"])
def test_a_body_over_the_cap_fails_once_and_keeps_the_url(
    content_length: bool, manifest: Path, tmp_path: Path
) -> None:
    with FakeDashScope(
        api_key=FAKE_KEY, image_profile="real", send_content_length=content_length
    ) as server:
        report = run_apply(manifest, server, tmp_path, max_image_bytes=1024 * 1024)
        downloads = len(server.downloads)
    entry = only(report)
    assert entry.status == "unfetched"
    assert "larger than 1 MiB" in entry.error
    assert downloads == 1  # the same bytes again would be just as large
    assert entry.image_url  # billed: the next apply can still fetch it
    assert not (output(manifest) / "only.png").exists()


def test_a_stalled_download_is_cut_at_its_deadline_and_tried_again(
    manifest: Path, tmp_path: Path
) -> None:
    # On virtual time, the server in the run's own loop: the deadline is kept exactly, and the
    # second try's 3.7 MB take no time on it however loaded the machine.
    server = FakeDashScope(api_key=FAKE_KEY, image_profile="real")
    with on_virtual_time(server):
        server.stall_next_download()
        report = run_apply(manifest, server, tmp_path, download_timeout=2.0)
    assert report.ok
    assert server.generation_count == 1
    assert_whole_image(manifest)
    # The stalled try (never finished: no status) was cut at 2 s; the next began at once.
    stalled, whole = sorted(server.downloads, key=lambda download: download.received_at)
    assert (stalled.status, whole.status) == (None, 200)
    assert 2.0 <= whole.received_at - stalled.received_at < 2.1


def test_an_image_host_that_trickles_fails_at_the_deadline_not_per_read(
    manifest: Path, tmp_path: Path
) -> None:
    # Each chunk comes well within any per-read timeout; the whole body never could in time.
    # On virtual time (the server in the run's own loop), so the time taken is the deadlines'.
    server = FakeDashScope(
        api_key=FAKE_KEY, image_profile="real", chunk_size=4096, chunk_delay=0.05
    )
    with on_virtual_time(server) as virtual:
        report = run_apply(manifest, server, tmp_path, download_timeout=0.3)
        elapsed = virtual.loop.time()
    entry = only(report)
    assert entry.status == "unfetched"
    assert "did not finish within 0.3 s" in entry.error
    assert entry.image_url
    # Four tries of 0.3 s (and their short backoffs), not the 900 chunks x 0.05 s a per-read
    # timeout would wait.
    assert len(server.downloads) == 4
    assert 4 * 0.3 <= elapsed < 4 * 0.3 + 0.2


# ----- hostile image bytes: PNG only, nothing run, the size read before a pixel -----------------


@dataclass(frozen=True)
class Served:
    name: str
    body: Callable[[], bytes]
    message: str
    content_type: str = "image/png"


SERVED_NOT_A_PNG = [
    # Pillow left to guess opens EPS and runs Ghostscript on it.
    Served("EPS", hostile_images.eps, "are a PostScript (EPS) document, not a PNG image"),
    # Pillow's DDS reader raised NotImplementedError, which ended the run with nothing written.
    Served("DDS", hostile_images.dds_unknown_pixel_format, "are a DDS image, not a PNG image"),
    # 9400*9400 pixels in a few hundred KB: refused from its header, never decoded.
    Served(
        "decode bomb",
        hostile_images.decode_bomb,
        "downloaded image is 9400*9400, not the 1328*1328 asked for",
    ),
    *(
        Served(kind, partial(hostile_images.other_format, kind), f"are a {name}, not a PNG", mime)
        for kind, name, mime in [
            ("JPEG", "JPEG image", "image/jpeg"),
            ("WEBP", "WebP image", "image/webp"),
            ("GIF", "GIF image", "image/gif"),
            ("BMP", "BMP image", "image/bmp"),
            ("TIFF", "TIFF image", "image/png"),  # labelled PNG: the bytes decide, not the label
        ]
    ),
]


@pytest.mark.parametrize("case", SERVED_NOT_A_PNG, ids=lambda case: case.name)
def test_an_image_that_is_not_a_png_fails_its_shot_keeps_its_url_and_runs_nothing(
    case: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = hostile_images.fake_gs(tmp_path, monkeypatch)
    manifest = write_manifest(tmp_path, MANIFEST_TWO)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        server.serve_next_image(case.body(), content_type=case.content_type)
        report = run_apply(manifest, server, tmp_path)
        generations = server.generation_count
        downloads = server.downloads_when_done(2)
    assert not marker.exists(), marker.read_text()
    by_id = {entry.id: entry for entry in report.entries}
    entry = by_id["first"]
    assert entry.status == "unfetched", entry.error
    assert case.message in (entry.error or "")
    assert entry.image_url  # paid for: its URL is kept
    assert generations == 2  # one each: the bad image was not paid for twice
    # Another format (or size) is not damage on the way: the same URL would serve it again, so
    # it is not downloaded again (one download each).
    assert len(downloads) == 2
    assert by_id["second"].status == "generated"  # the run went on
    folder = manifest.parent / "output" / "hostile"
    assert not (folder / "first.png").exists()
    saved = json.loads((folder / "results.json").read_text())
    assert [shot["status"] for shot in saved["shots"]] == ["unfetched", "generated"]


def test_a_gzip_encoded_image_is_decoded_not_called_cut_short(
    manifest: Path, tmp_path: Path
) -> None:
    # A real-sized image: megabytes of gzip in many chunks, decoded as they arrive.
    with FakeDashScope(api_key=FAKE_KEY, image_profile="real") as server:
        server.serve_next_image(gzip=True)
        report = run_apply(manifest, server, tmp_path)
        (download,) = server.downloads
    assert report.ok, only(report).error
    assert download.status == 200
    assert_whole_image(manifest, minimum_bytes=3 * 1024 * 1024)


def test_a_gzip_encoded_image_is_capped_at_its_decoded_size(manifest: Path, tmp_path: Path) -> None:
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        # 8 MiB of zeros: 8 KB on the wire.
        server.serve_next_image(bytes(8 * 1024 * 1024), gzip=True)
        report = run_apply(manifest, server, tmp_path, max_image_bytes=1024 * 1024)
    entry = only(report)
    assert entry.status == "unfetched"
    assert "larger than 1 MiB" in entry.error


# ----- answers that never come, waits that never end ----------------------------------------------


def test_a_generation_that_never_answers_is_given_up_after_few_possibly_billed_tries(
    manifest: Path, tmp_path: Path
) -> None:
    # On virtual time: every try reaches the server before its 0.2 s are up, however loaded the
    # machine (a real clock could run the deadline out before the request was even received).
    server = FakeDashScope(api_key=FAKE_KEY)
    with on_virtual_time(server):
        server.stall_next_generation(times=10)
        report = run_apply(manifest, server, tmp_path, request_timeout=0.2)
    generations = server.generation_count  # stalled requests are recorded when the server stops
    entry = only(report)
    assert entry.status == "failed"
    assert "no answer within 0.2 s" in entry.error
    assert "3 of them lost their answer and may have been billed" in entry.error
    # Three tries, each possibly billed, instead of six (the SDK re-sends nothing on a timeout).
    assert generations == 3
    assert report.maybe_billed == 3
    assert report.billed == 0


def test_a_retry_after_of_a_day_stops_the_run_with_a_message(
    manifest: Path, tmp_path: Path
) -> None:
    with FakeDashScope(api_key=FAKE_KEY) as server:
        server.enqueue_error(429, "Throttling", "come back tomorrow", retry_after=100000)
        report = run_apply(manifest, server, tmp_path)
        generations = server.generation_count
    assert generations == 1
    assert report.stopped is not None
    assert "asked to wait 100000 s" in report.stopped
    assert "run apply again later" in report.stopped
    # Refused, not made: it keeps its (absent) state and is left for the next apply.
    assert report.entries == ()
    assert report.not_run["only"].startswith("not run: ")
    assert "come back tomorrow" in report.not_run["only"]


# ----- what the service says is redacted at the boundary ------------------------------------------


def _cli(
    manifest: Path, server_url: str, home: Path, key: str = FAKE_KEY, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DASHSCOPE_API_KEY": key, "DASHSCOPE_HTTP_BASE_URL": server_url}
    env["HOME"] = str(home)
    env.pop("OUTPUT_DIR", None)
    command = [sys.executable, "-m", "imgbatch", "apply", str(manifest), "--rps", "100", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def _everything_written(folder: Path) -> str:
    return "".join(
        path.read_text(errors="replace")
        for path in folder.rglob("*")
        if path.is_file() and path.suffix != ".png"
    )


@pytest.mark.parametrize("fault", ["echo_key_next", "echo_key_in_next_url"])
def test_a_key_echoed_by_the_service_never_reaches_results_journal_or_stderr(
    fault: str, manifest: Path, tmp_path: Path
) -> None:
    with FakeDashScope(api_key=FAKE_KEY) as server:
        getattr(server, fault)()
        completed = _cli(manifest, server.base_url, tmp_path)
        echoed = [r for r in server.requests if r.status == 400]
    assert fault != "echo_key_next" or echoed, "the server did echo the key"
    assert "Traceback" not in completed.stderr
    for text in (completed.stdout, completed.stderr, _everything_written(output(manifest))):
        assert FAKE_KEY not in text
    document = json.loads((output(manifest) / "results.json").read_text())
    (entry,) = document["shots"]
    if fault == "echo_key_next":
        assert entry["error_code"] == "Invalid.***"
        assert "***" in entry["request_id"]
    else:
        assert "OSSAccessKeyId=***" in entry["image_url"]


def test_terminal_escapes_in_an_error_from_the_service_are_shown_not_obeyed(
    manifest: Path, tmp_path: Path
) -> None:
    """A service (or a proxy) could clear the screen, retitle the terminal or forge a line of
    the summary through the error it sends back."""
    with FakeDashScope(api_key=FAKE_KEY) as server:
        server.enqueue_error(
            400, "Bad\x1b[31mCode", "refused \x1b]0;pwned\x07\x1b[2J\r\nDone in 0.0 s: all good"
        )
        completed = _cli(manifest, server.base_url, tmp_path)
    assert completed.returncode == 1, completed.stderr
    assert "\x1b" not in completed.stderr + completed.stdout
    (failed,) = [line for line in completed.stderr.splitlines() if line.startswith("failed only")]
    assert "Bad\\x1b[31mCode" in failed and "[2J  Done in 0.0 s: all good" in failed
    assert not any(
        line.startswith("Done in 0.0 s: all good") for line in completed.stderr.splitlines()
    )


# ----- requests that never reached the service ----------------------------------------------------


def test_a_key_with_a_line_break_is_refused_before_any_request(
    manifest: Path, tmp_path: Path
) -> None:
    with FakeDashScope(api_key=FAKE_KEY) as server:
        completed = _cli(manifest, server.base_url, tmp_path, "sk-first\nsecond")
        sent = len(server.requests)
    assert completed.returncode == 2
    assert "line break" in completed.stderr
    assert "sk-first" not in completed.stderr + completed.stdout
    assert sent == 0
    assert not output(manifest).exists()


def test_a_server_that_cannot_be_reached_bills_nothing_and_says_so(
    manifest: Path, tmp_path: Path
) -> None:
    with FakeDashScope(api_key=FAKE_KEY) as server:
        pass  # its port is closed once it stops
    report = run_apply(manifest, server_at_closed_port(server), tmp_path)
    entry = only(report)
    assert entry.status == "failed"
    assert "cannot connect" in entry.error
    assert "billed" not in entry.error
    assert (report.requests, report.billed, report.maybe_billed) == (6, 0, 0)
    summary = apply_summary(report)
    assert "6 requests sent, 0 images billed," in summary
    assert "maybe billed" not in summary


def server_at_closed_port(stopped: FakeDashScope) -> Any:
    """A stand-in with the address a stopped server had: nothing listens there now."""
    return type("Closed", (), {"base_url": stopped.last_base_url})()


def test_requests_in_flight_stay_under_the_open_files_limit() -> None:
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
        "from imgbatch.run.executor import fit_to_open_files\n"
        "print(fit_to_open_files(400), fit_to_open_files(50))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    # 256 files: 64 kept for everything else, two a request (its API socket and its download).
    assert completed.stdout.split() == ["96", "50"]


# ----- signals ------------------------------------------------------------------------------------


@pytest.fixture
def throttling_server() -> Iterator[FakeDashScope]:
    with FakeDashScope(api_key=FAKE_KEY, latency=0.2) as server:
        yield server


def test_sigterm_is_named_and_shots_waiting_to_retry_are_not_called_in_flight(
    tmp_path: Path, throttling_server: FakeDashScope
) -> None:
    manifest = write_many_shots(tmp_path, "signals", 6)
    # Every shot is throttled once, then told by a 500 to come back in 30 s: all of them wait.
    throttling_server.enqueue_error(429, "Throttling", "slow down", times=6)
    throttling_server.enqueue_error(500, "InternalError", "busy", times=6, retry_after=30)
    env = {
        **os.environ,
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": throttling_server.base_url,
        "HOME": str(tmp_path),
    }
    env.pop("OUTPUT_DIR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "imgbatch", "apply", str(manifest), "--rps", "100"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while throttling_server.status_counts[500] < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    started = time.monotonic()
    # One is enough: a shot waiting out its 30 s was not sent, and stops waiting at once.
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)

    assert time.monotonic() - started < 20
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert "Interrupted (SIGTERM): sending nothing new." in stderr
    assert "interrupted (SIGTERM)" in stdout
    assert "Ctrl-C" not in stdout + stderr
    assert "6 throttled (429)" in stdout
    unbilled = stdout.replace("0 images billed", "").replace("Cost: nothing billed.", "")
    assert "6 not run" in stdout and "billed" not in unbilled
    # Never made: they have no entry in results.json, and no failure is recorded for them.
    shots = json.loads((tmp_path / "output" / "signals" / "results.json").read_text())["shots"]
    assert shots == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rps": float("nan")}, "rps must be a finite number"),
        ({"rps": float("inf")}, "rps must be a finite number"),
        ({"rps": 1e-300}, "rps must be a finite number of at least 0.001"),
        ({"concurrency": 0}, "concurrency must be at least 1"),
    ],
)
def test_options_from_python_are_bounded_like_the_command_line(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ApplyOptions(**options)
