"""Tests for the fake DashScope server in tests/support/fake_dashscope.py.

Takes: free ports on 127.0.0.1 only. Gives: evidence that the fake speaks the wire format that
plain HTTP clients and the dashscope SDK expect, and that each scripted fault does what it says.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from PIL import Image

try:
    from tests.support.fake_dashscope import GENERATION_PATH, FakeDashScope
    from tests.support.virtual_time import SETTLE_S, VirtualTimeLoop
except ImportError:
    # pytest's default import mode puts tests/ itself on sys.path when it is not a package.
    from fake_dashscope import GENERATION_PATH, FakeDashScope
    from virtual_time import SETTLE_S, VirtualTimeLoop

KEY = "sk-test-fake-key"
FAKE_PATH = Path(__file__).parents[1] / "support" / "fake_dashscope.py"


def async_test(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body in a fresh loop (pytest-asyncio is not a dependency)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def virtual_test(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """`async_test` on virtual time: the server's latency and quota, and the client, on a clock
    that only timers move, so what a test asserts about timing holds on a loaded machine."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        loop_factory = functools.partial(VirtualTimeLoop, settle=SETTLE_S)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(test(*args, **kwargs))

    return run


@contextlib.asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[tuple[FakeDashScope, aiohttp.ClientSession]]:
    async with FakeDashScope(**config) as server, aiohttp.ClientSession() as session:
        yield server, session


def gen_body(prompt: str = "a red fox in fresh snow", **parameters: Any) -> dict[str, Any]:
    message = {"role": "user", "content": [{"text": prompt}]}
    return {"model": "qwen-image-max", "input": {"messages": [message]}, "parameters": parameters}


async def post(
    session: aiohttp.ClientSession,
    server: FakeDashScope,
    body: Any,
    key: str | None = KEY,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    sent = {"Authorization": f"Bearer {key}"} if key else {}
    sent.update(headers or {})
    async with session.post(server.generation_url, json=body, headers=sent) as response:
        return response.status, await response.json(), response.headers


async def fetch(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes, str]:
    async with session.get(url, headers=headers) as response:
        return response.status, await response.read(), response.content_type


def image_url(payload: dict[str, Any]) -> str:
    url = payload["output"]["choices"][0]["message"]["content"][0]["image"]
    assert isinstance(url, str)
    return url


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


# ----- success --------------------------------------------------------------------------------


@async_test
async def test_success_answer_has_the_real_shape() -> None:
    async with serving() as (server, session):
        status, payload, _ = await post(session, server, gen_body(size="1328*1328", seed=42))
    assert status == 200
    (choice,) = payload["output"]["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert payload["usage"] == {"width": 1328, "height": 1328, "image_count": 1}
    assert len(payload["request_id"]) == 36
    (record,) = server.requests
    assert (record.method, record.path, record.status) == ("POST", GENERATION_PATH, 200)
    assert record.body == gen_body(size="1328*1328", seed=42)
    assert record.headers["authorization"] == f"Bearer {KEY}"
    assert (server.generation_count, server.successes) == (1, 1)


@async_test
async def test_image_is_a_png_of_the_reported_size_on_another_host() -> None:
    async with serving() as (server, session):
        _, payload, _ = await post(session, server, gen_body(size="928*1664"))
        url = image_url(payload)
        status, data, content_type = await fetch(session, url)
    parts = urlsplit(url)
    assert parts.hostname == "localhost"
    assert parts.path.startswith("/results/") and parts.path.endswith(".png")
    assert set(parse_qs(parts.query)) == {"Expires", "OSSAccessKeyId", "Signature"}
    assert (status, content_type) == (200, "image/png")
    assert png_size(data) == (928, 1664) == (payload["usage"]["width"], payload["usage"]["height"])
    (download,) = server.downloads
    assert download.status == 200 and "authorization" not in download.headers


@async_test
async def test_size_defaults_to_1664x928() -> None:
    async with serving() as (server, session):
        _, payload, _ = await post(session, server, gen_body())
        _, data, _ = await fetch(session, image_url(payload))
    assert (payload["usage"]["width"], payload["usage"]["height"]) == (1664, 928)
    assert png_size(data) == (1664, 928)


@async_test
async def test_colour_follows_prompt_and_seed() -> None:
    async with serving() as (server, session):
        colours = []
        for prompt in ["a cat", "a cat", *(f"scene number {i}" for i in range(8))]:
            _, payload, _ = await post(session, server, gen_body(prompt, size="1328*1328", seed=1))
            _, data, _ = await fetch(session, image_url(payload))
            with Image.open(io.BytesIO(data)) as image:
                colours.append(image.getpixel((0, 0)))
    assert colours[0] == colours[1]
    assert len(set(colours)) > 2


@async_test
async def test_latency_overlaps_between_requests() -> None:
    async with serving(latency=0.3) as (server, session):
        started = time.monotonic()
        results = await asyncio.gather(*(post(session, server, gen_body()) for _ in range(10)))
        elapsed = time.monotonic() - started
    assert [status for status, _, _ in results] == [200] * 10
    assert elapsed >= 0.3  # each waited the latency...
    assert server.most_in_flight == 10  # ...all ten at once, not one after the other


# ----- request errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "message"),
    [(None, "No API-key provided."), ("sk-wrong", "Invalid API-key provided.")],
)
@async_test
async def test_api_key_is_checked(key: str | None, message: str) -> None:
    async with serving() as (server, session):
        status, payload, _ = await post(session, server, gen_body(), key=key)
    assert status == 401
    assert (payload["code"], payload["message"]) == ("InvalidApiKey", message)
    assert payload["request_id"]
    assert (server.generation_count, server.successes) == (1, 0)


def _with(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**body, **changes}


INVALID_BODIES: dict[str, Any] = {
    "bad size": gen_body(size="1024*1024"),
    "size with x": gen_body(size="1664x928"),
    "bad model": _with(gen_body(), model="qwen-image"),
    "long prompt": gen_body("p" * 801),
    "long negative prompt": gen_body(negative_prompt="n" * 501),
    "negative seed": gen_body(seed=-1),
    "seed too large": gen_body(seed=2_147_483_648),
    "string seed": gen_body(seed="7"),
    "n of 2": gen_body(n=2),
    "non-bool watermark": gen_body(watermark="false"),
    "missing text": _with(
        gen_body(), input={"messages": [{"role": "user", "content": [{"image": "https://x/y"}]}]}
    ),
    "empty text": gen_body("  "),
    "messages not a list": _with(gen_body(), input={"messages": "a cat"}),
    "no input": {"model": "qwen-image-max"},
    "body not an object": ["a cat"],
}


@pytest.mark.parametrize("body", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
@async_test
async def test_invalid_parameters_are_400(body: Any) -> None:
    async with serving() as (server, session):
        status, payload, _ = await post(session, server, body)
    assert (status, payload["code"]) == (400, "InvalidParameter")
    assert server.successes == 0


@async_test
async def test_limits_themselves_are_accepted() -> None:
    body = gen_body("p" * 800, negative_prompt="n" * 500, seed=2_147_483_647, n=1)
    body["input"]["messages"][0]["content"].append({"image": "data:image/png;base64,AAAA"})
    async with serving() as (server, session):
        status, _, _ = await post(session, server, body)
    assert status == 200


@async_test
async def test_malformed_json_is_400() -> None:
    async with serving() as (server, session):
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        async with session.post(server.generation_url, data=b"{nope", headers=headers) as resp:
            status, payload = resp.status, await resp.json()
    assert (status, payload["code"]) == (400, "InvalidParameter")
    assert server.requests[0].body is None


@async_test
async def test_moderation_word_is_400_data_inspection_failed() -> None:
    async with serving(moderation_words=("FORBIDDEN", "BANNED")) as (server, session):
        status, payload, _ = await post(session, server, gen_body("a BANNED thing"))
    assert status == 400
    assert payload["code"] == "DataInspectionFailed"
    assert payload["message"] == "Input data may contain inappropriate content."


@async_test
async def test_async_mode_is_refused_like_the_real_endpoint() -> None:
    async with serving() as (server, session):
        headers = {"X-DashScope-Async": "enable"}
        status, payload, _ = await post(session, server, gen_body(), headers=headers)
    assert (status, payload["code"]) == (403, "AccessDenied")


@async_test
async def test_unknown_api_path_is_404_json() -> None:
    async with serving() as (server, session):
        async with session.get(server.base_url + "/services/nothing") as response:
            status, payload = response.status, await response.json()
    assert (status, payload["code"]) == (404, "NotFound")
    assert server.generation_count == 0 and server.status_counts[404] == 1


# ----- scripted faults ------------------------------------------------------------------------


@async_test
async def test_enqueued_errors_come_in_order_after_the_key_check() -> None:
    async with serving() as (server, session):
        server.enqueue_error(429, "Throttling.RateQuota", "slow down", times=2, retry_after=2)
        server.enqueue_error(500, "InternalError", "boom")
        wrong_key = await post(session, server, gen_body(), key="sk-wrong")
        answers = [await post(session, server, gen_body()) for _ in range(4)]
    assert wrong_key[0] == 401
    assert [status for status, _, _ in answers] == [429, 429, 500, 200]
    assert answers[0][1]["code"] == "Throttling.RateQuota"
    assert answers[0][1]["message"] == "slow down"
    assert answers[0][2]["Retry-After"] == "2"
    assert "Retry-After" not in answers[2][2]
    assert server.status_counts == {401: 1, 429: 2, 500: 1, 200: 1}


@virtual_test  # four sent at once arrive at once: none waits long enough for a token to refill
async def test_quota_answers_429_at_once_with_retry_after() -> None:
    config = {"quota_rps": 1, "quota_burst": 2, "retry_after": 1.5, "latency": 1.0}
    async with serving(**config) as (server, session):

        async def answered() -> tuple[int, dict[str, Any], Mapping[str, str], int]:
            status, payload, headers = await post(session, server, gen_body())
            return status, payload, headers, server.in_flight

        answers = await asyncio.gather(*(answered() for _ in range(4)))
    throttled = [a for a in answers if a[0] == 429]
    assert sorted(a[0] for a in answers) == [200, 200, 429, 429]
    for _, payload, headers, in_flight in throttled:
        assert payload["code"] == "Throttling.RateQuota"
        assert "rate limit" in payload["message"]
        assert headers["Retry-After"] == "1.5"
        assert in_flight == 2  # answered while the two successes were still waiting


@async_test
async def test_quota_refills_over_time() -> None:
    now = [0.0]  # the quota's clock: moved by the test, never by a slow machine
    async with serving(quota_rps=10, quota_burst=1, clock=lambda: now[0]) as (server, session):
        first = await post(session, server, gen_body())
        second = await post(session, server, gen_body())
        now[0] += 0.15
        third = await post(session, server, gen_body())
    assert [first[0], second[0], third[0]] == [200, 429, 200]
    assert "Retry-After" not in second[2]


async def _statuses_with_error_rate(seed: int) -> list[int]:
    async with serving(error_rate=0.3, seed=seed) as (server, session):
        answers = [await post(session, server, gen_body()) for _ in range(100)]
    for status, payload, _ in answers:
        if status == 500:
            assert payload["code"] == "InternalError"
    return [status for status, _, _ in answers]


@async_test
async def test_error_rate_is_roughly_respected_and_seeded() -> None:
    first = await _statuses_with_error_rate(seed=7)
    again = await _statuses_with_error_rate(seed=7)
    other = await _statuses_with_error_rate(seed=8)
    assert set(first) == {200, 500}
    assert 15 <= first.count(500) <= 45
    assert first == again
    assert first != other


@async_test
async def test_dropped_connection_raises_and_is_recorded() -> None:
    async with serving() as (server, session):
        server.enqueue_disconnect()
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(session, server, gen_body())
        status, _, _ = await post(session, server, gen_body())
    assert status == 200
    assert [r.status for r in server.requests] == [None, 200]
    assert server.requests[0].body == gen_body()
    assert (server.generation_count, server.successes) == (2, 1)


@async_test
async def test_corrupt_next_image_truncates_only_that_download() -> None:
    async with serving() as (server, session):
        server.corrupt_next_image()
        _, bad, _ = await post(session, server, gen_body())
        _, good, _ = await post(session, server, gen_body())
        bad_status, bad_data, bad_type = await fetch(session, image_url(bad))
        _, good_data, _ = await fetch(session, image_url(good))
    assert (bad_status, bad_type) == (200, "image/png")
    with pytest.raises(OSError):
        png_size(bad_data)
    assert png_size(good_data) == (1664, 928)


@async_test
async def test_wrong_size_next_misreports_usage_once() -> None:
    async with serving() as (server, session):
        server.wrong_size_next()
        _, wrong, _ = await post(session, server, gen_body(size="1472*1104"))
        _, right, _ = await post(session, server, gen_body(size="1472*1104"))
        _, data, _ = await fetch(session, image_url(wrong))
    assert png_size(data) == (1472, 1104)
    assert (wrong["usage"]["width"], wrong["usage"]["height"]) != (1472, 1104)
    assert (right["usage"]["width"], right["usage"]["height"]) == (1472, 1104)


@async_test
async def test_image_host_refuses_forgotten_unknown_tampered_and_authorized() -> None:
    async with serving() as (server, session):
        _, payload, _ = await post(session, server, gen_body())
        url = image_url(payload)
        tampered = url.replace("Signature=", "Signature=x")
        unknown = f"{server.image_base_url}/results/nope.png"
        with_key = {"Authorization": f"Bearer {KEY}"}
        before = [
            (await fetch(session, tampered))[0],
            (await fetch(session, unknown))[0],
            (await fetch(session, url, headers=with_key))[0],
            (await fetch(session, url))[0],
        ]
        server.forget_images()
        after, _, content_type = await fetch(session, url)
    assert before == [403, 404, 400, 200]
    assert (after, content_type) == (404, "application/xml")
    assert [d.status for d in server.downloads] == [403, 404, 400, 200, 404]


def test_reset_forgets_records_and_pending_faults() -> None:
    with FakeDashScope() as server:
        server.enqueue_error(500, "InternalError", "boom")
        server.corrupt_next_image()
        assert _post_sync(server.generation_url, gen_body())[0] == 500
        server.enqueue_error(500, "InternalError", "boom")
        server.reset()
        status, payload = _post_sync(server.generation_url, gen_body())
        assert status == 200
        assert _get_sync(image_url(payload))[0] == 200
        assert server.generation_count == 1


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        FakeDashScope(quota_burst=3)
    with pytest.raises(ValueError):
        FakeDashScope(error_rate=1.5)
    with pytest.raises(RuntimeError):
        _ = FakeDashScope().base_url


# ----- ways to run ----------------------------------------------------------------------------


def _post_sync(generation_url: str, body: Any, key: str = KEY) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        generation_url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


def _get_sync(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def test_thread_mode_serves_sync_clients_and_stops_cleanly() -> None:
    with FakeDashScope(api_key="sk-other") as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.base_url.endswith("/api/v1")
        assert server.image_base_url.startswith("http://localhost:")
        assert _post_sync(server.generation_url, gen_body())[0] == 401
        body = gen_body(size="1104*1472")
        status, payload = _post_sync(server.generation_url, body, key="sk-other")
        assert status == 200
        assert png_size(_get_sync(image_url(payload))[1]) == (1104, 1472)
        assert server.status_counts == {401: 1, 200: 1}
    assert not any(t.name == "fake-dashscope" for t in threading.enumerate())


@async_test
async def test_dashscope_sdk_round_trip() -> None:
    from dashscope.aigc.image_generation import AioImageGeneration

    messages = [{"role": "user", "content": [{"text": "a lighthouse at dusk"}]}]
    async with serving() as (server, session):
        call = functools.partial(
            AioImageGeneration.call,
            model="qwen-image-plus",
            messages=messages,
            size="1328*1328",
            base_address=server.base_url,
            session=session,
        )
        ok = await call(api_key=KEY)
        denied = await call(api_key="sk-wrong")
        server.enqueue_disconnect()
        resent = await call(api_key=KEY)
    assert ok.status_code == 200 and ok.request_id
    assert ok.usage["width"] == ok.usage["height"] == 1328
    assert urlsplit(ok.output.choices[0].message.content[0]["image"]).hostname == "localhost"
    assert (denied.status_code, denied.code) == (401, "InvalidApiKey")
    # The SDK resends once after a dropped connection, so the server saw (and may bill) both.
    assert resent.status_code == 200
    assert [r.status for r in server.requests] == [200, 401, None, 200]


def test_subprocess_mode_prints_urls_and_stops_on_sigterm() -> None:
    command = [
        sys.executable, str(FAKE_PATH), "--port", "0", "--latency", "0", "--quota-rps", "10",
        "--quota-burst", "10", "--error-rate", "0", "--api-key", "K",
    ]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else ""
            urls = json.loads(line)
            generation_url = urls["base_url"] + GENERATION_PATH.removeprefix("/api/v1")
            status, payload = _post_sync(generation_url, gen_body(), key="K")
            assert status == 200
            assert _get_sync(image_url(payload))[0] == 200
            assert image_url(payload).startswith(urls["image_base_url"])
        finally:
            process.terminate()
            _, stderr = process.communicate(timeout=5)
    assert process.returncode == 0, stderr
