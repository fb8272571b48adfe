"""`imgbatch quota show` and `imgbatch quota forget`: the quotas earlier runs remembered.

Takes the user's quota store (`quotas.json` in the user's cache directory); gives one line per
remembered quota (account fingerprint, endpoint, model, quota, where it came from, when, and the
credit of 429s the account's runs saved up to test it), or drops them. A remembered quota is only
where the next run starts: it is tested like any other.
"""

from __future__ import annotations

from datetime import UTC, datetime

import click

from imgbatch.cli.common import EXIT_OK, error_boundary
from imgbatch.units.text import printable

_SOURCES = {"probed": "found from 429s", "stated": "stated by the service"}


@click.group("quota")
def quota_group() -> None:
    """The quotas earlier runs found, where the next run of the same account starts."""


@quota_group.command("show")
@error_boundary
def show() -> int:
    """List the remembered quotas: account, endpoint, model, quota, source, when and the
    credit of 429s saved up to test it."""
    from imgbatch.pacing.learned import QuotaStore, default_store_path

    store = QuotaStore(default_store_path())
    remembered = store.remembered()
    if not remembered:
        click.echo(f"No quota remembered ({store.path}).")
        return EXIT_OK
    for item in remembered:
        limits = []
        if item.learned.window is not None:
            limits.append(str(item.learned.window))
        if item.learned.cap is not None:
            limits.append(f"{item.learned.cap} in progress")
        when = (
            datetime.fromtimestamp(item.saved_at, UTC).isoformat(timespec="seconds")
            if item.saved_at is not None
            else "unknown"
        )
        source = _SOURCES.get(item.source, item.source)
        # Printable: the file is text anyone with the user's account (or a tool) may have edited.
        click.echo(
            printable(
                f"{item.account}  {item.endpoint}  {item.model}  {', '.join(limits)}  "
                f"({source}, {when})  probe credit: {item.learned.credit:g} 429s"
            )
        )
    return EXIT_OK


@quota_group.command("forget")
@click.option("--model", default=None, help="Only this model's (default: every one).")
@error_boundary
def forget(model: str | None) -> int:
    """Drop the remembered quotas: the next run finds its quota again from the start."""
    from imgbatch.pacing.learned import QuotaStore, default_store_path

    dropped = QuotaStore(default_store_path()).forget(model)
    click.echo(f"Forgot {dropped} remembered quota{'s' if dropped != 1 else ''}.")
    return EXIT_OK
