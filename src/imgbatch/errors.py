"""One exception tree for everything imgbatch reports to a user.

    ImgbatchError                 every error imgbatch raises on purpose; str() is the message;
                                  `exit_code` the command's exit code, `status` the HTTP status
    ├── ManifestError             a shot list that cannot be run: all problems found, each with
    │                             file:line:col, shot id and field (exit code 2)
    ├── ConfigError               bad options or environment: missing key, unknown provider (exit 2)
    │   ├── PaidImagesError       placeholders would replace images a paid provider made
    │   ├── StoreOnlyError        images kept in a store only, which the run does not name
    │   └── FolderOwnedError      the output folder is another manifest's (--force to share it)
    ├── CostLimitError            the estimated cost exceeds --max-cost: nothing sent (exit 1)
    ├── InspectError              `inspect` of a missing file, a non-PNG or a PNG without
    │                             provenance (exit 2)
    ├── LockedError               another apply holds the output folder (exit 1)
    ├── ImageError                bytes that are not a whole PNG of the size asked for (a
    │                             download, a cache entry, a file in the output folder)
    ├── StoreError                the output folder or cache cannot be read or written (exit 1)
    │   ├── StoreWriteError       one file could not be written (disk full, a folder in its place)
    │   ├── CacheEntryDamaged     a cache entry that is not its image: discarded, made again
    │   └── SharedStoreError      a shared store (--store) cannot be used: unreachable, refused,
    │       │                     or it does not refuse a second create
    │       └── SharedEntryDamaged  a shared record whose blob is missing or not its image
    └── ProviderError             the image service refused or failed a request
        ├── TransientError        408, 5xx, dropped connections: retried with backoff
        │   └── RateLimited       429: the pacer slows the model down; not a try used up
        ├── PermanentError        400 (bad parameter, moderation): that shot fails, others go on
        ├── NoImageError          a 200 without an image: asked once more, simplified
        └── AuthError             401/403: every request would fail, so the run stops

Retry decisions follow the class, never the message text; the command's exit code is the error's
`exit_code`, read by the CLI's one error boundary. No message ever contains the API key.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from imgbatch.units.quota import Quota

_OBJECT_REPR = re.compile(r"\s*<[A-Za-z_][\w.]* object at 0x[0-9a-fA-F]+>")


def without_reprs(text: str) -> str:
    """`text` with Python object reprs taken out: a library's message such as Pillow's "cannot
    identify image file <_io.BytesIO object at 0x7f...>" reads "cannot identify image file".

    >>> without_reprs("cannot identify image file <_io.BytesIO object at 0x7f90407b83b0>")
    'cannot identify image file'
    """
    return _OBJECT_REPR.sub("", text)


# The exit codes errors give (the docs list them): 1 a run that failed or stopped, 2 input that
# cannot be run (a shot list, options, credentials, an image `inspect` cannot read).
EXIT_FAILED, EXIT_USAGE = 1, 2


class ImgbatchError(Exception):
    """Base of every error imgbatch raises on purpose; its str() is meant for the user, its
    `exit_code` is the command's, its `status` the HTTP status the service answered (if any)."""

    exit_code: ClassVar[int] = EXIT_FAILED
    status: int | None = None


@dataclass(frozen=True)
class ManifestProblem:
    """One problem in a manifest, located as precisely as the YAML allows."""

    file: str
    line: int
    column: int
    where: str
    message: str
    # The same place for programs (`validate --json`): the shot's id, if the problem is in one
    # shot, and the field, dotted (`size`; `defaults.size` outside a shot).
    shot: str | None = None
    field: str | None = None

    def to_json(self) -> dict[str, str | int | None]:
        """`validate --json`'s form: line and column are null where there are no lines (data
        given as a dict, a `generate` request)."""
        located = self.line > 0
        return {
            "file": self.file,
            "line": self.line if located else None,
            "column": self.column if located else None,
            "shot": self.shot,
            "field": self.field,
            "where": self.where,
            "message": self.message,
        }

    def __str__(self) -> str:
        if self.line <= 0:  # parsed data with no lines to point at: the field says where
            return f"{self.file}: {self.where}: {self.message}"
        return f"{self.file}:{self.line}:{self.column}: {self.where}: {self.message}"


class ManifestError(ImgbatchError):
    """A manifest that cannot be run; holds every problem found, not only the first."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: Sequence[ManifestProblem], subject: str = "the manifest") -> None:
        self.problems = tuple(problems)
        self.subject = subject
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in {subject}:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class ConfigError(ImgbatchError):
    """Options, environment or credentials that keep imgbatch from starting."""

    exit_code = EXIT_USAGE


class PaidImagesError(ConfigError):
    """The offline placeholder provider, not chosen explicitly (`auto` without a key, or the
    manifest's `provider:`), would replace images a paid provider made; nothing was sent or
    written."""


class StoreOnlyError(ConfigError):
    """A run without a shared store would pay again for images results.json keeps in one only
    (`apply --no-local-copy`); nothing was sent or written."""


class FolderOwnedError(ConfigError):
    """The output folder holds another manifest's shots (two manifests with one `name:`, or one
    `output.dir`); nothing was sent or written. `--force` shares it, keeping each manifest's
    shots apart."""


class InspectError(ImgbatchError):
    """An image `imgbatch inspect` cannot read provenance from: missing, not a PNG, damaged, or
    without imgbatch's text chunks."""

    exit_code = EXIT_USAGE


class FrozenError(ImgbatchError):
    """`apply --frozen` found shots that would need a paid request; nothing was sent or written."""


class CostLimitError(ImgbatchError):
    """The estimated cost exceeds `--max-cost` (or cannot be shown to stay within it); nothing
    was sent or written."""


class LockedError(ImgbatchError):
    """Another imgbatch process is applying to the same output folder."""


class ImageError(ImgbatchError, ValueError):
    """Bytes that are not a whole PNG image of the size asked for; str() says what they are.

    A ValueError too: it is what was long raised for an image that does not decode, so code
    that fails a shot on a ValueError keeps doing so."""


class WrongImageError(ImageError):
    """Whole bytes that are not the image asked for: another format (a JPEG, an EPS, an HTML
    page) or a PNG of another size. Not damage on the way (that fails a checksum, or cuts the
    bytes short): the same URL serves the same again, so a download of them is not tried again."""


class StoreError(ImgbatchError):
    """The output folder, the cache or the results file could not be read or written."""


class ProviderError(ImgbatchError):
    """The image service answered with an error, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        # A class that stands for one status (RateLimited: 429) gives it when none is given.
        status = self.status if status is None else status
        self.status = status
        self.code = code
        self.request_id = request_id
        self.detail = message
        prefix = " ".join(str(part) for part in (status, code) if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class TransientError(ProviderError):
    """Worth retrying: throttling, timeouts, server errors, dropped connections."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        maybe_billed: bool = False,
        stated_quota: Quota | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, request_id=request_id)
        self.retry_after = retry_after
        # The request was sent and its answer lost (dropped connection, timeout): the service
        # may have made, and billed, an image that never arrived.
        self.maybe_billed = maybe_billed
        # The quota the service says the account has, if its answer said (a hint).
        self.stated_quota = stated_quota


class RateLimited(TransientError):
    """A 429: the account's quota is used up for now. The pacer slows the model down and the
    shot waits its turn again; it is not one of the shot's tries."""

    status = 429


class PermanentError(ProviderError):
    """The request itself is refused; sending it again gives the same answer."""


class NoImageError(ProviderError):
    """The service answered 200 but gave no image; the seed skill's rule is to ask once more
    with a simplified prompt."""


class AuthError(ProviderError):
    """The key is refused; every other request would be refused too."""


class StoreWriteError(StoreError):
    """A file could not be written; `disk_full` when its filesystem (or quota) is out of space."""

    def __init__(self, path: str, error: OSError, filesystem: str) -> None:
        self.path = path
        self.error = error
        self.disk_full = error.errno in _DISK_FULL
        reason = error.strerror or str(error)
        if self.disk_full:
            message = (
                f"disk full writing {path} ({reason}): free space on the filesystem "
                f"mounted at {filesystem} and run apply again"
            )
        else:
            message = f"could not write {path}: {reason}"
        super().__init__(message)


class CacheEntryDamaged(StoreError):
    """A cache entry that is not the image it should be; it is discarded, never restored."""


class SharedStoreError(StoreError):
    """A shared store (`--store`) that cannot be used as one: unreachable, credentials refused,
    or it does not refuse a second create (so it cannot coordinate processes)."""


class SharedEntryDamaged(SharedStoreError):
    """A record in a shared store whose blob is missing, or is not the image it names: reported
    apart from a miss, and never copied into place."""


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
