"""The contact sheet: `index.html` in the output folder, to review a batch by eye and decide.

Takes the shot ids in manifest order, their results entries, what the last apply changed and
what the shot list says of each shot (variants, matrix values, picks); gives `<output>/index.html`,
a static page (styles and script inline, nothing fetched from a network, works from `file://`)
whose cards come from a data file beside it (`sheet_data`): a dense grid of thumbnails (or
detailed cards) drawn as they scroll into view, so the page stays a few kilobytes whatever the
batch. Each card has its thumbnail, id, status and marks (changed by the last apply, a placeholder
drawing, the picked take); the viewer shows the image beside its prompt, the text sent, negative
prompt, size, seed, model, status and error, and for a replaced shot its previous image (still in
the cache) to compare with. Marking cards builds the `imgbatch reroll` and `imgbatch pick`
commands (the page cannot write files).

Thumbnails are small WebP files in the output folder's state (`OutputFolder.thumb_path`), one
per image key, made once and never again (a key names one image forever). What an apply changed
is kept as the folder's last run, so `imgbatch sheet` can draw the same marks later; an apply
that changes no shot keeps them. The page is rendered by Jinja2 with autoescaping (prompts are
user text) and allows, by its Content-Security-Policy, no script but its own and the data
files beside it. It replaces only
a page it drew itself (its generator tag and digest): any other `index.html` is left as it is,
and drawing the sheet is refused with a message saying how to proceed. Thumbnails are made from
the images read as PNG only (`imgbatch.png`), never handed to another program.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from imgbatch.errors import ImageError, SharedStoreError, StoreError
from imgbatch.manifest import Manifest, load_manifest
from imgbatch.plan.decide import WORK_ACTIONS, Action, Plan
from imgbatch.png import decode_png, read_image_file
from imgbatch.review.events import Listener, RunEvent
from imgbatch.review.sheet_data import ShotInfo, page_url, shot_infos, write_data
from imgbatch.shots.expand import output_dir_for
from imgbatch.state.cache import ImageCache, atomic_write
from imgbatch.state.folder import OutputFolder
from imgbatch.state.last_run import Change, load_changes, save_changes, thumb_path
from imgbatch.state.results import STATUSES, ResultEntry
from imgbatch.state.store import SharedCache, chosen_store, open_shared, store_holding

# Jinja2 and Pillow are imported where they are used: an apply needs neither before its first
# request (the sheet is drawn at the end; images are decoded as they come).
if TYPE_CHECKING:
    import jinja2
    from PIL import Image

SHEET_FILE = "index.html"
# Bounding box of a thumbnail: a 16:9 image becomes 320*178, a WebP of a few to a few tens of KB.
THUMB_BOX = (320, 320)
THUMB_QUALITY = 80
# How long the sheet's signed links to full images kept in a store only work: a week, the
# longest an S3 signature (SigV4) may last. Links signed with temporary credentials stop sooner.
LINK_SECONDS = 7 * 24 * 3600
_STATUS_ORDER = (*STATUSES, "pending")
# What a card shows of its shot's entry; none of it for a shot not applied yet.
_DETAILS = tuple(
    "prompt text text_extra simplified negative_prompt size seed model provider style error"
    " error_code error_message request_id attempts key".split()
)
_DIGEST = re.compile(r'<meta name="imgbatch-sheet" content="([0-9a-f]{64})">')
# With the digest, how a page is known to be imgbatch's own (it replaces no other index.html).
_GENERATOR = '<meta name="generator" content="imgbatch">'
# A host (and port) as it may stand in the page's Content-Security-Policy, nothing else.
_ORIGIN_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")
_CHANGE_LABELS: dict[str, str] = {
    Action.REPLACE: "replaced",
    Action.RESTORE: "restored",
    Action.RECOVER: "recovered",
}


@dataclass(frozen=True)
class SheetLinks:
    """How the sheet opens the full images kept only in a shared store (`apply
    --no-local-copy`): a URL per image, by its SHA-256 (signed when the sheet is drawn, or a
    folder store's `file://` URL), and when the signed ones stop working (None: they do not).
    They are written into the sheet alone: it is drawn again, and they signed again, by every
    apply and by `imgbatch sheet`."""

    urls: Mapping[str, str] = field(default_factory=dict)
    expires: datetime | None = None

    def origins(self) -> list[str]:
        """The web origins of the links, which the page's policy must let it load images from."""
        found = {urlsplit(url) for url in self.urls.values()}
        return sorted(
            {
                f"{part.scheme}://{part.netloc}"
                for part in found
                if part.scheme in ("http", "https") and _ORIGIN_HOST.fullmatch(part.netloc)
            }
        )


async def signed_links(
    shared: SharedCache | None, entries: Iterable[ResultEntry], seconds: int = LINK_SECONDS
) -> SheetLinks | None:
    """The links the sheet opens the full images of `entries` kept in the store only through:
    URLs signed now for `seconds` (a folder store: its files' `file://` URLs, which do not
    expire). None without a store or such an entry; none at all if the store cannot sign. An
    entry whose `image_url` is in another store gets none (its card shows its thumbnail)."""
    if shared is None:
        return None
    # Only where this store holds the image: results.json names the store each was moved to,
    # and a link into another store (applied with another --store since) opens nothing. The
    # store compared as `store_holding` gives it: a folder's, written before folder stores were
    # canonical (`.../p/../cache/cas/...`), is still this one.
    wanted = {
        e.sha256
        for e in entries
        if e.local_copy is False
        and e.has_image
        and e.sha256
        and e.image_url
        and e.image_url.endswith(f"/cas/{e.sha256}")
        and store_holding(e.image_url) == shared.url
    }
    if not wanted:
        return None
    expires = datetime.now(UTC) + timedelta(seconds=seconds)
    try:
        urls, signed = await shared.view_links(sorted(wanted), seconds)
    except SharedStoreError:
        return SheetLinks()
    return SheetLinks(urls, expires if signed else None)


def store_links(
    manifest: Manifest,
    entries: Iterable[ResultEntry],
    flag: str | None,
    environ: Mapping[str, str] | None,
) -> SheetLinks | None:
    """`signed_links` for `imgbatch sheet`, through the store `flag`, else IMGBATCH_STORE,
    else the manifest's `output.store` (None when none is named or nothing needs one)."""
    environ = os.environ if environ is None else environ
    entries = [entry for entry in entries if entry.local_copy is False]
    chosen = chosen_store(flag, environ, manifest.store, manifest.base_dir)
    if chosen is None or not entries:
        return None
    url, base = chosen

    async def sign() -> SheetLinks | None:
        async with open_shared(url, environ, read_only=True, base=base) as shared:
            return await signed_links(shared, entries)

    return asyncio.run(sign())


def change_label(change: Change) -> str:
    """The word on a changed shot's card: new, regenerated, retried, replaced, restored..."""
    if change.action != Action.CREATE:
        return _CHANGE_LABELS.get(change.action, change.action)
    if change.previous is None:
        return "new"
    return "regenerated" if change.previous.has_image else "retried"


def changes_of(plan: Plan) -> dict[str, Change]:
    """Every shot of the plan that the apply touched (not the unchanged ones, nor those whose
    hand-edited file it kept)."""
    return {
        item.id: Change(str(item.action), item.reason, item.previous)
        for item in plan.shots
        if item.action in WORK_ACTIONS
    }


def update_after_apply(
    output_dir: Path,
    title: str,
    plan: Plan,
    entries: Sequence[ResultEntry],
    manifest: Manifest | None = None,
    links: SheetLinks | None = None,
) -> tuple[Path | None, str | None]:
    """Record what this apply changed and redraw the sheet; gives (sheet path, problem).
    `links`: how full images kept in the store only are opened (the page is then always
    drawn again, so its links are signed anew).

    Never raises: the images and results.json are what an apply is for, and a sheet that cannot
    be drawn must not fail the run; the problem is handed back to show as a warning.

    An apply that changed no shot keeps the marks of the last one that did, and leaves the page
    as it is when it already shows these shots in this order, so a no-op re-apply of thousands of
    shots costs nothing here.
    """
    sheet = output_dir / SHEET_FILE
    order = [item.id for item in plan.shots]
    by_id = {entry.id: entry for entry in entries}
    infos = shot_infos(manifest) if manifest is not None else {}
    command_path = manifest_command_path(manifest)
    try:
        finished: datetime | None
        if any(item.action in WORK_ACTIONS for item in plan.shots):
            finished = datetime.now(UTC)
            changes = changes_of(plan)
            save_changes(output_dir, changes, finished)
        elif not links and drawn_digest(sheet) == sheet_digest(
            title, order, by_id, infos, command_path
        ):
            return sheet, None
        else:  # shots removed or moved, or the page is missing or from another imgbatch
            changes, finished = load_changes(output_dir)
        path = render_sheet(
            output_dir,
            title=title,
            order=order,
            entries=by_id,
            changes=changes,
            finished_at=_readable(finished) if finished else None,
            infos=infos,
            command_path=command_path,
            links=links,
        )
    except Exception as exc:  # noqa: BLE001 - the images and results.json are already safe
        return None, f"the contact sheet {sheet} was not written: {type(exc).__name__}: {exc}"
    return path, None


def write_sheet(
    manifest_path: str | Path,
    environ: Mapping[str, str] | None = None,
    *,
    allow_reference_outside: bool = False,
    store: str | None = None,
) -> Path:
    """Draw `index.html` for a manifest's output folder from its results, without applying.

    Shots in the manifest that have no result yet show as pending. Raises `StoreError` when the
    folder has no results at all. The manifest is checked as `apply` checks it (references
    included, under the same trust rule), so the sheet never shows a list apply would refuse.
    Images kept in the shared store only are linked through URLs signed now (the store:
    `store`, else IMGBATCH_STORE, else the manifest's `output.store`).
    """
    manifest = load_manifest(manifest_path, allow_reference_outside=allow_reference_outside)
    output_dir = output_dir_for(manifest, environ)
    folder = OutputFolder(output_dir)
    state = folder.load().entries
    if not state:
        raise StoreError(
            f"no results in {output_dir} ({folder.results_path.name} is missing): "
            f"run `imgbatch apply {manifest_path}` first"
        )
    changes, finished = load_changes(output_dir)
    finished_at = _readable(finished) if finished else None
    links = store_links(manifest, state.values(), store, environ)
    try:
        return render_sheet(
            output_dir,
            title=manifest.name,
            order=[spec.id for spec in manifest.shots],
            entries=state,
            changes=changes,
            finished_at=finished_at,
            infos=shot_infos(manifest),
            command_path=manifest_command_path(manifest),
            links=links,
        )
    except OSError as exc:
        raise StoreError(f"cannot write the contact sheet in {output_dir}: {exc}") from None


def render_sheet(
    output_dir: Path,
    *,
    title: str,
    order: Sequence[str],
    entries: Mapping[str, ResultEntry],
    changes: Mapping[str, Change],
    finished_at: str | None,
    infos: Mapping[str, ShotInfo] | None = None,
    command_path: str | None = None,
    links: SheetLinks | None = None,
) -> Path:
    """Make the missing thumbnails, write the cards' data files, then `index.html` (each
    atomically, the page last); gives the page's path. `links` opens the full images kept in
    the store only (without one, such a card shows its thumbnail alone)."""
    links = links or SheetLinks()
    infos = infos or {}
    folder = OutputFolder(output_dir)
    folder.refuse_links()  # thumbnails are written under it
    cache = folder.cache
    changes = {shot_id: change for shot_id, change in changes.items() if shot_id in entries}
    thumbs = make_thumbnails(output_dir, _thumbnail_sources(output_dir, order, entries, changes))
    cards = [
        _card(output_dir, cache, shot_id, entries, changes, thumbs, links) for shot_id in order
    ]
    counts = {status: 0 for status in _STATUS_ORDER}
    for card in cards:
        counts[card["status"]] += 1
    digest = sheet_digest(title, order, entries, infos, command_path)
    # When the last apply finished is this machine's, not the folder's: it goes in the data file
    # (the folder's state), so that two runs that end with the same shots draw the same page.
    meta = {"title": title, "manifest": command_path, "page": digest, "finished_at": finished_at}
    key = "0" * 64  # any key: its place in the thumbnail's path is what is wanted
    template = _url(output_dir, thumb_path(output_dir, key))
    template = template.replace(key, "{key}").replace(f"/{key[:2]}/", "/{k2}/")
    write_data(output_dir, cards, infos, meta, template)
    script = _asset("sheet.js")
    variables = sorted({name for info in infos.values() for name in (info.values or {})})
    context = {
        "digest": digest,
        "title": title,
        "total": len(cards),
        "statuses": [(status, counts[status]) for status in _STATUS_ORDER if counts[status]],
        "changed": sum(1 for card in cards if card["change"]),
        "variants": any(info.base for info in infos.values()),
        "variables": variables,
        "links_until": _readable(links.expires) if links.expires and links.urls else None,
        "link_origins": links.origins(),
        "data_url": page_url(output_dir),
        "css": _asset("sheet.css"),
        "script": script,
        # The one inline script the page may run: a prompt that slipped past escaping could not.
        "script_hash": _csp_hash(script),
    }
    page = _environment().get_template("sheet.html.j2").render(context)
    path = output_dir / SHEET_FILE
    check_own_sheet(path)
    atomic_write(path, page.encode("utf-8"))
    return path


def _thumbnail_sources(
    output_dir: Path,
    order: Sequence[str],
    entries: Mapping[str, ResultEntry],
    changes: Mapping[str, Change],
) -> dict[str, Path]:
    """Where each image the page shows is read from for its thumbnail, by key."""
    cache = OutputFolder(output_dir).cache
    wanted: dict[str, Path] = {}
    for shot_id in order:
        entry = entries.get(shot_id)
        if entry is not None and entry.has_image:
            wanted[entry.key] = _image_source(output_dir, cache, entry)
        previous = _shown_previous(changes.get(shot_id), entry)
        if previous is not None:
            wanted[previous.key] = cache.path(previous.key)
    return wanted


def check_own_sheet(path: Path) -> None:
    """Raise `StoreError` naming `path` unless it is absent or a page imgbatch drew: a regular
    file whose head has the generator tag and the sheet's digest (a user's own index.html in an
    output folder set to `.` is never replaced)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot read {path} ({exc.strerror or exc})") from None
    if stat.S_ISREG(info.st_mode) and drawn_digest(path) and _GENERATOR in _head(path):
        return
    raise StoreError(
        f"{path} is not a contact sheet imgbatch drew, so it is left as it is: move it aside "
        "(or delete it) and run `imgbatch sheet` again, or give the shot list an output "
        "folder of its own (output.dir)"
    )


def sheet_digest(
    title: str,
    order: Sequence[str],
    entries: Mapping[str, ResultEntry],
    infos: Mapping[str, ShotInfo] | None = None,
    command_path: str | None = None,
) -> str:
    """What a page shows, in a word: the shots, their images, in order, how the shot list groups
    them and which takes it picked, drawn by this template."""
    digest = hashlib.sha256(_template_digest().encode())
    digest.update(f"{title}\n{command_path}".encode())
    infos = infos or {}
    for shot_id in order:
        entry = entries.get(shot_id)
        info = infos.get(shot_id)
        # A tuple's repr, not the dataclass's: this runs for every shot of every no-op apply.
        shown = None if info is None else tuple(getattr(info, name) for name in _INFO_FIELDS)
        digest.update(f"\n{shot_id} {entry.key if entry else '-'} {shown!r}".encode())
    return digest.hexdigest()


_INFO_FIELDS = tuple(field.name for field in dataclasses.fields(ShotInfo))


def drawn_digest(sheet: Path) -> str | None:
    """The digest a page was drawn with (in its first lines), or None."""
    match = _DIGEST.search(_head(sheet))
    return match.group(1) if match else None


def _head(sheet: Path) -> str:
    """The first 2 KiB of the page at `sheet` (never through a link, never a FIFO), or ""."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(sheet, flags)
    except OSError:
        return ""
    try:
        return os.read(fd, 2048).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


class Thumbnailer:
    """Makes an apply's thumbnails in the background as its shots finish; wraps its listener.

    A new image's thumbnail is made by the executor from the decode that verifies it
    (`write_thumbnail`), before its shot finishes, so it is found here and skipped; an image
    restored from the cache is decoded here, while the run waits on the network (at the end it
    would hold the run up). One worker, so the run's own work keeps a core.
    """

    def __init__(self, output_dir: Path, listener: Listener | None = None) -> None:
        self.output_dir = output_dir
        self.cache = OutputFolder(output_dir).cache
        self.listener = listener
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, event: RunEvent) -> None:
        if isinstance(event, ResultEntry) and event.has_image:
            self._submit(event.key)
        if self.listener is not None:
            self.listener(event)

    def _submit(self, key: str) -> None:
        if thumb_path(self.output_dir, key).is_file():
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgbatch-thumbs")
        self._pool.submit(_make_thumbnail, self.output_dir, key, self.cache.path(key))

    def close(self) -> None:
        """Drop what is still queued (the sheet makes it, several at a time) and wait for the
        one being made, so no thread outlives the apply."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def make_thumbnails(output_dir: Path, sources: Mapping[str, Path]) -> set[str]:
    """Make a thumbnail for each key that has none; gives the keys that have one now.

    Several at a time: Pillow decodes and resizes outside the GIL. An image that cannot be read
    gets no thumbnail (its card says so) rather than stopping the sheet.
    """
    missing = {
        key: source for key, source in sources.items() if not thumb_path(output_dir, key).is_file()
    }
    have = set(sources) - set(missing)
    if missing:
        workers = min(len(missing), os.cpu_count() or 1, 8)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            made = pool.map(
                lambda item: _make_thumbnail(output_dir, *item) and item[0], missing.items()
            )
            have.update(key for key in made if key)
    return have


def _make_thumbnail(output_dir: Path, key: str, source: Path) -> bool:
    # The source may be a file a pull request committed: read as a PNG only (never handed to
    # another program), its size checked in its header before it is decoded.
    try:
        with decode_png(read_image_file(source), f"the bytes of {source}") as image:
            return write_thumbnail(output_dir, key, image)
    except (ImageError, OSError, ValueError):
        return False


def write_thumbnail(output_dir: Path, key: str, image: Image.Image) -> bool:
    """Write the thumbnail of `image` (decoded already, as a PNG: an apply gives the one it
    decoded to verify a new image) as `key`'s; False when it cannot be made. `image` is
    reduced in place."""
    from PIL import Image

    try:
        # Box-reduced (`reduce`, a whole factor) to just above the size, then bilinear for what
        # is left: after the box average, Lanczos' wider window changes nothing visible at
        # this size and costs 0.6 ms more an image (2.0 against 1.4 ms for 1664*928).
        image.thumbnail(THUMB_BOX, Image.Resampling.BILINEAR, reducing_gap=1.0)
        converted = image.convert("RGBA" if image.has_transparency_data else "RGB")
        buffer = io.BytesIO()
        converted.save(buffer, format="WEBP", quality=THUMB_QUALITY, method=0)
    except (OSError, ValueError):
        return False
    try:
        atomic_write(thumb_path(output_dir, key), buffer.getvalue())
    except StoreError:
        return False  # a thumbnail is not worth a shot: the sheet makes it again, or says so
    return True


def _image_source(output_dir: Path, cache: ImageCache, entry: ResultEntry) -> Path:
    # The cache holds the image exactly as made for this key; the output file may be edited.
    cached = cache.path(entry.key)
    if cached.is_file() or not entry.file:
        return cached
    return output_dir / entry.file


def _shown_previous(change: Change | None, entry: ResultEntry | None) -> ResultEntry | None:
    """The image the shot had before the last apply, when it differs from the current one."""
    if change is None or change.previous is None or not change.previous.has_image:
        return None
    if entry is not None and entry.key == change.previous.key:
        return None
    return change.previous


def _card(
    output_dir: Path,
    cache: ImageCache,
    shot_id: str,
    entries: Mapping[str, ResultEntry],
    changes: Mapping[str, Change],
    thumbs: set[str],
    links: SheetLinks,
) -> dict[str, Any]:
    entry = entries.get(shot_id)
    change = changes.get(shot_id)
    previous = _shown_previous(change, entry)
    card: dict[str, Any] = {
        "id": shot_id,
        "status": entry.status if entry else "pending",
        "change": {"label": change_label(change), "reason": change.reason} if change else None,
        "image": None,
        "previous": None,
        **dict.fromkeys(_DETAILS),
    }
    if entry is None:
        return card
    card.update(_details(entry))
    if entry.has_image and entry.file:
        thumb = _url(output_dir, thumb_path(output_dir, entry.key)) if entry.key in thumbs else None
        href: str | None = _url(output_dir, output_dir / entry.file)
        if entry.local_copy is False:  # in the store only: its link, else the thumbnail alone
            href = links.urls.get(entry.sha256 or "") or thumb
        card["image"] = {"href": href, "thumb": thumb, **_thumb_size(entry.width, entry.height)}
    if previous is not None:
        card["previous"] = {
            "href": _url(output_dir, cache.path(previous.key)),
            "thumb": _url(output_dir, thumb_path(output_dir, previous.key))
            if previous.key in thumbs
            else None,
            "prompt": previous.prompt if previous.prompt != entry.prompt else None,
            **_thumb_size(previous.width, previous.height),
        }
    return card


def _details(entry: ResultEntry) -> dict[str, Any]:
    """What the card says of the request and its answer."""
    request = entry.request
    # What was sent: the simplified prompt after a 200 without an image, else the request's text.
    text = entry.prompt_sent or request.get("text")
    if not isinstance(text, str) or text == entry.prompt:
        text = None
    return dict(
        prompt=entry.prompt,
        text=text,
        simplified=entry.simplified,
        text_extra=_appended(entry.prompt, text),
        negative_prompt=entry.negative_prompt,
        size=entry.size.replace("*", "×"),
        seed=entry.seed,
        model=entry.model,
        provider=request.get("provider"),
        style=entry.style,
        error=entry.error,
        error_code=_error_code(entry),
        error_message=_error_message(entry),
        request_id=entry.request_id,
        attempts=entry.attempts,
        key=entry.key,
    )


def _appended(prompt: str, text: str | None) -> str | None:
    """What was added to the prompt to make the text sent (the style), shown on its own."""
    if text is None or not text.startswith(prompt):
        return None
    return text[len(prompt) :].strip()


def _csp_hash(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()


def _error_code(entry: ResultEntry) -> str | None:
    """The card's badge: the service's HTTP status and code, as the entry holds them."""
    shown = [str(part) for part in (entry.error_status, entry.error_code) if part]
    return " ".join(shown) or None


def _error_message(entry: ResultEntry) -> str | None:
    """The service's own words beside the badge, or the whole error when the run said more."""
    return entry.error_message or entry.error


def _thumb_size(width: int | None, height: int | None) -> dict[str, int | None]:
    """The thumbnail's size as Pillow makes it, known without opening it (for the layout)."""
    if not width or not height:
        return {"width": None, "height": None}
    scale = min(THUMB_BOX[0] / width, THUMB_BOX[1] / height, 1.0)
    return {"width": max(1, round(width * scale)), "height": max(1, round(height * scale))}


def _readable(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _url(output_dir: Path, path: Path) -> str:
    return quote(path.relative_to(output_dir).as_posix())


def manifest_command_path(manifest: Manifest | None) -> str | None:
    """The shot list as the commands the page builds name it: as it was given, normalised
    (`render_sheet`'s `command_path` for a manifest)."""
    if manifest is None:
        return None
    return os.path.normpath(manifest.path).replace(os.sep, "/")


@cache
def _environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("imgbatch.review", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@cache
def _template_digest() -> str:
    sources = (_asset(name) for name in ("sheet.html.j2", "sheet.css", "sheet.js"))
    return hashlib.sha256("\0".join(sources).encode()).hexdigest()


@cache
def _asset(name: str) -> str:
    source, _, _ = _environment().loader.get_source(_environment(), name)  # type: ignore[union-attr]
    return source
