"""`imgbatch generate`: one request, from flags or a JSON request."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from imgbatch.cli.common import (
    EXIT_OK,
    _verbosity,
    error_boundary,
    store_read_only_option,
)
from imgbatch.errors import ConfigError, ImgbatchError
from imgbatch.providers import PROVIDER_CHOICES

if TYPE_CHECKING:
    pass


# Worded for one request (generate --help speaks of no manifest).
_store_option = click.option(
    "--store",
    metavar="URL",
    default=None,
    help="A shared store of images for every machine, job and account: s3://BUCKET/PREFIX, "
    "oss://BUCKET/PREFIX or a folder (default: IMGBATCH_STORE). A request anyone sharing it "
    "made is restored from it, not paid again.",
)


def generate_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """`generate`'s --json, --provider, --allow-reference-outside, --store, --store-read-only
    and -q, worded for one request."""
    function = store_read_only_option(_store_option(function))
    function = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help='As --print-response, and on a failure print {"error": {...}} on stdout instead.',
    )(function)
    function = click.option(
        "-q",
        "--quiet",
        "verbosity",
        flag_value="quiet",
        default=None,
        help="Print only errors and the final line (no spinner, no progress lines).",
    )(function)
    function = click.option(
        "--allow-reference-outside",
        is_flag=True,
        help="Trust this request: read a local reference_image outside the current folder.",
    )(function)
    return click.option(
        "--provider",
        type=click.Choice(PROVIDER_CHOICES),
        default=None,
        help="Image provider; auto = dashscope when an API key is configured, else the offline "
        "placeholder (default: dashscope).",
    )(function)


@click.command("generate")
@click.option(
    "--request",
    "request_text",
    required=True,
    help="The normalized request: JSON, @file.json, or - to read it from stdin.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The image file to write (default: output/ai-image-qwen-image/images/<key>.png).",
)
@click.option(
    "--print-response",
    is_flag=True,
    help="Print the normalized response as one JSON object on stdout.",
)
@generate_options
@error_boundary
def generate_command(
    request_text: str,
    output: Path | None,
    print_response: bool,
    as_json: bool,
    provider: str | None,
    allow_reference_outside: bool,
    verbosity: str | None,
    store: str | None,
    store_read_only: bool,
) -> int:
    """Make one image from one request, as the seed skill's helper script does. While the
    request is awaited, a spinner (on a terminal) or a line when it is sent and when it is
    answered (in a log) says what it waits for."""
    from imgbatch.review.waiting import Waiting
    from imgbatch.run.generate import error_json, generate

    try:
        with Waiting(sys.stderr, verbosity=_verbosity(verbosity)) as waiting:
            response = generate(
                _read_request(request_text),
                output=output,
                provider=provider,
                allow_reference_outside=allow_reference_outside,
                on_phase=waiting,
                store=store,
                store_read_only=store_read_only,
            )
    except ImgbatchError as exc:
        if as_json:
            click.echo(json.dumps(error_json(exc), ensure_ascii=False))
        raise  # the message on stderr and the exit code, as without --json
    where = "from the cache, nothing sent" if response["cached"] else "generated"
    click.echo(f"{response['file']} ({where})", err=True)
    if print_response or as_json:
        click.echo(json.dumps(response, ensure_ascii=False))
    return EXIT_OK


def _read_request(text: str) -> Any:
    """`--request` as JSON, `@file.json` or `-` (stdin)."""
    source = "--request"
    if text == "-":
        text, source = sys.stdin.read(), "the request on stdin"
    elif text.startswith("@"):
        path = Path(text[1:])
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the request file {path}: {exc}") from None
    from imgbatch.manifest.places import bounded_int

    try:
        # bounded_int: a 5000-digit seed is refused by the field's own check, by name.
        return json.loads(text, parse_int=bounded_int)
    except ValueError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to be a request") from None
