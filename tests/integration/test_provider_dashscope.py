"""The DashScope provider's contract: what it sends, how it reads answers, how it maps errors.

Cassettes: most tests replay vcrpy cassettes from tests/cassettes/dashscope_*.yaml with
record_mode="none" (no server, no network: an unmatched request fails the test). Requests are
matched on method + path + JSON body, so a change in what the SDK sends breaks the replay. The
Authorization header is filtered out before a cassette is written; a test below checks that no
cassette holds a key.

Re-recording (only when the SDK's wire format or the fake server changes):

    IMGBATCH_RECORD=1 pytest tests/integration/test_provider_dashscope.py

starts tests/support/fake_dashscope.py on 127.0.0.1:RECORD_PORT (images on RECORD_IMAGE_PORT; both
must be free), deletes each cassette and records it again with record_mode="once". Replays point the
provider at the same RECORD_BASE_URL, where nothing listens. Review the diff and commit.

The rest run live against the `fake_server` fixture: the Authorization header itself, downloads,
redaction, and the key resolution rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import vcr
import yaml
from vcr.cassette import Cassette

from imgbatch.errors import (
    AuthError,
    ConfigError,
    PermanentError,
    ProviderError,
    RateLimited,
    TransientError,
)
from imgbatch.providers.dashscope import DashScopeProvider
from imgbatch.providers.dashscope_credentials import ApiKey, resolve_api_key
from imgbatch.shots.request import GeneratedImage, ImageRequest
from imgbatch.state.cache import verify_image
from tests.support.fake_dashscope import GENERATION_PATH, FakeDashScope
from tests.support.files import FAKE_KEY

RECORDING = os.environ.get("IMGBATCH_RECORD") == "1"
RECORD_PORT, RECORD_IMAGE_PORT = 47231, 47232
RECORD_BASE_URL = f"http://127.0.0.1:{RECORD_PORT}/api/v1"
CASSETTES = Path(__file__).resolve().parent / "cassettes"
ENV_SOURCE = "the DASHSCOPE_API_KEY environment variable"
FILE_SOURCE = "dashscope_api_key under [default] in /home/someone/.alibabacloud/credentials"
WRONG_KEY = "sk-wrong-key-fedcba9876543210"
NO_KEY_HINT = (
    "set DASHSCOPE_API_KEY, or add dashscope_api_key under [default] in "
    "~/.alibabacloud/credentials. To try a shot list without a key, use --provider placeholder."
)

Scenario = Callable[[DashScopeProvider], Awaitable[Any]]


def cassette_vcr(record_mode: str) -> vcr.VCR:
    return vcr.VCR(
        record_mode=record_mode,
        match_on=["method", "path", "body"],
        # The key, and the SDK's per-machine noise (platform string, random session id).
        filter_headers=["authorization", "user-agent", "x-dashscope-sdk-session-id"],
        decode_compressed_response=True,
    )


async def drive(key: ApiKey, base_url: str, scenario: Scenario) -> Any:
    provider = DashScopeProvider(key, environ={"DASHSCOPE_HTTP_BASE_URL": base_url})
    async with provider:
        return await scenario(provider)


def replay(
    name: str,
    scenario: Scenario,
    *,
    key: ApiKey | None = None,
    script: Callable[[FakeDashScope], None] | None = None,
) -> tuple[Any, Cassette]:
    """Run `scenario` against the cassette `name`, recording it first when IMGBATCH_RECORD=1.

    `script` sets up the fake server's faults; it runs only while recording.
    """
    key = key or ApiKey(FAKE_KEY, ENV_SOURCE)
    path = CASSETTES / f"{name}.yaml"
    server: contextlib.AbstractContextManager[FakeDashScope | None]
    if RECORDING:
        path.parent.mkdir(exist_ok=True)
        path.unlink(missing_ok=True)
        server = FakeDashScope(api_key=FAKE_KEY, port=RECORD_PORT, image_port=RECORD_IMAGE_PORT)
    else:
        if not path.is_file():
            pytest.fail(f"missing cassette {path}: record it with IMGBATCH_RECORD=1")
        server = contextlib.nullcontext()
    with server as running:
        if running is not None and script is not None:
            script(running)
        with cassette_vcr("once" if RECORDING else "none").use_cassette(str(path)) as cassette:
            outcome = asyncio.run(drive(key, RECORD_BASE_URL, scenario))
    if not RECORDING:
        assert cassette.all_played, f"{name}: not every recorded request was sent again"
    return outcome, cassette


def sent_bodies(cassette: Cassette) -> list[Any]:
    """The JSON bodies of the POSTs; with match_on body, these equal what was just sent."""
    return [json.loads(r.body) for r in cassette.requests if r.method == "POST"]


async def catch(call: Awaitable[Any]) -> ProviderError:
    try:
        await call
    except ProviderError as exc:
        return exc
    raise AssertionError("expected a ProviderError")


# ----- cassettes: the request and the answer ------------------------------------------------------


def test_generate_sends_the_sdk_body_text_only_and_parses_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A prompt that names an existing file: the SDK alone would upload it and send an OSS URL.
    # (Relative, so the body is the same on every machine; an upload would be an unrecorded
    # request and fail the replay.)
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("not an image", encoding="utf-8")
    plain = ImageRequest(
        prompt="notes.txt",
        model="qwen-image-plus",
        size="1328*1328",
        negative_prompt="blurry, text",
        seed=42,
    )
    styled = ImageRequest(prompt="a red bicycle", style="watercolour", size="928*1664")

    async def scenario(provider: DashScopeProvider) -> tuple[Any, ...]:
        first = await provider.generate(plain, label="plain")
        second = await provider.generate(styled, label="styled")
        data = await provider.fetch_bytes(first)
        return first, second, data

    (first, second, data), cassette = replay("dashscope_generate", scenario)
    assert sent_bodies(cassette) == [
        {
            "model": "qwen-image-plus",
            "input": {"messages": [{"role": "user", "content": [{"text": "notes.txt"}]}]},
            "parameters": {
                "size": "1328*1328",
                "prompt_extend": False,
                "watermark": False,
                "negative_prompt": "blurry, text",
                "seed": 42,
            },
        },
        {
            "model": "qwen-image-max",
            "input": {
                "messages": [
                    {"role": "user", "content": [{"text": "a red bicycle\nStyle: watercolour"}]}
                ]
            },
            # No seed and no negative prompt: left out, not sent as null.
            "parameters": {"size": "928*1664", "prompt_extend": False, "watermark": False},
        },
    ]
    assert [(r.method, r.path) for r in cassette.requests] == [
        ("POST", GENERATION_PATH),
        ("POST", GENERATION_PATH),
        ("GET", urlsplit(first.image_url).path),
    ]

    assert isinstance(first, GeneratedImage)
    assert first.image_url.startswith(f"http://localhost:{RECORD_IMAGE_PORT}/results/")
    assert "Signature=" in first.image_url
    assert (first.width, first.height, first.seed) == (1328, 1328, 42)
    recorded = json.loads(cassette.responses[0]["body"]["string"])
    assert first.request_id == recorded["request_id"]
    assert first.image_url == recorded["output"]["choices"][0]["message"]["content"][0]["image"]
    assert (second.width, second.height, second.seed) == (928, 1664, None)
    assert second.request_id and second.request_id != first.request_id
    verify_image(data, 1328, 1328)


ERROR_CASES: dict[str, dict[str, Any]] = {
    "dashscope_400_moderation": {
        "request": ImageRequest(prompt="a FORBIDDEN poster"),
        "error": PermanentError,
        "status": 400,
        "code": "DataInspectionFailed",
        "message": "400 DataInspectionFailed: Input data may contain inappropriate content.",
    },
    "dashscope_400_invalid_size": {
        "request": ImageRequest(prompt="a square bicycle", size="1024*1024"),
        "error": PermanentError,
        "status": 400,
        "code": "InvalidParameter",
        "message": "400 InvalidParameter: size must be one of "
        "1664*928, 1472*1104, 1328*1328, 1104*1472, 928*1664.",
    },
    "dashscope_401": {
        "request": ImageRequest(prompt="a bicycle, wrong key"),
        "key": ApiKey(WRONG_KEY, ENV_SOURCE),
        "error": AuthError,
        "status": 401,
        "code": "InvalidApiKey",
        "message": "401 InvalidApiKey: Invalid API-key provided. "
        f"(using the API key from {ENV_SOURCE})",
    },
    "dashscope_403": {
        "request": ImageRequest(prompt="a bicycle, no access"),
        "key": ApiKey(FAKE_KEY, FILE_SOURCE),
        "script": lambda s: s.enqueue_error(403, "AccessDenied", "Access denied."),
        "error": AuthError,
        "status": 403,
        "code": "AccessDenied",
        "message": f"403 AccessDenied: Access denied. (using the API key from {FILE_SOURCE})",
    },
    "dashscope_429_retry_after": {
        "request": ImageRequest(prompt="a bicycle, throttled with Retry-After"),
        "script": lambda s: s.enqueue_error(
            429, "Throttling.RateQuota", "Requests rate limit exceeded.", retry_after=7
        ),
        "error": RateLimited,
        "status": 429,
        "code": "Throttling.RateQuota",
        "retry_after": 7.0,
    },
    "dashscope_429": {
        "request": ImageRequest(prompt="a bicycle, throttled"),
        "script": lambda s: s.enqueue_error(429, "Throttling", "Too many requests."),
        "error": RateLimited,
        "status": 429,
        "code": "Throttling",
        "retry_after": None,
    },
    "dashscope_500": {
        "request": ImageRequest(prompt="a bicycle, server error"),
        "script": lambda s: s.enqueue_error(500, "InternalError", "An internal error."),
        "error": TransientError,
        "status": 500,
        "code": "InternalError",
        "message": "500 InternalError: An internal error.",
        "retry_after": None,
    },
    "dashscope_408": {
        "request": ImageRequest(prompt="a bicycle, request timeout"),
        "script": lambda s: s.enqueue_error(408, "RequestTimeOut", "Request timed out."),
        "error": TransientError,
        "status": 408,
        "code": "RequestTimeOut",
    },
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_error_statuses_map_to_exception_classes(name: str) -> None:
    case = ERROR_CASES[name]
    request: ImageRequest = case["request"]

    async def scenario(provider: DashScopeProvider) -> ProviderError:
        return await catch(provider.generate(request, label=name))

    error, cassette = replay(name, scenario, key=case.get("key"), script=case.get("script"))
    assert len(cassette) == 1
    assert type(error) is case["error"]
    assert error.status == case["status"]
    assert error.code == case["code"]
    recorded = json.loads(cassette.responses[0]["body"]["string"])
    assert error.request_id == recorded["request_id"]
    if "message" in case:
        assert str(error) == case["message"]
    # A 429 is its own class (the pacer's cue), every other transient answer is not.
    assert isinstance(error, RateLimited) is (case["status"] == 429)
    if isinstance(error, TransientError):
        if "retry_after" in case:
            assert error.retry_after == case["retry_after"]
    key: ApiKey | None = case.get("key")
    if key is not None:
        assert key.value not in str(error)


def test_no_cassette_holds_a_key_or_an_authorization_header() -> None:
    files = sorted(CASSETTES.glob("*.yaml"))
    assert {f.stem for f in files} >= {"dashscope_generate", *ERROR_CASES}
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert FAKE_KEY not in text and WRONG_KEY not in text, path
        assert "Bearer" not in text, path
        for interaction in yaml.safe_load(text)["interactions"]:
            headers = {name.lower() for name in interaction["request"]["headers"]}
            assert "authorization" not in headers, path


# ----- live, against the fake server --------------------------------------------------------------


def test_live_key_only_in_the_api_calls_authorization_header(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    existing = tmp_path / "reference.png"
    existing.write_bytes(b"\x89PNG not really")
    request = ImageRequest(prompt=str(existing), size="1104*1472", seed=3)
    cassette_path = tmp_path / "live.yaml"

    async def scenario() -> tuple[GeneratedImage, bytes]:
        provider = DashScopeProvider(resolve_api_key(os.environ), environ=os.environ)
        async with provider:
            image = await provider.generate(request, label="live")
            return image, await provider.fetch_bytes(image)

    with cassette_vcr("once").use_cassette(str(cassette_path)):
        image, data = asyncio.run(scenario())

    # The live request carried the key, as a bearer token, and nothing else did.
    (api_call,) = fake_server.requests
    assert api_call.headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert api_call.path == GENERATION_PATH
    # The file named by the prompt was not uploaded: no other request, the text sent as is.
    assert api_call.body["input"]["messages"] == [
        {"role": "user", "content": [{"text": str(existing)}]}
    ]
    assert api_call.body["parameters"]["seed"] == 3
    (download,) = fake_server.downloads_when_done(1)
    assert "authorization" not in download.headers
    assert download.headers["host"].startswith("localhost:")
    assert download.status == 200
    verify_image(data, image.width, image.height)
    # The same exchange, written to a cassette, has no trace of the key.
    text = cassette_path.read_text(encoding="utf-8")
    assert FAKE_KEY not in text
    assert "authorization" not in text.lower()


def test_base_url_is_read_at_each_call(fake_server: FakeDashScope) -> None:
    environ: dict[str, str] = {}
    provider = DashScopeProvider(ApiKey(FAKE_KEY, ENV_SOURCE), environ=environ)
    assert provider.base_url.startswith("https://")  # the SDK's default until configured
    environ["DASHSCOPE_HTTP_BASE_URL"] = fake_server.base_url
    assert provider.base_url == fake_server.base_url

    async def scenario() -> GeneratedImage:
        async with provider:
            return await provider.generate(ImageRequest(prompt="late base url"), label="x")

    image = asyncio.run(scenario())
    assert fake_server.successes == 1
    assert image.image_url.startswith(fake_server.image_base_url)


def test_a_key_echoed_by_the_service_is_redacted(fake_server: FakeDashScope) -> None:
    fake_server.enqueue_error(400, "InvalidParameter", f"Bad header: Bearer {FAKE_KEY}.")
    provider = DashScopeProvider(
        ApiKey(FAKE_KEY, ENV_SOURCE), environ={"DASHSCOPE_HTTP_BASE_URL": fake_server.base_url}
    )

    async def scenario() -> ProviderError:
        async with provider:
            return await catch(provider.generate(ImageRequest(prompt="echo"), label="x"))

    error = asyncio.run(scenario())
    assert isinstance(error, PermanentError)
    assert str(error) == "400 InvalidParameter: Bad header: Bearer ***."
    assert FAKE_KEY not in error.detail


def test_expired_download_is_a_transient_error(fake_server: FakeDashScope) -> None:
    provider = DashScopeProvider(
        ApiKey(FAKE_KEY, ENV_SOURCE), environ={"DASHSCOPE_HTTP_BASE_URL": fake_server.base_url}
    )

    async def scenario() -> ProviderError:
        async with provider:
            image = await provider.generate(ImageRequest(prompt="soon gone"), label="x")
            fake_server.forget_images()
            return await catch(provider.fetch_bytes(image))

    error = asyncio.run(scenario())
    assert type(error) is TransientError
    assert error.status == 404
    assert str(error) == "404: image download answered HTTP 404"
    assert [d.status for d in fake_server.downloads] == [404]


def test_dropped_connection_is_transient_and_not_sent_again_by_the_sdk(
    fake_server: FakeDashScope,
) -> None:
    # The SDK would re-send once by itself: a second image paid for one answer lost.
    fake_server.enqueue_disconnect(times=2)
    provider = DashScopeProvider(
        ApiKey(FAKE_KEY, ENV_SOURCE), environ={"DASHSCOPE_HTTP_BASE_URL": fake_server.base_url}
    )

    async def scenario() -> ProviderError:
        async with provider:
            return await catch(provider.generate(ImageRequest(prompt="dropped"), label="x"))

    error = asyncio.run(scenario())
    assert type(error) is TransientError
    assert error.code == "ConnectionDropped"
    assert error.maybe_billed
    assert fake_server.status_counts == {None: 1}
    assert provider.wire.posts_sent == 1


def test_provider_outside_async_with_is_an_error() -> None:
    provider = DashScopeProvider(ApiKey(FAKE_KEY, ENV_SOURCE), environ={})
    with pytest.raises(ProviderError, match="outside `async with`"):
        asyncio.run(provider.generate(ImageRequest(prompt="x"), label="x"))


# ----- keys ---------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "home"
    folder.mkdir()
    yield folder


def credentials(home: Path, text: str) -> Path:
    path = home / ".alibabacloud" / "credentials"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_environment_key_wins_over_the_credentials_file(home: Path) -> None:
    credentials(home, "[default]\ndashscope_api_key = sk-from-file\n")
    key = resolve_api_key({"DASHSCOPE_API_KEY": "  sk-from-env \n", "HOME": str(home)})
    assert key.value == "sk-from-env"
    assert key.source == ENV_SOURCE


def test_credentials_file_is_used_when_the_variable_is_unset_or_blank(home: Path) -> None:
    path = credentials(
        home,
        "[other]\ndashscope_api_key = sk-other\n[default]\ndashscope_api_key = sk-from-file  \n",
    )
    for environ in ({"HOME": str(home)}, {"HOME": str(home), "DASHSCOPE_API_KEY": "   "}):
        key = resolve_api_key(environ)
        assert key.value == "sk-from-file"
        assert key.source == f"dashscope_api_key under [default] in {path}"
    # An explicit home wins over $HOME.
    assert resolve_api_key({"HOME": "/nonexistent"}, home).value == "sk-from-file"


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "[default]\n",
        "[default]\ndashscope_api_key =\n",
        "[work]\ndashscope_api_key = sk-not-default\n",
        "[default]\naccess_key_id = AKID\n",
    ],
)
def test_no_key_is_a_config_error_with_the_whole_message(home: Path, text: str | None) -> None:
    if text is not None:
        credentials(home, text)
    with pytest.raises(ConfigError) as caught:
        resolve_api_key({"HOME": str(home)})
    looked = f"DASHSCOPE_API_KEY, {home}/.alibabacloud/credentials, {home}/.dashscope/api_key"
    assert str(caught.value) == f"No DashScope API key (looked in {looked}): {NO_KEY_HINT}"


@pytest.mark.parametrize(
    ("where", "source"),
    [
        ("credentials-double", "dashscope_api_key under [default]"),
        ("credentials-single", "dashscope_api_key under [default]"),
        ("sdk-file", "the key file"),
        ("sdk-env-file", "the key file"),
        ("env-quoted", "the DASHSCOPE_API_KEY environment variable"),
    ],
)
def test_keys_in_every_place_are_found_without_their_quotes(
    home: Path, tmp_path: Path, where: str, source: str
) -> None:
    environ = {"HOME": str(home)}
    if where == "credentials-double":
        credentials(home, '[default]\ndashscope_api_key = "sk-quoted-1"\n')
    elif where == "credentials-single":
        credentials(home, "[default]\ndashscope_api_key = 'sk-quoted-1'\n")
    elif where == "sdk-file":
        (home / ".dashscope").mkdir()
        (home / ".dashscope" / "api_key").write_text("sk-quoted-1\n")
    elif where == "sdk-env-file":
        path = tmp_path / "elsewhere.key"
        path.write_text("sk-quoted-1")
        environ["DASHSCOPE_API_KEY_FILE_PATH"] = str(path)
    else:
        environ["DASHSCOPE_API_KEY"] = '"sk-quoted-1"'
    key = resolve_api_key(environ)
    assert key.value == "sk-quoted-1"
    assert source in key.source


def test_an_unreadable_credentials_file_does_not_quote_the_key(home: Path) -> None:
    path = credentials(home, "dashscope_api_key = sk-secret-in-a-broken-file\n")
    with pytest.raises(ConfigError) as caught:
        resolve_api_key({"HOME": str(home)})
    message = str(caught.value)
    assert message == f"{path} is not a valid INI file (MissingSectionHeaderError)"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_printing_a_key_or_a_provider_never_shows_the_key() -> None:
    key = ApiKey(FAKE_KEY, ENV_SOURCE)
    provider = DashScopeProvider(key, environ={})
    shown = [
        repr(key),
        str(key),
        f"{key}",
        f"{key!r}",
        repr(provider),
        str(provider),
        provider.describe_credentials(),
        repr([key]),
    ]
    for text in shown:
        assert FAKE_KEY not in text
    assert str(key) == f"<API key from {ENV_SOURCE}>"
    assert provider.describe_credentials() == f"API key from {ENV_SOURCE}"
    assert ENV_SOURCE in repr(key)
