"""Turn a validated manifest into the shots to make.

Takes a `Manifest` (defaults already merged) and the environment; gives the output folder and a
`Shot` per manifest entry, each with its normalized `ImageRequest` and the file it becomes.
Reference images are read here, once per distinct file or URL, because their content hash is part
of the request's key.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imgbatch.errors import ManifestError, ManifestProblem
from imgbatch.manifest import Manifest
from imgbatch.models import DEFAULT_MODEL
from imgbatch.request import DEFAULT_SIZE, ImageRequest, ReferenceImage

REFERENCE_URL_TIMEOUT = 30.0
REFERENCE_MAX_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Shot:
    id: str
    request: ImageRequest
    file: str  # relative to the output folder


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
        return Path(override) / manifest.name
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
        fields = spec.fields
        reference_source = fields.get("reference_image")
        request = ImageRequest(
            prompt=fields["prompt"],
            model=fields.get("model", DEFAULT_MODEL),
            size=fields.get("size", DEFAULT_SIZE),
            negative_prompt=fields.get("negative_prompt") or None,
            style=fields.get("style"),
            # JSON Schema counts 5.0 as an integer; the key and the API must see 5.
            seed=int(fields["seed"]) if fields.get("seed") is not None else None,
            reference=references.read(spec.id, reference_source) if reference_source else None,
            prompt_extend=fields.get("prompt_extend", False),
            watermark=fields.get("watermark", False),
            provider=provider,
        )
        shots.append(Shot(spec.id, request, f"{spec.id}.png"))
    return Expansion(output_dir_for(manifest, environ), tuple(shots), provider)


class _ReferenceReader:
    """Reads each distinct reference once; a failure names the shot that needed it."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.seen: dict[str, ReferenceImage] = {}

    def read(self, shot_id: str, source: str) -> ReferenceImage:
        if source not in self.seen:
            self.seen[source] = self._load(shot_id, source)
        return self.seen[source]

    def _load(self, shot_id: str, source: str) -> ReferenceImage:
        try:
            if source.startswith(("http://", "https://")):
                data = _fetch(source)
                reference = ReferenceImage.from_bytes(data, source)
                # Keyed by what was fetched now; the URL is what the API is given.
                return ReferenceImage(reference.sha256, source, reference.media_type)
            return ReferenceImage.from_path((self.manifest.base_dir / source).resolve())
        except (OSError, ValueError) as exc:
            problem = ManifestProblem(
                str(self.manifest.path),
                1,
                1,
                f"shot {shot_id}, field reference_image",
                f"cannot read reference image '{source}': {exc}",
            )
            raise ManifestError([problem]) from None


def _fetch(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "imgbatch"})
    with urllib.request.urlopen(request, timeout=REFERENCE_URL_TIMEOUT) as response:
        data: bytes = response.read(REFERENCE_MAX_BYTES + 1)
    if len(data) > REFERENCE_MAX_BYTES:
        raise ValueError(f"larger than {REFERENCE_MAX_BYTES // (1024 * 1024)} MiB")
    return data
