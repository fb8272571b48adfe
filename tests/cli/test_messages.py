"""Messages that explain themselves: `apply --dry-run` points to `plan`, a close spelling never
suggests an option that deletes, and `python -m imgbatch` names itself `imgbatch`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgbatch.cli.main import main
from tests.conftest import REPO
from tests.support.fake_dashscope import FakeDashScope


def test_apply_dry_run_points_to_plan() -> None:
    result = CliRunner().invoke(main, ["apply", "--dry-run", "shots.yaml"])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: No such option: --dry-run; `imgbatch plan MANIFEST` shows what apply would do, "
        "and sends nothing."
    )


def test_no_suggestion_ever_names_an_option_that_deletes() -> None:
    for command, typo in (("apply", "--prun"), ("apply", "--overwrite"), ("gc", "--ye")):
        result = CliRunner().invoke(main, [command, typo, "shots.yaml"])
        assert result.exit_code == 2
        assert "--prune" not in result.stderr
        assert "--yes" not in result.stderr
        assert "--overwrite-edited" not in result.stderr
    # A harmless close spelling is still suggested.
    result = CliRunner().invoke(main, ["apply", "--frozn", "shots.yaml"])
    assert "--frozen" in result.stderr


def test_python_m_imgbatch_says_imgbatch_and_its_version() -> None:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "imgbatch", "--version"], capture_output=True, text=True, env=env
    )
    assert done.stdout == "imgbatch 0.1.0\n"
    done = subprocess.run(
        [sys.executable, "-m", "imgbatch", "apply"], capture_output=True, text=True, env=env
    )
    assert done.stderr.startswith("Usage: imgbatch apply [OPTIONS] MANIFEST\n")


def test_plan_without_a_key_says_first_that_apply_would_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    manifest = tmp_path / "shots.yaml"
    manifest.write_text("version: 1\nshots:\n  - id: a\n    prompt: p\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["plan", str(manifest)])
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("Note: apply would stop before sending anything: No DashScope API key")
    assert "--provider placeholder" in first
    # With a key, or offline, no such note.
    result = CliRunner().invoke(main, ["plan", str(manifest), "--provider", "placeholder"])
    assert "Note:" not in result.stdout


BAD = """\
version: 1
shots:
  - id: a
    prompt: p
    reference_image: bad.png
  - id: a
    prompt: q
"""


def test_validate_plan_and_apply_word_a_problem_alike_with_no_python_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    manifest = tmp_path / "shots.yaml"
    manifest.write_text(BAD, encoding="utf-8")
    said = set()
    for command in ("validate", "plan", "apply"):
        result = CliRunner().invoke(
            main,
            [command, str(manifest), "--provider", "placeholder"]
            if command != "validate"
            else [command, str(manifest)],
        )
        assert result.exit_code == 2
        said.add(result.stderr)
    (text,) = said
    assert text == (
        f"error: 2 problems in {manifest}:\n"
        f"  {manifest}:5:22: shot a, field reference_image: reference image 'bad.png' is not a "
        "readable image (cannot identify image file)\n"
        f"  {manifest}:6:9: shot a, field id: id 'a' is already used by shots[0] on line 3; ids "
        "must be unique (ignoring case)\n"
    )
    assert " object at 0x" not in text


def test_an_unclosed_quote_is_reported_where_it_opens_and_a_missing_file_has_no_line(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "shots.yaml"
    manifest.write_text(
        'version: 1\nname: x\nshots:\n  - id: a\n    prompt: "unterminated\n  - id: b\n'
        "    prompt: q\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["validate", str(manifest)])
    assert result.stderr.splitlines()[1] == (
        f"  {manifest}:5:13: YAML: a quoted string starts here and is never closed (found "
        "unexpected end of stream); not valid YAML"
    )
    missing = tmp_path / "missing.yaml"
    for command in ("validate", "plan"):
        result = CliRunner().invoke(main, [command, str(missing)])
        assert result.stderr == f"error: 1 problem in {missing}:\n  {missing}: file: no such file\n"


def test_paths_are_shown_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "shots.yaml").write_text(
        "version: 1\nname: n\noutput:\n  dir: ../output/n\ntrust:\n  output_outside: true\n"
        "shots:\n  - id: a\n    prompt: p\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(
        main, ["apply", "manifests/shots.yaml", "--provider", "placeholder"]
    )
    assert result.exit_code == 0, result.output
    assert "Results: output/n/results.json" in result.stdout
    assert "Contact sheet: output/n/index.html" in result.stdout
    assert ".." not in result.stdout


def test_a_run_that_billed_nothing_names_no_price_list(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = tmp_path / "shots.yaml"
    manifest.write_text(
        'version: 1\nshots:\n  - id: a\n    prompt: p\n    size: "1328*1328"\n',
        encoding="utf-8",
    )
    first = CliRunner().invoke(main, ["apply", str(manifest)])
    assert first.exit_code == 0, first.output
    assert "Cost: unknown, no price for qwen-image-max" in first.stdout  # a local fake server
    again = CliRunner().invoke(main, ["apply", str(manifest)])
    assert again.exit_code == 0, again.output
    assert "Cost: nothing billed." in again.stdout
    assert "127.0.0.1" not in again.stdout
