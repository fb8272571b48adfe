"""`imgbatch store claims` and `imgbatch store unlock KEY`: a shared store's claims, for people."""

from __future__ import annotations

import os

import click

from imgbatch.cli.common import EXIT_OK, error_boundary, store_option
from imgbatch.errors import EXIT_FAILED
from imgbatch.units.text import printable


@click.group("store")
def store_group() -> None:
    """The claims in a shared store (--store URL, else IMGBATCH_STORE)."""


@store_group.command("claims")
@store_option
@error_boundary
def store_claims_command(store: str | None) -> int:
    """List the claims held in the store: key, live or stale, age, holder, and whether the
    service had answered its holder (paid)."""
    from imgbatch.housekeeping.store_claims import list_claims

    url, claims = list_claims(store, os.environ)
    for claim in claims:
        state = "stale" if claim.stale else "live"
        paid = f"  paid: request {claim.request_id or 'unknown'}" if claim.image_url else ""
        # The holder and request id are what anyone who can write the store wrote.
        click.echo(printable(f"{claim.key}  {state}  {claim.age:.0f} s  {claim.holder}{paid}"))
    if not claims:
        click.echo(f"No claims in {url}.")
    return EXIT_OK


@store_group.command("unlock")
@click.argument("key")
@store_option
@error_boundary
def store_unlock_command(key: str, store: str | None) -> int:
    """Release the claim on KEY, whoever holds it (for a store without If-Match, such as OSS,
    where a dead process's claim is not taken over on its own)."""
    from imgbatch.housekeeping.store_claims import unlock

    if unlock(store, os.environ, key):
        click.echo(f"Released the claim on {key}.")
        return EXIT_OK
    click.echo(f"No claim on {key}.")
    return EXIT_FAILED
