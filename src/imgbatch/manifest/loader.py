"""Load a shot list: YAML with positions, the JSON Schema, then the model rules.

Takes a path to a version-1 manifest (or data already parsed); gives a validated `Manifest` whose
shots carry their defaults merged in, or raises `ManifestError` listing every problem in the file
at once, each at file:line:column with the shot id and field, what was wrong and what would be
right. The three jobs live in their own modules: `yaml_load` (the file and its positions),
`schema_messages` (the schema and its errors in words), `rules` (what a schema cannot say).

    >>> manifest = load_manifest("manifests/cyclist-spot.yaml")
    >>> [shot.id for shot in manifest.shots][:2]
    ['s01-dawn-road', 's02-dusk-portrait']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from imgbatch.errors import ManifestError
from imgbatch.manifest.catalogue import MIN_RPS
from imgbatch.manifest.expansion import no_values
from imgbatch.manifest.places import JsonPath
from imgbatch.manifest.reference import ReferenceImage
from imgbatch.manifest.rules import Checker
from imgbatch.manifest.schema_messages import manifest_schema
from imgbatch.manifest.yaml_load import Document, Positions, parse_yaml, read_manifest_text
from imgbatch.units.money import CostLimit, Pricing
from imgbatch.units.quota import Quota, parse_quota

__all__ = [
    "MIN_RPS",
    "Limits",
    "Manifest",
    "ShotSpec",
    "load_manifest",
    "manifest_from_data",
    "manifest_schema",
]


@dataclass(frozen=True)
class Limits:
    concurrency: int | None = None
    rps: float | None = None
    quota: Quota | None = None
    # `max_cost`: no run may cost more (the rules have checked it parses).
    max_cost: CostLimit | None = None


@dataclass(frozen=True, slots=True)
class ShotSpec:
    """One shot to make: `defaults` merged under its own fields, variables filled in, its seed
    resolved. `index` is the shot as written (`shots[index]`), which a matrix or variants can
    have made several of."""

    id: str
    index: int
    fields: Mapping[str, Any]
    # Made by `variants:`: its number and the id the variants share (poster-2: 2, poster).
    variant: int | None = None
    base_id: str | None = None
    # Made by `matrix:`: this combination's values, by variable.
    values: Mapping[str, Any] = dataclasses.field(default_factory=no_values)


# The fields of a shot already expanded (`Manifest.without_fields`): none.
_EXPANDED: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    provider: str | None
    output_dir: str | None
    limits: Limits
    shots: tuple[ShotSpec, ...]
    # Local references, checked and hashed while validating, by the path as written.
    references: Mapping[str, ReferenceImage] = dataclasses.field(default_factory=dict)
    allow_reference_outside: bool = False
    # Where each reference_image was written, by (shot index | "defaults", field): (line, col).
    positions: Mapping[JsonPath, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # `simplify: false`: a 200 without an image fails the shot instead of asking once more.
    simplify: bool = True
    # `pricing:`: prices per image that win over the built-in table (see imgbatch.plan.pricing).
    pricing: Pricing | None = None
    # `pick:`: the take chosen among a shot's variants, by the id they share (poster: poster-2);
    # apply also writes it as <that id>.png.
    picks: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # `output.store:`: a shared store (s3://, oss://, or a folder relative to the manifest).
    store: str | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def without_fields(self) -> Manifest:
        """This manifest once its shots are expanded (`imgbatch.shots.expand`): its shots
        without their merged `fields`, which only expansion reads (ids, variants, matrix
        values and picks stay, for the contact sheet and housekeeping). An apply holds its
        manifest to the end, and a 100,000-shot list's fields were 18 MB of it."""
        shots = tuple(
            ShotSpec(spec.id, spec.index, _EXPANDED, spec.variant, spec.base_id, spec.values)
            for spec in self.shots
        )
        return replace(self, shots=shots)

    def position_of(self, shot: ShotSpec, name: str) -> tuple[int, int]:
        """Where `name` was written for `shot` (on the shot or under defaults); else (1, 1)."""
        for path in (("shots", shot.index, name), ("defaults", name)):
            if path in self.positions:
                return self.positions[path]
        return (1, 1)


def load_manifest(path: str | Path, *, allow_reference_outside: bool = False) -> Manifest:
    """Parse, validate and merge a manifest; raise `ManifestError` with every problem found.

    `allow_reference_outside` lets local reference images lie outside the manifest's folder
    tree (a trust decision; the manifest can also say so itself, see docs/manifest.md).
    """
    path = Path(path)
    display = str(path)
    text = read_manifest_text(path, display)
    references: dict[str, ReferenceImage | str] = {}
    # Positions cost memory and time, and matter only when something is wrong: a valid manifest
    # is parsed once without them; an invalid one again with them, to locate every problem.
    for track_positions in (False, True):
        document, structural = parse_yaml(text, display, track_positions)
        name = _name(document.data, path)
        checker = Checker(document, display, path.parent, allow_reference_outside, references, name)
        # jsonschema reports a missing field once per required name: say each problem once.
        unique = dict.fromkeys([*structural, *checker.problems()])
        problems = sorted(unique, key=lambda p: (p.line, p.column))
        if not problems:
            return _build_manifest(path, document, checker)
    raise ManifestError(problems)


def _build_manifest(path: Path, document: Document, checker: Checker) -> Manifest:
    data: dict[str, Any] = document.data
    shots = tuple(
        ShotSpec(shot.id, shot.index, shot.fields, shot.variant, shot.base_id, shot.values)
        for shot in checker.expanded
    )
    written = data["shots"]
    picks = {
        shot.base_id: shot.id
        for shot in shots
        if shot.base_id is not None and shot.variant == written[shot.index].get("pick")
    }
    limits = data.get("limits", {})
    references = {
        written: reference
        for written, reference in checker.references.items()
        if isinstance(reference, ReferenceImage)
    }
    return Manifest(
        path=path,
        name=_name(data, path),
        provider=data.get("provider"),
        output_dir=data.get("output", {}).get("dir"),
        store=data.get("output", {}).get("store"),
        limits=Limits(
            limits.get("concurrency"),
            limits.get("rps"),
            # The schema's pattern has checked it: parse_quota accepts what the pattern does.
            parse_quota(limits["quota"]) if "quota" in limits else None,
            CostLimit.parse(limits["max_cost"], "limits.max_cost")
            if "max_cost" in limits
            else None,
        ),
        shots=shots,
        references=references,
        allow_reference_outside=checker.allow_reference_outside,
        positions=dict(document.values),
        simplify=data.get("simplify", True),
        pricing=Pricing.from_data(data["pricing"]) if "pricing" in data else None,
        picks=picks,
    )


def _name(data: Any, path: Path) -> str:
    """The manifest's `name:`, else its file name without the extension."""
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else path.stem


def manifest_from_data(
    data: Any, *, display: str, base_dir: Path, allow_reference_outside: bool = False
) -> Manifest:
    """Validate an already-parsed manifest by the same rules as a file: a dict from a Python
    caller, or a single `generate` request wrapped as a one-shot manifest. There are no lines to
    point at, so each problem names its field; relative paths are taken from `base_dir`, and
    local references must lie under it unless `allow_reference_outside`."""
    document = Document(data, Positions(False), Positions(False))
    checker = Checker(
        document, display, base_dir, allow_reference_outside, {}, _name(data, base_dir / display)
    )
    problems = [replace(problem, line=0, column=0) for problem in checker.problems()]
    if problems:
        raise ManifestError(list(dict.fromkeys(problems)))
    return _build_manifest(base_dir / display, document, checker)


ManifestSource = str | Path | Mapping[str, Any]
"""A manifest file's path, or a manifest already parsed into a dict (relative paths in it are
taken from the current folder)."""


def read_manifest(source: ManifestSource, *, allow_reference_outside: bool = False) -> Manifest:
    """`load_manifest` for a path, `manifest_from_data` for a dict; raises `ManifestError`."""
    if isinstance(source, Mapping):
        return manifest_from_data(
            dict(source),
            display="manifest",
            base_dir=Path.cwd(),
            allow_reference_outside=allow_reference_outside,
        )
    return load_manifest(source, allow_reference_outside=allow_reference_outside)
