"""Small real images for reference_image tests: bytes Pillow decodes, in the accepted sizes, and
an HTTP server on 127.0.0.1 that serves them as reference URLs and counts every fetch."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def image_bytes(
    image_format: str = "PNG", size: tuple[int, int] = (384, 384), colour: str = "red"
) -> bytes:
    """An image of `size` in `image_format`, one colour (so equal arguments give equal bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=image_format)
    return buffer.getvalue()


PNG = image_bytes("PNG")
PNG_OTHER = image_bytes("PNG", colour="blue")
JPEG = image_bytes("JPEG")


class ReferenceServer:
    """HTTP on 127.0.0.1 serving `bodies` by path (404 for any other), each answer `delay`
    seconds late; counts the requests for each path and the most it answered at once.

    `bodies` may be changed while it runs: the same URL then serves other content.
    """

    def __init__(self, bodies: dict[str, bytes], delay: float = 0.0) -> None:
        self.bodies = dict(bodies)
        self.delay = delay
        self.requests: Counter[str] = Counter()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                with server._lock:
                    server.requests[self.path] += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    body = server.bodies.get(self.path)
                    self.send_response(200 if body is not None else 404)
                    self.send_header("Content-Length", str(len(body or b"")))
                    self.end_headers()
                    self.wfile.write(body or b"")
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}{path}"

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def __enter__(self) -> ReferenceServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)
