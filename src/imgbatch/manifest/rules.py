"""The rules a schema cannot say, and the order every check runs in.

Takes a parsed `Document`; gives every `ManifestProblem` in it: the schema's (explained by
`schema_messages`), then the model rules (sizes per model, prompt lengths with the style
appended), unique ids ignoring case, a finite `limits.rps` and `limits.max_cost`, the models
`pricing:` names, and local reference images (read, checked and hashed once per load). A bad
default is reported once, naming the shots it reaches.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from imgbatch.errors import ManifestProblem
from imgbatch.manifest.catalogue import (
    DEFAULT_MODEL,
    DEFAULT_SIZE,
    MIN_RPS,
    MODELS,
    nearest_size,
    sent_text,
)
from imgbatch.manifest.expansion import ExpandedShot, expand_shots
from imgbatch.manifest.places import (
    MAX_NUMBER_DIGITS,
    TOO_LONG,
    JsonPath,
    describe,
    field_name,
    in_shot,
    show,
)
from imgbatch.manifest.reference import (
    ReferenceImage,
    ReferenceProblem,
    load_local_reference,
    shown,
)
from imgbatch.manifest.schema_messages import schema_problems
from imgbatch.manifest.yaml_load import Document

# The schema lets `{name}` placeholders through; what they expand to must be a plain id.
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_ID_HINT = "use only letters, digits, '.', '_' and '-', not starting with '.'"
_TEMPLATE_HINT = "{name} placeholders are filled only with vars: or a shot's matrix:"


def _all_plain(data: Any) -> bool:
    """True when `data` surely holds nothing `Checker._value_problems` reports: it serialises
    to UTF-8 (no lone surrogate) with no run of more than MAX_NUMBER_DIGITS digits anywhere
    (in a number or not). One pass in C instead of a walk in Python (a second of a
    100,000-shot manifest); False sends the data to that walk, which says where."""
    try:
        text = json.dumps(data, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return False
    return _LONG_DIGITS.search(text) is None


# W*H: compiled once (looked up in re's cache for each of 100,000 shots, it was a tenth of
# the rules' time).
_SIZE = re.compile(r"[0-9]+\*[0-9]+")
_LONG_DIGITS = re.compile(f"[0-9]{{{MAX_NUMBER_DIGITS + 1}}}")


class Checker:
    """Collects schema and model-rule problems for one parsed document."""

    def __init__(
        self,
        document: Document,
        display: str,
        base_dir: Path,
        allow_reference_outside: bool,
        references: dict[str, ReferenceImage | str],
        manifest_name: str,
    ) -> None:
        self.document = document
        self.display = display
        self.base_dir = base_dir
        self.manifest_name = manifest_name
        data = document.data
        trust = data.get("trust") if isinstance(data, dict) else None
        self.allow_reference_outside = allow_reference_outside or (
            isinstance(trust, dict) and trust.get("references_outside") is True
        )
        self.allow_output_outside = isinstance(trust, dict) and trust.get("output_outside") is True
        # Each distinct reference is checked and read once per load, across both passes.
        self.references = references
        shots = data.get("shots") if isinstance(data, dict) else None
        self.shots: list[Any] = shots if isinstance(shots, list) else []
        defaults = data.get("defaults") if isinstance(data, dict) else None
        self.defaults: dict[str, Any] = defaults if isinstance(defaults, dict) else {}
        self._from_defaults: dict[tuple[str, str], list[str]] = {}
        self.expanded, self._slips = expand_shots(data, manifest_name)

    def problems(self) -> Iterator[ManifestProblem]:
        unreadable = [] if _all_plain(self.document.data) else list(self._value_problems())
        if unreadable:  # the other checks could not even show these values
            yield from unreadable
            return
        yield from schema_problems(self.document.data, self._problem)
        yield from self._limits_problems()
        yield from self._output_problems()
        yield from self._store_problems()
        yield from self._pricing_problems()
        for slip in self._slips:
            problem = self._located(slip.parent, slip.shot_id, slip.field, slip.message)
            if problem is not _DEFERRED:
                yield problem
        yield from self._id_problems()
        for shot in self.expanded:
            for problem in self._shot_rule_problems(shot):
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
        self,
        parent: JsonPath,
        field: str | int | None,
        message: str,
        *,
        at_key: bool = False,
        shot_id: str | None = None,
    ) -> ManifestProblem:
        path = parent if field is None else (*parent, field)
        position = (self.document.keys.get(path) if at_key else None) or self.document.values.get(
            path, self.document.values.get(parent)
        )
        line, column = position or (1, 1)
        shot = (shot_id or self._shot_id(path)) if in_shot(parent) else None
        return ManifestProblem(
            self.display,
            line,
            column,
            describe(parent, field, shot),
            message,
            shot=shot,
            field=field_name(parent, field),
        )

    def _value_problems(self) -> Iterator[ManifestProblem]:
        """Values no check can show: strings that are not text (a lone surrogate, from JSON's
        "\\ud800" or a Python str, can be neither hashed, written nor sent) and, from Python,
        integers longer than any field takes (Python will not print one of 4300 digits)."""
        pending: list[tuple[JsonPath, Any]] = [((), self.document.data)]
        while pending:  # a loop, not recursion: data from Python may be nested deep
            path, value = pending.pop()
            if isinstance(value, dict):
                items = [(key, item) for key, item in value.items() if isinstance(key, str)]
                for key, _ in items:
                    yield from self._not_text(path, key, key)
                pending.extend(((*path, key), item) for key, item in reversed(items))
            elif isinstance(value, list):
                pending.extend(((*path, i), item) for i, item in reversed(list(enumerate(value))))
            elif isinstance(value, str) and path:
                yield from self._not_text(path[:-1], path[-1], value)
            elif isinstance(value, int) and abs(value) > TOO_LONG and path:
                message = f"is {show(value)}; no field takes a number that long"
                yield self._problem(path[:-1], path[-1], message)

    def _not_text(self, parent: JsonPath, field: str | int, text: str) -> Iterator[ManifestProblem]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = ascii(text[exc.start])
            yield self._problem(parent, field, f"holds {bad}, a lone surrogate, which is not text")

    def _limits_problems(self) -> Iterator[ManifestProblem]:
        # JSON Schema's minimum lets NaN through (every comparison with it is false) and has no
        # finite maximum to set: a NaN rate sends nothing, ever; an infinite one divides by zero.
        data = self.document.data
        limits = data.get("limits") if isinstance(data, dict) else None
        rps = limits.get("rps") if isinstance(limits, dict) else None
        if isinstance(rps, float) and not math.isfinite(rps):
            message = f"must be a finite number of requests per second (at least {MIN_RPS})"
            yield self._problem(("limits",), "rps", f"{message}, got {show(rps)}")
        max_cost = limits.get("max_cost") if isinstance(limits, dict) else None
        if isinstance(max_cost, float) and not math.isfinite(max_cost):
            message = f"must be a finite amount such as 5 or '5 USD', got {show(max_cost)}"
            yield self._problem(("limits",), "max_cost", message)

    def _output_problems(self) -> Iterator[ManifestProblem]:
        # A shot list can come from anyone: like a reference it reads, the folder it writes
        # (results.json, images, its state, index.html) stays inside its folder tree unless it
        # is trusted. OUTPUT_DIR replaces `output.dir` and is the user's own choice.
        # With no output.dir the folder is output/<name> beside the manifest, which a link
        # committed there could carry anywhere: that default is held to the same rule.
        data = self.document.data
        output = data.get("output") if isinstance(data, dict) else None
        written = output.get("dir") if isinstance(output, dict) else None
        place: tuple[JsonPath, str] = (("output",), "dir")
        if written is None and _ID.fullmatch(self.manifest_name):
            written, place = f"output/{self.manifest_name}", ((), "name")
        if self.allow_output_outside or not isinstance(written, str) or _CONTROL.search(written):
            return  # trusted, or the schema says what is wrong
        root = self.base_dir.resolve()
        try:
            resolved = (self.base_dir / written).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a link loop
            yield self._problem(*place, f"cannot be resolved: {exc}")
            return
        if not resolved.is_relative_to(root):
            default = place[1] == "name"
            message = (
                (f"names the output folder {written}, which " if default else "")
                + f"resolves to {resolved}, outside the manifest's folder {root}; a shot list "
                "can come from anyone, so it writes only inside its folder unless it says "
                "'trust: {output_outside: true}'"
                + (
                    " (or replace the link by a folder)"
                    if default
                    else " (or leave output.dir out and set OUTPUT_DIR)"
                )
            )
            yield self._problem(*place, message)

    def _store_problems(self) -> Iterator[ManifestProblem]:
        # A folder store is written (blobs, records, claims, probes) as the output folder is:
        # named by a shot list, it stays inside the list's folder tree unless trusted, as
        # `output.dir` does. A store the user names (--store, IMGBATCH_STORE) is their choice.
        data = self.document.data
        output = data.get("output") if isinstance(data, dict) else None
        written = output.get("store") if isinstance(output, dict) else None
        if self.allow_output_outside or not isinstance(written, str) or _CONTROL.search(written):
            return  # trusted, or the schema says what is wrong
        folder = _store_folder(written)
        if folder is None:
            return  # a bucket
        root = self.base_dir.resolve()
        try:
            resolved = (self.base_dir / Path(folder).expanduser()).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a link loop
            yield self._problem(("output",), "store", f"cannot be resolved: {exc}")
            return
        if not resolved.is_relative_to(root):
            message = (
                f"the folder store resolves to {resolved}, outside the manifest's folder "
                f"{root}; a shot list can come from anyone, so it writes only inside its "
                "folder unless it says 'trust: {output_outside: true}' (or leave output.store "
                "out and name the store with --store or IMGBATCH_STORE)"
            )
            yield self._problem(("output",), "store", message)

    def _pricing_problems(self) -> Iterator[ManifestProblem]:
        # A misspelt model would price nothing and leave its cost unknown; say so now.
        data = self.document.data
        pricing = data.get("pricing") if isinstance(data, dict) else None
        per_image = pricing.get("per_image") if isinstance(pricing, dict) else None
        if not isinstance(per_image, dict):
            return
        place = ("pricing", "per_image")
        for model, price in per_image.items():
            if not isinstance(model, str) or model not in MODELS:
                close = difflib.get_close_matches(str(model), list(MODELS), n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(MODELS)}"
                message = f"unknown model {show(model)}; {hint}"
                yield self._problem(place, model, message, at_key=True)
            if isinstance(price, float) and not math.isfinite(price):
                message = f"must be a finite price of one image, got {show(price)}"
                yield self._problem(place, model, message)

    def _id_problems(self) -> Iterator[ManifestProblem]:
        # Ids become file names: two ids differing only in case would overwrite each other on
        # case-insensitive file systems (macOS, Windows). Checked after expansion, where a
        # matrix or variants can make an id another shot already has.
        seen: dict[str, int] = {}
        # A written shot that repeats another's ids is reported once, however many of its
        # variants or matrix combinations repeat them: (its index, the other's) -> the ids.
        repeats: dict[tuple[int, int], list[str]] = {}
        for shot in self.expanded:
            raw = self.shots[shot.index].get("id")
            if not isinstance(raw, str):
                continue  # the schema says so
            if shot.id != raw or "{" in shot.id or "}" in shot.id:
                if not _ID.fullmatch(shot.id):
                    message = f"{show(shot.id)} is not valid: {_ID_HINT}"
                    if shot.id != raw:
                        message = f"{show(shot.id)} (from {show(raw)}) is not valid: {_ID_HINT}"
                    elif "{" in shot.id:
                        message += f"; {_TEMPLATE_HINT}"
                    yield self._problem(("shots", shot.index), "id", message, shot_id=shot.id)
                    continue
            folded = shot.id.casefold()
            if folded in seen:
                repeats.setdefault((shot.index, seen[folded]), []).append(shot.id)
            else:
                seen[folded] = shot.index
        for (index, first), ids in repeats.items():
            line = self.document.values.get(("shots", first, "id"), (0, 0))[0]
            named = (
                f"id '{ids[0]}' is"
                if len(ids) == 1
                else (f"ids '{ids[0]}' to '{ids[-1]}' ({len(ids)} of them) are")
            )
            message = (
                f"{named} already used by shots[{first}] on line {line}; "
                "ids must be unique (ignoring case)"
            )
            written = self.shots[index].get("id")
            shot_id = ids[0] if len(ids) == 1 or not isinstance(written, str) else written
            yield self._problem(("shots", index), "id", message, shot_id=shot_id)
        yield from self._pick_file_problems(seen)

    def _pick_file_problems(self, seen: dict[str, int]) -> Iterator[ManifestProblem]:
        # `pick:` writes the chosen take as <base id>.png: a file no other shot may have.
        for shot in self.expanded:
            if shot.base_id is None or shot.variant != self.shots[shot.index].get("pick"):
                continue
            other = seen.get(shot.base_id.casefold())
            if other is not None:
                message = (
                    f"pick: writes the chosen take as {shot.base_id}.png, the file of "
                    f"shots[{other}] ('{self.shots[other].get('id')}'); rename one of the two"
                )
                yield self._problem(("shots", shot.index), "pick", message, shot_id=shot.base_id)

    def _written(self, shot: dict[str, Any], field: str) -> Any:
        """The field as written for `shot` (its own, else the default), before expansion."""
        return shot.get(field, self.defaults.get(field, DEFAULT_SIZE if field == "size" else None))

    def _field_origin(self, index: int, shot: dict[str, Any], field: str) -> JsonPath:
        """Where a merged field was written: on the shot, or under defaults."""
        if field in shot or field not in self.defaults:
            return ("shots", index)
        return ("defaults",)

    def _shot_rule_problems(self, expanded: ExpandedShot) -> Iterator[ManifestProblem]:
        index, merged, shot_id = expanded.index, expanded.fields, expanded.id
        shot: dict[str, Any] = self.shots[index]
        model = merged.get("model", DEFAULT_MODEL)
        if not isinstance(model, str):
            return
        spec = MODELS.get(model)
        if spec is None:
            close = difflib.get_close_matches(model, list(MODELS), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(MODELS)}"
            origin = self._field_origin(index, shot, "model")
            yield self._located(origin, shot_id, "model", f"unknown model '{model}'; {hint}")
            return
        size = merged.get("size", DEFAULT_SIZE)
        if isinstance(size, str) and _SIZE.fullmatch(size):
            if size not in spec.sizes:
                message = (
                    f"size '{size}' is not supported by {model}; supported: "
                    f"{', '.join(spec.sizes)}; nearest by aspect ratio: "
                    f"{nearest_size(size, spec.sizes)}"
                )
                origin = self._field_origin(index, shot, "size")
                yield self._located(origin, shot_id, "size", message)
        elif isinstance(size, str) and ("{" in size or size != self._written(shot, "size")):
            # A size only a placeholder made invalid; the schema has said so for any other.
            hint = "write it as W*H, for example '1664*928'"
            if "{" in size:
                hint += f"; {_TEMPLATE_HINT}"
            origin = self._field_origin(index, shot, "size")
            yield self._located(origin, shot_id, "size", f"{show(size)} is not valid: {hint}")
        yield from self._control_problems(expanded)
        prompt, style = merged.get("prompt"), merged.get("style")
        if isinstance(prompt, str):
            sent = len(sent_text(prompt, style if isinstance(style, str) else None))
            if sent > spec.max_prompt_chars:
                with_style = " with its style appended" if isinstance(style, str) else ""
                message = (
                    f"prompt{with_style} is {sent} characters; {model} takes at most "
                    f"{spec.max_prompt_chars}"
                )
                yield self._located(("shots", index), shot_id, "prompt", message)
        negative = merged.get("negative_prompt")
        if isinstance(negative, str) and len(negative) > spec.max_negative_prompt_chars:
            message = (
                f"negative_prompt is {len(negative)} characters; {model} takes at most "
                f"{spec.max_negative_prompt_chars}"
            )
            origin = self._field_origin(index, shot, "negative_prompt")
            yield self._located(origin, shot_id, "negative_prompt", message)
        reference = merged.get("reference_image")
        if isinstance(reference, str) and reference and not _is_url(reference):
            checked = self._reference(reference)
            if isinstance(checked, str):
                origin = self._field_origin(index, shot, "reference_image")
                yield self._located(origin, shot_id, "reference_image", checked)

    def _control_problems(self, expanded: ExpandedShot) -> Iterator[ManifestProblem]:
        """A control character in a text field: a YAML or JSON escape can hide NUL or ESC in a
        prompt (sent, it is noise to the model; printed, it drives the terminal)."""
        shot: dict[str, Any] = self.shots[expanded.index]
        for name in _TEXT_FIELDS:
            text = expanded.fields.get(name)
            control = _CONTROL.search(text) if isinstance(text, str) else None
            if control is not None:
                message = (
                    f"{name} contains the control character U+{ord(control.group()):04X} at "
                    f"position {control.start() + 1}; only tabs and line breaks are allowed"
                )
                origin = self._field_origin(expanded.index, shot, name)
                yield self._located(origin, expanded.id, name, message)

    def _reference(self, written: str) -> ReferenceImage | str:
        """The checked reference, or what is wrong with it; each file is read once per load."""
        if written not in self.references:
            try:
                self.references[written] = load_local_reference(
                    written, self.base_dir, allow_outside=self.allow_reference_outside
                )
            except ReferenceProblem as exc:
                message = f"reference image '{shown(written)}' {exc}"
                if str(exc).startswith("not found"):
                    message += (
                        "; give a path relative to the manifest, a data: URI or an http(s) URL"
                    )
                self.references[written] = message
        return self.references[written]

    def _located(
        self, origin: JsonPath, shot_id: str | None, field: str, message: str
    ) -> ManifestProblem:
        if origin == ("defaults",):
            name = shot_id or "?"
            self._from_defaults.setdefault((field, message), []).append(name)
            return _DEFERRED
        return self._problem(origin, field, message, shot_id=shot_id)

    def _defaults_problems(self) -> Iterator[ManifestProblem]:
        """A bad default is one mistake, however many shots inherit it: say it once."""
        for (field, message), names in self._from_defaults.items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problem = self._problem(("defaults",), field, message)
            yield ManifestProblem(
                problem.file,
                problem.line,
                problem.column,
                f"{problem.where} (used by shot{'s' if len(names) > 1 else ''} {shown})",
                message,
                field=problem.field,
            )


_DEFERRED = ManifestProblem("", 0, 0, "", "")


_TEXT_FIELDS = ("prompt", "negative_prompt", "style")
# C0 controls but tab, line feed and carriage return; DEL; C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _store_folder(written: str) -> str | None:
    """The folder `output.store` names, as a path (`file://` unquoted; relative to the
    manifest), or None for a bucket (`s3://`, `oss://`: the store's URL rules,
    `imgbatch.state.store.location`, say the rest)."""
    try:
        parts = urlsplit(written)
    except ValueError:  # not a URL (`s3://a]b`): the store's rules refuse it, naming it
        return written
    if parts.scheme in ("s3", "oss"):
        return None
    return unquote(parts.path) if parts.scheme == "file" else written
