"""Image providers: where requests go and where image bytes come from.

Takes a provider name and the environment; gives an object with `generate(request, label=...)`
and `fetch(image)`. The executor knows nothing else about them, so tests pass fakes or point the
real provider at a fake server.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from imgbatch.errors import ConfigError
from imgbatch.request import GeneratedImage, ImageRequest

PROVIDERS = ("dashscope", "placeholder")
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

    async def fetch(self, image: GeneratedImage) -> bytes:
        """The image's bytes; raise `TransientError` when they cannot be had right now."""
        ...

    def describe_credentials(self) -> str:
        """Where the credentials came from, never what they are."""
        ...


def create_provider(name: str, environ: Mapping[str, str], home: Path | None = None) -> Provider:
    """The provider called `name`, configured from the environment."""
    if name == "placeholder":
        from imgbatch.providers.placeholder import PlaceholderProvider

        return PlaceholderProvider()
    if name == "dashscope":
        from imgbatch.providers.dashscope import DashScopeProvider, resolve_api_key

        return DashScopeProvider(resolve_api_key(environ, home), environ=environ)
    raise ConfigError(f"unknown provider '{name}': choose one of {', '.join(PROVIDERS)}")
