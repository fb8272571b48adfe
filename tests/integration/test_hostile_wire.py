"""A hostile wire: what imgbatch sends to hosts a shot list names, and what it accepts back.

Takes: servers on 127.0.0.1 that record the headers they receive (tests/support/recording_http.py,
also standing in for a proxy that must never be used), the fake DashScope server with its
misbehaviours, and a user's ambient credentials (a real ~/.netrc under a temporary HOME, proxy
variables with a login in them).
Gives: evidence, case by case, that no ambient credential reaches a URL a shot list chooses (nor
the next host after a redirect), and that answers the API client cannot use are bounded,
counted and reported. Each case is one of issue 18's wire defects and fails without its fix.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from imgbatch.cli.main import main
from imgbatch.errors import ProviderError, TransientError
from imgbatch.pacing.gate import RetryPolicy
from imgbatch.providers.dashscope import ApiKey, DashScopeProvider
from imgbatch.providers.dashscope_wire import ServiceText, retry_after
from imgbatch.review.report import apply_summary
from imgbatch.run.apply import ApplyOptions, ApplyReport, apply
from imgbatch.shots.request import ImageRequest
from tests.conftest import FAKE_KEY, write_manifest
from tests.support.fake_dashscope import KEY_TRANSFORMS, FakeDashScope, _gzip_bomb
from tests.support.recording_http import Received, RecordingServer
from tests.support.reference_images import PNG

FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01)
NETRC_SECRETS = ("netrc-secret-machine", "netrc-secret-localhost", "netrc-secret-default")
PROXY_SECRET = "proxy-secret"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")


# ----- ambient credentials ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ambient:
    """What a user's machine holds: which of a ~/.netrc and proxy variables this case sets."""

    name: str
    netrc: bool
    proxy: bool


AMBIENT = [
    Ambient("a ~/.netrc with a default login", netrc=True, proxy=False),
    Ambient("proxy variables with a login", netrc=False, proxy=True),
    Ambient("both", netrc=True, proxy=True),
]


@pytest.fixture
def proxy() -> Iterator[RecordingServer]:
    with RecordingServer() as running:
        yield running


def set_ambient(
    case: Ambient, home: Path, proxy: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    for name in ("NETRC", "NO_PROXY", "no_proxy", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    if case.netrc:
        netrc = home / ".netrc"
        netrc.write_text(
            f"machine 127.0.0.1 login alice password {NETRC_SECRETS[0]}\n"
            f"machine localhost login alice password {NETRC_SECRETS[1]}\n"
            f"default login bob password {NETRC_SECRETS[2]}\n"
        )
        netrc.chmod(0o600)
    if case.proxy:
        address = proxy.origin.replace("http://", f"http://carol:{PROXY_SECRET}@")
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, address)


def assert_no_credentials(received: list[Received]) -> None:
    for request in received:
        assert "proxy-authorization" not in request.headers, request
        assert not request.headers.get("authorization", "").lower().startswith("basic"), request
        shown = repr(request.headers)
        for secret in (*NETRC_SECRETS, PROXY_SECRET):
            assert secret not in shown, request


def reference_shots(url: str) -> str:
    return (
        "version: 1\nname: refs\nprovider: placeholder\n"
        'defaults:\n  size: "1328*1328"\nshots:\n'
        f'  - id: front\n    prompt: a helmet, front\n    reference_image: "{url}"\n'
    )


@pytest.mark.parametrize("case", AMBIENT, ids=lambda case: case.name)
def test_a_reference_fetch_sends_no_ambient_credential_even_after_a_redirect(
    case: Ambient,
    tmp_path: Path,
    proxy: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_ambient(case, tmp_path / "home", proxy, monkeypatch)
    with RecordingServer({"/moved.png": PNG}) as second:
        with RecordingServer(redirects={"/ref.png": second.url("/moved.png")}) as first:
            path = write_manifest(tmp_path, reference_shots(first.url("/ref.png")))
            report = apply(path)
    assert report.ok, report.entries
    assert [r.target for r in first.received] == ["/ref.png"]
    assert [r.target for r in second.received] == ["/moved.png"]  # straight there, no proxy
    assert proxy.received == []
    assert_no_credentials(first.received + second.received)


@pytest.mark.parametrize("case", AMBIENT, ids=lambda case: case.name)
def test_api_calls_and_image_downloads_send_no_ambient_credential(
    case: Ambient,
    tmp_path: Path,
    proxy: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    set_ambient(case, home, proxy, monkeypatch)
    path = write_manifest(tmp_path, reference_shots("x").replace("provider: placeholder\n", ""))
    path.write_text(path.read_text().replace('    reference_image: "x"\n', ""))
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny", redirect_images=True) as server:
        report = run_apply(path, server, home)
        api, downloads = list(server.requests), list(server.downloads)
    assert report.ok, report.entries
    assert [d.status for d in downloads] == [302, 200]
    assert proxy.received == []
    assert [r.headers["authorization"] for r in api] == [f"Bearer {FAKE_KEY}"]
    assert all("authorization" not in d.headers for d in downloads)
    as_received = [Received(r.method, r.path, r.headers) for r in api + downloads]
    assert_no_credentials(as_received)


def run_apply(path: Path, server: Any, home: Path, max_cost: str | None = None) -> ApplyReport:
    environ = {
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": server.base_url,
        "HOME": str(home),
    }
    provider = DashScopeProvider(ApiKey(FAKE_KEY, "the test"), environ=environ)
    options = ApplyOptions(
        provider="dashscope", rps=1000, retry=FAST_RETRY, environ=environ, max_cost=max_cost
    )
    return apply(path, options, provider=provider)


# ----- answers the client cannot use: bounded, counted, reported ----------------------------------

SHOT = """\
version: 1
name: wire
shots:
  - id: only
    prompt: a lighthouse on a cliff at night, long exposure
    size: "1328*1328"
    seed: 3
"""
GZIP_BOMB_BYTES = 64 * 1024 * 1024
HUGE_JSON_BYTES = 100 * 1024 * 1024
# What reading one refused answer may take at most, every Python allocation counted (the fake
# server's too: it runs in this process); an answer read whole takes at least its size.
MEMORY_BOUND = 24 * 1024 * 1024


@dataclass(frozen=True)
class Misbehaviour:
    name: str  # a key of tests.support.fake_dashscope.MISBEHAVIOURS
    error: str  # in the shot's error
    billed: bool  # a 200: the service made, and may have billed, an image
    size: int = 0


UNUSABLE_ANSWERS = [
    Misbehaviour("gzip bomb", f"an answer larger than {1024 * 1024} bytes", True, GZIP_BOMB_BYTES),
    Misbehaviour("huge json", f"an answer larger than {1024 * 1024} bytes", True, HUGE_JSON_BYTES),
    Misbehaviour("200 html", "answered 200 with an answer of text/html, not JSON", True),
    Misbehaviour("200 html as json", "cannot be read (JSONDecodeError)", True),
    Misbehaviour("200 empty", "malformed answer", True),
    Misbehaviour("200 cut json", "cannot be read (JSONDecodeError)", True),
    Misbehaviour("200 json list", "cannot be read (ValueError)", True),
    Misbehaviour("200 nested brackets", "cannot be read (nested too deeply)", True),
    Misbehaviour("200 no content type", "an answer of application/octet-stream, not JSON", True),
    Misbehaviour("200 multipart", "an answer of multipart/mixed, not JSON", True),
    Misbehaviour("200 event stream", "an answer of text/event-stream, not JSON", True),
    Misbehaviour("200 bad charset", "cannot be read (JSONDecodeError)", True),
    Misbehaviour("200 not utf-8", "cannot be read (UnicodeDecodeError)", True),
    Misbehaviour("200 without output", "malformed answer", True),
    Misbehaviour("500 nested brackets", "cannot be read (nested too deeply)", False),
    Misbehaviour("500 not utf-8", "cannot be read (UnicodeDecodeError)", False),
]


@pytest.mark.parametrize("case", UNUSABLE_ANSWERS, ids=lambda case: case.name)
def test_an_answer_that_cannot_be_used_fails_the_shot_and_a_200_counts_as_maybe_billed(
    case: Misbehaviour, tmp_path: Path
) -> None:
    path = write_manifest(tmp_path, SHOT)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        server.misbehave_next(case.name, times=10, size=case.size)
        report = run_apply(path, server, tmp_path)
        posts = server.generation_count
    (entry,) = report.entries
    assert entry.status == "failed"
    assert case.error in entry.error
    # Every POST the server received is a request the report counts; each 200 may be billed.
    assert report.requests == posts
    assert report.maybe_billed == (posts if case.billed else 0)
    assert report.billed == 0
    if case.billed:
        assert posts == 3  # given up after three lost answers, not six tries
        assert "may have billed it" in entry.error
        assert f"(+{posts} whose answer was lost, maybe billed)" in apply_summary(report)


@pytest.mark.parametrize(
    ("name", "size"), [("gzip bomb", GZIP_BOMB_BYTES), ("huge json", HUGE_JSON_BYTES)]
)
def test_a_huge_answer_is_read_no_further_than_the_cap(name: str, size: int) -> None:
    _gzip_bomb(size) if name == "gzip bomb" else None  # the server's bomb, made before measuring

    async def scenario(server: FakeDashScope) -> ProviderError:
        server.misbehave_next(name, size=size)
        provider = DashScopeProvider(ApiKey(FAKE_KEY, "the test"), base_url=server.base_url)
        async with provider:
            tracemalloc.start()
            try:
                await provider.generate(ImageRequest(prompt="a lighthouse"), label="only")
            except ProviderError as exc:
                error = exc
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        assert peak < MEMORY_BOUND, f"{peak / 2**20:.0f} MiB"
        return error

    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        error = asyncio.run(scenario(server))
    assert isinstance(error, TransientError) and error.maybe_billed
    assert f"an answer larger than {1024 * 1024} bytes" in str(error)


def test_max_cost_counts_a_200_that_cannot_be_read(tmp_path: Path) -> None:
    priced = "pricing:\n  currency: USD\n  per_image:\n    qwen-image-max: 0.075\n"
    path = write_manifest(tmp_path, SHOT.replace("shots:\n", priced + "shots:\n"))
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        server.misbehave_next("200 html as json", times=10)
        report = run_apply(path, server, tmp_path, max_cost="0.15 USD")  # two images
        posts = server.generation_count
    assert posts == 2
    assert report.bounded == "max_cost"
    assert (report.requests, report.maybe_billed) == (2, 2)


def test_a_redirect_loop_is_not_followed_and_every_post_is_counted(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, SHOT)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        server.misbehave_next("redirect loop", times=100)
        report = run_apply(path, server, tmp_path)
        posts = server.generation_count
    (entry,) = report.entries
    assert entry.status == "failed"
    assert "HTTP 307, a redirect to http://127.0.0.1:" in entry.error
    assert "API calls are never redirected" in entry.error
    assert posts == report.requests == 1  # refused, not sent again and again
    assert report.maybe_billed == 0


# ----- what the service says: redacted in every form, bounded, never obeyed -----------------------


def cli_apply(path: Path, server: FakeDashScope, home: Path) -> Any:
    env = {
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": server.base_url,
        "HOME": str(home),
        "OUTPUT_DIR": None,
    }
    return CliRunner().invoke(main, ["apply", str(path), "--rps", "100"], env=env)


def written(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): path.read_text(errors="replace")
        for path in folder.rglob("*")
        if path.is_file() and path.suffix != ".png"
    }


@pytest.mark.parametrize("transform", list(KEY_TRANSFORMS))
def test_a_key_echoed_back_in_any_form_is_redacted_everywhere(
    transform: str, tmp_path: Path
) -> None:
    path = write_manifest(tmp_path, SHOT)
    echoed = KEY_TRANSFORMS[transform](FAKE_KEY)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        server.echo_key_next(transform=transform)
        result = cli_apply(path, server, tmp_path)
    assert result.exit_code == 1, result.output
    files = written(tmp_path / "output" / "wire")
    assert "results.json" in files
    for text in (result.stdout, result.stderr, *files.values()):
        assert echoed not in text
        assert FAKE_KEY not in text
    assert "bad key " in result.stderr and "***" in result.stderr


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        # Under the answer cap: the message is kept to its first 1000 characters.
        (900_000, f"{'x' * 1000}... (899000 more characters)"),
        # Over it (the 20 MB message of the issue): not read at all.
        (20_000_000, f"DashScope answered with an answer larger than {1024 * 1024} bytes"),
    ],
    ids=["900 KB", "20 MB"],
)
def test_a_huge_message_from_the_service_is_bounded_wherever_it_is_stored_or_shown(
    size: int, shown: str, tmp_path: Path
) -> None:
    path = write_manifest(tmp_path, SHOT)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        server.misbehave_next("huge message", size=size)
        result = cli_apply(path, server, tmp_path)
    assert result.exit_code == 1, result.output
    assert shown in result.stderr
    assert len(result.stderr) + len(result.stdout) < 20_000
    files = written(tmp_path / "output" / "wire")
    # The sheet (index.html) is 20 KB without any message.
    assert files and all(len(text) < 50_000 for text in files.values()), {
        name: len(text) for name, text in files.items()
    }
    (entry,) = json.loads(files["results.json"])["shots"]
    assert shown in entry["error"]


# ----- headers: a date-form Retry-After is honoured, poison is ignored ----------------------------

NOW = 1_780_000_000.0  # a fixed "now" for the pure cases


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 1.5 ", 1.5),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),  # a date gone by: now
        ("inf", None),
        ("nan", None),
        ("1e999", None),
        ("-5", None),
        ("Infinity", None),
        ("tomorrow", None),
        ("Wed, 31 Feb 2026 99:99:99 GMT", None),
        ("Sat, 01 Jan 2000 00:00:00", None),  # no zone: not an HTTP date
        ("9" * 5000, None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates_and_nothing_else(
    value: str, seconds: float | None
) -> None:
    got = retry_after({"Retry-After": value}, now=NOW)
    assert got == (None if seconds is None else pytest.approx(seconds))


def test_a_retry_after_given_as_a_date_is_honoured(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, SHOT)
    in_an_hour = email.utils.formatdate(time.time() + 3600, usegmt=True)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        server.enqueue_error(429, "Throttling", "come back later", retry_after=in_an_hour)
        report = run_apply(path, server, tmp_path)
        posts = server.generation_count
    assert posts == 1  # not tried again at once, as when the date was ignored
    assert report.stopped is not None
    assert "asked to wait 3" in report.stopped and "run apply again later" in report.stopped


@pytest.mark.parametrize("value", ["inf", "1e999", "nan", "-1", "Infinity"])
def test_a_poisoned_retry_after_is_ignored_and_the_shot_made(value: str, tmp_path: Path) -> None:
    path = write_manifest(tmp_path, SHOT)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        server.enqueue_error(429, "Throttling", "slow down", retry_after=value)
        report = run_apply(path, server, tmp_path)
    assert report.ok, report.stopped
    assert report.stopped is None


def test_poisoned_headers_and_sizes_on_a_success_are_ignored(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, SHOT)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        server.poison_next()
        report = run_apply(path, server, tmp_path)
    assert report.ok, report.entries
    ((entry,),) = [report.entries]
    assert (entry.width, entry.height) == (1328, 1328)


# ----- the base URL -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "message"),
    [
        (
            "http://alice:hunter2@{host}/api/v1",
            "DASHSCOPE_HTTP_BASE_URL has a user name or password before the host of "
            "http://{host}/api/v1: remove them",
        ),
        ("http://hunter2@{host}/api/v1", "has a user name or password before the host"),
        ("ftp://{host}/api/v1", "must be an http:// or https:// URL with a host"),
        ("http://{host}:port/api/v1", "DASHSCOPE_HTTP_BASE_URL is not a URL imgbatch can call"),
    ],
    ids=["user and password", "user only", "not http", "port not a number"],
)
@pytest.mark.parametrize("command", ["apply", "generate"])
def test_a_base_url_imgbatch_cannot_call_is_refused_before_anything_is_sent(
    base: str, message: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_manifest(tmp_path, SHOT)
    monkeypatch.chdir(tmp_path)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        host = server.base_url.removeprefix("http://").removesuffix("/api/v1")
        env = {
            "DASHSCOPE_API_KEY": FAKE_KEY,
            "DASHSCOPE_HTTP_BASE_URL": base.format(host=host),
            "HOME": str(tmp_path),
            "OUTPUT_DIR": None,
        }
        request = ["generate", "--request", '{"prompt": "a lighthouse"}']
        args = ["apply", str(path)] if command == "apply" else request
        result = CliRunner().invoke(main, args, env=env)
        sent = len(server.requests)
    assert result.exit_code == 2, result.output
    assert message.format(host=host) in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert sent == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shots.yaml"]


@pytest.mark.parametrize("prefix", ["", "a", "ab", "Bearer ", "key="])
@pytest.mark.parametrize("urlsafe", [False, True])
def test_a_key_inside_base64_is_found_at_every_alignment(prefix: str, urlsafe: bool) -> None:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    encoded = encode(f"{prefix}{FAKE_KEY} and more".encode()).decode()
    shown = ServiceText(FAKE_KEY)(f"echo: {encoded}")
    assert "***" in shown
    # What is left either side is the prefix's and the tail's own few characters.
    assert len(shown) < len(f"echo: {encoded}") - 30


def test_service_text_is_cut_after_redaction_and_escaping() -> None:
    text = ServiceText(FAKE_KEY, limit=20)("\x1b" * 10 + FAKE_KEY + "x" * 100)
    assert text == "\\x1b" * 5 + "... (" + str(40 + 3 + 100 - 20) + " more characters)"
    assert FAKE_KEY not in ServiceText(FAKE_KEY, limit=5)(FAKE_KEY)
