"""Shared fixtures: a fake DashScope server on 127.0.0.1 and an environment pointing at it.

No test reaches a real host: the dashscope provider is configured through the environment
(`DASHSCOPE_HTTP_BASE_URL`, `DASHSCOPE_API_KEY`, `HOME`) to talk to the fake server only.

Also the `slow` marker: a plain `pytest` skips the tests marked `@pytest.mark.slow` (the quick
loop); `pytest --slow` runs them too, as the README's test command and CI do.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_dashscope import FakeDashScope

# The helpers' old home: tests written before they moved to tests/support/ still import them here.
from tests.support.files import EXAMPLE, FAKE_KEY, REPO, write_manifest, write_many_shots  # noqa: F401


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the tests marked slow (the README's test command and CI do)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes many seconds; skipped by a plain `pytest`, run by `pytest --slow`"
    )
    config.addinivalue_line(
        "markers", "real_images: the fake_server fixture serves real-sized images (3 to 4 MB)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: `pytest --slow` runs it")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def user_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Learned quotas go to a folder of the test's own, never the user's cache directory."""
    folder = tmp_path_factory.mktemp("user-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeDashScope]:
    """The fake service: small images, unless the test is marked `real_images` (3 to 4 MB)."""
    real = request.node.get_closest_marker("real_images") is not None
    with FakeDashScope(api_key=FAKE_KEY, image_profile="real" if real else "tiny") as server:
        yield server


@pytest.fixture
def api_env(
    fake_server: FakeDashScope, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """os.environ as a user with a key would have it, pointed at the fake server."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DASHSCOPE_API_KEY", FAKE_KEY)
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", fake_server.base_url)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    return {
        "HOME": str(home),
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": fake_server.base_url,
    }


@pytest.fixture
def example_manifest(tmp_path: Path) -> Path:
    """The repository's example shot list, copied so its output lands in tmp_path."""
    target = tmp_path / "project" / "manifests" / EXAMPLE.name
    target.parent.mkdir(parents=True)
    shutil.copy(EXAMPLE, target)
    return target
