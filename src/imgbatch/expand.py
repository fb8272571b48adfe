"""Turn a validated manifest into the shots to make.

Takes a `Manifest` (defaults already merged) and the environment; gives the output folder and a
`Shot` per manifest entry, each with its normalized `ImageRequest` and the file it becomes.
Reference images come checked and hashed from `load_manifest`; reference URLs are fetched here,
once each, because their content hash is part of the request's key. `shot_list` gives the same
shots as plain dicts for `imgbatch expand`, without fetching anything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgbatch.errors import ManifestError, ManifestProblem
from imgbatch.manifest import Manifest, ShotSpec
from imgbatch.models import DEFAULT_MODEL
from imgbatch.reference import (
    REFERENCE_MAX_BYTES,
    ReferenceImage,
    ReferenceProblem,
    load_local_reference,
)
from imgbatch.request import DEFAULT_SIZE, ImageRequest

# The whole fetch of a reference URL (connect, headers, body), not each read.
REFERENCE_URL_DEADLINE = 30.0
_MIB = REFERENCE_MAX_BYTES // (1024 * 1024)


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
        source = spec.fields.get("reference_image")
        reference = references.read(spec, source) if source else None
        shots.append(Shot(spec.id, _request(spec, reference, provider), f"{spec.id}.png"))
    return Expansion(output_dir_for(manifest, environ), tuple(shots), provider)


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
        if not (source and _is_url(source)):
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


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class _ReferenceReader:
    """Reads each distinct reference once; a failure names the shot that needed it."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.seen: dict[str, ReferenceImage] = dict(manifest.references)

    def read(self, spec: ShotSpec, source: str) -> ReferenceImage:
        if source not in self.seen:
            self.seen[source] = self._load(spec, source)
        return self.seen[source]

    def _load(self, spec: ShotSpec, source: str) -> ReferenceImage:
        try:
            if _is_url(source):
                reference = ReferenceImage.from_bytes(_fetch(source), source)
                # Keyed by what was fetched now; the URL is what the API is given.
                return ReferenceImage(reference.sha256, source, reference.media_type)
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
                f"reference image '{source}' {exc}",
                shot=spec.id,
                field="reference_image",
            )
            raise ManifestError([problem]) from None


def _fetch(url: str) -> bytes:
    """The body at `url`: at most REFERENCE_MAX_BYTES, all of it within REFERENCE_URL_DEADLINE.

    A per-read timeout is not enough: a server sending a byte every few seconds would never be
    cut off. The fetch runs on its own event loop in a worker thread, so it works the same
    whether or not the caller is inside one.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="imgbatch-ref") as pool:
        return pool.submit(asyncio.run, _fetch_async(url)).result()


async def _fetch_async(url: str) -> bytes:
    # Imported here, not at the top: only a manifest with a reference URL needs it, and `validate`
    # or `plan` of any other should not pay its import (tests/test_startup.py).
    import aiohttp

    deadline = REFERENCE_URL_DEADLINE
    try:
        async with asyncio.timeout(deadline):
            timeout = aiohttp.ClientTimeout(total=None, connect=deadline)
            async with (
                aiohttp.ClientSession(timeout=timeout, trust_env=True) as session,
                session.get(url, headers={"User-Agent": "imgbatch"}) as response,
            ):
                if response.status != 200:
                    raise ValueError(f"cannot be fetched: HTTP {response.status}")
                declared = response.content_length
                if declared is not None and declared > REFERENCE_MAX_BYTES:
                    raise ReferenceProblem(f"is larger than {_MIB} MiB ({declared} bytes)")
                data = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > REFERENCE_MAX_BYTES:
                        raise ReferenceProblem(f"is larger than {_MIB} MiB")
                return bytes(data)
    except TimeoutError:
        raise ValueError(f"cannot be fetched: not received in full within {deadline:g} s") from None
    except aiohttp.ClientError as exc:
        raise ValueError(f"cannot be fetched: {type(exc).__name__} {exc}".rstrip()) from None
