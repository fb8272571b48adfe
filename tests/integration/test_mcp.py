"""`imgbatch mcp`, driven as an agent drives it: the official MCP client spawns the server.

Takes the `mcp` SDK's `stdio_client` and `ClientSession` against `python -m imgbatch mcp` in a
temporary project, with the placeholder provider or the fake DashScope server on 127.0.0.1;
gives evidence that the tools and their schemas are listed, that parallel `generate` calls are
paced under a small quota and pay once per distinct request, that `apply` reports progress,
that a bad request is a tool error naming its field, that the key is in nothing the server
sends, and that closing stdin or Ctrl-C mid-request loses no paid image.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import FAKE_KEY

TOOLS = {"generate", "validate", "plan", "apply", "inspect"}
SIZE = "1328*1328"


def server_env(home: Path, fake: FakeDashScope | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASHSCOPE_", "OUTPUT_DIR"))}
    env["HOME"] = str(home)
    if fake is not None:
        env["DASHSCOPE_API_KEY"] = FAKE_KEY
        env["DASHSCOPE_HTTP_BASE_URL"] = fake.base_url
    return env


@asynccontextmanager
async def connected(
    project: Path, fake: FakeDashScope | None, *flags: str, errlog: Path | None = None
) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "imgbatch", "mcp", *flags],
        env=server_env(project / "home", fake),
        cwd=str(project),
    )
    log = (errlog or project / "server-stderr.log").open("a", encoding="utf-8")
    try:
        async with stdio_client(params, errlog=log) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session
    finally:
        log.close()


def shot_list(project: Path, count: int, provider: str | None = None) -> Path:
    lines = ["version: 1", "name: shots", *([f"provider: {provider}"] if provider else [])]
    lines += ["defaults:", f'  size: "{SIZE}"', "shots:"]
    for index in range(count):
        lines += [f"  - id: s{index}", f'    prompt: "frame {index}"']
    path = project / "shots.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path


def run(coroutine: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coroutine())  # type: ignore[arg-type]


def test_the_tools_and_their_schemas_are_listed(project: Path) -> None:
    async def scenario() -> Any:
        async with connected(project, None, "--provider", "placeholder") as session:
            return (await session.list_tools()).tools

    tools = {tool.name: tool for tool in run(scenario)}
    assert set(tools) == TOOLS
    generate = tools["generate"].input_schema
    assert generate["required"] == ["prompt"]
    assert {
        "prompt",
        "negative_prompt",
        "size",
        "style",
        "seed",
        "reference_image",
        "model",
    } <= set(generate["properties"])
    assert tools["apply"].input_schema["required"] == ["manifest"]
    assert {"max_requests", "max_duration", "max_cost"} <= set(
        tools["apply"].input_schema["properties"]
    )
    # The agent's context is the server's business, not a parameter the model fills in.
    assert "ctx" not in tools["apply"].input_schema["properties"]
    assert tools["validate"].input_schema["required"] == ["manifests"]
    assert tools["inspect"].input_schema["required"] == ["image"]


def test_generate_with_the_placeholder_writes_the_image_and_caches_it(project: Path) -> None:
    request = {"prompt": "a red bicycle", "size": SIZE, "seed": 7}

    async def scenario() -> list[Any]:
        async with connected(project, None, "--provider", "placeholder") as session:
            first = await session.call_tool("generate", request)
            again = await session.call_tool("generate", request)
            inspected = await session.call_tool(
                "inspect", {"image": first.structured_content["file"]}
            )
            return [first, again, inspected]

    first, again, inspected = run(scenario)
    assert not first.is_error and not again.is_error
    response = first.structured_content
    assert (response["width"], response["height"], response["seed"]) == (1328, 1328, 7)
    assert Path(response["file"]).is_file()
    assert response["file"].startswith(str(project / "output" / "ai-image-qwen-image"))
    assert response["cached"] is False and again.structured_content["cached"] is True
    assert inspected.structured_content["prompt"] == "a red bicycle"
    assert inspected.structured_content["seed"] == 7


def test_parallel_generates_are_paced_and_pay_once_per_request(project: Path) -> None:
    """Ten calls at once, five distinct requests, an account allowing 2 requests a second:
    every call succeeds (429s are retried under one pacer, never returned), and the service
    bills five images."""
    requests = [{"prompt": f"keyframe {i % 5}", "size": SIZE, "seed": i % 5} for i in range(10)]
    with FakeDashScope(
        api_key=FAKE_KEY, image_profile="tiny", latency=0.2, quota_window=(2, 1.0)
    ) as fake:

        async def scenario() -> list[Any]:
            async with connected(project, fake) as session:
                calls = [session.call_tool("generate", request) for request in requests]
                return list(await asyncio.gather(*calls))

        results = run(scenario)
        assert [result.is_error for result in results] == [False] * 10
        assert fake.successes == 5
    files = {result.structured_content["file"] for result in results}
    assert len(files) == 5
    assert sum(result.structured_content["cached"] for result in results) == 5
    everything = json.dumps([r.structured_content for r in results])
    everything += (project / "server-stderr.log").read_text(encoding="utf-8")
    assert FAKE_KEY not in everything


def test_apply_reports_progress_and_returns_the_json_document(project: Path) -> None:
    manifest = shot_list(project, 3, provider="placeholder")
    notes: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, total, message))

    async def scenario() -> Any:
        async with connected(project, None) as session:
            planned = await session.call_tool("plan", {"manifest": str(manifest)})
            applied = await session.call_tool(
                "apply", {"manifest": str(manifest)}, progress_callback=on_progress
            )
            return planned, applied

    planned, applied = run(scenario)
    assert [shot["action"] for shot in planned.structured_content["shots"]] == ["create"] * 3
    document = applied.structured_content
    assert not applied.is_error, applied.content
    assert [shot["id"] for shot in document["shots"]] == ["s0", "s1", "s2"]
    assert (project / "output" / "shots" / "s2.png").is_file()
    assert notes[-1][:2] == (3, 3)
    assert {message for _, _, message in notes} >= {"s0: generated", "s2: generated"}


def test_apply_progress_says_from_store_for_images_restored_from_the_store(
    project: Path,
) -> None:
    # The server said `generated` for each shot restored from the store (its entry is its
    # maker's), while the CLI's progress, summary and --json said `from_store`.
    manifest = shot_list(project, 2, provider="placeholder")
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text.replace("defaults:", "output:\n  store: store\ndefaults:"))
    notes: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append(message)

    async def scenario() -> Any:
        async with connected(project, None) as session:
            first = await session.call_tool("apply", {"manifest": str(manifest)})
            # Another machine's output folder, the same store: every image comes from it.
            shutil.rmtree(project / "output")
            again = await session.call_tool(
                "apply", {"manifest": str(manifest)}, progress_callback=on_progress
            )
            return first, again

    first, again = run(scenario)
    assert not first.is_error and not again.is_error, again.content
    assert [shot["status"] for shot in again.structured_content["shots"]] == ["from_store"] * 2
    assert set(notes) >= {"s0: from_store", "s1: from_store"}
    assert not [note for note in notes if note and note.endswith(": generated")]


def test_apply_honours_max_requests(project: Path) -> None:
    manifest = shot_list(project, 4)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as fake:

        async def scenario() -> Any:
            async with connected(project, fake, "--provider", "dashscope") as session:
                arguments = {"manifest": str(manifest), "max_requests": 2}
                return await session.call_tool("apply", arguments)

        result = run(scenario)
        assert fake.generation_count == 2
    assert not result.is_error, result.content
    assert result.structured_content["summary"]["remaining"] == 2
    assert result.structured_content["summary"]["bounded"] == "max_requests"


@pytest.mark.parametrize(
    ("tool", "arguments", "words"),
    [
        ("generate", {"prompt": "x", "size": "10*10"}, ["field size", "'10*10'", "1328*1328"]),
        ("apply", {"manifest": "shots.yaml", "max_duration": "soon"}, ["soon"]),
        ("inspect", {"image": "missing.png"}, ["missing.png"]),
        ("plan", {"manifest": "nowhere.yaml"}, ["nowhere.yaml"]),
    ],
)
def test_a_bad_call_is_a_tool_error_in_the_clis_words(
    project: Path, tool: str, arguments: dict[str, Any], words: list[str]
) -> None:
    async def scenario() -> Any:
        async with connected(project, None, "--provider", "placeholder") as session:
            failed = await session.call_tool(tool, arguments)
            # The server goes on after a failed call.
            alive = await session.call_tool("generate", {"prompt": "still here", "size": SIZE})
            return failed, alive

    failed, alive = run(scenario)
    assert failed.is_error
    text = failed.content[0].text
    for word in words:
        assert word in text
    assert "Traceback" not in text
    assert not alive.is_error


@pytest.mark.parametrize("output", ["../{name}/frame.png", "{outside}/frame.png", "link/x.png"])
def test_generate_writes_no_output_outside_the_folder_unless_trusted(
    project: Path, output: str
) -> None:
    """A tool call's arguments come from a model (and what it read): as a reference image
    outside the folder is not read, an `output` outside it is not written, links included."""
    outside = project.parent / f"{project.name}-outside"
    outside.mkdir()
    (project / "link").symlink_to(outside)
    output = output.replace("{outside}", str(outside)).replace("{name}", outside.name)
    request = {"prompt": "a frame", "size": SIZE, "output": output}

    async def scenario(*flags: str) -> Any:
        async with connected(project, None, "--provider", "placeholder", *flags) as session:
            return await session.call_tool("generate", request)

    refused = run(lambda: scenario())
    assert refused.is_error
    assert "outside the folder" in refused.content[0].text
    assert "--allow-output-outside" in refused.content[0].text
    assert list(outside.iterdir()) == [] and not (project / "output").exists()

    trusted = run(lambda: scenario("--allow-output-outside"))
    assert not trusted.is_error, trusted.content[0].text
    assert Path(json.loads(trusted.content[0].text)["file"]).is_file()


def test_no_tool_gives_the_key_from_a_file_it_quotes(project: Path) -> None:
    """A model told by a page it read to `validate` the `.env` beside it: the problem quotes the
    file's text, and the key would be in the model's context."""
    (project / ".env").write_text(f"DASHSCOPE_API_KEY={FAKE_KEY}\n", encoding="utf-8")
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as fake:

        async def scenario() -> list[Any]:
            async with connected(project, fake) as session:
                return [
                    await session.call_tool("validate", {"manifests": [".env"]}),
                    await session.call_tool("plan", {"manifest": ".env"}),
                    await session.call_tool("apply", {"manifest": ".env"}),
                ]

        answers = run(scenario)
    for answer in answers:
        text = answer.content[0].text
        assert "expected a mapping" in text
        assert FAKE_KEY not in text


def test_closing_stdin_mid_request_keeps_the_paid_image(project: Path) -> None:
    """The agent goes away while a generation is in flight: the server waits for the answer,
    writes the image (it was paid for) and exits."""
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny", latency=1.0) as fake:

        async def scenario() -> None:
            async with connected(project, fake) as session:
                call = asyncio.ensure_future(
                    session.call_tool("generate", {"prompt": "a paid frame", "size": SIZE})
                )
                await _until(lambda: fake.in_flight == 1)
                call.cancel()
            # Leaving the client closed the server's stdin, then waited for it to exit.

        run(scenario)
        assert fake.successes == 1
    assert len(list((project / "output" / "ai-image-qwen-image" / "images").glob("*.png"))) == 1


def test_ctrl_c_mid_request_keeps_the_paid_image_and_exits_130(project: Path) -> None:
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny", latency=1.0) as fake:
        server = subprocess.Popen(
            [sys.executable, "-m", "imgbatch", "mcp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=server_env(project / "home", fake),
            cwd=project,
        )
        assert server.stdin is not None and server.stdout is not None
        for message in _handshake_then_generate({"prompt": "a paid frame", "size": SIZE}):
            server.stdin.write((json.dumps(message) + "\n").encode())
        server.stdin.flush()
        asyncio.run(_until(lambda: fake.in_flight == 1))
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
        assert fake.successes == 1
    assert server.returncode == 130
    assert b"Traceback" not in stderr and FAKE_KEY.encode() not in stderr
    assert len(list((project / "output" / "ai-image-qwen-image" / "images").glob("*.png"))) == 1


def _handshake_then_generate(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON-RPC lines a client sends to initialize and call `generate` once."""
    return [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "0"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "generate", "arguments": request},
        },
    ]


async def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        await asyncio.sleep(0.01)
