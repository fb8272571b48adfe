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
    recover    billed by an earlier run but never downloaded (`unfetched`): its URL is fetched,
               no request; only if the URL no longer works is one paid request sent, and said
    drift      its file was edited since imgbatch wrote it (its size differs from the record):
               left as it is, unless `overwrite_edited` (then restored, or made again)

A shot whose image is kept only in the shared store (its entry's `local_copy` is false: `apply
--no-local-copy`) is unchanged while `local_copies` is False: its missing file is not a reason
to fetch it. With `local_copies` it is planned as any missing file (restored: the store has it).
Such a shot that would be paid for although the run names another store, or none (`store`), is
marked `kept_in` that store: apply refuses to pay for it again (`guards.refuse_paying_for_store_
only`), and so does the plan that shows what apply would do.
    orphan     in the results but no longer in the manifest: left on disk, listed

Whether this plan decides a shot is the only place it is decided: the executor does what the
action says. A shot whose request changed while its file was edited by hand is replaced (or
restored, or created) with `move_aside` set: the edited file is renamed beside it first
(`aside_path`), never overwritten.

A plan downloads nothing, so the content of a reference URL, and with it the shot's key, is
unknown to it. When the shot's previous image was made from the same URL and nothing else
changed, the plan assumes the URL still serves what it served then, and says so in the reason
("unchanged, unless the reference URL's content changed"); otherwise it is a create or a replace
as usual. `apply` fetches every URL and plans again with the real keys.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from enum import StrEnum
from pathlib import Path

from imgbatch.manifest.reference import ReferenceImage
from imgbatch.plan.pricing import PriceList, cost
from imgbatch.providers import is_metered
from imgbatch.providers.image_url import url_expired_at
from imgbatch.shots.expand import Shot
from imgbatch.shots.request import changed_fields
from imgbatch.state.cache import ImageCache
from imgbatch.state.results import ResultEntry
from imgbatch.state.store import store_holding
from imgbatch.units.money import Cost


class Action(StrEnum):
    CREATE = "create"
    REPLACE = "replace"
    UNCHANGED = "unchanged"
    RESTORE = "restore"
    RECOVER = "recover"
    DRIFT = "drift"
    ORPHAN = "orphan"


PAID_ACTIONS = frozenset({Action.CREATE, Action.REPLACE})
# What an apply would change on disk. An orphan is only listed (its file is kept), and so is a
# drift (the edited file is kept): a plan with those and nothing else has nothing to do.
WORK_ACTIONS = frozenset({Action.CREATE, Action.REPLACE, Action.RESTORE, Action.RECOVER})
# What a hand-edited file is renamed to, beside it, when a new image must take its place.
ASIDE_MARK = ".edited"


@dataclass(frozen=True, slots=True)
class PlannedShot:
    id: str
    action: Action
    reason: str
    shot: Shot | None
    previous: ResultEntry | None
    # For a restore: the entry that recorded the cached image's SHA-256 and size, if any.
    record: ResultEntry | None = None
    # The file on disk was edited by hand and a new image will be written there: rename it
    # aside first (`aside_path`).
    move_aside: bool = False
    # A restore of an image another shot of this plan makes (the same request): it waits for
    # that shot, so the request is paid for once.
    twin_of: str | None = None
    # For a recover: the entry whose billed image is fetched, the shot's own or, for a shot
    # renamed since, the one its old id left behind.
    billed: ResultEntry | None = None
    # A shot to pay for whose image results.json keeps, for this very request, in a shared
    # store only (`apply --no-local-copy`): that store's URL, when the run names another store
    # or none. Apply refuses to pay for it again (`guards.refuse_paying_for_store_only`).
    kept_in: str | None = None

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
    # What an image costs on the endpoint this plan is for; None: not priced at all.
    prices: PriceList | None = None
    # Whether the provider this plan is for spends quota and money: the provider object's own
    # answer when the run has one, else what `imgbatch.providers.is_metered` says of its name.
    metered: bool = True
    # The shared store the run names (its URL, as `state.store.store_url` gives it), if any.
    store: str | None = None

    def count(self, action: Action) -> int:
        return sum(1 for item in (*self.shots, *self.orphans) if item.action is action)

    @property
    def paid_requests(self) -> int:
        return sum(1 for item in self.shots if item.paid)

    def cost_of(self, item: PlannedShot) -> Decimal | None:
        """What `item` is expected to cost: one image at its model's price if it needs a paid
        request (None when that price is unknown), else nothing."""
        if not item.paid or item.shot is None:
            return Decimal(0)
        return self.prices.price(item.shot.request.model) if self.prices else None

    @property
    def estimated_cost(self) -> Cost:
        """One image for each paid request, at its model's price."""
        paid = [
            item.shot.request.model for item in self.shots if item.paid and item.shot is not None
        ]
        prices = self.prices or PriceList(None, {}, "no prices")
        return cost(paid, prices)

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
    overwrite_edited: bool = False,
    now: float | None = None,
    local_copies: bool = True,
    store: str | None = None,
) -> Plan:
    """`overwrite_edited`: a file edited by hand is put back (restored or made again) instead
    of kept; `now` (seconds since the epoch) decides whether a recorded image URL has expired;
    `local_copies` False: an image kept only in the store stays there (`--no-local-copy`);
    `store`: the URL of the shared store the run names (`store_url`), None for none."""
    records = _Records(state)
    clock = time.time() if now is None else now
    planned = _pay_once(
        _plan_shot(
            output_dir,
            shot,
            state.get(shot.id),
            cache,
            records,
            overwrite_edited,
            clock,
            local_copies,
        )
        for shot in shots
    )
    planned = tuple(_kept_elsewhere(item, store, records) for item in planned)
    wanted = {shot.id for shot in shots}
    orphans = tuple(
        PlannedShot(entry.id, Action.ORPHAN, _orphan_reason(entry), None, entry)
        for shot_id, entry in state.items()
        if shot_id not in wanted
    )
    return Plan(output_dir, planned, orphans, provider, metered=is_metered(provider), store=store)


def _kept_elsewhere(item: PlannedShot, store: str | None, records: _Records) -> PlannedShot:
    """`item` marked `kept_in` the store holding its image, if it is to be paid for although
    results.json keeps that image, for this very request, in a store only (under the shot's
    id, or another's: renamed since, or a twin), and the run names another store or none
    (`store`): that store was forgotten (a new shell, a clone) or mistyped, not the image.
    Through the store that holds it, a shot to pay for is one that store lost: made again."""
    if not item.paid or item.shot is None:
        return item
    kept = records.store_only(item.shot.request.key, item.previous)
    if kept is None:
        return item
    holder = store_holding(kept.image_url)
    if holder is not None and holder == store:
        return item
    where = holder or "a store results.json does not name"
    named = f"not in {store}" if store else "which this run does not name"
    reason = f"its image is kept only in {where} (--no-local-copy), {named}: name that store"
    return replace(item, reason=reason, kept_in=where)


def _orphan_reason(entry: ResultEntry) -> str:
    if entry.has_image:
        return "no longer in the manifest; its file is kept"
    if entry.status == "unfetched":
        return (
            "no longer in the manifest; its image was billed but not downloaded, and a shot "
            "with the same request recovers it"
        )
    return "no longer in the manifest; it has no image"


def _pay_once(planned: Iterable[PlannedShot]) -> tuple[PlannedShot, ...]:
    """Shots that are the same request (same key) are paid for once: the first is made, the
    others restore its image once it is in the cache. An image already billed (a recover) is
    the one made, wherever its shot stands in the list."""
    items = tuple(planned)
    first_with_key: dict[str, str] = {}
    for item in items:
        if item.action is Action.RECOVER and item.shot is not None:
            first_with_key.setdefault(item.shot.request.key, item.id)
    result = []
    for item in items:
        # Two recovers of one image would write two stampings of it under one cache key.
        if (item.paid or item.action is Action.RECOVER) and item.shot is not None:
            key = item.shot.request.key
            twin = first_with_key.setdefault(key, item.id)
            if twin != item.id:
                reason = f"the same request as shot {twin}: its image is copied, not paid twice"
                item = replace(item, action=Action.RESTORE, reason=reason, twin_of=twin)
        result.append(item)
    return tuple(result)


class _Records:
    """The entry that recorded each key's image, indexed only when a restore asks for one."""

    def __init__(self, state: Mapping[str, ResultEntry]) -> None:
        self._state = state
        self._by_key: dict[str, ResultEntry] | None = None
        self._unfetched: dict[str, ResultEntry] | None = None
        self._store_only: dict[str, ResultEntry] | None = None

    def unfetched(self, key: str, previous: ResultEntry | None) -> ResultEntry | None:
        """The entry of an image billed for `key` but not downloaded: `previous`, else another
        id's (an orphan, once the shot is renamed)."""
        if previous is not None and previous.status == "unfetched" and previous.key == key:
            return previous
        if self._unfetched is None:
            self._unfetched = {
                e.key: e for e in self._state.values() if e.status == "unfetched" and e.image_url
            }
        return self._unfetched.get(key)

    def store_only(self, key: str, previous: ResultEntry | None) -> ResultEntry | None:
        """The entry of an image made for `key` and kept in a shared store only (`local_copy`
        false): `previous`, else another id's (renamed since, or a twin)."""
        if previous is not None and previous.local_copy is False and previous.key == key:
            return previous
        if self._store_only is None:
            self._store_only = {
                e.key: e for e in self._state.values() if e.has_image and e.local_copy is False
            }
        return self._store_only.get(key)

    def get(self, key: str, previous: ResultEntry | None) -> ResultEntry | None:
        if previous is not None and previous.key == key and _has_record(previous):
            return previous
        if self._by_key is None:
            self._by_key = {e.key: e for e in self._state.values() if _has_record(e)}
        return self._by_key.get(key)


def _has_record(entry: ResultEntry) -> bool:
    return entry.has_image and entry.sha256 is not None and entry.bytes is not None


@dataclass(frozen=True, slots=True)
class _Found:
    """What a shot's file and its previous image say, for one plan decision."""

    made: ResultEntry | None  # the previous entry, if it has an image
    on_disk: int | None  # the file's size, if it has one
    edited: bool  # the file's size is not the one imgbatch wrote
    aside: bool  # an edited file is moved aside before a new image takes its place
    note: str  # what the reason adds about that move


_NOTHING_MADE = _Found(None, None, False, False, "")


def _plan_shot(
    output_dir: Path,
    shot: Shot,
    previous: ResultEntry | None,
    cache: ImageCache,
    records: _Records,
    overwrite_edited: bool,
    now: float,
    local_copies: bool = True,
) -> PlannedShot:
    reference = shot.request.reference
    if reference is not None and not reference.fetched:
        return _plan_unknown_content(
            output_dir,
            shot,
            reference,
            previous,
            cache,
            records,
            overwrite_edited,
            now,
            local_copies,
        )
    found = _found(output_dir, shot, previous, overwrite_edited)
    return (
        _kept(shot, previous, found, overwrite_edited, local_copies)
        or _restored(shot, previous, found, cache, records)
        or _recovered(shot, previous, found, records, now)
        or _made_anew(shot, previous, found)
    )


def _found(
    output_dir: Path, shot: Shot, previous: ResultEntry | None, overwrite_edited: bool
) -> _Found:
    made = previous if previous is not None and previous.has_image else None
    if made is None:
        return _NOTHING_MADE
    # Size, not a hash: a no-op plan must not read every image, and an edit by hand (saved
    # again by an image editor) all but always changes a PNG's size. A string path: a Path
    # object per shot was a tenth of a 100,000-shot no-op plan.
    on_disk = _size(f"{output_dir}{os.sep}{shot.file}")
    edited = made.bytes is not None and on_disk is not None and on_disk != made.bytes
    if not (edited and not overwrite_edited):
        return _Found(made, on_disk, edited, False, "")
    # Only an edited file is moved aside: looking for a free name costs a stat or two.
    note = f"; edited {shot.file} is moved aside to {aside_path(output_dir / shot.file).name}"
    return _Found(made, on_disk, edited, True, note)


def _kept(
    shot: Shot,
    previous: ResultEntry | None,
    found: _Found,
    overwrite_edited: bool,
    local_copies: bool = True,
) -> PlannedShot | None:
    """Unchanged, or drift: the file keeps the shot's current image (or an edit of it), or
    the image is kept in the store only and is to stay there."""
    made = found.made
    if made is None or made.key != shot.request.key:
        return None
    if found.on_disk is not None and found.on_disk == made.bytes:
        return PlannedShot(shot.id, Action.UNCHANGED, "image matches", shot, previous)
    if found.on_disk is None and made.local_copy is False and not local_copies:
        reason = "kept in the store only (--no-local-copy), as last time"
        return PlannedShot(shot.id, Action.UNCHANGED, reason, shot, previous)
    if found.edited and not overwrite_edited:
        reason = (
            f"{shot.file} was edited since imgbatch wrote it ({found.on_disk} bytes, not "
            f"{made.bytes}): kept as it is (--overwrite-edited puts imgbatch's image back)"
        )
        return PlannedShot(shot.id, Action.DRIFT, reason, shot, previous)
    return None


def _restored(
    shot: Shot, previous: ResultEntry | None, found: _Found, cache: ImageCache, records: _Records
) -> PlannedShot | None:
    """Restore: the request's image is in the cache."""
    key = shot.request.key
    if not cache.has(key):
        return None
    if previous is not None and previous.key == key and found.edited:
        reason = "edited by hand; imgbatch's image is put back from the cache"
    elif previous is not None and previous.key == key and found.made is not None:
        reason = "file missing; restored from the cache"
    else:
        reason = "this exact request was made before; restored from the cache"
    record = records.get(key, previous)
    return PlannedShot(
        shot.id, Action.RESTORE, reason + found.note, shot, previous, record, move_aside=found.aside
    )


def _recovered(
    shot: Shot, previous: ResultEntry | None, found: _Found, records: _Records, now: float
) -> PlannedShot | None:
    """Recover: the request's image was billed and not downloaded, and its URL still works
    (a create when this shot's own URL expired)."""
    billed = records.unfetched(shot.request.key, previous)
    if billed is None:
        return None
    expired = url_expired_at(billed.image_url, now)
    # Renamed since: the image billed for its old id is the same request's.
    by = "" if billed is previous else f" (as shot {billed.id})"
    if expired is None:
        reason = (
            f"billed last time{by} but not downloaded: its URL is fetched (if it no longer "
            "works, one paid request)"
        )
        return PlannedShot(
            shot.id,
            Action.RECOVER,
            reason + found.note,
            shot,
            previous,
            move_aside=found.aside,
            billed=billed,
        )
    if billed is previous:
        reason = (
            f"billed last time but not downloaded, and its URL expired at {expired}: "
            "one paid request"
        )
        return PlannedShot(shot.id, Action.CREATE, reason, shot, previous)
    return None


def _made_anew(shot: Shot, previous: ResultEntry | None, found: _Found) -> PlannedShot:
    """Replace (the shot had another request's image) or create, with why."""
    made, note, aside = found.made, found.note, found.aside
    if made is not None and made.key != shot.request.key and made.request:
        changed = changed_fields(dict(made.request), shot.request.canonical())
        reason = f"changed: {', '.join(changed)}" if changed else "request format changed"
        return PlannedShot(shot.id, Action.REPLACE, reason + note, shot, previous, move_aside=aside)
    if previous is None:
        reason = "new shot"
    elif previous.status == "unfetched":
        reason = "changed since its image was billed but not downloaded"
    elif previous.status == "failed":
        reason = f"failed last time: {previous.error or 'unknown error'}"
    elif found.edited:
        reason = "edited by hand, and imgbatch's image is not in the cache: made again"
    else:
        reason = "image missing from disk and cache"
    return PlannedShot(shot.id, Action.CREATE, reason + note, shot, previous, move_aside=aside)


def _plan_unknown_content(
    output_dir: Path,
    shot: Shot,
    reference: ReferenceImage,
    previous: ResultEntry | None,
    cache: ImageCache,
    records: _Records,
    overwrite_edited: bool,
    now: float,
    local_copies: bool = True,
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
        planned = _plan_shot(
            output_dir, assumed, previous, cache, records, overwrite_edited, now, local_copies
        )
        if planned.action in (Action.UNCHANGED, Action.RESTORE):
            reason = f"{planned.reason}, unless the reference URL's content changed"
            return replace(planned, reason=reason)
        return planned
    if previous is None:
        return PlannedShot(shot.id, Action.CREATE, "new shot", shot, None)
    if not previous.has_image:
        reason = (
            f"failed last time: {previous.error or 'unknown error'}"
            if previous.status == "failed"
            else "changed since its image was billed but not downloaded"
        )
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


def aside_path(path: Path) -> Path:
    """Where an edited file at `path` is moved to: `<stem>.edited<suffix>` beside it, or
    `<stem>.edited-2<suffix>` and so on, the first name not taken (nothing is overwritten)."""
    number = 1
    while True:
        mark = ASIDE_MARK if number == 1 else f"{ASIDE_MARK}-{number}"
        candidate = path.with_name(f"{path.stem}{mark}{path.suffix}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
        number += 1


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None
