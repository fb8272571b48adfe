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

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imgbatch.pacing.gate import RetryPolicy
from imgbatch.providers.dashscope import ApiKey, DashScopeProvider
from imgbatch.run.apply import ApplyOptions, ApplyReport, apply
from tests.conftest import FAKE_KEY, write_manifest
from tests.support.fake_dashscope import FakeDashScope
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


def run_apply(path: Path, server: Any, home: Path, **provider_options: Any) -> ApplyReport:
    environ = {
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": server.base_url,
        "HOME": str(home),
    }
    provider = DashScopeProvider(ApiKey(FAKE_KEY, "the test"), environ=environ, **provider_options)
    return apply(
        path,
        ApplyOptions(provider="dashscope", rps=1000, retry=FAST_RETRY, environ=environ),
        provider=provider,
    )
