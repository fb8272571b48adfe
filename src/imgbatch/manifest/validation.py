"""`imgbatch validate`: check shot lists, and say what is wrong in words and in JSON.

Takes manifest paths; gives one `Validated` per path (its shot count, or every problem found,
each with file, line, column, shot id and field) and the document `validate --json` prints:

    >>> report = validate(["manifests/shots.yaml"])
    >>> validate_json(report)["manifests"]
    [{'manifest': 'manifests/shots.yaml', 'valid': True, 'shots': 2}]

Nothing is sent, fetched or written: a reference URL is not downloaded, a local reference is
read and checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgbatch.errors import ManifestError, ManifestProblem
from imgbatch.manifest import load_manifest


@dataclass(frozen=True)
class Validated:
    manifest: Path
    shots: int | None  # after vars, matrix and variants; None when the manifest is invalid
    problems: tuple[ManifestProblem, ...] = ()
    # The error as the terminal shows it, naming the file (a hook checks several at once).
    message: str | None = None

    @property
    def valid(self) -> bool:
        return not self.problems


def validate(
    paths: Iterable[str | Path], *, allow_reference_outside: bool = False
) -> tuple[Validated, ...]:
    """Each manifest checked on its own: one invalid file does not hide another's problems."""
    results = []
    for path in paths:
        try:
            manifest = load_manifest(path, allow_reference_outside=allow_reference_outside)
        except ManifestError as error:
            message = str(ManifestError(error.problems, subject=str(path)))
            results.append(Validated(Path(path), None, error.problems, message))
        else:
            results.append(Validated(Path(path), len(manifest.shots)))
    return tuple(results)


def validate_json(results: Sequence[Validated]) -> dict[str, Any]:
    """`{"valid", "manifests": [{"manifest", "valid", "shots"}], "problems": [...]}`."""
    return {
        "valid": all(result.valid for result in results),
        "manifests": [
            {"manifest": str(result.manifest), "valid": result.valid, "shots": result.shots}
            for result in results
        ],
        "problems": [problem.to_json() for result in results for problem in result.problems],
    }
