"""Saying more in fewer lines: `vars:`, `matrix:`, `variants:` and `seed: auto`.

Takes a parsed manifest (checked by the schema, but read defensively: rules run on invalid files
too, to report every problem at once); gives one `ExpandedShot` per shot to make, in manifest
order, with defaults merged under its own fields, `{name}` placeholders filled in and its seed
resolved, plus a `Slip` for each thing that keeps a shot from expanding. Each expanded shot keeps
the index of the shot it was written as, so its errors point at that shot's lines.

    >>> auto_seed("cyclist-spot", "s01-dawn-road") == auto_seed("cyclist-spot", "s01-dawn-road")
    True
    >>> fill("{angle} view, {{not a variable}}", {"angle": "front"})
    'front view, {not a variable}'

Placeholders are filled only where the manifest asks for it (it has `vars:`, or the shot a
`matrix:`): a version-1 manifest written before these existed, with a literal `{` in a prompt,
means what it always meant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from imgbatch.manifest.catalogue import SEED_MAX
from imgbatch.manifest.places import JsonPath

# A matrix of ten variables of ten values is ten billion shots: a mistake, refused before a
# single one is built. The 100,000-shot benchmark is far below.
MAX_SHOTS = 1_000_000
MAX_VARIANTS = 10_000  # as the schema says
AUTO = "auto"
# Fields a shot has that are instructions for expansion, not part of any request.
EXPANSION_FIELDS = ("matrix", "variants", "pick")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


# The matrix values of a shot made by no matrix: one empty mapping shared by all of them (an
# empty dict apiece was 64 bytes a shot of a 100,000-shot list).
NO_VALUES: Mapping[str, Any] = MappingProxyType({})


def no_values() -> Mapping[str, Any]:
    """`NO_VALUES` (a dataclass takes no shared default that is not hashable)."""
    return NO_VALUES


@dataclass(frozen=True, slots=True)
class ExpandedShot:
    id: str
    index: int  # the shot as written: shots[index]
    fields: Mapping[str, Any]
    # Made by `variants:`: its number (1..N) and the id the variants share (`poster` for
    # poster-2); what the contact sheet groups by and what `pick:` chooses among.
    variant: int | None = None
    base_id: str | None = None
    # Made by `matrix:`: this combination's values, by variable.
    values: Mapping[str, Any] = dataclasses.field(default_factory=no_values)


@dataclass(frozen=True, slots=True)
class Slip:
    """Why a shot did not expand: where it was written (parent path and field) and what."""

    parent: JsonPath
    field: str
    message: str
    shot_id: str | None = None  # the expanded id, when the problem is one combination's


def auto_seed(manifest_name: str, shot_id: str) -> int:
    """`seed: auto`: the first 4 bytes of SHA-256("<manifest name>/<shot id>"), big-endian, with
    the top bit cleared; the same on every machine and every run, in [0, 2147483647]."""
    digest = hashlib.sha256(f"{manifest_name}/{shot_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & SEED_MAX


def fill(template: str, values: Mapping[str, Any]) -> str:
    """`{name}` replaced by its value; `{{` and `}}` stand for a literal brace."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return match.group(0)[0]
        return _text(values[name])

    return _PLACEHOLDER.sub(replace, template)


def placeholders(template: str) -> list[str]:
    """The variable names `template` uses, in order."""
    return [name for name in _PLACEHOLDER.findall(template) if name]


def _label(shot: dict[str, Any]) -> str | None:
    shot_id = shot.get("id")
    return shot_id if isinstance(shot_id, str) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def expand_shots(data: Any, manifest_name: str) -> tuple[list[ExpandedShot], list[Slip]]:
    """Every shot `data` describes, and every slip; a shot that slips is left out."""
    if not isinstance(data, dict):
        return [], []
    raw_shots = data.get("shots")
    defaults = data.get("defaults")
    variables = data.get("vars")
    expander = _Expander(
        manifest_name,
        defaults if isinstance(defaults, dict) else {},
        _valid_vars(variables),
    )
    shots: list[ExpandedShot] = []
    for index, shot in enumerate(raw_shots if isinstance(raw_shots, list) else []):
        if isinstance(shot, dict):
            shots.extend(expander.shot(index, shot))
            if len(shots) > MAX_SHOTS:
                message = (
                    f"the manifest expands to more than {MAX_SHOTS:,} shots; "
                    "split it, or use fewer matrix values or variants"
                )
                field = "matrix" if "matrix" in shot else "variants"
                return [], [*expander.slips, Slip(("shots", index), field, message)]
    return shots, expander.slips


def _valid_vars(variables: Any) -> dict[str, Any] | None:
    """`vars:` as usable values (the schema reports anything else), or None when absent."""
    if not isinstance(variables, dict):
        return None
    return {
        name: value
        for name, value in variables.items()
        if isinstance(value, str | int | float) and not isinstance(value, bool)
    }


class _Expander:
    def __init__(
        self, manifest_name: str, defaults: dict[str, Any], variables: dict[str, Any] | None
    ) -> None:
        self.name = manifest_name
        self.defaults = defaults
        self.variables = variables
        self.slips: list[Slip] = []

    def shot(self, index: int, shot: dict[str, Any]) -> Iterator[ExpandedShot]:
        merged = {**self.defaults, **shot}
        matrix = shot.get("matrix")
        variants = shot.get("variants")
        if "pick" in shot and not self._pick_allowed(index, shot):
            return
        if self.variables is None and matrix is None and variants is None:
            # A version-1 shot: only `seed: auto` can need resolving.
            merged.pop("pick", None)
            shot_id = merged.get("id")
            if merged.get("seed") == AUTO and isinstance(shot_id, str):
                merged["seed"] = auto_seed(self.name, shot_id)
            yield ExpandedShot(shot_id if isinstance(shot_id, str) else "", index, merged)
            return
        for name in EXPANSION_FIELDS:
            merged.pop(name, None)
        count = variants if isinstance(variants, int) and not isinstance(variants, bool) else None
        if variants is not None and (count is None or not 1 <= count <= MAX_VARIANTS):
            return  # the schema says what is wrong with it
        combinations = self._combinations(index, shot, matrix, count or 1)
        if combinations is None:
            return
        if count is not None and not self._seed_allows_variants(index, shot, merged, count):
            return
        templated = self.variables is not None or matrix is not None
        for combination in combinations:
            values = {**(self.variables or {}), **combination}
            fields = (
                {
                    key: fill(value, values) if isinstance(value, str) else value
                    for key, value in merged.items()
                }
                if templated
                else dict(merged)
            )
            base_id = fields.get("id")
            if not isinstance(base_id, str):
                continue
            if count is None:
                yield self._seeded(index, fields, base_id, None, combination)
            else:
                for number in range(1, count + 1):
                    yield self._seeded(index, fields, base_id, number, combination)

    def _seeded(
        self,
        index: int,
        fields: dict[str, Any],
        base_id: str,
        variant: int | None,
        values: dict[str, Any],
    ) -> ExpandedShot:
        shot_id = base_id if variant is None else f"{base_id}-{variant}"
        seed = fields.get("seed")
        resolved = dict(fields, id=shot_id)
        if seed == AUTO:
            resolved["seed"] = auto_seed(self.name, shot_id)
        elif isinstance(seed, int | float) and not isinstance(seed, bool):
            resolved["seed"] = seed + (variant or 1) - 1
        if variant is None:
            return ExpandedShot(shot_id, index, resolved, values=values)
        return ExpandedShot(shot_id, index, resolved, variant, base_id, values)

    def _pick_allowed(self, index: int, shot: dict[str, Any]) -> bool:
        """`pick: N` chooses one of a shot's own variants; anything else is a slip."""
        pick, variants = shot.get("pick"), shot.get("variants")
        if not isinstance(pick, int) or isinstance(pick, bool):
            return True  # the schema says what is wrong with it
        message = None
        if variants is None:
            message = (
                f"pick: {pick} chooses among a shot's variants, and this shot has no variants:; "
                "add variants: N, or remove pick:"
            )
        elif "matrix" in shot:
            message = (
                f"pick: {pick} would choose take {pick} of every matrix combination at once; "
                "pick works on a shot with variants: and no matrix: (write the combination you "
                "want to pick from as its own shot)"
            )
        elif isinstance(variants, int) and not isinstance(variants, bool) and pick > variants:
            message = f"pick: {pick} names a take this shot does not have (variants: {variants})"
        if message is None:
            return True
        self.slips.append(Slip(("shots", index), "pick", message, _label(shot)))
        return False

    def _origin(self, index: int, shot: dict[str, Any], field: str) -> JsonPath:
        return ("shots", index) if field in shot or field not in self.defaults else ("defaults",)

    def _combinations(
        self, index: int, shot: dict[str, Any], matrix: Any, variants: int
    ) -> list[dict[str, Any]] | None:
        """Each matrix combination's variables (one empty one without a matrix); None when the
        shot cannot expand (a slip is recorded, or the schema reports it)."""
        names: list[str] = []
        if matrix is not None:
            if not isinstance(matrix, dict) or not matrix:
                return None
            if not all(isinstance(values, list) and values for values in matrix.values()):
                return None
            names = list(matrix)
        known = set(self.variables or {}) | set(names)
        ok = True
        merged = {**self.defaults, **shot}
        for field, value in merged.items():
            if not isinstance(value, str) or field in EXPANSION_FIELDS:
                continue
            missing = [name for name in dict.fromkeys(placeholders(value)) if name not in known]
            if missing:
                ok = False
                shown = ", ".join(sorted(known)) or "none"
                message = (
                    f"unknown variable {', '.join('{' + name + '}' for name in missing)}; "
                    f"define it under vars: or in the shot's matrix: (known: {shown}); "
                    "write {{ for a literal brace"
                )
                origin = self._origin(index, shot, field)
                self.slips.append(Slip(origin, field, message, _label(shot)))
        shot_id = shot.get("id")
        if names and isinstance(shot_id, str):
            unused = [name for name in names if name not in placeholders(shot_id)]
            if unused:
                ok = False
                example = shot_id + "".join(f"-{{{name}}}" for name in unused)
                message = (
                    f"id '{shot_id}' does not use matrix variable "
                    f"{', '.join('{' + name + '}' for name in unused)}; each combination needs "
                    f"its own id, for example '{example}'"
                )
                self.slips.append(Slip(("shots", index), "id", message))
        if not ok:
            return None
        if not names:
            return [{}]
        combinations = math.prod(len(matrix[name]) for name in names)
        if combinations * variants > MAX_SHOTS:
            times = f" x {variants} variants" if variants > 1 else ""
            message = (
                f"the matrix makes {combinations:,} combinations{times}: more than "
                f"{MAX_SHOTS:,} shots"
            )
            self.slips.append(Slip(("shots", index), "matrix", message))
            return None
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(matrix[name] for name in names))
        ]

    def _seed_allows_variants(
        self, index: int, shot: dict[str, Any], merged: dict[str, Any], count: int
    ) -> bool:
        seed = merged.get("seed")
        if seed is None:
            message = (
                f"variants: {count} needs a seed to tell the variants apart: "
                "add seed: auto, or a number (the variants get seed, seed+1, ...)"
            )
            self.slips.append(Slip(("shots", index), "variants", message))
            return False
        if isinstance(seed, int) and not isinstance(seed, bool) and seed + count - 1 > SEED_MAX:
            message = (
                f"seed {seed} with variants: {count} goes past {SEED_MAX} "
                f"(the last variant would get {seed + count - 1}); lower the seed"
            )
            origin = self._origin(index, shot, "seed")
            self.slips.append(Slip(origin, "seed", message, _label(shot)))
            return False
        return True
