"""A fake DashScope server for Qwen Image generation, for tests and benchmarks.

Takes: HTTP requests in the real wire format of
``POST {base}/services/aigc/multimodal-generation/generation`` (Bearer key, JSON body with
``model``, ``input.messages`` and ``parameters``), plus scripted faults set by the test
(queued errors, dropped connections, corrupt or wrongly sized images, a rate quota, random 500s,
cut, stalled, slow and redirected downloads, a key echoed back, plain or transformed, and images
whose bytes the test chooses: an EPS, a DDS, a decode bomb, a JPEG, or a PNG sent gzip-encoded)
and the misbehaviours of a hostile API (``misbehave_next``: gzip bombs, huge answers, 200s that
are not JSON, redirect loops, huge messages, poisoned headers; see ``MISBEHAVIOURS``).
Gives: DashScope-shaped JSON answers, with the real answer's headers (``x-request-id``,
``req-cost-time``), whose image URLs point at a second listener that plays the OSS bucket (a
different host name, ``localhost``, with a signed-looking query string) and serves PNGs of the
reported size; and a record of every request either listener received.

Images are small solid-colour PNGs by default (``image_profile="tiny"``), which keeps the test
loop fast; a test about downloads asks for images as hostile as the real ones
(``image_profile="real"``, or the ``real_images`` marker with the ``fake_server`` fixture): 3 to
4 MB of mostly incompressible PNG, sent with a ``Content-Length`` in chunks of ``chunk_size``
bytes, ``chunk_delay`` seconds apart (a throttled link). The benchmarks serve real ones. A real
generation takes about 16.5 s (``REAL_LATENCY_S``); tests pass a scaled ``latency``.

Three ways to run it:

* ``with FakeDashScope() as server:`` runs both listeners in a background thread with its own
  event loop (for sync tests);
* ``async with FakeDashScope() as server:`` runs them in the current event loop (on virtual
  time, `tests/support/virtual_time.py`'s `VirtualServer`, for timing a test asserts);
* ``python tests/support/fake_dashscope.py --port 0 --latency 0.5`` prints one JSON line with
  ``base_url`` and ``image_base_url`` once listening, then serves until SIGTERM or SIGINT.

Only 127.0.0.1 is ever bound and nothing else is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import io
import json
import random
import secrets
import signal
import sys
import threading
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

API_PREFIX = "/api/v1"
GENERATION_PATH = f"{API_PREFIX}/services/aigc/multimodal-generation/generation"
MODELS = frozenset(
    {
        "qwen-image-max",
        "qwen-image-max-2025-12-30",
        "qwen-image-plus",
        "qwen-image-plus-2026-01-09",
    }
)
SIZES: dict[str, tuple[int, int]] = {
    "1664*928": (1664, 928),
    "1472*1104": (1472, 1104),
    "1328*1328": (1328, 1328),
    "1104*1472": (1104, 1472),
    "928*1664": (928, 1664),
}
DEFAULT_SIZE = "1664*928"
MAX_PROMPT_CHARS = 800
MAX_NEGATIVE_PROMPT_CHARS = 500
MAX_SEED = 2_147_483_647
# Images in the real service stay downloadable for 24 hours.
URL_LIFETIME_S = 24 * 3600
# A small palette keeps the PNG cache tiny: at most len(PALETTE) * len(SIZES) encodes, ever.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (0, 0, 128),
)  # fmt: skip
RATE_LIMIT_MESSAGE = "Requests rate limit exceeded, please try again later."
MODERATION_MESSAGE = "Input data may contain inappropriate content."
# What one qwen-image-max generation took in the recorded real answer (API_NOTES.md).
REAL_LATENCY_S = 16.5
IMAGE_PROFILES = ("real", "tiny")
# The share of a "real" image's rows that are noise: a 1664*928 PNG comes out near 3.3 MB,
# a 1328*1328 one near 3.7 MB, like the service's 1 to 4 MB images, and no compressor shrinks it.
NOISE_SHARE = 0.7
# "Real" images vary over a few colours only: each is megabytes held in memory.
REAL_COLOURS = 4
DEFAULT_CHUNK_SIZE = 64 * 1024
INTERNAL_ERROR_MESSAGE = "An internal error has occurred, please try again later."
ASYNC_MESSAGE = "current user api does not support asynchronous calls"
# In-flight requests get this long to finish when the server stops; a test that closes the
# server under load should not wait out the simulated latency.
SHUTDOWN_GRACE_S = 0.25


@dataclass(frozen=True)
class RecordedRequest:
    """One request a listener received, with the status it answered.

    ``headers`` keys are lower-cased, since HTTP header names are case-insensitive.
    ``status`` is None when the connection was dropped (or the server stopped) instead.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int | None
    query: str = ""
    received_at: float = 0.0  # on arrival, by the server's clock (its event loop's, by default)


class ApiError(Exception):
    """An answer in DashScope's error shape: HTTP status plus JSON ``code`` and ``message``."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | str | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class _Disconnect:
    """Queued fault: drop the connection instead of answering."""


class _Stall:
    """Queued fault: take the request and never answer it (until the server stops)."""


@dataclass(frozen=True)
class _EchoKey:
    """Queued fault: a 400 whose code, message and request id all carry the caller's key, put
    through ``transform`` (a name in ``KEY_TRANSFORMS``)."""

    transform: str = "plain"


# How a service (or a proxy) might echo a key back: each must be redacted all the same.
KEY_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "plain": lambda key: key,
    "upper-case": str.upper,
    "reversed": lambda key: key[::-1],
    "truncated by one": lambda key: key[:-1],
    "base64": lambda key: base64.b64encode(key.encode()).decode(),
    "base64 of the header": lambda key: base64.b64encode(f"Bearer {key}".encode()).decode(),
    "url-safe base64, no padding": (
        lambda key: base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    ),
}


@dataclass(frozen=True)
class _Misbehave:
    """Queued fault: answer with whatever a hostile server sends (see ``MISBEHAVIOURS``)."""

    name: str
    size: int


_Fault = ApiError | _Disconnect | _Stall | _EchoKey | _Misbehave


@dataclass(frozen=True)
class _Generation:
    model: str
    prompt: str
    width: int
    height: int
    seed: int | None


@dataclass(frozen=True)
class _Served:
    """Scripted image bytes: served instead of a drawn PNG (`body` None: the drawn one), with
    this Content-Type, and gzip-encoded on the wire when `gzip`."""

    body: bytes | None
    content_type: str
    gzip: bool


@dataclass(frozen=True)
class _StoredImage:
    width: int
    height: int
    colour: int
    signature: str
    corrupt: bool
    served: _Served | None = None


def loop_clock() -> float:
    """The running event loop's time (time.monotonic outside one, as a real loop's is)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class TokenBucket:
    """A rate quota: ``rate`` tokens per second, holding at most ``burst``, full at the start.

    On the server's clock (its loop's by default); the pacer's simulations pass the virtual one.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = loop_clock) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        # Read at the first request, in the loop that serves it (full until then anyway).
        self._last: float | None = None

    def try_take(self) -> bool:
        now = self._clock()
        last = now if self._last is None else self._last
        self._tokens = min(self._burst, self._tokens + (now - last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class FakeDashScope:
    """Fake DashScope API plus fake OSS image host; see the module docstring."""

    def __init__(
        self,
        *,
        api_key: str = "sk-test-fake-key",
        latency: float = 0.0,
        quota_rps: float | None = None,
        quota_burst: int | None = None,
        retry_after: float | None = None,
        error_rate: float = 0.0,
        seed: int = 0,
        moderation_words: Sequence[str] = ("FORBIDDEN",),
        reject_download_auth: bool = True,
        image_profile: str = "tiny",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_delay: float = 0.0,
        send_content_length: bool = True,
        disconnect_rate: float = 0.0,
        cut_download_rate: float = 0.0,
        redirect_images: bool = False,
        port: int = 0,
        image_port: int = 0,
        quota_window: tuple[int, float] | None = None,
        max_in_progress: int | None = None,
        state_quota: bool | tuple[int, float] = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if image_profile not in IMAGE_PROFILES:
            raise ValueError(f"image_profile must be one of {', '.join(IMAGE_PROFILES)}")
        if chunk_size < 1 or chunk_delay < 0:
            raise ValueError("chunk_size must be positive and chunk_delay not negative")
        rates = {"disconnect_rate": disconnect_rate, "cut_download_rate": cut_download_rate}
        for name, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if quota_burst is not None and quota_rps is None:
            raise ValueError("quota_burst needs quota_rps")
        if quota_rps is not None and quota_rps <= 0:
            raise ValueError("quota_rps must be positive")
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError("error_rate must be within [0, 1]")
        self.api_key = api_key
        self.latency = latency
        self.retry_after = retry_after
        self.error_rate = error_rate
        self.moderation_words = tuple(moderation_words)
        self.reject_download_auth = reject_download_auth
        self.image_profile = image_profile
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        self.send_content_length = send_content_length
        self.disconnect_rate = disconnect_rate
        self.cut_download_rate = cut_download_rate
        self.redirect_images = redirect_images
        self.requests: list[RecordedRequest] = []
        self.downloads: list[RecordedRequest] = []
        # API requests received and not yet answered (or dropped), and the most at once.
        self.in_flight = self.most_in_flight = 0
        # Every time the server keeps (arrivals, quotas, the answer's cost time) is on one clock:
        # by default its event loop's, which is time.monotonic on a real loop and virtual on a
        # virtual-time one, so a test on virtual time sees the server's timing exactly.
        self._clock = clock or loop_clock
        self._quota = _make_bucket(quota_rps, quota_burst, self._clock)
        self.shapes = QuotaShapes(quota_window, max_in_progress, state_quota, self._clock)
        self._rng = random.Random(seed)
        self._port = port
        self._image_port = image_port
        # Test threads enqueue faults while the server loop consumes them.
        self._lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self._pending: Counter[str] = Counter()  # "corrupt" / "wrong_size" toggles still due
        self._served: deque[_Served] = deque()  # scripted image bytes for the next successes
        self._images: dict[str, _StoredImage] = {}
        self._png_cache: dict[tuple[int, int, int], bytes] = {}
        self._runners: list[web.AppRunner] = []
        self._base_url: str | None = None
        # Kept after the server stops: a test of a closed port needs an address nobody serves.
        self.last_base_url: str | None = None
        self._image_base_url: str | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._thread_stop: asyncio.Event | None = None
        self._thread_error: BaseException | None = None

    # ----- addresses and records -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/api/v1``: what DashScope clients call ``base_address``."""
        if self._base_url is None:
            raise RuntimeError("FakeDashScope is not running")
        return self._base_url

    @property
    def image_base_url(self) -> str:
        """``http://localhost:PORT2``: the fake OSS host the image URLs point at."""
        if self._image_base_url is None:
            raise RuntimeError("FakeDashScope is not running")
        return self._image_base_url

    @property
    def generation_url(self) -> str:
        return self.base_url + GENERATION_PATH.removeprefix(API_PREFIX)

    @property
    def generation_count(self) -> int:
        """Generation POSTs received, whatever they were answered (or not)."""
        return sum(1 for r in list(self.requests) if _is_generation(r.method, r.path))

    @property
    def status_counts(self) -> Counter[int | None]:
        """API answers by HTTP status; None counts dropped connections."""
        return Counter(r.status for r in list(self.requests))

    @property
    def successes(self) -> int:
        """Generations answered 200, i.e. images that would have been billed."""
        return self.status_counts[200]

    def downloads_when_done(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """The downloads, once `count` are recorded: a download is recorded when its handler
        ends, which may be just after the client has read the last byte."""
        deadline = time.monotonic() + timeout
        while len(self.downloads) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.downloads)

    def reset(self) -> None:
        """Forget records and pending scripted faults (not the quota, rng or images)."""
        with self._lock:
            self.requests.clear()
            self.downloads.clear()
            self._faults.clear()
            self._pending.clear()

    # ----- scripted faults ---------------------------------------------------------------------

    def enqueue_error(
        self,
        status: int,
        code: str,
        message: str,
        times: int = 1,
        retry_after: float | str | None = None,
    ) -> None:
        """Answer the next ``times`` authenticated generation requests with this error.

        ``retry_after``: seconds, or a header value as given (an HTTP date, or poison).

        Queued faults (errors and disconnects) are served in the order they were queued, right
        after the API key check and before quota, validation and latency.
        """
        with self._lock:
            self._faults.extend(ApiError(status, code, message, retry_after) for _ in range(times))

    def enqueue_disconnect(self, times: int = 1) -> None:
        """Drop the connection of the next ``times`` authenticated generation requests.

        The body is read and the latency waited first, as if the server took the job and the
        connection died before the answer; the request is recorded with status None.
        """
        with self._lock:
            self._faults.extend(_Disconnect() for _ in range(times))

    def stall_next_generation(self, times: int = 1) -> None:
        """Take the next ``times`` authenticated generation requests and never answer them."""
        with self._lock:
            self._faults.extend(_Stall() for _ in range(times))

    def echo_key_next(self, times: int = 1, transform: str = "plain") -> None:
        """Answer the next ``times`` generation requests with a 400 that quotes the caller's key
        in its ``code``, ``message`` and ``request_id`` (and its ``x-request-id`` header), put
        through ``transform`` (a name in ``KEY_TRANSFORMS``: upper-case, reversed, base64...)."""
        if transform not in KEY_TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(KEY_TRANSFORMS)}")
        with self._lock:
            self._faults.extend(_EchoKey(transform) for _ in range(times))

    def misbehave_next(self, name: str, times: int = 1, size: int = 0) -> None:
        """Answer the next ``times`` authenticated generation requests as ``name`` says (a key of
        ``MISBEHAVIOURS``); ``size`` is the bytes a bomb inflates to, or a message's length."""
        if name not in MISBEHAVIOURS:
            raise ValueError(f"name must be one of {', '.join(MISBEHAVIOURS)}")
        with self._lock:
            self._faults.extend(_Misbehave(name, size) for _ in range(times))

    def echo_key_in_next_url(self, times: int = 1) -> None:
        """Put the caller's key into the signed image URL of the next ``times`` successes."""
        with self._lock:
            self._pending["echo_url"] += times

    def cut_next_download(self, times: int = 1) -> None:
        """Cut the next ``times`` image downloads short: half the bytes, then close."""
        with self._lock:
            self._pending["cut"] += times

    def stall_next_download(self, times: int = 1) -> None:
        """Send the headers and first chunk of the next ``times`` image downloads, then nothing."""
        with self._lock:
            self._pending["stall"] += times

    def corrupt_next_image(self, times: int = 1) -> None:
        """Serve truncated PNG bytes for the images of the next ``times`` successes."""
        with self._lock:
            self._pending["corrupt"] += times

    def wrong_size_next(self, times: int = 1) -> None:
        """Report half the real width and height in ``usage`` for the next ``times`` successes."""
        with self._lock:
            self._pending["wrong_size"] += times

    def no_image_next(self, times: int = 1) -> None:
        """Answer the next ``times`` successes 200 with a text item and no image."""
        with self._lock:
            self._pending["no_image"] += times

    def poison_next(self, times: int = 1) -> None:
        """Give the next ``times`` successes poisoned extras: a flow-control header nested too
        deep for a JSON parser, and ``usage`` sizes of Infinity (the image itself is sound)."""
        with self._lock:
            self._pending["poison"] += times

    def small_image_next(self, times: int = 1) -> None:
        """Make the next ``times`` images 64*64 whatever size was asked, and report 64*64."""
        with self._lock:
            self._pending["small"] += times

    def serve_next_image(
        self,
        body: bytes | None = None,
        *,
        content_type: str = "image/png",
        gzip: bool = False,
        times: int = 1,
    ) -> None:
        """Serve `body` (an EPS, a DDS, a decode bomb, a JPEG...) as the image of the next
        ``times`` successes, labelled `content_type`; with `gzip`, sent gzip-encoded
        (``Content-Encoding: gzip``, ``Content-Length`` of the compressed bytes), and without a
        `body`, the drawn PNG is what is compressed."""
        with self._lock:
            self._served.extend(_Served(body, content_type, gzip) for _ in range(times))

    def forget_images(self) -> None:
        """Make every image URL handed out so far answer 404, like an expired result."""
        with self._lock:
            self._images.clear()

    # ----- running in the current loop ---------------------------------------------------------

    async def astart(self) -> FakeDashScope:
        """Start both listeners in the running event loop."""
        if self._runners:
            raise RuntimeError("FakeDashScope is already running")
        try:
            api_port = await self._listen(self._api_app(), self._port)
            image_port = await self._listen(self._image_app(), self._image_port)
        except BaseException:
            await self.astop()
            raise
        self._base_url = f"http://127.0.0.1:{api_port}{API_PREFIX}"
        self.last_base_url = self._base_url
        # Another host name than the API's, so clients that leak API headers to it get caught.
        self._image_base_url = f"http://localhost:{image_port}"
        return self

    async def astop(self) -> None:
        """Stop both listeners; in-flight requests get SHUTDOWN_GRACE_S to finish."""
        runners, self._runners = self._runners, []
        # Together, so the shutdown grace periods of the two hosts overlap.
        await asyncio.gather(*(runner.cleanup() for runner in runners))
        self._base_url = None
        self._image_base_url = None

    async def __aenter__(self) -> FakeDashScope:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()

    async def _listen(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return int(runner.addresses[0][1])

    # ----- running in a background thread ------------------------------------------------------

    def start(self) -> FakeDashScope:
        """Start both listeners on a background thread with its own event loop."""
        if self._thread is not None:
            raise RuntimeError("FakeDashScope is already running")
        ready = threading.Event()
        self._thread_error = None
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="fake-dashscope", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._thread_error is not None:
            self._thread.join()
            self._thread = None
            raise self._thread_error
        return self

    def stop(self) -> None:
        """Stop the background thread's listeners and join it."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._thread_loop is not None and self._thread_stop is not None:
            self._thread_loop.call_soon_threadsafe(self._thread_stop.set)
        thread.join()

    def __enter__(self) -> FakeDashScope:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _thread_main(self, ready: threading.Event) -> None:
        try:
            # asyncio.run also cancels leftovers and closes the loop, so nothing leaks a warning.
            asyncio.run(self._serve_in_thread(ready))
        except Exception as exc:
            self._thread_error = exc
        finally:
            self._thread_loop = None
            self._thread_stop = None
            ready.set()

    async def _serve_in_thread(self, ready: threading.Event) -> None:
        self._thread_loop = asyncio.get_running_loop()
        self._thread_stop = asyncio.Event()
        async with self:
            ready.set()
            await self._thread_stop.wait()

    # ----- the API host ------------------------------------------------------------------------

    def _api_app(self) -> web.Application:
        app = web.Application()
        # One catch-all route so that every request, even a wrong path, lands in the records.
        app.router.add_route("*", "/{tail:.*}", self._handle_api)
        return app

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        received_at = self._clock()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        raw = await request.read()
        body = _parse_json(raw)
        status: int | None = None
        try:
            response = await self._answer_api(request, raw, body)
            status = None if response is None else response.status
        finally:
            self.in_flight -= 1
            self._record(self.requests, request, body, status, received_at)
        if response is None:
            # Returning a response to a closed transport is the quiet way out of the handler:
            # aiohttp treats the failed write as a client that went away.
            return web.Response(status=499)
        return response

    async def _answer_api(
        self, request: web.Request, raw: bytes, body: Any
    ) -> web.StreamResponse | None:
        if not _is_generation(request.method, request.path):
            return _error_response(ApiError(404, "NotFound", f"Not found: {request.path}"))
        try:
            return await self._generate(request, raw, body)
        except ApiError as exc:
            if exc.status == 429 and exc.retry_after is None:
                exc.retry_after = self.retry_after
            return _error_response(exc)

    async def _generate(
        self, request: web.Request, raw: bytes, body: Any
    ) -> web.StreamResponse | None:
        self._check_api_key(request.headers.get("Authorization"))
        fault = self._pop_fault()
        if isinstance(fault, _Stall):
            await asyncio.Event().wait()  # until the server stops and cancels the handler
        if isinstance(fault, _EchoKey):
            key = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
            key = KEY_TRANSFORMS[fault.transform](key)
            return _error_response(ApiError(400, f"Invalid.{key}", f"bad key {key}"), key)
        if isinstance(fault, _Misbehave):
            return await self._misbehave(request, fault)
        if isinstance(fault, _Disconnect) or (
            self.disconnect_rate and self._draw() < self.disconnect_rate
        ):
            await asyncio.sleep(self.latency)
            _drop_connection(request)
            return None
        if fault is not None:
            raise fault
        if self._quota is not None and not self._quota.try_take():
            raise ApiError(429, "Throttling.RateQuota", RATE_LIMIT_MESSAGE)
        self.shapes.admit()
        if request.headers.get("X-DashScope-Async", "").lower() == "enable":
            raise ApiError(403, "AccessDenied", ASYNC_MESSAGE)
        generation = _parse_generation(raw, body)
        self._moderate(generation.prompt)
        # Draw at arrival, so a sequential client sees the same outcomes for the same seed.
        fails = self._rng.random() < self.error_rate
        started = self._clock()
        await asyncio.sleep(self.latency)
        if fails:
            raise ApiError(500, "InternalError", INTERNAL_ERROR_MESSAGE)
        key = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
        body = self._success_body(generation, key)
        with self._lock:
            if self._consume_toggle("no_image"):
                text = {"text": "I cannot draw that."}
                body["output"]["choices"][0]["message"]["content"] = [text]
            poison = self._consume_toggle("poison")
        headers = _answer_headers(body["request_id"], self._clock() - started)
        headers.update(self.shapes.headers())
        if poison:
            body["usage"].update(width=float("inf"), height=float("-inf"))
            headers[FLOW_CONTROL_HEADER] = "[" * 4000 + "]" * 4000
        return web.json_response(body, headers=headers)

    async def _misbehave(self, request: web.Request, fault: _Misbehave) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        headers = _answer_headers(request_id, 0.0)
        if fault.name == "redirect loop":
            # Back to the same address: a client that follows it POSTs (and may pay) again.
            headers["Location"] = str(request.url)
            return web.Response(status=307, headers=headers)
        if fault.name == "huge message":
            body = {"request_id": request_id, "code": "InternalError", "message": "x" * fault.size}
            return web.json_response(body, status=400, headers=headers)
        status, content_type, chunks = await MISBEHAVIOURS[fault.name](fault.size, request_id)
        response = web.StreamResponse(status=status, headers=headers)
        if content_type:
            response.headers["Content-Type"] = content_type
        if fault.name == "gzip bomb":
            response.headers["Content-Encoding"] = "gzip"
        await response.prepare(request)
        try:
            for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            pass  # the client stopped reading: what a capped reader does
        return response

    def _draw(self) -> float:
        with self._lock:
            return self._rng.random()

    def _check_api_key(self, header: str | None) -> None:
        if not header:
            raise ApiError(401, "InvalidApiKey", "No API-key provided.")
        if header != f"Bearer {self.api_key}":
            raise ApiError(401, "InvalidApiKey", "Invalid API-key provided.")

    def _pop_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _moderate(self, prompt: str) -> None:
        if any(word in prompt for word in self.moderation_words):
            raise ApiError(400, "DataInspectionFailed", MODERATION_MESSAGE)

    def _success_body(self, generation: _Generation, key: str) -> dict[str, Any]:
        url, (width, height) = self._store_image(generation, key)
        return {
            "output": {
                "choices": [
                    {
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": [{"image": url}]},
                    }
                ]
            },
            "usage": {"width": width, "height": height, "image_count": 1},
            "request_id": str(uuid.uuid4()),
        }

    def _store_image(self, generation: _Generation, key: str) -> tuple[str, tuple[int, int]]:
        """Keep a new image; give its signed URL and the size ``usage`` should report."""
        image_id = str(uuid.uuid4())
        signature = secrets.token_urlsafe(18)
        colour = _colour_index(generation.prompt, generation.seed)
        width, height = generation.width, generation.height
        with self._lock:
            if self._consume_toggle("small"):
                width, height = 64, 64
            corrupt = self._consume_toggle("corrupt")
            wrong_size = self._consume_toggle("wrong_size")
            echo = self._consume_toggle("echo_url")
            served = self._served.popleft() if self._served else None
            self._images[image_id] = _StoredImage(width, height, colour, signature, corrupt, served)
        expires = int(time.time()) + URL_LIFETIME_S
        # A redirecting URL first passes through /r/, like a CDN in front of the bucket.
        folder = "r" if self.redirect_images else "results"
        url = (
            f"{self.image_base_url}/{folder}/{image_id}.png"
            f"?Expires={expires}&OSSAccessKeyId={key if echo else 'fake'}&Signature={signature}"
        )
        reported = (width // 2, height // 2) if wrong_size else (width, height)
        return url, reported

    def _consume_toggle(self, name: str) -> bool:
        """Use up one pending toggle; the caller holds the lock."""
        if self._pending[name] <= 0:
            return False
        self._pending[name] -= 1
        return True

    # ----- the image host ----------------------------------------------------------------------

    def _image_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle_image)
        return app

    async def _handle_image(self, request: web.Request) -> web.StreamResponse:
        received_at = self._clock()
        status: int | None = None
        try:
            response = await self._answer_image(request)
            status = response.status
        except _CutShort as cut:
            # Like a dropped API connection: handing aiohttp a response for a closed transport
            # ends the handler quietly.
            response = cut.response
        finally:
            # None: the body was cut short or never finished (stalled until the server stopped).
            self._record(self.downloads, request, None, status, received_at)
        return response

    async def _answer_image(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _oss_error(405, "MethodNotAllowed", "The specified method is not allowed.")
        if self.reject_download_auth and "Authorization" in request.headers:
            # A signed URL plus an Authorization header is two auth mechanisms; OSS refuses,
            # and sending the DashScope key to the bucket host would leak it anyway.
            return _oss_error(400, "InvalidArgument", "Authorization header is not expected.")
        if request.path.startswith("/r/"):
            target = "/results/" + request.path.removeprefix("/r/")
            return web.Response(
                status=302, headers={"Location": f"{target}?{request.query_string}"}
            )
        stored = self._find_image(request.path)
        if stored is None:
            return _oss_error(404, "NoSuchKey", "The specified key does not exist.")
        if request.query.get("Signature") != stored.signature:
            return _oss_error(403, "SignatureDoesNotMatch", "The request signature is wrong.")
        served = stored.served
        if served is not None and served.body is not None:
            png = served.body
        else:
            png = await self._png(stored.width, stored.height, stored.colour)
        if stored.corrupt:
            png = png[: len(png) // 2]
        if served is not None and served.gzip:
            png = gzip.compress(png, mtime=0)
        return await self._send_image(request, png, stored)

    async def _send_image(
        self, request: web.Request, png: bytes, stored: _StoredImage
    ) -> web.StreamResponse:
        """The body in chunks, as a real object store over a real link sends it."""
        served = stored.served
        headers = {
            "Content-Type": served.content_type if served else "image/png",
            "ETag": f'"{stored.signature}"',
        }
        if served is not None and served.gzip:
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(headers=headers)
        if self.send_content_length:
            response.content_length = len(png)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        with self._lock:
            cut = self._consume_toggle("cut") or self._rng.random() < self.cut_download_rate
            stall = self._consume_toggle("stall")
        end = len(png) // 2 if cut else len(png)
        try:
            for offset in range(0, end, self.chunk_size):
                await response.write(png[offset : min(offset + self.chunk_size, end)])
                if stall:
                    await asyncio.Event().wait()  # until the server stops
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
        except ConnectionError:
            raise _CutShort(response) from None  # the client hung up (a cap, a deadline)
        if cut:
            _drop_connection(request)
            raise _CutShort(response)
        await response.write_eof()
        return response

    def _find_image(self, path: str) -> _StoredImage | None:
        prefix, suffix = "/results/", ".png"
        if not (path.startswith(prefix) and path.endswith(suffix)):
            return None
        with self._lock:
            return self._images.get(path[len(prefix) : -len(suffix)])

    async def _png(self, width: int, height: int, colour: int) -> bytes:
        real = self.image_profile == "real"
        key = (width, height, colour % REAL_COLOURS if real else colour)
        png = self._png_cache.get(key)
        if png is None:
            encode = _encode_real_png if real else _encode_png
            # Encoding megabytes takes a while: off the loop, so other requests keep flowing.
            png = await asyncio.to_thread(encode, width, height, PALETTE[key[2]])
            self._png_cache[key] = png
        return png

    def _record(
        self,
        records: list[RecordedRequest],
        request: web.Request,
        body: Any,
        status: int | None,
        received_at: float,
    ) -> None:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            status=status,
            query=request.query_string,
            received_at=received_at,
        )
        with self._lock:
            records.append(record)


# ----- request parsing ---------------------------------------------------------------------------


def _parse_generation(raw: bytes, body: Any) -> _Generation:
    """Validate a generation body the way the service does; raise 400 InvalidParameter."""
    if not isinstance(body, dict):
        detail = "body is not valid JSON" if raw else "body is empty"
        raise _invalid(f"Request {detail}.")
    model = body.get("model")
    if model not in MODELS:
        raise _invalid("Model not exist.")
    prompt = _parse_messages(body.get("input"))
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise _invalid("parameters must be an object.")
    width, height = _parse_size(parameters.get("size", DEFAULT_SIZE))
    _check_negative_prompt(parameters.get("negative_prompt"))
    seed = _parse_seed(parameters.get("seed"))
    _check_flags(parameters)
    return _Generation(model, prompt, width, height, seed)


def _parse_messages(input_: Any) -> str:
    """Give the prompt: the single text item of the single user message."""
    messages = input_.get("messages") if isinstance(input_, dict) else None
    if not isinstance(messages, list) or len(messages) != 1:
        raise _invalid("input.messages must hold exactly one message.")
    message = messages[0]
    if not isinstance(message, dict) or message.get("role") != "user":
        raise _invalid("input.messages[0] must be a user message.")
    content = message.get("content")
    if not isinstance(content, list):
        raise _invalid("input.messages[0].content must be a list.")
    texts = [item["text"] for item in content if isinstance(item, dict) and "text" in item]
    images = [item["image"] for item in content if isinstance(item, dict) and "image" in item]
    if len(texts) + len(images) != len(content):
        raise _invalid("Each content item must be a text or an image.")
    if len(texts) != 1 or not isinstance(texts[0], str) or not texts[0].strip():
        raise _invalid("The content must hold exactly one non-empty text.")
    if not all(isinstance(url, str) and url.startswith(_IMAGE_SCHEMES) for url in images):
        raise _invalid("Image inputs must be http(s), oss or data URLs.")
    if len(texts[0]) > MAX_PROMPT_CHARS:
        raise _invalid(f"The prompt is longer than {MAX_PROMPT_CHARS} characters.")
    return texts[0]


_IMAGE_SCHEMES = ("http://", "https://", "oss://", "data:")


def _parse_size(size: Any) -> tuple[int, int]:
    if not isinstance(size, str) or size not in SIZES:
        raise _invalid(f"size must be one of {', '.join(SIZES)}.")
    return SIZES[size]


def _check_negative_prompt(negative_prompt: Any) -> None:
    if negative_prompt is None:
        return
    if not isinstance(negative_prompt, str):
        raise _invalid("negative_prompt must be a string.")
    if len(negative_prompt) > MAX_NEGATIVE_PROMPT_CHARS:
        raise _invalid(f"negative_prompt is longer than {MAX_NEGATIVE_PROMPT_CHARS} characters.")


def _parse_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    # bool is an int subclass, but JSON true is no seed.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise _invalid(f"seed must be an integer in [0, {MAX_SEED}].")
    return seed


def _check_flags(parameters: dict[str, Any]) -> None:
    for name in ("prompt_extend", "watermark"):
        if name in parameters and not isinstance(parameters[name], bool):
            raise _invalid(f"{name} must be a boolean.")
    n = parameters.get("n", 1)
    if isinstance(n, bool) or n != 1:
        raise _invalid("n must be 1 for this model.")


def _invalid(message: str) -> ApiError:
    return ApiError(400, "InvalidParameter", message)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _is_generation(method: str, path: str) -> bool:
    return method == "POST" and path == GENERATION_PATH


# ----- answers -----------------------------------------------------------------------------------


class _CutShort(Exception):
    """An image body was cut short on purpose; the handler's connection is already closed."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("cut short")
        self.response = response


def _answer_headers(request_id: str, seconds: float) -> dict[str, str]:
    """The headers the real service sets on every API answer (API_NOTES.md)."""
    return {"x-request-id": request_id, "req-cost-time": str(round(seconds * 1000))}


def _error_response(error: ApiError, request_id: str | None = None) -> web.Response:
    request_id = request_id or str(uuid.uuid4())
    body = {"request_id": request_id, "code": error.code, "message": error.message}
    headers = _answer_headers(request_id, 0.0)
    if error.retry_after is not None:
        value = error.retry_after
        headers["Retry-After"] = value if isinstance(value, str) else f"{value:g}"
    return web.json_response(body, status=error.status, headers=headers)


def _oss_error(status: int, code: str, message: str) -> web.Response:
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{uuid.uuid4().hex.upper()}</RequestId></Error>"
    )
    return web.Response(status=status, text=text, content_type="application/xml")


def _drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _colour_index(prompt: str, seed: int | None) -> int:
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    return digest[0] % len(PALETTE)


def _encode_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_real_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A PNG of the service's weight: a band of colour over rows of seeded noise."""
    noise_rows = int(height * NOISE_SHARE)
    image = Image.new("RGB", (width, height), rgb)
    noise = random.Random(f"{width}*{height}*{rgb}").randbytes(width * noise_rows * 3)
    image.paste(Image.frombytes("RGB", (width, noise_rows), noise), (0, height - noise_rows))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ----- a hostile API's answers -------------------------------------------------------------------

_Chunks = tuple[int, str | None, Iterator[bytes]]


def _success_json(request_id: str) -> bytes:
    """A well-formed success, as a bomb's or a padded answer's payload ends with."""
    answer = {
        "output": {"choices": [{"message": {"content": [{"image": "http://localhost:1/x.png"}]}}]},
        "usage": {"width": 1328, "height": 1328, "image_count": 1},
        "request_id": request_id,
    }
    return json.dumps(answer).encode()


_GZIP_BOMBS: dict[int, bytes] = {}


def _gzip_bomb(size: int) -> bytes:
    """``size`` bytes of JSON whitespace and then a well-formed success answer, gzip-compressed
    (about 1000:1: 2 MB on the wire for 2 GiB); made once per size, through the compressor in
    blocks, so the server never holds ``size`` bytes."""
    bomb = _GZIP_BOMBS.get(size)
    if bomb is None:
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip stream
        block, parts = b" " * (1 << 20), []
        for _ in range(size >> 20):
            parts.append(compressor.compress(block))
        parts.append(compressor.compress(b" " * (size & ((1 << 20) - 1))))
        parts += [compressor.compress(_success_json("bomb")), compressor.flush()]
        bomb = _GZIP_BOMBS[size] = b"".join(parts)
    return bomb


async def _bomb(size: int, request_id: str) -> _Chunks:
    body = await asyncio.to_thread(_gzip_bomb, size)
    return 200, "application/json", _in_chunks(body)


async def _huge_json(size: int, request_id: str) -> _Chunks:
    """A valid success answer padded to ``size`` bytes, streamed (never held whole)."""
    head = _success_json(request_id)[:-1] + b', "padding": "'

    def chunks() -> Iterator[bytes]:
        yield head
        block = b"x" * DEFAULT_CHUNK_SIZE
        for _ in range(max(0, size - len(head)) // len(block)):
            yield block
        yield b'"}'

    return 200, "application/json", chunks()


def _fixed(status: int, content_type: str | None, body: bytes) -> Callable[..., Any]:
    async def answer(size: int, request_id: str) -> _Chunks:
        return status, content_type, iter([body])

    return answer


def _in_chunks(body: bytes) -> Iterator[bytes]:
    for offset in range(0, len(body), DEFAULT_CHUNK_SIZE):
        yield body[offset : offset + DEFAULT_CHUNK_SIZE]


_DEEP = b"[" * 200_000 + b"]" * 200_000
# Each: (size, request id) -> (status, content type, body chunks). "redirect loop" and "huge
# message" are answered in FakeDashScope._misbehave itself.
MISBEHAVIOURS: dict[str, Callable[[int, str], Any]] = {
    "gzip bomb": _bomb,
    "huge json": _huge_json,
    "redirect loop": _fixed(307, None, b""),
    "huge message": _fixed(400, None, b""),
    "200 html": _fixed(200, "text/html", b"<html><body>Service Unavailable</body></html>"),
    "200 html as json": _fixed(200, "application/json", b"<html>gateway error</html>"),
    "200 empty": _fixed(200, "application/json", b""),
    "200 cut json": _fixed(200, "application/json", b'{"output": {"choices": [{"mess'),
    "200 json list": _fixed(200, "application/json", b"[1, 2, 3]"),
    "200 nested brackets": _fixed(200, "application/json", _DEEP),
    "200 no content type": _fixed(200, None, b'{"output": {}}'),
    "200 multipart": _fixed(200, "multipart/mixed; boundary=x", b"--x--\r\n"),
    "200 event stream": _fixed(200, "text/event-stream", b'data: {"output": {}}\n\n'),
    "200 bad charset": _fixed(200, "application/json; charset=utf-16", b'{"output": {}}'),
    "200 not utf-8": _fixed(200, "application/json", b'{"output": "\xff\xfe"}'),
    "200 without output": _fixed(200, "application/json", b'{"request_id": "r"}'),
    "500 nested brackets": _fixed(500, "application/json", _DEEP),
    "500 not utf-8": _fixed(500, "text/plain", b"\xff\xfe bad gateway"),
}


# ----- quota shapes: a counted window, a cap on work in progress, the stated quota ---------------

FLOW_CONTROL_HEADER = "x-dashscope-inner-flow-control-meta"


class QuotaShapes:
    """The account's quota in the shapes the real service shows (API_NOTES.md, "Quotas").

    ``window=(K, P)``: at most K requests admitted in any P seconds (a counted window; the first
    K may go at once). ``max_in_progress``: a request arriving while that many are being
    generated is refused. Both answer 429 at once. ``state``: successful answers carry the
    window in the undocumented ``x-dashscope-inner-flow-control-meta`` header, as recorded; a
    window ``(K, P)`` instead is stated whatever is enforced (a header that lies, such as
    ``(1, 1e9)``).
    """

    def __init__(
        self,
        window: tuple[int, float] | None,
        max_in_progress: int | None,
        state: bool | tuple[int, float],
        clock: Callable[[], float] = loop_clock,
    ) -> None:
        if window is not None and (window[0] < 1 or window[1] <= 0):
            raise ValueError("quota_window needs K >= 1 requests per P > 0 seconds")
        if max_in_progress is not None and max_in_progress < 1:
            raise ValueError("max_in_progress must be at least 1")
        if state is True and window is None:
            raise ValueError("state_quota needs quota_window (or the window to state)")
        self.window = window
        self.max_in_progress = max_in_progress
        self.state = state
        self.in_progress = 0
        self._clock = clock
        self._admitted: deque[float] = deque()

    def admit(self) -> None:
        """Take one request in (until the handler that called this ends); else raise a 429."""
        if self.max_in_progress is not None and self.in_progress >= self.max_in_progress:
            raise ApiError(429, "Throttling.AllocationQuota", RATE_LIMIT_MESSAGE)
        if self.window is not None:
            count, period = self.window
            now = self._clock()
            while self._admitted and self._admitted[0] <= now - period:
                self._admitted.popleft()
            if len(self._admitted) >= count:
                raise ApiError(429, "Throttling.RateQuota", RATE_LIMIT_MESSAGE)
            self._admitted.append(now)
        self.in_progress += 1
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.in_progress -= 1

    def headers(self) -> dict[str, str]:
        stated = self.state if isinstance(self.state, tuple) else self.window
        if not self.state or stated is None:
            return {}
        count, period = stated
        spec = {
            "default_spec": False,
            "count_limit": count,
            "count_limit_period": period,
            "usage_limit": 1000000,
            "usage_limit_field": "total_tokens",
            "usage_limit_period": 60,
            "burst_factor": 0,
            "burst_timeout": 10000,
        }
        meta = {"model": "qwen-image-max", "user_id": "fake", "user_spec": spec}
        return {FLOW_CONTROL_HEADER: json.dumps(meta, separators=(",", ":"))}


def _make_bucket(
    rate: float | None, burst: int | None, clock: Callable[[], float]
) -> TokenBucket | None:
    if rate is None:
        return None
    return TokenBucket(rate, burst if burst is not None else max(1, int(rate)), clock)


# ----- subprocess mode ---------------------------------------------------------------------------


def _window_arg(text: str) -> tuple[int, float]:
    count, _, period = text.partition("/")
    return int(count), float(period.removesuffix("s"))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a fake DashScope API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="API port (0: any free port)")
    parser.add_argument("--image-port", type=int, default=0, help="image host port")
    parser.add_argument("--api-key", default="sk-test-fake-key")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per generation")
    parser.add_argument("--quota-rps", type=float, default=None)
    parser.add_argument("--quota-burst", type=int, default=None)
    parser.add_argument("--quota-window", type=_window_arg, default=None, help="K/P seconds")
    parser.add_argument("--max-in-progress", type=int, default=None)
    parser.add_argument("--state-quota", action="store_true", help="send the flow-control header")
    parser.add_argument("--retry-after", type=float, default=None)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--moderation-word", action="append", default=None, help="repeatable; default FORBIDDEN"
    )
    parser.add_argument("--image-profile", choices=IMAGE_PROFILES, default="real")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--disconnect-rate", type=float, default=0.0)
    parser.add_argument("--cut-download-rate", type=float, default=0.0)
    parser.add_argument("--redirect-images", action="store_true")
    return parser.parse_args(argv)


def _server_from_args(args: argparse.Namespace) -> FakeDashScope:
    words = tuple(args.moderation_word) if args.moderation_word else ("FORBIDDEN",)
    return FakeDashScope(
        api_key=args.api_key,
        latency=args.latency,
        quota_rps=args.quota_rps,
        quota_burst=args.quota_burst,
        quota_window=args.quota_window,
        max_in_progress=args.max_in_progress,
        state_quota=args.state_quota,
        retry_after=args.retry_after,
        error_rate=args.error_rate,
        seed=args.seed,
        moderation_words=words,
        image_profile=args.image_profile,
        chunk_size=args.chunk_size,
        chunk_delay=args.chunk_delay,
        disconnect_rate=args.disconnect_rate,
        cut_download_rate=args.cut_download_rate,
        redirect_images=args.redirect_images,
        port=args.port,
        image_port=args.image_port,
    )


async def _serve_until_signalled(server: FakeDashScope) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except NotImplementedError:
            pass  # Windows: Ctrl-C still ends asyncio.run with KeyboardInterrupt.
    async with server:
        urls = {"base_url": server.base_url, "image_base_url": server.image_base_url}
        print(json.dumps(urls), flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(_serve_until_signalled(_server_from_args(_parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
