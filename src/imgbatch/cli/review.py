"""`imgbatch sheet` and `imgbatch inspect`: the contact sheet, an image's provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from imgbatch.cli.common import (
    EXIT_OK,
    allow_outside_option,
    error_boundary,
    manifest_argument,
    store_option,
)

if TYPE_CHECKING:
    pass


@click.command()
@manifest_argument
@allow_outside_option
@store_option
@error_boundary
def sheet(manifest: Path, allow_reference_outside: bool, store: str | None) -> int:
    """Draw the contact sheet (index.html in the output folder) from the last results; full
    images kept in a store only (apply --no-local-copy) are linked through URLs signed now."""
    from imgbatch.review.report import shown_path
    from imgbatch.review.sheet import write_sheet

    path = write_sheet(manifest, allow_reference_outside=allow_reference_outside, store=store)
    click.echo(f"Contact sheet: {shown_path(path)}")
    return EXIT_OK


@click.command()
@manifest_argument
@click.argument("shot_ids", metavar="ID...", nargs=-1, required=True)
@allow_outside_option
@error_boundary
def reroll(manifest: Path, shot_ids: tuple[str, ...], allow_reference_outside: bool) -> int:
    """Give shots a new seed in the shot list, so the next apply makes a new take of them.

    Only those shots change; their old takes stay in the cache (revert the edit to get them back
    for free). Name a shot with variants by the id they share to reroll all its takes.
    """
    from imgbatch.manifest.edit import reroll as reroll_shots

    for change in reroll_shots(manifest, shot_ids, allow_reference_outside=allow_reference_outside):
        click.echo(f"{change}")
    click.echo(f"Next: imgbatch apply {manifest}")
    return EXIT_OK


@click.command()
@manifest_argument
@click.argument("take_ids", metavar="ID-N...", nargs=-1, required=True)
@allow_outside_option
@error_boundary
def pick(manifest: Path, take_ids: tuple[str, ...], allow_reference_outside: bool) -> int:
    """Choose a shot's take among its variants (poster-2): writes pick: 2 on the shot, and
    apply then also writes that take as poster.png."""
    from imgbatch.manifest.edit import pick as pick_takes

    for change in pick_takes(manifest, take_ids, allow_reference_outside=allow_reference_outside):
        click.echo(f"{change}")
    click.echo(f"Next: imgbatch apply {manifest}")
    return EXIT_OK


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the fields as one JSON object.")
@error_boundary
def inspect(image: Path, as_json: bool) -> int:
    """Print the provenance an imgbatch PNG carries: prompt sent, seed, model, key, request id."""
    from imgbatch.review.provenance import as_json as fields_json
    from imgbatch.review.provenance import as_lines, inspect_image

    fields = inspect_image(image)
    if as_json:
        click.echo(json.dumps(fields_json(fields), ensure_ascii=False))
    else:
        click.echo("\n".join(as_lines(fields)))
    return EXIT_OK
