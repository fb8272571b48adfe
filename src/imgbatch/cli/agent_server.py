"""`imgbatch mcp`: imgbatch as tools for an AI agent, over the Model Context Protocol on stdio.

Takes an MCP client on stdin and stdout (an agent, a desktop assistant); gives it five tools:
`generate` (one normalized `image.generate` request), `validate`, `plan` and `apply` (a shot
list by path) and `inspect` (an imgbatch PNG). Their results are the documents the CLI prints
with `--json`; their errors are MCP tool errors carrying the CLI's message (shot, field, what to
do). Every call of one server shares one `GenerateSession`: one pacer under the account's
quota, one cache per output folder, one payment for calls that ask the same thing at once.
`apply` calls take turns (each holds its output folder), reporting progress as MCP progress
notifications. Nothing is printed on stdout but the protocol, and the API key is in nothing the
server sends: provider errors are redacted where they are made.

The `mcp` SDK is an optional extra (`pip install 'imgbatch[mcp]'`), imported only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from imgbatch.errors import ConfigError, ImgbatchError

if TYPE_CHECKING:
    from imgbatch.plan.decide import Plan
    from imgbatch.review.events import RunEvent

SERVER_NAME = "imgbatch"
INSTRUCTIONS = (
    "Generate images with Alibaba Cloud Model Studio's Qwen Image models through imgbatch. "
    "Use `generate` for one image (a normalized request: prompt, size, seed, ...), and a shot "
    "list (a YAML manifest) with `validate`, `plan` and `apply` for a storyboard or a batch: "
    "apply makes only the shots whose request changed. Every image is cached by its request, "
    "so asking again costs nothing. Sizes for qwen-image-max and qwen-image-plus: 1664*928, "
    "1472*1104, 1328*1328, 1104*1472, 928*1664."
)


@dataclass(frozen=True)
class ServerSettings:
    """What `imgbatch mcp` was started with: applies to every call."""

    provider: str | None = None
    allow_reference_outside: bool = False
    allow_output_outside: bool = False


def build_server(settings: ServerSettings, session: Any) -> MCPServer:
    """The MCP server with imgbatch's tools; `session` is the `GenerateSession` they share."""
    # Warnings only on stderr: the SDK logs every failed call at INFO, which the result says.
    server = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, log_level="WARNING")
    _add_generate(server, settings, session)
    _add_manifest_tools(server, settings)
    _add_apply(server, settings)
    _add_inspect(server)
    return server


def _add_generate(server: MCPServer, settings: ServerSettings, session: Any) -> None:
    @server.tool(description=_GENERATE_DOC)
    async def generate(
        prompt: str,
        size: str | None = None,
        negative_prompt: str | None = None,
        style: str | None = None,
        seed: int | None = None,
        reference_image: str | None = None,
        model: str | None = None,
        output: str | None = None,
    ) -> dict[str, Any]:
        fields = {
            "prompt": prompt,
            "size": size,
            "negative_prompt": negative_prompt,
            "style": style,
            "seed": seed,
            "reference_image": reference_image,
            "model": model,
        }
        request = {name: value for name, value in fields.items() if value is not None}
        async with _tool_errors():
            if output is not None and not settings.allow_output_outside:
                _check_inside(Path(output))
            return _shown(dict(await session.generate(request, output=output)))


def _add_manifest_tools(server: MCPServer, settings: ServerSettings) -> None:
    @server.tool(description="Check shot lists (YAML manifests, by path) against the schema and "
                 "the model rules; gives the verdict and every problem with file, line, shot "
                 "and field, as `imgbatch validate --json`.")  # fmt: skip
    async def validate(manifests: list[str]) -> dict[str, Any]:
        from imgbatch.manifest.validation import validate as check
        from imgbatch.manifest.validation import validate_json

        async with _tool_errors():
            paths = [Path(name) for name in manifests]
            allow = settings.allow_reference_outside
            results = await asyncio.to_thread(check, paths, allow_reference_outside=allow)
            return _shown(validate_json(results))

    @server.tool(description="What `apply` would do to a shot list (by path), shot by shot and "
                 "why, with the estimated cost; nothing is sent or downloaded. As "
                 "`imgbatch plan --json`.")  # fmt: skip
    async def plan(manifest: str, only: list[str] | None = None) -> dict[str, Any]:
        from imgbatch.api import make_plan
        from imgbatch.review.report import plan_json

        async with _tool_errors():
            made = await asyncio.to_thread(
                make_plan,
                Path(manifest),
                provider=settings.provider,
                allow_reference_outside=settings.allow_reference_outside,
                only=tuple(only or ()),
            )
            return _shown(plan_json(made))


def _add_apply(server: MCPServer, settings: ServerSettings) -> None:
    applying = asyncio.Lock()

    @server.tool(description=_APPLY_DOC)
    async def apply(
        manifest: str,
        ctx: Context,
        only: list[str] | None = None,
        max_requests: int | None = None,
        max_duration: str | None = None,
        max_cost: str | None = None,
    ) -> dict[str, Any]:
        async with _tool_errors(), applying:
            bounds = _bounds(max_requests, max_duration, max_cost)
            return _shown(await _apply(Path(manifest), settings, tuple(only or ()), bounds, ctx))


def _add_inspect(server: MCPServer) -> None:
    @server.tool(description="The provenance an imgbatch PNG carries (prompt sent, seed, model, "
                 "request key, request id), as `imgbatch inspect --json`.")  # fmt: skip
    async def inspect(image: str) -> dict[str, Any]:
        from imgbatch.review.provenance import as_json, inspect_image

        async with _tool_errors():
            return _shown(as_json(await asyncio.to_thread(inspect_image, Path(image))))


_GENERATE_DOC = (
    "Make one image from a normalized image.generate request, or take it from the cache when "
    "the same request was made before (nothing is sent or paid then). prompt is required; size "
    "is W*H (qwen-image-max and -plus: 1664*928, 1472*1104, 1328*1328, 1104*1472, 928*1664); "
    "reference_image is a path under the current folder, an http(s) URL or a data: URI; model "
    "is qwen-image-max (default) or qwen-image-plus-2026-01-09; output is the PNG file to "
    "write (default output/ai-image-qwen-image/images/<key>.png). Gives image_url, width, "
    "height, seed, file, request_id and cached."
)
_APPLY_DOC = (
    "Make every shot of a shot list (by path) whose request changed, write the images, "
    "results.json and the contact sheet, and give what the run did, as `imgbatch apply "
    "--json`. Progress comes as MCP progress notifications. Bounds: max_requests (requests "
    "sent, retries included), max_duration (such as 90s, 10m, 1h30m), max_cost (such as 5 or "
    "'5 USD'); a bounded run stops sending, finishes what is in flight and says how many shots "
    "remain: call apply again to continue."
)


def _check_inside(output: Path) -> None:
    """Raise `ConfigError` unless `output` lies under the current folder, links resolved: a
    call's arguments come from a model and whatever it read, so, as for a reference image, a
    file outside the folder the server runs in is not written without the user's trust."""
    root = Path.cwd().resolve()
    try:
        resolved = (root / output).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a link loop
        raise ConfigError(f"output {output} cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root):
        raise ConfigError(
            f"output {output} resolves to {resolved}, outside the folder the server runs in "
            f"({root}); start the server with --allow-output-outside to write there; nothing "
            "was sent or written"
        )


@dataclass(frozen=True)
class _Bounds:
    max_requests: int | None
    max_duration: float | None
    max_cost: Any


def _bounds(max_requests: int | None, max_duration: str | None, max_cost: str | None) -> _Bounds:
    """The bounds as apply takes them; a value that cannot be read is the caller's error."""
    from imgbatch.run.bounds import parse_duration
    from imgbatch.units.money import CostLimit

    if max_requests is not None and max_requests < 1:
        raise ConfigError(f"max_requests must be at least 1, not {max_requests}")
    try:
        duration = parse_duration(max_duration) if max_duration is not None else None
        cost = CostLimit.parse(max_cost) if max_cost is not None else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return _Bounds(max_requests, duration, cost)


async def _apply(
    manifest: Path, settings: ServerSettings, only: Sequence[str], bounds: _Bounds, ctx: Context
) -> dict[str, Any]:
    from imgbatch.api import ApplyOptions, apply_async
    from imgbatch.review.report import apply_json

    progress = _ProgressNotes(ctx)
    options = ApplyOptions(
        provider=settings.provider,
        allow_reference_outside=settings.allow_reference_outside,
        max_requests=bounds.max_requests,
        max_duration=bounds.max_duration,
        max_cost=bounds.max_cost,
        only=tuple(only),
    )
    report = await apply_async(manifest, options, listener=progress, on_plan=progress.start)
    await progress.flush()
    return apply_json(report)


class _ProgressNotes:
    """An apply's finished shots, as MCP progress notifications (done of total, and the shot):
    a long run is never silent to the agent."""

    def __init__(self, ctx: Context) -> None:
        from imgbatch.review.events import RunStatuses

        self._ctx = ctx
        # As the CLI's progress says it: a shot restored from the store is `from_store`.
        self._statuses = RunStatuses()
        self._total = 0
        self._done = 0
        self._sent: list[asyncio.Task[None]] = []

    def start(self, plan: Plan) -> None:
        from imgbatch.plan.decide import WORK_ACTIONS

        self._total = sum(1 for item in plan.shots if item.action in WORK_ACTIONS)
        self._notify(f"{self._total} shots to make")

    def __call__(self, event: RunEvent) -> None:
        from imgbatch.state.results import ResultEntry

        status = self._statuses.finished(event)
        if isinstance(event, ResultEntry) and status is not None:
            self._done += 1
            self._notify(f"{event.id}: {status}")

    def _notify(self, message: str) -> None:
        report = self._ctx.report_progress(self._done, self._total or None, message)
        self._sent.append(asyncio.ensure_future(report))

    async def flush(self) -> None:
        """Every notification sent before the result, so that none arrives after it."""
        if self._sent:
            await asyncio.gather(*self._sent, return_exceptions=True)


def _shown(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with the API key hidden wherever it quotes a file's text (a shot list that is
    the `.env` beside it, a PNG's text chunk): what a tool gives goes into a model's context."""
    from imgbatch.cli.common import hide_secrets

    shown: dict[str, Any] = json.loads(hide_secrets(json.dumps(document, ensure_ascii=False)))
    return shown


@contextlib.asynccontextmanager
async def _tool_errors() -> AsyncIterator[None]:
    """imgbatch's errors as MCP tool errors in the CLI's words; anything else as the CLI says
    it (one line, the traceback in a crash log with secrets hidden), and the server goes on."""
    try:
        yield
    except ImgbatchError as exc:
        from imgbatch.cli.common import hide_secrets

        raise ToolError(hide_secrets(str(exc))) from None
    except Exception as exc:  # noqa: BLE001 - the boundary: no traceback reaches the agent
        from imgbatch.cli.common import write_crash_log

        log = write_crash_log()
        raise ToolError(f"unexpected {type(exc).__name__}; details in {log}") from None


def serve(settings: ServerSettings, *, runner: Callable[..., Any] = asyncio.run) -> None:
    """Run the server on stdin and stdout until the client closes stdin (or Ctrl-C); requests
    already sent to the service are waited for, so no paid image is lost."""
    from imgbatch.run.generate import GenerateSession

    async def main() -> None:
        session = GenerateSession(
            provider=settings.provider, allow_reference_outside=settings.allow_reference_outside
        )
        async with session:
            await build_server(settings, session).run_stdio_async()

    runner(main())
