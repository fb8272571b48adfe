"""The rules a schema cannot say, and the order every check runs in.

Takes a parsed `Document`; gives every `ManifestProblem` in it: the schema's (explained by
`schema_messages`), then the model rules (sizes per model, prompt lengths with the style
appended), unique ids ignoring case, a finite `limits.rps`, and local reference images (read,
checked and hashed once per load). A bad default is reported once, naming the shots it reaches.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgbatch.errors import ManifestProblem
from imgbatch.manifest.places import JsonPath, describe, show
from imgbatch.manifest.schema_messages import schema_problems
from imgbatch.manifest.yaml_load import Document
from imgbatch.models import DEFAULT_MODEL, MODELS, nearest_size
from imgbatch.reference import ReferenceImage, ReferenceProblem, load_local_reference
from imgbatch.request import DEFAULT_SIZE, ImageRequest

# Below this a run would wait a quarter of an hour between requests: a typo, not a plan.
MIN_RPS = 0.001


class Checker:
    """Collects schema and model-rule problems for one parsed document."""

    def __init__(
        self,
        document: Document,
        display: str,
        base_dir: Path,
        allow_reference_outside: bool,
        references: dict[str, ReferenceImage | str],
    ) -> None:
        self.document = document
        self.display = display
        self.base_dir = base_dir
        data = document.data
        trust = data.get("trust") if isinstance(data, dict) else None
        self.allow_reference_outside = allow_reference_outside or (
            isinstance(trust, dict) and trust.get("references_outside") is True
        )
        # Each distinct reference is checked and read once per load, across both passes.
        self.references = references
        shots = data.get("shots") if isinstance(data, dict) else None
        self.shots: list[Any] = shots if isinstance(shots, list) else []
        defaults = data.get("defaults") if isinstance(data, dict) else None
        self.defaults: dict[str, Any] = defaults if isinstance(defaults, dict) else {}
        self._from_defaults: dict[tuple[str, str], list[int]] = {}

    def problems(self) -> Iterator[ManifestProblem]:
        yield from schema_problems(self.document.data, self._problem)
        yield from self._limits_problems()
        yield from self._id_problems()
        for index, shot in enumerate(self.shots):
            if isinstance(shot, dict):
                for problem in self._shot_rule_problems(index, shot):
                    if problem is not _DEFERRED:
                        yield problem
        yield from self._defaults_problems()

    def _shot_id(self, path: JsonPath) -> str | None:
        if len(path) >= 2 and path[0] == "shots" and isinstance(path[1], int):
            if path[1] < len(self.shots) and isinstance(self.shots[path[1]], dict):
                shot_id = self.shots[path[1]].get("id")
                return shot_id if isinstance(shot_id, str) else None
        return None

    def _problem(
        self, parent: JsonPath, field: str | int | None, message: str, *, at_key: bool = False
    ) -> ManifestProblem:
        path = parent if field is None else (*parent, field)
        position = (self.document.keys.get(path) if at_key else None) or self.document.values.get(
            path, self.document.values.get(parent)
        )
        line, column = position or (1, 1)
        return ManifestProblem(
            self.display, line, column, describe(parent, field, self._shot_id(path)), message
        )

    def _limits_problems(self) -> Iterator[ManifestProblem]:
        # JSON Schema's minimum lets NaN through (every comparison with it is false) and has no
        # finite maximum to set: a NaN rate sends nothing, ever; an infinite one divides by zero.
        data = self.document.data
        limits = data.get("limits") if isinstance(data, dict) else None
        rps = limits.get("rps") if isinstance(limits, dict) else None
        if isinstance(rps, float) and not math.isfinite(rps):
            message = f"must be a finite number of requests per second (at least {MIN_RPS})"
            yield self._problem(("limits",), "rps", f"{message}, got {show(rps)}")

    def _id_problems(self) -> Iterator[ManifestProblem]:
        # Ids become file names: two ids differing only in case would overwrite each other on
        # case-insensitive file systems (macOS, Windows).
        seen: dict[str, int] = {}
        for index, shot in enumerate(self.shots):
            shot_id = shot.get("id") if isinstance(shot, dict) else None
            if not isinstance(shot_id, str):
                continue
            folded = shot_id.casefold()
            if folded in seen:
                first = seen[folded]
                line = self.document.values.get(("shots", first, "id"), (0, 0))[0]
                message = (
                    f"id '{shot_id}' is already used by shots[{first}] on line {line}; "
                    "ids must be unique (ignoring case)"
                )
                yield self._problem(("shots", index), "id", message)
            else:
                seen[folded] = index

    def _field_origin(self, index: int, shot: dict[str, Any], field: str) -> JsonPath:
        """Where a merged field was written: on the shot, or under defaults."""
        if field in shot or field not in self.defaults:
            return ("shots", index)
        return ("defaults",)

    def _shot_rule_problems(self, index: int, shot: dict[str, Any]) -> Iterator[ManifestProblem]:
        merged = {**self.defaults, **shot}
        model = merged.get("model", DEFAULT_MODEL)
        if not isinstance(model, str):
            return
        spec = MODELS.get(model)
        if spec is None:
            close = difflib.get_close_matches(model, list(MODELS), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(MODELS)}"
            origin = self._field_origin(index, shot, "model")
            yield self._located(origin, index, "model", f"unknown model '{model}'; {hint}")
            return
        size = merged.get("size", DEFAULT_SIZE)
        if isinstance(size, str) and re.fullmatch(r"[0-9]+\*[0-9]+", size):
            if size not in spec.sizes:
                message = (
                    f"size '{size}' is not supported by {model}; supported: "
                    f"{', '.join(spec.sizes)}; nearest by aspect ratio: "
                    f"{nearest_size(size, spec.sizes)}"
                )
                origin = self._field_origin(index, shot, "size")
                yield self._located(origin, index, "size", message)
        prompt, style = merged.get("prompt"), merged.get("style")
        if isinstance(prompt, str):
            sent = len(ImageRequest(prompt, style=style if isinstance(style, str) else None).text)
            if sent > spec.max_prompt_chars:
                with_style = " with its style appended" if isinstance(style, str) else ""
                message = (
                    f"prompt{with_style} is {sent} characters; {model} takes at most "
                    f"{spec.max_prompt_chars}"
                )
                yield self._located(("shots", index), index, "prompt", message)
        negative = merged.get("negative_prompt")
        if isinstance(negative, str) and len(negative) > spec.max_negative_prompt_chars:
            message = (
                f"negative_prompt is {len(negative)} characters; {model} takes at most "
                f"{spec.max_negative_prompt_chars}"
            )
            origin = self._field_origin(index, shot, "negative_prompt")
            yield self._located(origin, index, "negative_prompt", message)
        reference = merged.get("reference_image")
        if isinstance(reference, str) and reference and not _is_url(reference):
            checked = self._reference(reference)
            if isinstance(checked, str):
                origin = self._field_origin(index, shot, "reference_image")
                yield self._located(origin, index, "reference_image", checked)

    def _reference(self, written: str) -> ReferenceImage | str:
        """The checked reference, or what is wrong with it; each file is read once per load."""
        if written not in self.references:
            try:
                self.references[written] = load_local_reference(
                    written, self.base_dir, allow_outside=self.allow_reference_outside
                )
            except ReferenceProblem as exc:
                message = f"reference image '{written}' {exc}"
                if str(exc).startswith("not found"):
                    message += "; give a path relative to the manifest or an http(s) URL"
                self.references[written] = message
        return self.references[written]

    def _located(self, origin: JsonPath, index: int, field: str, message: str) -> ManifestProblem:
        if origin == ("defaults",):
            self._from_defaults.setdefault((field, message), []).append(index)
            return _DEFERRED
        return self._problem(origin, field, message)

    def _defaults_problems(self) -> Iterator[ManifestProblem]:
        """A bad default is one mistake, however many shots inherit it: say it once."""
        for (field, message), indexes in self._from_defaults.items():
            names = [self._shot_id(("shots", index)) or f"shots[{index}]" for index in indexes]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problem = self._problem(("defaults",), field, message)
            yield ManifestProblem(
                problem.file,
                problem.line,
                problem.column,
                f"{problem.where} (used by shot{'s' if len(names) > 1 else ''} {shown})",
                message,
            )


_DEFERRED = ManifestProblem("", 0, 0, "", "")


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))
