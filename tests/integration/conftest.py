"""Fixtures of the store's integration tests: S3 servers on 127.0.0.1, started once per test
module (a server takes a second to start), and an environment pointing a run at a fresh prefix.

Takes `api_env` (tests/conftest.py: a key and the fake DashScope server); gives `moto_endpoint`
and `seaweed_endpoint` (each server's URL; SeaweedFS is the race-tested one) and `store_env`
(the environment of a machine with a key and the store's credentials, with `IMGBATCH_STORE`
naming a prefix of the test's own, so tests sharing the server never meet).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.object_servers import BUCKET, moto_server, s3_environ, seaweed_server


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def seaweed_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seaweed_server(tmp_path_factory.mktemp("weed")) as endpoint:
        yield endpoint


@pytest.fixture
def store_env(
    moto_endpoint: str, api_env: dict[str, str], request: pytest.FixtureRequest
) -> dict[str, str]:
    """The environment of a machine with a key and the store's credentials; a fresh prefix
    (the test's name, without a parametrised test's brackets)."""
    prefix = request.node.name.replace("[", "-").replace("]", "")[:40]
    return {**api_env, **s3_environ(moto_endpoint), "IMGBATCH_STORE": f"s3://{BUCKET}/{prefix}"}
