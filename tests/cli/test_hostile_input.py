"""Hostile values in a request or a shot list end in a clear error naming the field, exit 2.

Takes: `generate --request` (JSON on the command line and on stdin), the Python API with a dict,
and `validate` of a YAML file, each given a value Python itself chokes on: a 5000-digit seed
(Python refuses to convert more than 4300 digits), 200,000 nested brackets, a lone surrogate
(JSON's "\\ud800" is no text), a date that cannot be. Gives: evidence that each is a
`ManifestError` or `ConfigError` naming the field (or the request), never "unexpected" with a
crash log, and that nothing was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

import imgbatch
from imgbatch.cli.main import main
from imgbatch.errors import ManifestError

SEED_5000 = "1" * 5000
TOO_LONG = "got a number of more than 40 digits"


@dataclass(frozen=True)
class Case:
    name: str
    request: str  # the JSON given to generate --request
    message: str


REQUESTS = [
    Case("5000-digit seed", f'{{"prompt": "a", "seed": {SEED_5000}}}', "field seed: seed must"),
    Case("negative 5000-digit seed", f'{{"prompt": "a", "seed": -{SEED_5000}}}', TOO_LONG),
    Case("200,000 nested brackets", "[" * 200_000 + "]" * 200_000, "is nested too deeply"),
    Case(
        "lone surrogate in the prompt",
        '{"prompt": "a lighthouse \\ud800 at night"}',
        "field prompt: holds '\\ud800', a lone surrogate, which is not text",
    ),
    Case(
        "lone surrogate in a field name",
        '{"prompt": "a", "\\udfff": 1}',
        "holds '\\udfff', a lone surrogate, which is not text",
    ),
]


@pytest.mark.parametrize("case", REQUESTS, ids=lambda case: case.name)
@pytest.mark.parametrize("where", ["argument", "stdin"])
def test_generate_request_with_a_hostile_value_is_refused_by_name(
    case: Case, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    given = case.request if where == "argument" else "-"
    stdin = case.request if where == "stdin" else None
    args = ["generate", "--provider", "placeholder", "--request", given]
    result = CliRunner().invoke(main, args, input=stdin)
    assert result.exit_code == 2, result.output
    assert case.message in result.stderr
    if case.name.endswith("seed"):
        assert TOO_LONG in result.stderr
    assert "unexpected" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"prompt": "a", "seed": 10**5000}, "field seed: is a number of more than 40 digits"),
        ({"prompt": "a", "seed": -(10**5000)}, "field seed: is a number of more than 40 digits"),
        ({"prompt": "a \ud800"}, "field prompt: holds '\\ud800', a lone surrogate"),
        ({"prompt": "a", "negative_prompt": "b\udc00"}, "field negative_prompt: holds '\\udc00'"),
    ],
    ids=["huge seed", "huge negative seed", "surrogate in prompt", "surrogate elsewhere"],
)
def test_the_python_api_refuses_a_hostile_value_by_name(
    request_: dict[str, object], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    with pytest.raises(ManifestError) as caught:
        imgbatch.generate(request_, provider="placeholder")
    assert message in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (SEED_5000, f"shots.yaml:7:11: shot b, field seed: seed must be a whole number from 0 to "
         f"2147483647 or auto, {TOO_LONG}"),
        ("2024-13-45", "shots.yaml:7:11: shots[0], field seed: '2024-13-45' reads as a timestamp "
         "that cannot be: month must be in 1..12; quote it"),
    ],
    ids=["5000-digit seed", "impossible date"],
)  # fmt: skip
def test_a_shot_list_with_a_value_python_cannot_read_is_refused_by_name(
    value: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "shots.yaml"
    path.write_text(
        "version: 1\nname: x\nprovider: placeholder\nshots:\n"
        f"  - id: b\n    prompt: a lighthouse\n    seed: {value}\n"
    )
    for command in ("validate", "apply"):
        result = CliRunner().invoke(main, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert message in result.stderr
        assert "unexpected" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["shots.yaml"]
