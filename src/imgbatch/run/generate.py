"""One request at a time, as the seed skill's helper script does: `imgbatch generate`.

Takes a normalized `image.generate` request (a dict: `prompt`, `negative_prompt`, `size`,
`style`, `seed`, `reference_image`, `model`, `prompt_extend`, `watermark`); gives the normalized
response (`image_url`, `width`, `height`, `seed`, plus `file`, `request_id` and `cached`) after
writing the image. The request is checked by the same rules as a manifest shot and sent through
the same executor (pacing, retries, download, verification) and image cache as `apply`:

    >>> response = generate({"prompt": "a red bicycle", "size": "1328*1328"},
    ...                     provider="placeholder")
    >>> response["cached"], response["width"]
    (False, 1328)

Where the image and the cache go:

* with no `output`, the image is `<folder>/images/<key>.png` and the cache that folder's
  (`OutputFolder`), where `<folder>` is `output/ai-image-qwen-image` in the current directory,
  or `$OUTPUT_DIR/ai-image-qwen-image` when `OUTPUT_DIR` is set (the skill's layout);
* with `output`, the image goes there, and the cache is that of the nearest folder above it that
  an `apply` wrote (`OutputFolder.is_made`), so a request an apply already paid for is free;
  when there is none, the default folder's cache (one cache per project, whatever file the
  image is written to).

Nothing is written before the request is known to be answerable: a request that must be sent
has its provider (its key) made before the folder's lock is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgbatch.errors import (
    CacheEntryDamaged,
    ConfigError,
    ImgbatchError,
    ManifestError,
    ManifestProblem,
    ProviderError,
)
from imgbatch.manifest import Manifest, manifest_from_data
from imgbatch.manifest.expansion import EXPANSION_FIELDS
from imgbatch.state.cache import ImageCache
from imgbatch.state.folder import OutputFolder

if TYPE_CHECKING:
    from imgbatch.shots.expand import Shot

SKILL_FOLDER = "ai-image-qwen-image"
# Hears a request's `Phase` as it changes, then None when it is done.
PhaseListener = Callable[[str | None], None]
REQUEST_DISPLAY = "request"


def generate(
    request: Mapping[str, Any],
    *,
    output: str | Path | None = None,
    provider: Any = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    allow_reference_outside: bool = False,
    on_phase: PhaseListener | None = None,
    store: str | None = None,
    store_read_only: bool = False,
) -> dict[str, Any]:
    """Make (or take from the cache) the image for one normalized request; see the module doc.

    `store` (else `IMGBATCH_STORE`): a shared store, as for `apply --store`.

    `provider` is a name (`"dashscope"`, `"placeholder"`, `"auto"`) or a provider object.
    `on_phase` hears what the request waits for as it changes (`run.executor.Phase`: its turn,
    the service's answer, a retry's pause, the download), then None when it is done: what a
    spinner or a log line shows while a 16-second generation is awaited.
    Raises `ManifestError` for an invalid request (nothing sent), `ConfigError` for missing
    credentials, `ProviderError` when the service refused or failed it.
    """
    return asyncio.run(
        agenerate(
            request,
            output=output,
            provider=provider,
            environ=environ,
            home=home,
            allow_reference_outside=allow_reference_outside,
            on_phase=on_phase,
            store=store,
            store_read_only=store_read_only,
        )
    )


async def agenerate(
    request: Mapping[str, Any],
    *,
    output: str | Path | None = None,
    provider: Any = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    allow_reference_outside: bool = False,
    on_phase: PhaseListener | None = None,
    store: str | None = None,
    store_read_only: bool = False,
) -> dict[str, Any]:
    """`generate` for callers already inside an event loop."""
    session = GenerateSession(
        provider=provider,
        environ=environ,
        home=home,
        allow_reference_outside=allow_reference_outside,
        on_phase=on_phase,
        store=store,
        store_read_only=store_read_only,
    )
    async with session:
        return await session.generate(request, output=output)


class GenerateSession:
    """Many `generate` calls in one process (an MCP server, a pipeline's worker) that share what
    one account has: one pacer per provider (so parallel calls are paced under the quota, not
    refused), one open provider, one hold on each output folder's lock, and one request for
    calls that ask the same thing at the same time (the second takes the first's image from the
    cache). Leaving the session waits for the requests already sent, so an image paid for is
    written even when the caller stopped waiting for it.

        >>> import asyncio
        >>> async def two_at_once():
        ...     async with GenerateSession(provider="placeholder") as session:
        ...         request = {"prompt": "a red bicycle", "size": "1328*1328"}
        ...         return await asyncio.gather(session.generate(request),
        ...                                     session.generate(request))
        >>> sorted(response["cached"] for response in asyncio.run(two_at_once()))
        [False, True]
    """

    def __init__(
        self,
        *,
        provider: Any = None,
        environ: Mapping[str, str] | None = None,
        home: Path | None = None,
        allow_reference_outside: bool = False,
        on_phase: PhaseListener | None = None,
        store: str | None = None,
        store_read_only: bool = False,
    ) -> None:
        self._on_phase = on_phase
        # A provider object given is used as it is; a name (or None) is resolved per request.
        self._given = provider if not isinstance(provider, str | None) else None
        self._choice = provider if self._given is None else None
        # A shared store (`store`, else IMGBATCH_STORE): opened on first use, one per session.
        self._store = (store, store_read_only)
        self._shared: Any = None
        self._environ = os.environ if environ is None else environ
        self._home = home
        self._allow_outside = allow_reference_outside
        self._providers: dict[str, tuple[Any, Any]] = {}
        self._holds: dict[Path, list[Any]] = {}
        self._folder_guard = asyncio.Lock()
        self._requests: dict[tuple[Path, str], asyncio.Lock] = {}
        self._work: set[asyncio.Task[dict[str, Any]]] = set()
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> GenerateSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            # Requests already sent finish and their images are written; nothing new starts.
            if self._work:
                await asyncio.wait(self._work)
        finally:
            await self._stack.aclose()
            for hold in self._holds.values():
                hold[1].close()
            self._holds.clear()

    async def generate(
        self, request: Mapping[str, Any], *, output: str | Path | None = None
    ) -> dict[str, Any]:
        """The normalized response for `request` (see `generate`); a caller that stops waiting
        (cancelled) does not cancel a request already sent."""
        task = asyncio.ensure_future(self._generate(request, output))
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return await asyncio.shield(task)

    async def _generate(
        self, request: Mapping[str, Any], output: str | Path | None
    ) -> dict[str, Any]:
        from imgbatch.providers import check_endpoint
        from imgbatch.run.apply import provider_name
        from imgbatch.shots.expand import expand, fetch_references

        if not isinstance(request, Mapping):
            raise ConfigError("the request must be a JSON object of image.generate fields")
        manifest = _as_manifest(request, self._allow_outside)
        chosen = self._given
        name = (
            chosen.name
            if chosen is not None
            else provider_name(manifest, self._choice, self._environ, self._home)
        )
        if chosen is None:
            check_endpoint(name, self._environ)  # before the lock is taken: nothing written
        # A reference URL is fetched now and the request keyed by its content; one that cannot
        # be fetched fails in the executor, naming the field, with nothing sent.
        expansion = expand(manifest, provider=name, environ=self._environ)
        (shot,) = (await fetch_references(expansion)).shots
        state_folder, target = _places(shot.request.key, output, self._environ)
        _check_replaceable(target.resolve())
        if self._must_send(state_folder, shot.request.key):
            # The key is checked before the lock is taken: a call refused for want of one writes
            # nothing, not even the default folder's lock in the current directory.
            await self._provider(name)
        async with self._holding(state_folder), self._one_request(state_folder, shot.request.key):
            folder = OutputFolder(state_folder)
            had = folder.cache.has(shot.request.key)
            try:
                return await self._made(shot, name, state_folder, target.resolve())
            finally:
                if not had and folder.cache.has(shot.request.key):
                    # Under the lock: an apply of this folder that planned this request as one
                    # to pay for before taking its lock sees the change, plans again, and
                    # restores the image instead of paying for it twice.
                    folder.mark_changed()

    async def _made(
        self, shot: Shot, name: str, state_folder: Path, target: Path
    ) -> dict[str, Any]:
        """The image for `shot` at `target`: restored from the cache, else generated."""
        from imgbatch.plan.decide import Action, Plan, PlannedShot
        from imgbatch.run.executor import Executor, Phase
        from imgbatch.shots.expand import Shot

        key = shot.request.key
        width, height = shot.request.dimensions
        cache = OutputFolder(state_folder).cache
        sharing = await self._sharing(cache)
        if sharing is not None and not cache.has(key):
            await sharing.hydrate([shot])  # made by anyone sharing the store: restored
        if cache.has(key) and await _restored(cache, key, target, (width, height)):
            return _response(None, width, height, shot.request.seed, target, None, cached=True)
        provider, pacer = await self._provider(name)
        placed = Shot(shot.id, shot.request, str(target))
        planned = PlannedShot(shot.id, Action.CREATE, "new request", placed, None)
        plan = Plan(state_folder, (planned,), (), name)
        executor = Executor(provider, cache, lambda entry: None, pacer=pacer, shared=sharing)
        on_phase = self._on_phase
        told: list[str] = []
        watch = (
            asyncio.ensure_future(_watch(executor.outcome.in_flight, shot.id, on_phase, told))
            if on_phase is not None
            else None
        )
        try:
            outcome = await executor.run(plan)
            if on_phase is not None and told[-1:] == [Phase.SENDING]:
                # Answered, downloaded and written between two looks (a small image): said all
                # the same, or the answer would go unsaid.
                if outcome.entries[shot.id].has_image:
                    on_phase(Phase.WRITING)
        finally:
            if watch is not None and on_phase is not None:
                watch.cancel()
                on_phase(None)
        entry = outcome.entries[shot.id]
        if not entry.has_image:
            # The entry's error already reads "400 DataInspectionFailed: ...": given as code=
            # too, the message would say the code twice.
            error = ProviderError(entry.error or "the request failed", request_id=entry.request_id)
            error.code = entry.error_code
            raise error
        seed = shot.request.seed
        return _response(
            entry.image_url, width, height, seed, target, entry.request_id, cached=False
        )

    def _must_send(self, folder: Path, key: str) -> bool:
        """Whether only the service can give this request's image: not in `folder`'s cache, and
        no shared store that may hold it (either serves it with no key at all)."""
        from imgbatch.state.store import choose_store

        if choose_store(self._store[0], self._environ, None) is not None:
            return False
        return not OutputFolder(folder).cache.has(key)

    async def _sharing(self, cache: ImageCache) -> Any:
        """The shared store's view over the output folder's `cache` (None without a store)."""
        from imgbatch.run.sharing import SharedRun
        from imgbatch.state.store import choose_store, open_shared, read_only_from

        flag, read_only = self._store
        chosen = choose_store(flag, self._environ, None)
        if chosen is None:
            return None
        if self._shared is None:
            self._shared = await self._stack.enter_async_context(
                open_shared(
                    chosen[0], self._environ, read_only=read_only_from(read_only, self._environ)
                )
            )
        return SharedRun(self._shared, cache)

    async def _provider(self, name: str) -> tuple[Any, Any]:
        """The open provider called `name` and its pacer, made on first use."""
        from imgbatch.pacing.gate import Pacer
        from imgbatch.providers import create_provider

        if name not in self._providers:
            provider = self._given or create_provider(name, self._environ, self._home)
            await self._stack.enter_async_context(provider)
            self._providers[name] = (provider, Pacer(unlimited=not provider.metered))
        return self._providers[name]

    @contextlib.asynccontextmanager
    async def _holding(self, folder: Path) -> AsyncIterator[None]:
        """The output folder's lock, taken by the first call that needs it and kept while any
        call of this session uses it: one process's calls share it, another process is refused."""
        async with self._folder_guard:
            hold = self._holds.get(folder)
            if hold is None:
                stack = contextlib.ExitStack()
                stack.enter_context(OutputFolder(folder).lock("generate"))
                hold = self._holds[folder] = [0, stack]
            hold[0] += 1
        try:
            yield
        finally:
            async with self._folder_guard:
                hold[0] -= 1
                if hold[0] == 0:
                    del self._holds[folder]
                    hold[1].close()

    @contextlib.asynccontextmanager
    async def _one_request(self, folder: Path, key: str) -> AsyncIterator[None]:
        """Calls for the same request take turns: the first pays, the next restores its image."""
        lock = self._requests.setdefault((folder, key), asyncio.Lock())
        async with lock:
            yield


async def _watch(
    in_flight: Mapping[str, str],
    shot_id: str,
    on_phase: PhaseListener,
    told: list[str],
    every: float = 0.05,
) -> None:
    """Tell `on_phase` each new phase of `shot_id` (the executor's record, read as it runs),
    and keep in `told` what it was told."""
    last: str | None = None
    while True:
        phase = in_flight.get(shot_id)
        if phase is not None and phase != last:
            on_phase(phase)
            told.append(phase)
            last = phase
        await asyncio.sleep(every)


def _check_replaceable(target: Path) -> None:
    """Raise `ConfigError` unless `target` is absent or an image imgbatch wrote (its provenance
    says so): a device node, a folder or a user's own file is never replaced."""
    from imgbatch.png import read_image_file, read_provenance

    try:
        info = target.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"output {target} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISREG(info.st_mode):
        try:
            read_provenance(read_image_file(target), name=str(target))
            return
        except ImgbatchError:
            what = "a file imgbatch did not write"
    else:
        special = "not a regular file (a device or a pipe)"
        what = "a folder" if stat.S_ISDIR(info.st_mode) else special
    raise ConfigError(
        f"output {target} is {what}, so it is not replaced: remove it or choose another path; "
        "nothing was sent"
    )


async def _restored(cache: ImageCache, key: str, target: Path, size: tuple[int, int]) -> bool:
    """Put the cached image at `target` once checked; False (the entry discarded) if damaged."""
    if target.exists() and target.samefile(cache.path(key)):
        return True
    try:
        await asyncio.to_thread(cache.restore, key, target, sha256=None, size=None, dimensions=size)
    except CacheEntryDamaged:
        await asyncio.to_thread(cache.discard, key)
        return False
    return True


def _as_manifest(request: Mapping[str, Any], allow_reference_outside: bool) -> Manifest:
    """The request as a one-shot manifest, checked by the manifest's rules; problems are named
    by the request's own fields. Relative reference paths are taken from the current folder, and
    a local reference must lie under it unless `allow_reference_outside` (a request may come
    from a model or a pull request as much as from the person typing it)."""
    for name in EXPANSION_FIELDS:
        if name in request:
            message = f"unknown field '{name}'; a request makes one image ({name} is a manifest's)"
            problem = ManifestProblem(REQUEST_DISPLAY, 0, 0, f"field {name}", message, field=name)
            raise ManifestError([problem], subject="the request")
    shot_fields = {"id": REQUEST_DISPLAY, **request}
    try:
        return manifest_from_data(
            {"version": 1, "name": SKILL_FOLDER, "shots": [shot_fields]},
            display=REQUEST_DISPLAY,
            base_dir=Path.cwd(),
            allow_reference_outside=allow_reference_outside,
        )
    except ManifestError as error:
        shot = f"shot {REQUEST_DISPLAY}, "
        problems = [
            replace(problem, where=problem.where.removeprefix(shot), shot=None)
            for problem in error.problems
        ]
        raise ManifestError(problems, subject="the request") from None


def _places(key: str, output: str | Path | None, environ: Mapping[str, str]) -> tuple[Path, Path]:
    """The folder whose cache serves the request, and the image file to write."""
    base = Path(environ["OUTPUT_DIR"]).expanduser() if environ.get("OUTPUT_DIR") else Path("output")
    default_folder = base / SKILL_FOLDER
    if output is None:
        return default_folder, default_folder / "images" / f"{key}.png"
    target = Path(output)
    if target.is_dir():
        raise ConfigError(f"--output {target} is a folder; give the image file's path")
    for folder in target.resolve().parents:
        if OutputFolder(folder).is_made():
            return folder, target
    return default_folder, target


def error_json(error: ImgbatchError) -> dict[str, Any]:
    """`generate --json`'s document for a request that failed: `{"error": {"type", "message",
    "status", "code", "request_id", "problems"}}`; what does not apply is null (`problems`
    lists an invalid request's fields, as `validate --json` does)."""
    provider = error if isinstance(error, ProviderError) else None
    return {
        "error": {
            "type": type(error).__name__,
            "message": str(error),
            "status": provider.status if provider else None,
            "code": provider.code if provider else None,
            "request_id": provider.request_id if provider else None,
            "problems": [problem.to_json() for problem in error.problems]
            if isinstance(error, ManifestError)
            else None,
        }
    }


def _response(
    image_url: str | None,
    width: int,
    height: int,
    seed: int | None,
    file: Path,
    request_id: str | None,
    *,
    cached: bool,
) -> dict[str, Any]:
    return {
        # A cached image was not fetched from the service now (its signed URL may have expired),
        # and an offline one never had a URL: the URL given is then the local copy's.
        "image_url": image_url if image_url and image_url.startswith("http") else file.as_uri(),
        "width": width,
        "height": height,
        "seed": seed,
        "file": str(file),
        "request_id": request_id,
        "cached": cached,
    }
