"""Shared stores: one cache of images for every process, machine, job and account using it.

Takes a store's URL (`--store`, else `IMGBATCH_STORE`, else the manifest's `output.store`) and
the environment; gives an open `SharedCache` (`layout.py`: blobs and records) with its claims
(`claims.py`). URL forms: `s3://BUCKET/PREFIX` (any S3-compatible service), `oss://BUCKET/PREFIX`
(Alibaba Cloud OSS) and a local folder (a path, or `file://`). The S3 client library is imported
only here, when a store is opened: a run without a store never loads it.

    >>> location("s3://team-images/storyboards", Path("."))
    ('s3', 'team-images', 'storyboards')
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from imgbatch.errors import ConfigError
from imgbatch.state.store.claims import lease_from
from imgbatch.state.store.layout import Record, SharedCache
from imgbatch.state.store.local import FolderStore
from imgbatch.state.store.objects import ObjectStore

__all__ = [
    "Record",
    "SharedCache",
    "choose_store",
    "chosen_store",
    "location",
    "open_shared",
    "read_only_from",
    "store_holding",
    "store_url",
]

STORE_VARIABLE = "IMGBATCH_STORE"
READ_ONLY_VARIABLE = "IMGBATCH_STORE_READ_ONLY"
BUCKET_SCHEMES = ("s3", "oss")


def choose_store(
    flag: str | None, environ: Mapping[str, str], manifest: str | None
) -> tuple[str, str] | None:
    """The store to use and where it was named (flag, environment, manifest), first wins."""
    for value, origin in (
        (flag, "--store"),
        (environ.get(STORE_VARIABLE), STORE_VARIABLE),
        (manifest, "output.store"),
    ):
        if value:
            return value, origin
    return None


def chosen_store(
    flag: str | None, environ: Mapping[str, str], manifest: str | None, manifest_dir: Path
) -> tuple[str, Path] | None:
    """The store to use (`choose_store`) and the folder a store named by a relative path is
    in: the shot list's folder (`manifest_dir`) for its `output.store`, else the working
    directory (a flag or a variable is the user's, typed where they stand). None when none is
    named."""
    chosen = choose_store(flag, environ, manifest)
    if chosen is None:
        return None
    url, origin = chosen
    return url, manifest_dir if origin == "output.store" else Path.cwd()


def read_only_from(flag: bool, environ: Mapping[str, str]) -> bool:
    """`--store-read-only`, or `IMGBATCH_STORE_READ_ONLY=1` (true, yes)."""
    return flag or environ.get(READ_ONLY_VARIABLE, "").strip().lower() in ("1", "true", "yes")


def location(url: str, base: Path) -> tuple[str, str, str] | Path:
    """(scheme, bucket, prefix) for a bucket URL; the folder for a path or `file://` URL
    (relative to `base`), canonical: absolute, with `.`, `..`, a trailing `/` and symbolic
    links resolved, so that every spelling of one folder is one store (one `image_url` in
    results.json, one store the guards compare). Links are resolved, not kept: `..` after a
    link means the link's target's parent to the system, so only a resolved path names the
    folder the user means, and two processes reaching one shared disk by two paths share one
    store. `ConfigError` for anything else, quoting the URL without what may be a secret
    (`_shown`): a folder no path can name (a link loop, `~nobody/...`, a NUL) and a URL that
    does not parse (`s3://a]b`) are such, not crashes."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in BUCKET_SCHEMES:
            return _folder(url, parts, base)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ConfigError(f"store {_shown(url)!r}: no store can be named so ({exc})") from None
    if not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(
            f"store {_shown(url)!r}: write {parts.scheme}://BUCKET/PREFIX (no credentials, "
            "query or fragment: those come from the environment)"
        )
    return parts.scheme, parts.netloc, parts.path.strip("/")


def _folder(url: str, parts: SplitResult, base: Path) -> Path:
    """`location` of a path or `file://` URL (`parts`, split from `url`)."""
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"store {_shown(url)!r}: a file:// URL names a folder on this machine"
            )
        return (base / Path(unquote(parts.path))).resolve()
    if parts.scheme and len(parts.scheme) > 1:  # a Windows drive letter is a path
        raise ConfigError(
            f"store {_shown(url)!r}: use s3://BUCKET/PREFIX, oss://BUCKET/PREFIX, or a folder"
        )
    return (base / Path(url).expanduser()).resolve()


def store_url(url: str, base: Path) -> str:
    """The URL of the store `url` names (a folder relative to `base`), as the store gives it
    and results.json's `image_url`s start with: `s3://BUCKET/PREFIX`, `oss://...`, or the
    folder's canonical `file://` URL (`location`). `ConfigError` as `location`."""
    where = location(url, base)
    if isinstance(where, Path):
        return where.as_uri()
    scheme, bucket, prefix = where
    return f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")


def store_holding(image_url: str | None) -> str | None:
    """The URL of the store a results entry's `image_url` names its blob in
    (`<store>/cas/<sha256>`), as `store_url` gives it; None for any other URL. A folder store's
    URL written before folders were canonical (`file:///w/p/../cache/cas/...`) gives today's
    (`file:///w/cache`), so a results.json from before still names its store."""
    if not image_url or "/cas/" not in image_url:
        return None
    return _canonical(image_url.rpartition("/cas/")[0])


@functools.lru_cache(maxsize=64)
def _canonical(url: str) -> str:
    # Cached: every entry of a results.json names one store or two, and a folder's is resolved
    # on disk (a few system calls each, for thousands of entries).
    try:
        return store_url(url, Path("/"))
    except ConfigError:
        return url


def _shown(url: str) -> str:
    """`url` as an error message may quote it: without a user name and password, a query or a
    fragment (a key pair or a signature pasted into the URL), each replaced by `***`; one that
    does not parse as a URL, with anything after its scheme's `//` replaced so."""
    try:
        parts = urlsplit(url)
    except ValueError:
        scheme, slashes, _ = url.partition("://")
        return f"{scheme}://***" if slashes else "***"
    user, at, host = parts.netloc.rpartition("@")
    netloc = f"***@{host}" if at else host
    return urlunsplit(
        (
            parts.scheme,
            netloc,
            parts.path,
            "***" if parts.query else "",
            "***" if parts.fragment else "",
        )
    )


def _objects(url: str, base: Path, environ: Mapping[str, str]) -> ObjectStore:
    where = location(url, base)
    if isinstance(where, Path):
        return FolderStore(where)
    try:
        from imgbatch.state.store.s3 import BucketStore  # the client library: only now
    except ImportError:
        raise ConfigError(
            f"store {url!r} needs the S3 client: pip install 'imgbatch[s3]' (aiobotocore)"
        ) from None

    return BucketStore(*where, environ)


@contextlib.asynccontextmanager
async def open_shared(
    url: str, environ: Mapping[str, str], *, read_only: bool = False, base: Path = Path(".")
) -> AsyncIterator[SharedCache]:
    """The shared cache at `url`, open for the duration (its client made in this event loop)."""
    objects = _objects(url, base, environ)
    opener = getattr(objects, "open", None)
    if opener is not None:
        await opener()
    cache = SharedCache(objects, read_only=read_only, lease=lease_from(environ))
    try:
        yield cache
    finally:
        await cache.claims.close()
        await objects.close()
