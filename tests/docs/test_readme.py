"""Every example in README.md runs as written, from a clean clone.

Takes: README.md's fenced code blocks, a temporary copy of the repository's `manifests/`, and the
fake DashScope server (a key is configured, so `--provider auto` and `provider: auto` use the real
dashscope provider against it). Gives: evidence that each full manifest shown is a file under
`manifests/` (verbatim) that validates, that each YAML fragment validates inside a minimal
manifest, that each `imgbatch` command in a ```sh block exits 0, and that each ```python block
runs without an error; all of it writing only into the temporary copy.
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

MANIFESTS = REPO / "manifests"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
SCHEMA_LINE = "# yaml-language-server: $schema=../schema/manifest.schema.json\n"


def blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [body for tag, body in BLOCK.findall(text) if tag == language]


def imgbatch_commands() -> list[list[str]]:
    commands = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0] == "imgbatch":
                    commands.append(words[1:])
    return commands


@pytest.fixture
def clone(api_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder is a copy of the clone's manifests/, with a key for the fake server."""
    root = tmp_path / "clone"
    shutil.copytree(MANIFESTS, root / "manifests")
    monkeypatch.chdir(root)
    return root


def test_the_readme_has_examples_of_every_kind() -> None:
    assert len(blocks("yaml")) >= 6
    assert len(imgbatch_commands()) >= 8
    assert len(blocks("python")) >= 2


@pytest.mark.parametrize("block", blocks("yaml"), ids=lambda block: block.splitlines()[1][:40])
def test_each_yaml_example_is_a_shipped_manifest_or_a_valid_fragment(block: str) -> None:
    data: Any = yaml.safe_load(block)
    assert isinstance(data, dict)
    if "version" in data:
        files = {path.name: path.read_text(encoding="utf-8") for path in MANIFESTS.glob("*.yaml")}
        named = [name for name, text in files.items() if text == block]
        assert named, "a full manifest in the README must be a file in manifests/, verbatim"
        load_manifest(MANIFESTS / named[0])
    else:
        fragment = {"version": 1, "shots": [{"id": "a", "prompt": "p"}], **data}
        manifest_from_data(fragment, display="README", base_dir=MANIFESTS)


def test_every_shipped_manifest_validates_and_names_the_schema() -> None:
    paths = sorted(MANIFESTS.glob("*.yaml"))
    assert {path.stem for path in paths} >= {
        "cyclist-spot",
        "shots",
        "vars",
        "matrix",
        "variants",
        "seed-auto",
        "reference",
    }
    for path in paths:
        assert path.read_text(encoding="utf-8").startswith(SCHEMA_LINE), path
        assert load_manifest(path).shots, path
    # The reference example really uses the shipped image.
    (shot,) = load_manifest(MANIFESTS / "reference.yaml").shots
    assert (MANIFESTS / shot.fields["reference_image"]).is_file()


def test_each_shell_command_runs_as_written(clone: Path, fake_server: FakeDashScope) -> None:
    runner = CliRunner()
    for command in imgbatch_commands():
        result = runner.invoke(main, command, catch_exceptions=False)
        assert result.exit_code == 0, (command, result.output)
    assert fake_server.generation_count > 0  # the commands did reach the (fake) service
    # Everything was written inside the copy, nothing outside it.
    assert (clone / "output" / "cyclist-spot" / "results.json").is_file()
    assert (clone / "manifests" / "output" / "shots" / "results.json").is_file()


def test_each_python_example_runs_as_written(clone: Path, fake_server: FakeDashScope) -> None:
    for block in blocks("python"):
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (clone / "manifests" / "output" / "shots" / "results.json").is_file()
