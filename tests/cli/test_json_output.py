"""`--json` on `validate` and `generate`: one JSON document on stdout, human text on stderr.

Takes: small manifests written into tmp_path (good, bad, several at once) and, for `generate`,
the fake DashScope server (its moderation refusal).
Gives: evidence of each document's shape and content (every problem with file, line, column,
shot and field; the normalized response; a failure as `{"error": ...}` with the service's
code and request id), of the exit codes, and that stdout holds the document alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from click.testing import Result

from tests.cli.test_cli import assert_clean, run
from tests.cli.test_generate import REQUEST
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import FAKE_KEY, write_manifest

BAD = (
    "version: 1\n"
    "name: bad\n"
    "defaults:\n"
    '  size: "1000*1000"\n'
    "shots:\n"
    "  - id: one\n"
    "    prompt: a red bicycle\n"
    '    size: "1328*1328"\n'
    "    seed: -3\n"
    "  - id: two\n"
    "    prompt: a blue bicycle\n"
)


def document(result: Result) -> dict[str, Any]:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"stdout is one JSON document and nothing else: {result.stdout!r}"
    parsed: dict[str, Any] = json.loads(lines[0])
    return parsed


def test_validate_json_of_a_valid_manifest(example_manifest: Path) -> None:
    result = run("validate", example_manifest, "--json")
    assert result.exit_code == 0, result.output
    assert document(result) == {
        "valid": True,
        "manifests": [{"manifest": str(example_manifest), "valid": True, "shots": 8}],
        "problems": [],
    }
    assert f"{example_manifest}: valid, 8 shots" in result.stderr


def test_validate_json_lists_every_problem_with_its_place(tmp_path: Path) -> None:
    bad = write_manifest(tmp_path, BAD)
    result = run("validate", bad, "--json")
    assert result.exit_code == 2, result.output
    assert_clean(result)
    found = document(result)
    assert found["valid"] is False
    assert found["manifests"] == [{"manifest": str(bad), "valid": False, "shots": None}]
    problems = {(p["shot"], p["field"]): p for p in found["problems"]}
    assert set(problems) == {("one", "seed"), (None, "defaults.size")}
    seed = problems["one", "seed"]
    assert (seed["file"], seed["line"], seed["where"]) == (str(bad), 9, "shot one, field seed")
    assert isinstance(seed["column"], int) and "-3" in seed["message"]
    size = problems[None, "defaults.size"]
    assert size["line"] == 4
    assert "used by shot two" in size["where"]  # one shot overrides the default, one inherits it
    assert "1000*1000" in size["message"]
    # The human text is still there, on stderr.
    assert f"{bad}:9:" in result.stderr


def test_validate_takes_several_manifests_and_fails_if_any_is_invalid(
    tmp_path: Path, example_manifest: Path
) -> None:
    bad = write_manifest(tmp_path, BAD, name="bad.yaml")
    missing = tmp_path / "missing.yaml"
    result = run("validate", example_manifest, bad, missing)
    assert result.exit_code == 2, result.output
    assert_clean(result)
    # Each is checked: the valid one is said valid, the invalid ones each name their file.
    assert result.stdout.strip() == f"{example_manifest}: valid, 8 shots"
    assert f"{bad}:9:" in result.stderr
    assert f"{missing}:1:1: file: no such file" in result.stderr

    found = document(run("validate", example_manifest, bad, missing, "--json"))
    assert [(m["manifest"], m["valid"]) for m in found["manifests"]] == [
        (str(example_manifest), True),
        (str(bad), False),
        (str(missing), False),
    ]
    assert {p["file"] for p in found["problems"]} == {str(bad), str(missing)}

    assert run("validate", example_manifest, example_manifest).exit_code == 0


def test_generate_json_prints_the_normalized_response(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("generate", "--request", json.dumps(REQUEST), "--json")
    assert result.exit_code == 0, result.output
    response = document(result)
    assert response["cached"] is False
    assert response["request_id"]
    assert Path(response["file"]).is_file()
    # The same document --print-response gives (now from the cache).
    again = document(run("generate", "--request", json.dumps(REQUEST), "--print-response"))
    cached = {"cached": True, "image_url": Path(response["file"]).as_uri(), "request_id": None}
    assert again == {**response, **cached}


def test_generate_json_says_a_refusal_as_an_error_document(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    request = {**REQUEST, "prompt": "a FORBIDDEN thing"}
    result = run("generate", "--request", json.dumps(request), "--json")
    assert result.exit_code == 1, result.output
    assert_clean(result)
    error = document(result)["error"]
    assert error["type"] == "ProviderError"
    assert error["code"] == "DataInspectionFailed"
    assert re.fullmatch(r"[0-9a-f-]{36}", error["request_id"])  # the fake server's uuid4
    assert error["message"] == (
        "400 DataInspectionFailed: Input data may contain inappropriate content."
    )
    assert error["problems"] is None
    assert "DataInspectionFailed" in result.stderr
    assert FAKE_KEY not in result.output


def test_generate_json_names_an_invalid_requests_fields(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    request = {**REQUEST, "size": "1*1", "variants": 2}
    result = run("generate", "--request", json.dumps(request), "--json")
    assert result.exit_code == 2, result.output
    error = document(result)["error"]
    assert error["type"] == "ManifestError"
    assert [p["field"] for p in error["problems"]] == ["variants"]
    assert error["problems"][0]["line"] is None
    assert fake_server.requests == []

    result = run("generate", "--request", json.dumps({**REQUEST, "size": "1*1"}), "--json")
    assert result.exit_code == 2, result.output
    (problem,) = document(result)["error"]["problems"]
    assert (problem["field"], problem["shot"]) == ("size", None)
    assert "1328*1328" in problem["message"]

    result = run("generate", "--request", "{not json", "--json")
    assert result.exit_code == 2
    assert document(result)["error"]["type"] == "ConfigError"
    assert not (tmp_path / "output").exists()
