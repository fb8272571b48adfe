"""An HTTP server on 127.0.0.1 that records the headers of every request it receives.

Takes: `bodies` (path -> bytes, served 200) and `redirects` (path -> absolute URL, served 302).
Gives: `received`, every request as (method, target, lower-cased headers), whatever it was;
any other path is 404, and a CONNECT or an absolute-form request (what a client sends to a
proxy) is recorded and refused with 502, so the same class stands in for a proxy that must
never be used. Nothing but 127.0.0.1 is bound.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    method: str
    target: str
    headers: dict[str, str]


class RecordingServer:
    def __init__(
        self, bodies: dict[str, bytes] | None = None, redirects: dict[str, str] | None = None
    ) -> None:
        self.bodies = dict(bodies or {})
        self.redirects = dict(redirects or {})
        self.received: list[Received] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                headers = {name.lower(): value for name, value in self.headers.items()}
                with server._lock:
                    server.received.append(Received(self.command, self.path, headers))
                if self.command == "CONNECT" or not self.path.startswith("/"):
                    self._send(502, b"")
                elif self.path in server.redirects:
                    self._send(302, b"", {"Location": server.redirects[self.path]})
                elif self.path in server.bodies:
                    self._send(200, server.bodies[self.path], {"Content-Type": "image/png"})
                else:
                    self._send(404, b"")

            def _send(
                self, status: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_CONNECT = _answer  # noqa: N815 (the library's names)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def url(self, path: str) -> str:
        return self.origin + path

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)
