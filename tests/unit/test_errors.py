"""Every error carries its exit code and HTTP status as data; the CLI's one boundary reads them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import imgbatch.errors as errors
from imgbatch.cli.main import error_boundary
from imgbatch.errors import (
    ConfigError,
    ImgbatchError,
    PaidImagesError,
    ProviderError,
    RateLimited,
    TransientError,
)

# The exit codes the docs list: 2 for input that cannot be run, 1 for everything else.
USAGE = {
    "ManifestError",
    "ConfigError",
    "PaidImagesError",
    "InspectError",
    "FolderOwnedError",
    "StoreOnlyError",
}


def _all_errors() -> list[type[ImgbatchError]]:
    found = [ImgbatchError]
    for error in found:
        found += [sub for sub in error.__subclasses__() if sub.__module__ == errors.__name__]
    return found


def test_each_error_class_says_its_exit_code() -> None:
    codes = {error.__name__: error.exit_code for error in _all_errors()}
    assert len(codes) >= 15  # every class in the tree, not one by luck
    assert {name for name, code in codes.items() if code == 2} == USAGE
    assert {code for name, code in codes.items() if name not in USAGE} == {1}


def test_a_429_is_its_own_transient_class_with_its_status() -> None:
    refused = RateLimited("Requests rate limit exceeded.", code="Throttling.RateQuota")
    assert isinstance(refused, TransientError)
    assert refused.status == 429
    assert str(refused) == "429 Throttling.RateQuota: Requests rate limit exceeded."
    assert TransientError("busy", status=503).status == 503
    assert ProviderError("no answer").status is None
    assert ConfigError("no key").status is None


class _Teapot(ImgbatchError):
    exit_code = 42


@pytest.mark.parametrize(
    ("error", "code"),
    [(_Teapot("short and stout"), 42), (PaidImagesError("paid images"), 2), (RateLimited("x"), 1)],
)
def test_the_cli_exit_code_is_the_errors_own(error: ImgbatchError, code: int) -> None:
    import click

    @click.command()
    @error_boundary
    def command() -> int:
        raise error

    result = CliRunner().invoke(command, [])
    assert result.exit_code == code
    assert result.output == f"error: {error}\n"
