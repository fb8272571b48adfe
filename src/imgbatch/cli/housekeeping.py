"""`imgbatch gc`: the files no results refer to, listed or deleted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from imgbatch.cli.common import (
    EXIT_OK,
    allow_outside_option,
    error_boundary,
)

if TYPE_CHECKING:
    pass


@click.command("gc")
@click.argument(
    "manifests", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--yes", is_flag=True, help="Delete what is listed (default: only list it).")
@allow_outside_option
@error_boundary
def gc_command(manifests: tuple[Path, ...], yes: bool, allow_reference_outside: bool) -> int:
    """List the cached images, thumbnails and files in the manifests' output folders that no
    results refer to, with their total size; --yes deletes them."""
    from imgbatch.housekeeping.gc import collect_garbage

    collection = collect_garbage(
        manifests, delete=yes, allow_reference_outside=allow_reference_outside
    )
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
    return EXIT_OK


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
