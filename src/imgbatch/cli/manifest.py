"""`imgbatch validate` and `imgbatch expand`: check a shot list, list its shots."""

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
    provider_option,
)
from imgbatch.errors import EXIT_USAGE

if TYPE_CHECKING:
    pass


@click.command()
@click.argument(
    "manifests", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@allow_outside_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the verdict and every problem (file, line, shot, field) as one JSON document on "
    "stdout.",
)
@error_boundary
def validate(manifests: tuple[Path, ...], allow_reference_outside: bool, as_json: bool) -> int:
    """Check shot lists against the schema and the model rules (several at once: a pre-commit
    hook passes every changed file)."""
    from imgbatch.manifest.validation import validate, validate_json

    # The manifest's own checks, local references included; a reference URL is not downloaded
    # (only apply and generate fetch one, to key it by its content).
    results = validate(manifests, allow_reference_outside=allow_reference_outside)
    for result in results:
        if result.shots is not None:
            count = result.shots
            line = f"{result.manifest}: valid, {count} shot{'s' if count != 1 else ''}"
            click.echo(line, err=as_json)
        else:
            click.echo(f"error: {result.message}", err=True)
    if as_json:
        click.echo(json.dumps(validate_json(results), ensure_ascii=False))
    return EXIT_OK if all(result.valid for result in results) else EXIT_USAGE


@click.command("expand")
@manifest_argument
@click.option("--json", "as_json", is_flag=True, help='Print {"shots": [...]} as JSON.')
@provider_option
@allow_outside_option
@error_boundary
def expand_command(
    manifest: Path, as_json: bool, provider: str | None, allow_reference_outside: bool
) -> int:
    """Print every shot after vars, matrix, variants and seed: auto, in manifest order."""
    from imgbatch.run.apply import expand_shots

    shots = expand_shots(
        manifest, provider=provider, allow_reference_outside=allow_reference_outside
    )
    if as_json:
        click.echo(json.dumps({"shots": shots}, ensure_ascii=False))
    else:
        import yaml

        text = yaml.safe_dump(
            {"shots": shots}, sort_keys=False, allow_unicode=True, width=1_000_000
        )
        click.echo(text, nl=False)
    return EXIT_OK
