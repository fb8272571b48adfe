"""Turn a validated manifest into the shots to make.

Takes a `Manifest` (defaults already merged) and the environment; gives the output folder and a
`Shot` per manifest entry, each with its normalized `ImageRequest` and the file it becomes.
Reference images come checked and hashed from `load_manifest`. Nothing is downloaded here: a
reference URL stays unfetched (its request's key is provisional) until `fetch_references`, which
only `apply` and `generate` call, fetches each distinct URL once and keys its shots by its content.
`shot_list` gives the same shots as plain dicts for `imgbatch expand`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imgbatch.errors import ManifestError, ManifestProblem
from imgbatch.manifest import Manifest, ShotSpec
from imgbatch.manifest.catalogue import DEFAULT_MODEL, DEFAULT_SIZE
from imgbatch.manifest.reference import (
    ReferenceImage,
    fetch_urls,
    is_url,
    load_local_reference,
    shown,
)
from imgbatch.shots.request import ImageRequest


@dataclass(frozen=True, slots=True)
class Shot:
    id: str
    request: ImageRequest
    file: str  # relative to the output folder

    # What its results entry repeats (`imgbatch.state.results.KnownShot`): a loaded state
    # shares these strings with the shot list instead of holding copies.
    @property
    def key(self) -> str:
        return self.request.key

    @property
    def prompt(self) -> str:
        return self.request.prompt


@dataclass(frozen=True)
class Expansion:
    output_dir: Path
    shots: tuple[Shot, ...]
    provider: str


def output_dir_for(manifest: Manifest, environ: Mapping[str, str] | None = None) -> Path:
    """`output.dir` relative to the manifest, else `output/<name>` beside it.

    `OUTPUT_DIR`, when set, replaces the base: the folder becomes `$OUTPUT_DIR/<name>`.
    """
    environ = os.environ if environ is None else environ
    override = environ.get("OUTPUT_DIR")
    if override:
        # `OUTPUT_DIR="~/renders"` (quoted, so no shell expanded it) means the home folder.
        return Path(override).expanduser() / manifest.name
    if manifest.output_dir:
        return manifest.base_dir / manifest.output_dir
    return manifest.base_dir / "output" / manifest.name


def expand(
    manifest: Manifest, *, provider: str, environ: Mapping[str, str] | None = None
) -> Expansion:
    """Every shot's normalized request for `provider`, in manifest order."""
    references = _ReferenceReader(manifest)
    shots = []
    for spec in manifest.shots:
        source = spec.fields.get("reference_image")
        reference = references.read(spec, source) if source else None
        shots.append(Shot(spec.id, _request(spec, reference, provider), f"{spec.id}.png"))
    return Expansion(output_dir_for(manifest, environ), tuple(shots), provider)


def references_to_fetch(expansion: Expansion) -> list[str]:
    """The reference URLs `fetch_references` would fetch (one per shot that names one)."""
    return [
        shot.request.reference.source
        for shot in expansion.shots
        if shot.request.reference is not None and not shot.request.reference.fetched
    ]


async def fetch_references(expansion: Expansion) -> Expansion:
    """`expansion` with every reference URL fetched (once, however many shots name it) and its
    shots keyed by the content; a URL that could not be fetched stays unfetched, with its
    `problem`, and the executor fails its shots (naming the field) without sending them."""
    urls = references_to_fetch(expansion)
    if not urls:
        return expansion
    fetched = await fetch_urls(urls)
    shots = tuple(
        replace(shot, request=replace(shot.request, reference=fetched[reference.source]))
        if (reference := shot.request.reference) is not None and not reference.fetched
        else shot
        for shot in expansion.shots
    )
    return replace(expansion, shots=shots)


def _request(spec: ShotSpec, reference: ReferenceImage | None, provider: str) -> ImageRequest:
    fields = spec.fields
    return ImageRequest(
        prompt=fields["prompt"],
        model=fields.get("model", DEFAULT_MODEL),
        size=fields.get("size", DEFAULT_SIZE),
        negative_prompt=fields.get("negative_prompt") or None,
        style=fields.get("style"),
        # JSON Schema counts 5.0 as an integer; the key and the API must see 5.
        seed=int(fields["seed"]) if fields.get("seed") is not None else None,
        reference=reference,
        prompt_extend=fields.get("prompt_extend", False),
        watermark=fields.get("watermark", False),
        provider=provider,
    )


def shot_list(
    manifest: Manifest, *, provider: str, environ: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every shot to make, in manifest order, as `imgbatch expand` prints it: its fields after
    `vars`, `matrix`, `variants` and `seed: auto` (model and size with their defaults, other
    unset fields None), the image file apply would write and the request's cache key.

    Nothing is downloaded: a reference URL's content, and so its key, is unknown until apply
    fetches it, and its `key` is None.
    """
    output_dir = output_dir_for(manifest, environ)
    references = _ReferenceReader(manifest)
    shots = []
    for spec in manifest.shots:
        source = spec.fields.get("reference_image")
        key: str | None = None
        if not (source and is_url(source)):
            reference = references.read(spec, source) if source else None
            key = _request(spec, reference, provider).key
        fields = spec.fields
        shots.append(
            {
                "id": spec.id,
                "prompt": fields["prompt"],
                "negative_prompt": fields.get("negative_prompt") or None,
                "size": fields.get("size", DEFAULT_SIZE),
                "seed": int(fields["seed"]) if fields.get("seed") is not None else None,
                "style": fields.get("style"),
                "model": fields.get("model", DEFAULT_MODEL),
                "reference_image": source or None,
                "file": str(output_dir / f"{spec.id}.png"),
                "key": key,
            }
        )
    return shots


class _ReferenceReader:
    """Reads each distinct local reference once; a failure names the shot that needed it."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.seen: dict[str, ReferenceImage] = dict(manifest.references)

    def read(self, spec: ShotSpec, source: str) -> ReferenceImage:
        if source not in self.seen:
            self.seen[source] = self._load(spec, source)
        return self.seen[source]

    def _load(self, spec: ShotSpec, source: str) -> ReferenceImage:
        if is_url(source):
            return ReferenceImage.at_url(source)  # fetched by apply and generate only
        try:
            # Checked by load_manifest already, unless the Manifest was built by hand.
            return load_local_reference(
                source,
                self.manifest.base_dir,
                allow_outside=self.manifest.allow_reference_outside,
            )
        except (OSError, ValueError) as exc:
            line, column = self.manifest.position_of(spec, "reference_image")
            problem = ManifestProblem(
                str(self.manifest.path),
                line,
                column,
                f"shot {spec.id}, field reference_image",
                f"reference image '{shown(source)}' {exc}",
                shot=spec.id,
                field="reference_image",
            )
            raise ManifestError([problem]) from None
