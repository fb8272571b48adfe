"""make_plan: what each shot needs, from the shots, the previous results and the image cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from imgbatch.api import ApplyOptions, apply
from imgbatch.api import make_plan as plan_manifest
from imgbatch.expand import Shot
from imgbatch.plan import Action, Plan, make_plan
from imgbatch.request import ImageRequest
from imgbatch.results import ResultEntry
from imgbatch.store import ImageCache
from tests.conftest import write_manifest

IMAGE = b"\x89PNG pretend image bytes"


def shot(shot_id: str, prompt: str = "a red bicycle", **fields: object) -> Shot:
    request = ImageRequest(prompt=prompt, size="1328*1328", provider="placeholder", **fields)
    return Shot(shot_id, request, f"{shot_id}.png")


def entry(
    made: Shot, status: str = "generated", *, data: bytes = IMAGE, error: str | None = None
) -> ResultEntry:
    """A results.json line as the executor writes it for `made`."""
    request = made.request
    failed = status == "failed"
    return ResultEntry(
        id=made.id,
        status=status,  # type: ignore[arg-type]
        file=None if failed else made.file,
        key=request.key,
        width=None if failed else 1328,
        height=None if failed else 1328,
        seed=request.seed,
        model=request.model,
        size=request.size,
        prompt=request.prompt,
        image_url=None,
        request_id=None,
        error=error,
        bytes=None if failed else len(data),
        attempts=1,
        request=request.canonical(),
    )


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "output" / "spot"


@pytest.fixture
def cache(out: Path) -> ImageCache:
    return ImageCache(out)


def place(out: Path, made: Shot, data: bytes = IMAGE) -> None:
    (out / made.file).parent.mkdir(parents=True, exist_ok=True)
    (out / made.file).write_bytes(data)


def plan_of(out: Path, shots: list[Shot], state: list[ResultEntry], cache: ImageCache) -> Plan:
    return make_plan(
        out, tuple(shots), {item.id: item for item in state}, cache, provider="placeholder"
    )


def single_action(plan: Plan) -> tuple[Action, str]:
    (item,) = plan.shots
    return item.action, item.reason


# --- one shot at a time -----------------------------------------------------------------------


def test_new_shot_is_created(out: Path, cache: ImageCache) -> None:
    new = shot("s01")
    plan = plan_of(out, [new], [], cache)

    (item,) = plan.shots
    assert (item.id, item.action, item.reason) == ("s01", Action.CREATE, "new shot")
    assert item.shot is new
    assert item.previous is None
    assert plan.orphans == ()
    assert (plan.output_dir, plan.provider) == (out, "placeholder")


def test_failed_shot_is_created_again_saying_why_it_failed(out: Path, cache: ImageCache) -> None:
    again = shot("s01")
    failed = entry(again, "failed", error="400 DataInspectionFailed: input text is unsafe")
    plan = plan_of(out, [again], [failed], cache)

    assert single_action(plan) == (
        Action.CREATE,
        "failed last time: 400 DataInspectionFailed: input text is unsafe",
    )
    assert plan.shots[0].previous is failed


def test_failed_shot_without_an_error_message(out: Path, cache: ImageCache) -> None:
    again = shot("s01")
    plan = plan_of(out, [again], [entry(again, "failed")], cache)
    assert single_action(plan) == (Action.CREATE, "failed last time: unknown error")


def test_failed_shot_whose_file_happens_to_exist_is_not_unchanged(
    out: Path, cache: ImageCache
) -> None:
    again = shot("s01")
    place(out, again)
    failed = replace(entry(again), status="failed", error="boom")
    assert single_action(plan_of(out, [again], [failed], cache))[0] is Action.CREATE


def test_failed_shot_edited_since_is_created_not_replaced(out: Path, cache: ImageCache) -> None:
    before = shot("s01", "a rude prompt")
    failed = entry(before, "failed", error="400 DataInspectionFailed: input text is unsafe")
    plan = plan_of(out, [shot("s01", "a polite prompt")], [failed], cache)

    action, reason = single_action(plan)
    assert action is Action.CREATE
    assert "DataInspectionFailed" in reason


def test_changed_request_is_replaced_naming_the_changed_fields(
    out: Path, cache: ImageCache
) -> None:
    before = shot("s01", "a red bicycle", seed=1)
    after = shot("s01", "a blue bicycle", seed=2)
    place(out, before)
    cache.put(before.request.key, IMAGE)

    plan = plan_of(out, [after], [entry(before)], cache)

    assert single_action(plan) == (Action.REPLACE, "changed: text, seed")
    assert plan.paid_requests == 1


def test_changed_style_and_size_are_named(out: Path, cache: ImageCache) -> None:
    before = shot("s01")
    after = Shot("s01", replace(before.request, style="ink", size="928*1664"), "s01.png")
    place(out, before)
    plan = plan_of(out, [after], [entry(before)], cache)
    assert single_action(plan) == (Action.REPLACE, "changed: text, size")


def test_key_format_change_alone_is_a_replace_saying_so(out: Path, cache: ImageCache) -> None:
    current = shot("s01")
    place(out, current)
    # Same canonical request, but made under an older key format: another key.
    old = replace(entry(current), key="0" * 64)
    plan = plan_of(out, [current], [old], cache)
    assert single_action(plan) == (Action.REPLACE, "request format changed")


def test_unchanged_when_the_file_on_disk_has_the_recorded_size(
    out: Path, cache: ImageCache
) -> None:
    made = shot("s01")
    place(out, made)
    previous = entry(made)
    plan = plan_of(out, [made], [previous], cache)

    assert single_action(plan) == (Action.UNCHANGED, "image matches")
    assert plan.shots[0].previous is previous
    assert plan.paid_requests == 0
    assert not plan.has_changes


def test_cached_status_counts_as_made(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    place(out, made)
    plan = plan_of(out, [made], [entry(made, "cached")], cache)
    assert single_action(plan)[0] is Action.UNCHANGED


def test_deleted_file_is_restored_from_the_cache(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    place(out, made)
    cache.put(made.request.key, IMAGE)
    state = [entry(made)]
    assert single_action(plan_of(out, [made], state, cache))[0] is Action.UNCHANGED

    (out / made.file).unlink()
    plan = plan_of(out, [made], state, cache)

    assert single_action(plan) == (
        Action.RESTORE,
        "file missing or modified; restored from the cache",
    )
    assert plan.paid_requests == 0
    assert plan.has_changes


def test_modified_file_is_restored_from_the_cache(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    place(out, made, IMAGE + b" edited in an image editor")
    cache.put(made.request.key, IMAGE)
    plan = plan_of(out, [made], [entry(made)], cache)
    assert single_action(plan) == (
        Action.RESTORE,
        "file missing or modified; restored from the cache",
    )


def test_deleted_file_not_in_the_cache_is_created(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    plan = plan_of(out, [made], [entry(made)], cache)
    assert single_action(plan) == (Action.CREATE, "image missing from disk and cache")


def test_renamed_shot_is_restored_and_its_old_id_is_an_orphan(out: Path, cache: ImageCache) -> None:
    old = shot("s01-dusk")
    place(out, old)
    cache.put(old.request.key, IMAGE)
    renamed = shot("s01-sunset")
    assert renamed.request.key == old.request.key

    plan = plan_of(out, [renamed], [entry(old)], cache)

    (item,) = plan.shots
    assert (item.id, item.action, item.reason) == (
        "s01-sunset",
        Action.RESTORE,
        "this exact request was made before; restored from the cache",
    )
    assert item.previous is None
    (orphan,) = plan.orphans
    assert (orphan.id, orphan.action, orphan.shot) == ("s01-dusk", Action.ORPHAN, None)
    assert plan.paid_requests == 0


def test_reverting_to_an_earlier_prompt_restores_its_cached_image(
    out: Path, cache: ImageCache
) -> None:
    first = shot("s01", "a red bicycle")
    second = shot("s01", "a blue bicycle")
    # Made first, then edited and made again: both images are in the cache.
    cache.put(first.request.key, IMAGE)
    cache.put(second.request.key, IMAGE + b"2")
    place(out, second, IMAGE + b"2")

    plan = plan_of(out, [first], [entry(second, data=IMAGE + b"2")], cache)

    assert single_action(plan) == (
        Action.RESTORE,
        "this exact request was made before; restored from the cache",
    )
    assert plan.shots[0].previous is not None
    assert plan.shots[0].previous.key == second.request.key


def test_orphans_are_listed_with_their_last_entry(out: Path, cache: ImageCache) -> None:
    kept = shot("s01")
    gone = shot("s02", "a helmet")
    failed_gone = shot("s03", "a bottle")
    place(out, kept)
    state = [entry(kept), entry(gone), entry(failed_gone, "failed", error="x")]

    plan = plan_of(out, [kept], state, cache)

    assert [item.id for item in plan.orphans] == ["s02", "s03"]
    for item, previous in zip(plan.orphans, state[1:], strict=True):
        assert item.action is Action.ORPHAN
        assert item.reason == "no longer in the manifest; its file is kept"
        assert item.shot is None
        assert item.previous is previous
    assert plan.count(Action.ORPHAN) == 2
    assert plan.paid_requests == 0
    assert plan.has_changes  # orphans are news, though nothing is sent


def test_plan_keeps_manifest_order_and_counts_actions(out: Path, cache: ImageCache) -> None:
    unchanged = shot("a-unchanged", "one")
    replaced_before = shot("b-replaced", "two")
    replaced = shot("b-replaced", "two, edited")
    restored = shot("c-restored", "three")
    created = shot("d-created", "four")
    failed = shot("e-failed", "five")
    place(out, unchanged)
    place(out, replaced_before)
    cache.put(restored.request.key, IMAGE)
    state = [
        entry(failed, "failed", error="500 InternalError"),
        entry(unchanged),
        entry(replaced_before),
        entry(shot("z-orphan", "six")),
    ]

    plan = plan_of(out, [unchanged, replaced, restored, created, failed], state, cache)

    assert [(item.id, item.action) for item in plan.shots] == [
        ("a-unchanged", Action.UNCHANGED),
        ("b-replaced", Action.REPLACE),
        ("c-restored", Action.RESTORE),
        ("d-created", Action.CREATE),
        ("e-failed", Action.CREATE),
    ]
    assert {action: plan.count(action) for action in Action} == {
        Action.CREATE: 2,
        Action.REPLACE: 1,
        Action.UNCHANGED: 1,
        Action.RESTORE: 1,
        Action.ORPHAN: 1,
    }
    assert plan.paid_requests == 3


def test_plan_never_reads_or_writes_the_output_folder(out: Path, cache: ImageCache) -> None:
    plan = plan_of(out, [shot("s01"), shot("s02", "x")], [], cache)
    assert plan.paid_requests == 2
    assert not out.exists()


# --- the library's make_plan on a manifest file ----------------------------------------------


MANIFEST = """\
version: 1
name: spot
provider: dashscope
defaults:
  size: "928*1664"
shots:
  - id: s01
    prompt: a red bicycle
  - id: s02
    prompt: a helmet
"""


def test_api_make_plan_on_a_fresh_manifest(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, MANIFEST)

    plan = plan_manifest(path, provider="placeholder", environ={})

    assert plan.provider == "placeholder"  # the argument wins over the manifest
    assert plan.output_dir == tmp_path / "output" / "spot"
    assert [(item.id, item.action, item.reason) for item in plan.shots] == [
        ("s01", Action.CREATE, "new shot"),
        ("s02", Action.CREATE, "new shot"),
    ]
    assert plan.paid_requests == 2
    assert not (tmp_path / "output").exists()


def test_api_make_plan_after_apply_then_edit(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, MANIFEST)
    report = apply(path, ApplyOptions(provider="placeholder", environ={}))
    assert report.ok

    settled = plan_manifest(path, provider="placeholder", environ={})
    assert [item.action for item in settled.shots] == [Action.UNCHANGED, Action.UNCHANGED]
    assert not settled.has_changes

    edited = MANIFEST.replace("a red bicycle", "a red bicycle at night").replace(
        "  - id: s02\n    prompt: a helmet\n", "  - id: s03\n    prompt: a helmet\n"
    )
    path.write_text(edited, encoding="utf-8")
    plan = plan_manifest(path, provider="placeholder", environ={})

    assert [(item.id, item.action, item.reason) for item in plan.shots] == [
        ("s01", Action.REPLACE, "changed: text"),
        ("s03", Action.RESTORE, "this exact request was made before; restored from the cache"),
    ]
    assert [(item.id, item.action) for item in plan.orphans] == [("s02", Action.ORPHAN)]
    assert plan.paid_requests == 1


# --- the record a restore is checked against --------------------------------------------------


def recorded(made: Shot, sha256: str, status: str = "generated") -> ResultEntry:
    return replace(entry(made, status), sha256=sha256)


def restore_record(
    out: Path, cache: ImageCache, wanted: Shot, state: list[ResultEntry]
) -> str | None:
    cache.put(wanted.request.key, IMAGE)
    (item,) = plan_of(out, [wanted], state, cache).shots
    assert item.action is Action.RESTORE
    return item.record.sha256 if item.record else None


def test_a_restore_is_checked_against_its_own_record(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    assert restore_record(out, cache, made, [recorded(made, "a" * 64)]) == "a" * 64


def test_a_renamed_shot_is_checked_against_the_record_its_old_id_left(
    out: Path, cache: ImageCache
) -> None:
    old = shot("s01-old")
    assert restore_record(out, cache, shot("s01-new"), [recorded(old, "b" * 64)]) == "b" * 64


def test_a_failed_entry_or_an_unrecorded_key_leaves_nothing_to_check_but_the_decode(
    out: Path, cache: ImageCache
) -> None:
    made = shot("s01")
    failed = recorded(made, "c" * 64, status="failed")
    assert restore_record(out, cache, made, [failed]) is None
    # A revert to an earlier prompt: results.json only holds the later request's record.
    later = recorded(shot("s01", "a blue bicycle"), "d" * 64)
    assert restore_record(out, cache, made, [later]) is None
