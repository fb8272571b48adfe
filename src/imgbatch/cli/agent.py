"""`imgbatch mcp`: imgbatch's tools served to an AI agent over MCP."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from imgbatch.cli.common import (
    EXIT_OK,
    allow_outside_option,
    error_boundary,
    provider_option,
)
from imgbatch.errors import ConfigError

if TYPE_CHECKING:
    pass


@click.command("mcp")
@provider_option
@allow_outside_option
@error_boundary
def mcp_command(provider: str | None, allow_reference_outside: bool) -> int:
    """Serve generate, validate, plan, apply and inspect to an AI agent over the Model Context
    Protocol on stdin and stdout (needs the extra: pip install 'imgbatch[mcp]')."""
    try:
        from imgbatch.cli.agent_server import ServerSettings, serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "mcp":
            raise
        raise ConfigError(
            "imgbatch mcp needs the MCP SDK, an optional extra: pip install 'imgbatch[mcp]'"
        ) from None
    serve(ServerSettings(provider=provider, allow_reference_outside=allow_reference_outside))
    return EXIT_OK
