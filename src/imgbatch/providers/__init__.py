"""Image providers: where requests go and where image bytes come from.

Takes a provider name and the environment; gives an object with `generate(request, label=...)`
and `fetch(image, sink)` (the image's bytes, handed to `sink` piece by piece as they arrive).
The executor knows nothing else about them, so tests pass fakes or point the real provider at a
fake server. This package also answers, without importing any provider's SDK, what the rest of
imgbatch asks about providers: which one `auto` means, whether one spends quota and money
(`is_metered`), which secrets a crash log must hide, and whether the endpoint configured can be
called at all (`check_endpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self
from urllib.parse import urlsplit, urlunsplit

from imgbatch.errors import ConfigError

if TYPE_CHECKING:
    from imgbatch.shots.request import GeneratedImage, ImageRequest

# Takes the pieces of an image's bytes, in order, as they arrive; on the event loop, so it only
# hashes and writes them.
Sink = Callable[[bytes], None]
# Whether each provider spends quota (and money): the placeholder draws its images locally.
METERED = {"dashscope": True, "placeholder": False}
PROVIDERS = tuple(METERED)
# `auto`: dashscope when a key is configured, else the offline placeholder (and it says so).
PROVIDER_CHOICES = (*PROVIDERS, "auto")


class Provider(Protocol):
    name: str
    # False for providers that spend no quota (the placeholder): no rate limit applies.
    metered: bool

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    async def generate(self, request: ImageRequest, *, label: str) -> GeneratedImage:
        """Make one image; raise a `ProviderError` subclass on failure."""
        ...

    async def fetch(self, image: GeneratedImage, sink: Sink) -> None:
        """Hand the image's bytes to `sink`, in order, as they arrive (an image is never held
        whole: the executor writes them to disk); raise `TransientError` when they cannot be
        had right now (the pieces given so far are then worth nothing)."""
        ...

    def describe_credentials(self) -> str:
        """Where the credentials came from, never what they are."""
        ...


def is_metered(name: str) -> bool:
    """Whether the provider `name` spends quota; a name not known here is taken as paid."""
    return METERED.get(name, True)


def resolve_provider_name(name: str, environ: Mapping[str, str], home: Path | None = None) -> str:
    """`auto` is dashscope when a DashScope key is configured, else placeholder; others stay."""
    if name != "auto":
        return name
    from imgbatch.providers.dashscope_credentials import configured_key

    return "dashscope" if configured_key(environ, home) is not None else "placeholder"


def secrets_for_redaction(environ: Mapping[str, str], home: Path | None = None) -> tuple[str, ...]:
    """Every secret a provider would send, so that text which may quote one can hide it."""
    from imgbatch.providers.dashscope_credentials import configured_secret

    secret = configured_secret(environ, home)
    return (secret,) if secret else ()


def checked_base_url(url: str, origin: str) -> str:
    """`url` if API calls can go there: http(s), a host, a port that is a number, and no user
    name or password (the key goes in a header; aiohttp would refuse both at every call, as a
    "malformed answer"). Else `ConfigError` naming `origin`, never quoting the password."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        raise ConfigError(f"{origin} is not a URL imgbatch can call") from None
    if parts.username is not None or parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        shown = urlunsplit(parts._replace(netloc=host))
        raise ConfigError(
            f"{origin} has a user name or password before the host of {shown}: remove them; "
            "DashScope takes only the API key, which imgbatch sends in a header itself"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{origin} must be an http:// or https:// URL with a host, such as "
            "https://dashscope-intl.aliyuncs.com/api/v1"
        )
    return url.strip()


def check_endpoint(name: str, environ: Mapping[str, str]) -> None:
    """Refuse, before anything is sent or written, an endpoint provider `name` cannot call."""
    configured = environ.get("DASHSCOPE_HTTP_BASE_URL")
    if name == "dashscope" and configured:
        checked_base_url(configured, "DASHSCOPE_HTTP_BASE_URL")


def create_provider(name: str, environ: Mapping[str, str], home: Path | None = None) -> Provider:
    """The provider called `name`, configured from the environment; its SDK is imported here."""
    if name == "placeholder":
        from imgbatch.providers.placeholder import PlaceholderProvider

        return PlaceholderProvider()
    if name == "dashscope":
        from imgbatch.providers.dashscope import DashScopeProvider
        from imgbatch.providers.dashscope_credentials import resolve_api_key

        return DashScopeProvider(resolve_api_key(environ, home), environ=environ)
    raise ConfigError(f"unknown provider '{name}': choose one of {', '.join(PROVIDER_CHOICES)}")
