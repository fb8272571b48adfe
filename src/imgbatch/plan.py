"""Compare the shots with what was made before, and decide what each one needs.

Takes the expanded shots, the state from results.json (plus journal) and the image cache; gives a
`Plan`: one `PlannedShot` per shot in manifest order, and the orphans (shots in the results that
the manifest no longer has). Reads each file's metadata once and never an image's bytes, so a
no-op plan of thousands of shots stays fast.

    create     never generated (or failed last time): one paid request
    replace    its request changed since its image was made: one paid request, the old image
               stays in the cache so reverting the edit costs nothing
    unchanged  its image on disk matches: nothing to do
    restore    an image for this exact request is in the cache: copied into place, no request
               (checked first; a damaged entry is discarded and the image fetched or made again)
    orphan     in the results but no longer in the manifest: left on disk, listed

A plan downloads nothing, so the content of a reference URL, and with it the shot's key, is
unknown to it. When the shot's previous image was made from the same URL and nothing else
changed, the plan assumes the URL still serves what it served then, and says so in the reason
("unchanged, unless the reference URL's content changed"); otherwise it is a create or a replace
as usual. `apply` fetches every URL and plans again with the real keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from imgbatch.expand import Shot
from imgbatch.reference import ReferenceImage
from imgbatch.request import changed_fields
from imgbatch.results import ResultEntry
from imgbatch.store import ImageCache


class Action(StrEnum):
    CREATE = "create"
    REPLACE = "replace"
    UNCHANGED = "unchanged"
    RESTORE = "restore"
    ORPHAN = "orphan"


PAID_ACTIONS = frozenset({Action.CREATE, Action.REPLACE})
# What an apply would change on disk. An orphan is only listed (its file is kept), so a plan with
# orphans and nothing else has nothing to do.
WORK_ACTIONS = frozenset({Action.CREATE, Action.REPLACE, Action.RESTORE})


@dataclass(frozen=True, slots=True)
class PlannedShot:
    id: str
    action: Action
    reason: str
    shot: Shot | None
    previous: ResultEntry | None
    # For a restore: the entry that recorded the cached image's SHA-256 and size, if any.
    record: ResultEntry | None = None

    @property
    def paid(self) -> bool:
        """Whether apply would send a paid request for it: a create or replace, unless its
        reference URL could not be fetched (it then fails, unsent)."""
        reference = self.shot.request.reference if self.shot is not None else None
        return self.action in PAID_ACTIONS and (reference is None or reference.problem is None)


@dataclass(frozen=True)
class Plan:
    output_dir: Path
    shots: tuple[PlannedShot, ...]
    orphans: tuple[PlannedShot, ...]
    provider: str

    def count(self, action: Action) -> int:
        return sum(1 for item in (*self.shots, *self.orphans) if item.action is action)

    @property
    def paid_requests(self) -> int:
        return sum(1 for item in self.shots if item.paid)

    @property
    def has_work(self) -> bool:
        """Whether an apply would make or put back any image (`plan --detailed-exitcode`)."""
        return any(item.action in WORK_ACTIONS for item in self.shots)

    @property
    def has_changes(self) -> bool:
        return any(item.action is not Action.UNCHANGED for item in (*self.shots, *self.orphans))


def make_plan(
    output_dir: Path,
    shots: tuple[Shot, ...],
    state: Mapping[str, ResultEntry],
    cache: ImageCache,
    *,
    provider: str,
) -> Plan:
    records = _Records(state)
    planned = tuple(
        _plan_shot(output_dir, shot, state.get(shot.id), cache, records) for shot in shots
    )
    wanted = {shot.id for shot in shots}
    orphans = tuple(
        PlannedShot(
            entry.id, Action.ORPHAN, "no longer in the manifest; its file is kept", None, entry
        )
        for shot_id, entry in state.items()
        if shot_id not in wanted
    )
    return Plan(output_dir, planned, orphans, provider)


class _Records:
    """The entry that recorded each key's image, indexed only when a restore asks for one."""

    def __init__(self, state: Mapping[str, ResultEntry]) -> None:
        self._state = state
        self._by_key: dict[str, ResultEntry] | None = None

    def get(self, key: str, previous: ResultEntry | None) -> ResultEntry | None:
        if previous is not None and previous.key == key and _has_record(previous):
            return previous
        if self._by_key is None:
            self._by_key = {e.key: e for e in self._state.values() if _has_record(e)}
        return self._by_key.get(key)


def _has_record(entry: ResultEntry) -> bool:
    return entry.status != "failed" and entry.sha256 is not None and entry.bytes is not None


def _plan_shot(
    output_dir: Path,
    shot: Shot,
    previous: ResultEntry | None,
    cache: ImageCache,
    records: _Records,
) -> PlannedShot:
    reference = shot.request.reference
    if reference is not None and not reference.fetched:
        return _plan_unknown_content(output_dir, shot, reference, previous, cache, records)
    key = shot.request.key
    made_before = previous is not None and previous.status != "failed"
    if made_before and previous is not None and previous.key == key:
        if _file_matches(output_dir / shot.file, previous):
            return PlannedShot(shot.id, Action.UNCHANGED, "image matches", shot, previous)
    if cache.has(key):
        if previous is not None and previous.key == key:
            reason = "file missing or modified; restored from the cache"
        else:
            reason = "this exact request was made before; restored from the cache"
        return PlannedShot(
            shot.id, Action.RESTORE, reason, shot, previous, records.get(key, previous)
        )
    if made_before and previous is not None and previous.key != key and previous.request:
        changed = changed_fields(dict(previous.request), shot.request.canonical())
        reason = f"changed: {', '.join(changed)}" if changed else "request format changed"
        return PlannedShot(shot.id, Action.REPLACE, reason, shot, previous)
    if previous is None:
        reason = "new shot"
    elif previous.status == "failed" and previous.image_url and previous.key == key:
        reason = "generated last time but not downloaded; its URL is tried before paying again"
    elif previous.status == "failed":
        reason = f"failed last time: {previous.error or 'unknown error'}"
    else:
        reason = "image missing from disk and cache"
    return PlannedShot(shot.id, Action.CREATE, reason, shot, previous)


def _plan_unknown_content(
    output_dir: Path,
    shot: Shot,
    reference: ReferenceImage,
    previous: ResultEntry | None,
    cache: ImageCache,
    records: _Records,
) -> PlannedShot:
    """A shot whose reference URL is not fetched: see the module docstring."""
    if reference.problem is not None:  # apply fetched it and could not: the shot fails
        reason = f"reference_image cannot be used ({reference.problem}): fails, nothing is sent"
        return PlannedShot(shot.id, Action.CREATE, reason, shot, previous)
    known = previous.request.get("reference_sha256") if previous is not None else None
    known = known if isinstance(known, str) else None
    # The shot as it would be if the URL served what the previous image was made from.
    assumed = replace(
        shot, request=replace(shot.request, reference=ReferenceImage(known, reference.source))
    )
    if previous is not None and previous.reference_url == reference.source and known:
        planned = _plan_shot(output_dir, assumed, previous, cache, records)
        if planned.action in (Action.UNCHANGED, Action.RESTORE):
            reason = f"{planned.reason}, unless the reference URL's content changed"
            return replace(planned, reason=reason)
        return planned
    if previous is None:
        return PlannedShot(shot.id, Action.CREATE, "new shot", shot, None)
    if previous.status == "failed":
        reason = f"failed last time: {previous.error or 'unknown error'}"
        return PlannedShot(shot.id, Action.CREATE, reason, shot, previous)
    # Another URL (or one the previous run did not record): what it serves is unknown.
    others = [
        name
        for name in changed_fields(dict(previous.request), assumed.request.canonical())
        if name != "reference_sha256"
    ]
    reason = f"changed: {', '.join(['reference URL', *others])}"
    if not others:
        reason += " (nothing is paid if it serves the same content: apply fetches it to see)"
    return PlannedShot(shot.id, Action.REPLACE, reason, shot, previous)


def _file_matches(path: Path, previous: ResultEntry) -> bool:
    # Size, not a hash: a no-op plan must not read every image. A truncated or replaced file
    # almost always changes size; `apply --verify` style hashing can come later.
    try:
        return path.stat().st_size == previous.bytes
    except OSError:
        return False
