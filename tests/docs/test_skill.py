"""The agents' skill (skills/imgbatch/SKILL.md) is true: every command in it runs as written.

Takes: the skill's front matter, its fenced blocks (the shot list, the shell commands, the MCP
client configuration, the exit-code table) and a temporary project with no API key. Gives:
evidence that the front matter is in the seed skill's format, that each command exits 0 with
the placeholder provider (`--provider auto` falls back to it), that the configuration starts a
server the official MCP client can list tools from, and that the exit codes it states are the
CLI's own.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.support.files import REPO

SKILL = REPO / "skills" / "imgbatch" / "SKILL.md"
AGENTS_PAGE = REPO / "docs" / "agents.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def text(page: Path = SKILL) -> str:
    return page.read_text(encoding="utf-8")


def blocks(language: str, page: Path = SKILL) -> list[str]:
    return [body for tag, body in BLOCK.findall(text(page)) if tag == language]


def commands() -> list[list[str]]:
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                found.append(words)
    return found


@pytest.fixture
def keyless(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASHSCOPE_", "OUTPUT_DIR"))}
    env["HOME"] = str(tmp_path / "home")
    return env


def test_the_front_matter_is_the_seed_skills_format() -> None:
    _, front, body = text().split("---\n", 2)
    fields = yaml.safe_load(front)
    assert set(fields) == {"name", "description"}
    assert fields["name"] == "imgbatch"
    assert "qwen-image-max" in fields["description"]
    assert body.lstrip().startswith("**Category: provider**")


def test_every_command_runs_as_written(tmp_path: Path, keyless: dict[str, str]) -> None:
    (shot_list,) = blocks("yaml")
    (tmp_path / "storyboard.yaml").write_text(shot_list, encoding="utf-8")
    imgbatch = str(Path(sys.executable).with_name("imgbatch"))
    ran = []
    for words in commands():
        if words[:2] == ["pip", "install"]:
            continue  # the environment running this test is that install
        assert words[0] == "imgbatch", words
        done = subprocess.run(
            [imgbatch, *words[1:]], cwd=tmp_path, env=keyless, capture_output=True, text=True
        )
        assert done.returncode == 0, (words, done.stderr)
        ran.append(words[1])
        if words[1] == "generate":
            response = json.loads(done.stdout)
            assert Path(tmp_path, response["file"]).is_file()
            assert (response["width"], response["height"], response["seed"]) == (1328, 1328, 7)
    assert ran == ["generate", "validate", "plan", "apply", "sheet", "inspect"]
    assert (tmp_path / "output" / "storyboard" / "index.html").is_file()


def test_the_mcp_configuration_starts_a_server(tmp_path: Path, keyless: dict[str, str]) -> None:
    (config,) = blocks("json")
    server = json.loads(config)["mcpServers"]["imgbatch"]
    command = shutil.which(server["command"], path=str(Path(sys.executable).parent))
    assert command is not None

    async def tool_names() -> set[str]:
        params = StdioServerParameters(
            command=command, args=server["args"], env=keyless, cwd=str(tmp_path)
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return {tool.name for tool in (await session.list_tools()).tools}

    assert asyncio.run(tool_names()) == {"generate", "validate", "plan", "apply", "inspect"}


def test_the_exit_codes_are_the_clis() -> None:
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", text(), re.MULTILINE)
    stated = {int(code) for code, _ in rows}
    cli = importlib.import_module("imgbatch.cli.main")
    actual = {cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_REMAINING}
    assert stated == actual | {cli.EXIT_INTERRUPTED}


def test_the_agents_page_shows_the_same_configuration() -> None:
    assert blocks("json", AGENTS_PAGE) == blocks("json")


def test_the_agents_pages_python_runs(
    tmp_path: Path, keyless: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (example,) = blocks("python", AGENTS_PAGE)
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("DASHSCOPE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", keyless["HOME"])
    exec(compile(example, str(AGENTS_PAGE), "exec"), {"__name__": "agents_page"})
    assert len(list((tmp_path / "output" / "ai-image-qwen-image" / "images").glob("*.png"))) == 2
