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
)

if TYPE_CHECKING:
    pass


@click.command()
@manifest_argument
@allow_outside_option
@error_boundary
def sheet(manifest: Path, allow_reference_outside: bool) -> int:
    """Draw the contact sheet (index.html in the output folder) from the last results."""
    from imgbatch.review.sheet import write_sheet

    path = write_sheet(manifest, allow_reference_outside=allow_reference_outside)
    click.echo(f"Contact sheet: {path}")
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
