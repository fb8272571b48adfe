"""`imgbatch gc`: the files no results refer to, listed or deleted; with a store, the store's
objects its policy lets go (`imgbatch.housekeeping.store_gc`)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from imgbatch.cli.common import (
    EXIT_OK,
    allow_outside_option,
    error_boundary,
    store_read_only_option,
)
from imgbatch.errors import ConfigError
from imgbatch.units.text import printable

if TYPE_CHECKING:
    from imgbatch.housekeeping.gc import Collection
    from imgbatch.housekeeping.store_gc import StoreCollection, StorePolicy


def _age_option(value: str | None) -> float | None:
    from imgbatch.housekeeping.store_gc import parse_age

    try:
        return parse_age(value) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Only list what would be deleted, with sizes (the default)."
)
_store_option = click.option(
    "--store",
    metavar="URL",
    default=None,
    help="Also collect this shared store (default: IMGBATCH_STORE, else the manifests' "
    "output.store): blobs no record names, past --grace; stale claims; records only with "
    "--older-than. What these manifests do not name is never a reason to delete.",
)
_older_than_option = click.option(
    "--older-than",
    metavar="AGE",
    default=None,
    callback=lambda _context, _parameter, value: _age_option(value),
    help="With a store: also delete its records last written more than AGE ago (30d, 12h), "
    "and then their blobs no other record names. Without it no record is deleted.",
)
_grace_option = click.option(
    "--grace",
    metavar="AGE",
    default="1d",
    callback=lambda _context, _parameter, value: _age_option(value),
    help="With a store: a blob no record names is kept until it is this old (default 1d): a "
    "writer puts its blob before its record.",
)


def _store_policy(
    manifests: tuple[Path, ...],
    older_than: float | None,
    grace: float,
    allow_reference_outside: bool,
) -> StorePolicy:
    """gc's rules for the store: an image a folder keeps in the store only (--no-local-copy)
    has no other copy, so it stays, as the folders say now and again once gc's marker is in
    the store (an apply moving images there meanwhile)."""
    from imgbatch.housekeeping.gc import kept_in_store_only
    from imgbatch.housekeeping.store_gc import StorePolicy

    kept = functools.partial(kept_in_store_only, manifests, os.environ, allow_reference_outside)
    records, blobs = kept()
    return StorePolicy(older_than, grace, keep_records=records, keep_blobs=blobs, recheck=kept)


@click.command("gc")
@click.argument(
    "manifests", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--yes", is_flag=True, help="Delete what is listed (default: only list it).")
@_dry_run_option
@_store_option
@store_read_only_option
@_older_than_option
@_grace_option
@allow_outside_option
@error_boundary
def gc_command(
    manifests: tuple[Path, ...],
    yes: bool,
    dry_run: bool,
    store: str | None,
    store_read_only: bool,
    older_than: float | None,
    grace: float,
    allow_reference_outside: bool,
) -> int:
    """List the cached images, thumbnails and files in the manifests' output folders that no
    results refer to, with their total size, and with a store what its policy lets go; --yes
    deletes them."""
    from imgbatch.housekeeping.gc import collect_garbage
    from imgbatch.housekeeping.store_gc import collect_store, store_for_gc

    if yes and dry_run:
        raise ConfigError("--yes deletes and --dry-run does not: give one of them")
    delete = yes and not dry_run
    target = store_for_gc(
        store, os.environ, manifests, allow_reference_outside=allow_reference_outside
    )
    # The store first: a store refused (read-only, unreachable) leaves the folders as they are.
    shared = (
        collect_store(
            target[0],
            os.environ,
            _store_policy(manifests, older_than, grace, allow_reference_outside),
            delete=delete,
            read_only=store_read_only,
            base=target[1],
        )
        if target is not None
        else None
    )
    collection = collect_garbage(
        manifests, delete=delete, allow_reference_outside=allow_reference_outside
    )
    _say_folders(collection)
    if shared is not None:
        _say_store(shared)
    return EXIT_OK


def _say_folders(collection: Collection) -> None:
    """The folders' files that go (or would), and their total."""
    for item in collection.items:
        click.echo(f"{_shown(item.path)}  {_size_text(item.size)}  {item.kind}")
    count = len(collection.items)
    what = f"{count} file{'s' if count != 1 else ''}, {_size_text(collection.total)}"
    if not count:
        click.echo("Nothing to collect: every file is referred to by the results.")
    elif collection.deleted:
        click.echo(f"Deleted {what}.")
    else:
        click.echo(f"{what} that no results refer to; run again with --yes to delete them.")


def _say_store(found: StoreCollection) -> None:
    """The store's objects that go (or would), their total, the claims kept and the requests."""
    # Object names and a claim's holder are what anyone who can write the store wrote.
    for item in found.items:
        where = f"{found.url}/{item.name}"
        age = f"{_age_text(item.age)} old" if item.age >= 0 else f"{_age_text(-item.age)} ahead"
        line = f"{where}  {_size_text(item.size)}  {age}  {item.why}"
        click.echo(printable(line))
    for name, why in found.kept:
        click.echo(printable(f"kept {found.url}/{name}: {why}"))
    count = len(found.items)
    what = f"{count} object{'s' if count != 1 else ''}, {_size_text(found.total)}"
    sent = ", ".join(
        f"{operation} {number}" for operation, number in sorted(found.requests.items())
    )
    if not count:
        click.echo(f"Store {found.url}: nothing to collect ({sent} requests).")
    elif found.deleted:
        click.echo(f"Store {found.url}: deleted {what} ({sent} requests).")
    else:
        click.echo(
            f"Store {found.url}: {what} to collect ({sent} requests); run again with --yes to "
            "delete them."
        )


def _age_text(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _size_text(size: int) -> str:
    if size < 1000:
        return f"{size} bytes"
    value, units = size / 1000, ["KB", "MB", "GB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{value:.1f} {units[0]}"


def _shown(path: Path) -> str:
    """`path` relative to the current folder when it is below it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative
