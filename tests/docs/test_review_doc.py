"""docs/review.md runs as written: its commands, in order, in a copy of manifests/, against the
fake DashScope server; its YAML is a valid shot list; its picture is in the repository, and the
README links to the page.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from imgbatch.cli.main import main
from imgbatch.manifest import load_manifest, manifest_from_data
from tests.conftest import REPO
from tests.support.fake_dashscope import FakeDashScope

PAGE = REPO / "docs" / "review.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    text = PAGE.read_text(encoding="utf-8")
    return [body for tag, body in BLOCK.findall(text) if tag == language]


def commands() -> list[list[str]]:
    found = []
    for block in blocks("sh"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "imgbatch":
                found.append(words[1:])
    return found


@pytest.fixture
def clone(api_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "clone"
    shutil.copytree(REPO / "manifests", root / "manifests")
    monkeypatch.chdir(root)
    return root


def test_the_review_page_s_commands_run_in_order_and_do_what_it_says(
    clone: Path, fake_server: FakeDashScope
) -> None:
    verbs = [words[0] for words in commands()]
    assert verbs == ["apply", "apply", "sheet", "reroll", "pick", "apply"]
    shots = clone / "manifests" / "shots.yaml"
    before = shots.read_text(encoding="utf-8").splitlines()
    runner = CliRunner()
    for number, command in enumerate(commands()):
        if number == len(verbs) - 1:
            fake_server.reset()
        result = runner.invoke(main, command, catch_exceptions=False)
        assert result.exit_code == 0, (command, result.output)
    # The reroll was one line of the shot list, and the apply after it paid for that shot only.
    after = shots.read_text(encoding="utf-8").splitlines()
    assert len(after) in (len(before), len(before) + 1)
    assert len(set(after) - set(before)) == 1
    assert fake_server.successes == 1
    assert len(load_manifest(shots).shots) > 1
    assert "pick: 2" in (clone / "manifests" / "variants.yaml").read_text(encoding="utf-8")
    assert (clone / "manifests" / "output" / "variants-example" / "index.html").is_file()


def test_the_review_page_s_yaml_is_a_valid_shot_list() -> None:
    (block,) = blocks("yaml")
    data: Any = yaml.safe_load(block)
    manifest = manifest_from_data({"version": 1, **data}, display="review.md", base_dir=REPO)
    assert manifest.picks == {"poster": "poster-2"}


def test_the_picture_is_there_and_the_readme_links_the_page() -> None:
    assert "](review-sheet.png)" in PAGE.read_text(encoding="utf-8")
    assert (REPO / "docs" / "review-sheet.png").stat().st_size > 10_000
    assert "(docs/review.md)" in (REPO / "README.md").read_text(encoding="utf-8")
