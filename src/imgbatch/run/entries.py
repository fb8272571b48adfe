"""The results entries a run writes for a shot, one builder per state.

Takes a `Shot` and what became of it (the `GeneratedImage`, the error, the request actually
sent); gives the `ResultEntry` for results.json and the journal: made (`shot_entry` with status
generated or cached), `failed_entry`, `unfetched_entry` (billed, not downloaded: its URL kept),
`abandoned_download`, and `with_reference_url` for an entry kept from an earlier run. Each new
outcome (an image received, a failure, a billed answer) is stamped with its time (`made_at`).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from imgbatch.errors import ProviderError
from imgbatch.shots.expand import Shot
from imgbatch.shots.request import GeneratedImage, ImageRequest
from imgbatch.state.results import WITH_IMAGE, ResultEntry


def shot_entry(
    shot: Shot,
    status: str,
    image: GeneratedImage | None,
    width: int | None,
    height: int | None,
    sha256: str | None,
    size_bytes: int | None,
    *,
    attempts: int,
    sent: ImageRequest | None = None,
) -> ResultEntry:
    request = shot.request
    sent = sent or request
    return ResultEntry(
        id=shot.id,
        status=status,  # type: ignore[arg-type]
        file=shot.file if status in WITH_IMAGE else None,
        key=request.key,
        width=width,
        height=height,
        seed=request.seed,
        model=request.model,
        size=request.size,
        prompt=request.prompt,
        image_url=image.image_url if image else None,
        request_id=image.request_id if image else None,
        negative_prompt=request.negative_prompt,
        style=request.style,
        sha256=sha256,
        bytes=size_bytes,
        attempts=attempts,
        request=request.canonical(),
        prompt_sent=sent.text,
        simplified=sent is not request,
        reference_url=request.reference.source
        if request.reference is not None and request.reference.is_url
        else None,
        # A cached image's time is not known here: it keeps its earlier entry's, where it has one.
        made_at=None if status == "cached" else made_now(),
    )


def made_now() -> str:
    """The time an entry's outcome comes (`ResultEntry.made_at`): UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def with_reference_url(entry: ResultEntry, shot: Shot | None) -> ResultEntry:
    """`entry` naming the reference URL the shot has now: the same content moved to another URL
    keeps its image, and the next plan must compare against the new URL."""
    if shot is None:
        return entry
    reference = shot.request.reference
    url = reference.source if reference is not None and reference.is_url else None
    return entry if entry.reference_url == url else replace(entry, reference_url=url)


def abandoned_download(downloading: ResultEntry) -> ResultEntry:
    """The entry of a paid image whose download was abandoned (`downloading`: the entry
    journaled before it began): its URL is kept, and the next apply fetches it before paying
    again."""
    message = (
        f"abandoned in flight while downloading its image (request "
        f"{downloading.request_id or 'unknown'}); the next apply fetches it before paying again"
    )
    return replace(downloading, error=message)


def failed_entry(
    shot: Shot,
    message: str,
    error: ProviderError | None,
    attempts: int,
    *,
    sent: ImageRequest | None = None,
) -> ResultEntry:
    """A failed shot's entry: no image, `message` says why; `sent` is the simplified request,
    when the last one sent was."""
    entry = shot_entry(shot, "failed", None, None, None, None, None, attempts=attempts, sent=sent)
    return replace(
        entry,
        **_error_fields(message, error),
        request_id=error.request_id if error else None,
    )


def unfetched_entry(
    shot: Shot,
    message: str,
    image: GeneratedImage,
    attempts: int,
    error: ProviderError | None = None,
    *,
    sent: ImageRequest | None = None,
) -> ResultEntry:
    """The entry of a shot the service made (and billed) as `image` from `sent` (the simplified
    request, when it was one), not downloaded yet: its URL is kept for the next apply's
    `recover`."""
    entry = shot_entry(
        shot, "unfetched", None, None, None, None, None, attempts=attempts, sent=sent
    )
    return replace(
        entry,
        **_error_fields(message, error),
        # The generation's request id is the one a billing query or a support ticket needs.
        request_id=image.request_id or (error.request_id if error else None),
        image_url=image.image_url,
    )


def _error_fields(message: str, error: ProviderError | None) -> dict[str, Any]:
    """`message` as the entry's error, and the provider's error as data: its code and HTTP
    status, and its own words when `message` is its answer as such (not wrapped in what the run
    adds, such as "gave up after 6 tries: ")."""
    return {
        "error": message,
        "error_code": error.code if error else None,
        "error_status": error.status if error else None,
        "error_message": error.detail if error is not None and message == str(error) else None,
    }
